"""The joint example selection sampler (Evans et al. 2024, Algorithm 1) and its baselines.

Given a score matrix S (for JEST, S = learner pair losses − reference pair losses, so that
Σ_{i,j∈A} S_ij is the learnability of the sub-batch A in sum form), draw k of the B examples in
n_chunks chunks. Chunk 1 samples by the examples' own scores S_mm. Every later chunk samples the
unselected candidates m by the *conditional* score of adding m to everything selected so far,

    logit_m = S_mm + Σ_{i∈A} (S_im + S_mi),

c_j of them without replacement with probability ∝ exp(logit / temperature) — done with the
Gumbel-top-c trick, which is exactly sequential sampling without replacement. Selected
candidates are masked with −inf; ``temperature=0`` is greedy (top-c, ties to the lower index).

The running vector Σ_{i∈A}(S_i· + S_·i) is updated with each new chunk's rows and columns only,
so after S the sampler does O(B·k) work. :func:`joint_sample_from_embeddings` never builds S: it
computes the diagonal and then, per chunk, exactly the rows and columns it needs straight from
the embeddings (peak extra memory O(B·d + B·k/n_chunks)). With the softmax (CLIP) loss, which
has no pairwise form, the logits are the exact conditional gains of
:class:`jeststream.losses.SoftmaxGain`.

Randomness: every chunk of a sampled (temperature > 0) draw consumes one ``torch.rand`` of shape
[B] from ``generator``, whatever the path, so the matrix and the embeddings paths return the same
indices for the same generator state.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

from jeststream.losses import (
    Embeddings,
    SigmoidBlocks,
    SoftmaxGain,
    clip_example_losses,
    compute_dtype,
    criterion_weights,
    sigmoid_pair_loss_diagonal,
)

__all__ = [
    "LOSSES",
    "chunk_sizes",
    "example_scores",
    "independent_sample",
    "joint_sample",
    "joint_sample_from_embeddings",
    "topk_sample",
]

LOSSES = ("sigmoid", "softmax")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_k(k: int, n: int, n_chunks: int | None = None) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k={k!r} must be an int (the number of examples to select)") from None
    if k <= 0 or k > n:
        raise ValueError(f"k={k} must satisfy 0 < k <= B={n} (the super-batch size)")
    if n_chunks is not None:
        try:
            n_chunks = operator.index(n_chunks)
        except TypeError:
            raise TypeError(f"n_chunks={n_chunks!r} must be an int") from None
        if n_chunks < 1 or n_chunks > k:
            raise ValueError(
                f"n_chunks={n_chunks} must satisfy 1 <= n_chunks <= k={k}; every chunk draws at "
                "least one example"
            )
    return k


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(
            f"temperature={temperature} must be a finite number >= 0 (0 means greedy top-k)"
        )
    return temperature


def _check_finite(t: Tensor, what: str) -> None:
    # Fast path: one read-only pass. A finite sum implies finite entries (NaN or ±inf in any
    # entry makes the sum NaN or ±inf); only a non-finite sum, possibly a mere overflow, counts.
    if bool(torch.isfinite(t.sum())):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(
            f"{what} contain {bad} NaN/inf entr{'y' if bad == 1 else 'ies'} (of {t.numel()}); "
            "refusing to turn them into sampling probabilities — check the models' outputs"
        )


def _check_embeddings(e: Embeddings, name: str) -> int:
    if not isinstance(e, tuple) or len(e) not in (3, 4):
        raise TypeError(f"{name} must be an Embeddings(image, text, logit_scale, logit_bias)")
    e = Embeddings(*e)
    for field in ("image", "text"):
        if not isinstance(getattr(e, field), Tensor):
            raise TypeError(f"{name}.{field} must be a torch.Tensor, got {type(getattr(e, field))}")
    if e.image.dim() != 2 or e.image.shape != e.text.shape:
        raise ValueError(
            f"{name}.image {tuple(e.image.shape)} and {name}.text {tuple(e.text.shape)} must both "
            "be [B, d] with the same shape"
        )
    if not e.image.is_floating_point() or not e.text.is_floating_point():
        raise TypeError(f"{name} embeddings must be floating point, got {e.image.dtype}")
    for field in ("logit_scale", "logit_bias"):
        value = getattr(e, field)
        if value is not None and torch.as_tensor(value).numel() != 1:
            raise ValueError(f"{name}.{field} must be a scalar, got shape {tuple(value.shape)}")
    _check_finite(e.image, f"{name}.image")
    _check_finite(e.text, f"{name}.text")
    _check_finite(torch.as_tensor(e.logit_scale), f"{name}.logit_scale")
    if e.logit_bias is not None:
        _check_finite(torch.as_tensor(e.logit_bias), f"{name}.logit_bias")
    return e.image.shape[0]


def _check_models(
    learner: Embeddings | None, reference: Embeddings | None, loss: str, criterion: str
) -> tuple[int, float, float]:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
    w_learner, w_reference = criterion_weights(criterion)
    if learner is None and w_learner:
        raise ValueError(
            f"criterion={criterion!r} needs the learner's embeddings; learner=None only works "
            "with criterion='easy_reference'"
        )
    if reference is None and w_reference:
        raise ValueError(
            f"criterion={criterion!r} needs a reference model; pass reference embeddings or "
            "use criterion='hard_learner'"
        )
    n = None if learner is None else _check_embeddings(learner, "learner")
    if reference is not None:
        n_ref = _check_embeddings(reference, "reference")
        if n is not None and n_ref != n:
            raise ValueError(f"learner has B={n} examples but reference has B={n_ref}")
        n = n_ref
    return n, w_learner, w_reference


def _device_dtype(learner: Embeddings | None, reference: Embeddings | None):
    """Where the selection runs: the learner embeddings' device (the reference's without one)."""
    image = (learner if learner is not None else reference).image
    return image.device, compute_dtype(image.dtype)


# ---------------------------------------------------------------------------------------------
# The chunked sampler
# ---------------------------------------------------------------------------------------------


def chunk_sizes(k: int, n_chunks: int) -> list[int]:
    """Split k into n_chunks sizes as evenly as possible, larger chunks first."""
    base, extra = divmod(k, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


def _draw(logits: Tensor, c: int, temperature: float, generator: torch.Generator | None) -> Tensor:
    """c distinct indices, in draw order, ∝ exp(logits / temperature) without replacement.

    Gumbel-top-c: argsort of logits/T + Gumbel noise is a sample of sequential draws without
    replacement. We rank logits + T·Gumbel instead (same order, no overflow for tiny T).
    Masked entries are −inf and stay last.
    """
    if temperature == 0:
        # Stable sort: equal logits keep index order, so ties go to the lower index.
        return torch.sort(logits, descending=True, stable=True).indices[:c]
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], generator=generator, device=device, dtype=logits.dtype)
    u = u.to(logits.device).clamp_(min=torch.finfo(logits.dtype).tiny)
    keys = logits + temperature * -torch.log(-torch.log(u))
    return torch.topk(keys, c).indices


def _chunked_sample(
    first_logits: Tensor,
    k: int,
    n_chunks: int,
    temperature: float,
    generator: torch.Generator | None,
    next_logits: Callable[[Tensor], Tensor],
) -> Tensor:
    """Run the chunk loop. ``next_logits(new)`` folds the newest chunk into A and returns the
    conditional logits of every candidate; it is never called after the last chunk."""
    n = first_logits.shape[0]
    selected = torch.zeros(n, dtype=torch.bool, device=first_logits.device)
    drawn: list[Tensor] = []
    logits = first_logits
    for j, c in enumerate(chunk_sizes(k, n_chunks)):
        if j:
            logits = next_logits(drawn[-1])
        new = _draw(logits.masked_fill(selected, -math.inf), c, temperature, generator)
        selected[new] = True
        drawn.append(new)
    return torch.cat(drawn)


def _fold(running: Tensor, rows: Tensor, cols: Tensor) -> None:
    """running += Σ_{i∈new} S_i· + Σ_{i∈new} S_·i. Shared by both paths so they round alike."""
    running += rows.sum(dim=0) + cols.sum(dim=1)


def joint_sample(
    scores: Tensor,
    k: int,
    *,
    n_chunks: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Joint example selection from a materialised score matrix.

    Args:
        scores: [B, B] pairwise scores S (higher = more wanted), e.g. learner − reference
            sigmoid pair losses.
        k: number of examples to draw (the sub-batch size b).
        n_chunks: number of chunks (the paper uses 16); 1 <= n_chunks <= k.
        temperature: softmax temperature of the draws; 0 = greedy.
        generator: torch.Generator for the Gumbel noise (one torch.rand([B]) per chunk).

    Returns:
        LongTensor[k] of distinct indices in [0, B), in draw order.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores)}")
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square [B, B] matrix, got shape {tuple(scores.shape)}")
    n = scores.shape[0]
    k = _check_k(k, n, n_chunks)
    temperature = _check_temperature(temperature)
    _check_finite(scores, "scores")
    s = scores.to(compute_dtype(scores.dtype))
    diag = s.diagonal().clone()
    running = torch.zeros_like(diag)

    def next_logits(new: Tensor) -> Tensor:
        _fold(running, s.index_select(0, new), s.index_select(1, new))
        return diag + running

    return _chunked_sample(diag, k, n_chunks, temperature, generator, next_logits)


def _combine(
    w_learner: float,
    w_reference: float,
    learner_term: Callable[[], Tensor],
    reference_term: Callable[[], Tensor],
) -> Tensor:
    """w_l·learner + w_r·reference for w ∈ {0, ±1}, computing only the terms that count."""
    if w_learner and w_reference:
        out = learner_term()
        return out.sub_(reference_term().to(out.device))
    if w_learner:
        return learner_term()
    return reference_term().neg_()


def example_scores(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    loss: str = "sigmoid",
    criterion: str = "learnability",
) -> Tensor:
    """Each example's score on its own under ``criterion``: [B].

    sigmoid: the diagonal S_mm (the positive pair's loss); softmax: each example's CLIP loss
    against the whole super-batch (:func:`jeststream.losses.clip_example_losses`). For the
    default criterion that is learner loss minus reference loss.
    """
    _, w_l, w_r = _check_models(learner, reference, loss, criterion)
    per_example = sigmoid_pair_loss_diagonal if loss == "sigmoid" else clip_example_losses
    return _combine(w_l, w_r, lambda: per_example(learner), lambda: per_example(reference))


def joint_sample_from_embeddings(
    learner: Embeddings | None,
    reference: Embeddings | None,
    k: int,
    *,
    loss: str = "sigmoid",
    criterion: str = "learnability",
    n_chunks: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    own_scores: Tensor | None = None,
) -> Tensor:
    """Joint example selection straight from embeddings, without any B×B matrix.

    sigmoid: computes the diagonal, then per chunk the chunk's rows and columns of each model's
    pair-loss matrix (one matmul per model per direction) and folds them into the running
    conditional scores. Returns the same indices as :func:`joint_sample` on the materialised
    ``criterion`` matrix for the same generator state.

    softmax: chunk 1 scores each candidate by its CLIP loss against the whole super-batch (a
    singleton's CLIP loss is 0, so the conditional gain given an empty set carries no
    information); later chunks use the exact conditional gain of the sum-form CLIP loss,
    L(A ∪ {m}) − L(A), per model (:class:`jeststream.losses.SoftmaxGain`).

    Args:
        learner, reference: each model's :class:`Embeddings` of the super-batch; reference may be
            None with ``criterion="hard_learner"``, learner with ``criterion="easy_reference"``.
        k, n_chunks, temperature, generator: as in :func:`joint_sample`.
        loss: "sigmoid" (SigLIP) or "softmax" (CLIP).
        criterion: "learnability" (learner − reference), "hard_learner" or "easy_reference".
        own_scores: optional [B], :func:`example_scores` of the same inputs when the caller
            has it already. It is the first chunk's logits, so passing it saves computing them
            again (for softmax a whole O(B²·d) pass); the indices are the same either way.

    Returns:
        LongTensor[k] of distinct indices in draw order, on the learner embeddings' device (the
        reference's when learner is None).
    """
    n, w_l, w_r = _check_models(learner, reference, loss, criterion)
    k = _check_k(k, n, n_chunks)
    temperature = _check_temperature(temperature)
    if own_scores is not None:
        if not isinstance(own_scores, Tensor) or tuple(own_scores.shape) != (n,):
            raise ValueError(
                f"own_scores must be a [B={n}] tensor from example_scores(), got "
                f"{tuple(own_scores.shape) if isinstance(own_scores, Tensor) else own_scores!r}"
            )
        _check_finite(own_scores, "own_scores")
        device, dtype = _device_dtype(learner, reference)
        own_scores = own_scores.to(device=device, dtype=dtype)

    if loss == "sigmoid":
        blocks_l = SigmoidBlocks(learner) if w_l else None
        blocks_r = SigmoidBlocks(reference) if w_r else None
        diag = own_scores
        if diag is None:
            diag = _combine(w_l, w_r, lambda: blocks_l.diagonal(), lambda: blocks_r.diagonal())
        running = torch.zeros_like(diag)

        def next_logits(new: Tensor) -> Tensor:
            # One matmul per model per direction. The diagonal entries of these blocks sit at
            # selected (masked) candidates, so the positive-pair fix-up is skipped.
            rows = _combine(
                w_l,
                w_r,
                lambda: blocks_l.rows(new, exact_diagonal=False),
                lambda: blocks_r.rows(new, exact_diagonal=False),
            )
            cols = _combine(
                w_l,
                w_r,
                lambda: blocks_l.cols(new, exact_diagonal=False),
                lambda: blocks_r.cols(new, exact_diagonal=False),
            )
            _fold(running, rows, cols)
            return diag + running

        return _chunked_sample(diag, k, n_chunks, temperature, generator, next_logits)

    first = own_scores
    if first is None:
        first = _combine(
            w_l, w_r, lambda: clip_example_losses(learner), lambda: clip_example_losses(reference)
        )
    gain_l = SoftmaxGain(learner) if w_l else None
    gain_r = SoftmaxGain(reference) if w_r else None

    def softmax_logits(new: Tensor) -> Tensor:
        def term(gain: SoftmaxGain) -> Tensor:
            gain.add(new)
            return gain.gains()

        return _combine(w_l, w_r, lambda: term(gain_l), lambda: term(gain_r))

    return _chunked_sample(first, k, n_chunks, temperature, generator, softmax_logits)


def independent_sample(
    learner: Embeddings | None,
    reference: Embeddings | None,
    k: int,
    *,
    loss: str = "sigmoid",
    criterion: str = "learnability",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Baseline: sample k examples by their own scores alone (RHO-LOSS style), ∝ exp(s/T)
    without replacement (Gumbel-top-k, one torch.rand([B]) draw); ``temperature=0`` is top-k."""
    scores = example_scores(learner, reference, loss=loss, criterion=criterion)
    k = _check_k(k, scores.shape[0])
    temperature = _check_temperature(temperature)
    return _draw(scores, k, temperature, generator)


def topk_sample(
    learner: Embeddings | None,
    reference: Embeddings | None,
    k: int,
    *,
    loss: str = "sigmoid",
    criterion: str = "learnability",
) -> Tensor:
    """Baseline: the k examples with the highest own scores (ties to the lower index)."""
    return independent_sample(
        learner, reference, k, loss=loss, criterion=criterion, temperature=0.0
    )
