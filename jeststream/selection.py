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

Several ranks: :func:`blocked_joint_sample` is the definition for a global super-batch split into
per-rank blocks (each block draws its own quota; after chunk 1 every block's logits are taken
against the examples selected by all blocks). One chunk loop (:func:`chunk_loop`) serves every
case; it takes the transport -- "exchange the embeddings of the examples just drawn" -- as a
function: in-process here, an all-gather in :func:`jeststream.distributed.global_joint_sample`.
This module never imports torch.distributed.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

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
    "blocked_joint_sample",
    "chunk_sizes",
    "example_scores",
    "gumbel_top_k",
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


def gumbel_top_k(
    logits: Tensor, c: int, temperature: float, generator: torch.Generator | None
) -> Tensor:
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


Exchange = Callable[[list[Tensor]], list[Tensor]]
"""The transport of the chunk loop: given the payload of the examples each local block just
drew (one [c_r, w] tensor per block), return every rank's payload in rank order."""


def _in_process(payloads: list[Tensor]) -> list[Tensor]:
    """Every block is local: the payloads already are everyone's, in rank order."""
    return payloads


class Block:
    """One rank's side of the chunk loop: its candidates, its chunk sizes and its running
    conditional logits. ``payload(new)`` is what the other ranks need of the examples it just
    drew; ``fold(everyone, me)`` folds every rank's newest chunk (``everyone[me]`` is its own)
    into the logits. Built by :func:`embedding_block`; run by :func:`chunk_loop`."""

    def __init__(
        self,
        first_logits: Tensor,
        sizes: list[int],
        temperature: float,
        generator: torch.Generator | None,
    ) -> None:
        self.logits = first_logits
        self.sizes = sizes
        self.temperature = temperature
        self.generator = generator
        self.selected = torch.zeros(
            first_logits.shape[0], dtype=torch.bool, device=first_logits.device
        )
        self.drawn: list[Tensor] = []

    def draw(self, j: int) -> Tensor:
        new = gumbel_top_k(
            self.logits.masked_fill(self.selected, -math.inf),
            self.sizes[j],
            self.temperature,
            self.generator,
        )
        self.selected[new] = True
        self.drawn.append(new)
        return new

    def payload(self, new: Tensor) -> Tensor:  # pragma: no cover -- abstract
        raise NotImplementedError

    def fold(self, everyone: list[Tensor], me: int) -> None:  # pragma: no cover -- abstract
        raise NotImplementedError

    def result(self) -> Tensor:
        return torch.cat(self.drawn)


def chunk_loop(
    blocks: list[Block], ranks: list[int], n_chunks: int, exchange: Exchange = _in_process
) -> list[Tensor]:
    """The chunk loop, once for every transport: each block draws its chunk, the payloads of
    what was drawn are exchanged, every block folds everyone's chunk into its logits. Nothing
    is exchanged after the last chunk. ``ranks[i]`` is block i's position in ``exchange``'s
    answer."""
    for j in range(n_chunks):
        new = [b.draw(j) for b in blocks]
        if j + 1 == n_chunks:
            break
        everyone = exchange([b.payload(x) for b, x in zip(blocks, new)])
        for b, me in zip(blocks, ranks):
            b.fold(everyone, me)
    return [b.result() for b in blocks]


def _fold(running: Tensor, rows: Tensor, cols: Tensor) -> None:
    """running += Σ_{i∈new} S_i· + Σ_{i∈new} S_·i. Shared by both paths so they round alike."""
    running += rows.sum(dim=0) + cols.sum(dim=1)


class _MatrixBlock(Block):
    """A materialised score matrix; one block only (the payload is the drawn indices)."""

    def __init__(self, s: Tensor, sizes, temperature, generator) -> None:
        self.s = s
        self.diag = s.diagonal().clone()
        self.running = torch.zeros_like(self.diag)
        super().__init__(self.diag, sizes, temperature, generator)

    def payload(self, new: Tensor) -> Tensor:
        return new

    def fold(self, everyone: list[Tensor], me: int) -> None:
        new = everyone[me]
        _fold(self.running, self.s.index_select(0, new), self.s.index_select(1, new))
        self.logits = self.diag + self.running


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
    block = _MatrixBlock(s, chunk_sizes(k, n_chunks), temperature, generator)
    return chunk_loop([block], [0], n_chunks)[0]


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


class _EmbeddingBlock(Block):
    """A super-batch given by each model's embeddings. The payload of drawn examples is their
    embeddings (image then text, learner then reference, only the models the criterion
    weighs), unscaled and in the compute dtype, side by side in one [c, w] tensor."""

    def __init__(self, learner, reference, w_l, w_r, first, sizes, temperature, generator):
        super().__init__(first, sizes, temperature, generator)
        self.w_l, self.w_r = w_l, w_r
        self.models = [e for e, w in ((learner, w_l), (reference, w_r)) if w]
        self.dtypes = [compute_dtype(e.image.dtype) for e in self.models]
        self.widths = [e.image.shape[1] for e in self.models]
        dtype = self.dtypes[0]
        for d in self.dtypes[1:]:
            dtype = torch.promote_types(dtype, d)
        self.payload_dtype = dtype

    @property
    def payload_width(self) -> int:
        return 2 * sum(self.widths)

    def payload(self, new: Tensor) -> Tensor:
        parts = []
        for e in self.models:
            for t in (e.image, e.text):
                t = t.detach().to(device=self.logits.device)
                parts.append(t.index_select(0, new.to(t.device)).to(self.payload_dtype))
        return torch.cat(parts, dim=1)

    def unpack(self, members: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The inverse of :meth:`payload` for any rank's rows: per model, (image, text)."""
        out, at = [], 0
        for d, dtype in zip(self.widths, self.dtypes):
            image = members[:, at : at + d].to(dtype).contiguous()
            text = members[:, at + d : at + 2 * d].to(dtype).contiguous()
            out.append((image, text))
            at += 2 * d
        return out

    def _per_model(self, parts: list) -> tuple:
        """(learner's, reference's) entries of a per-used-model list; None where unweighted."""
        it = iter(parts)
        return (next(it) if self.w_l else None), (next(it) if self.w_r else None)


class _SigmoidBlock(_EmbeddingBlock):
    def __init__(self, learner, reference, w_l, w_r, first, sizes, temperature, generator):
        self.blocks_l = SigmoidBlocks(learner) if w_l else None
        self.blocks_r = SigmoidBlocks(reference) if w_r else None
        if first is None:
            first = _combine(
                w_l, w_r, lambda: self.blocks_l.diagonal(), lambda: self.blocks_r.diagonal()
            )
        self.diag = first
        self.running = torch.zeros_like(first)
        super().__init__(learner, reference, w_l, w_r, first, sizes, temperature, generator)

    def fold(self, everyone: list[Tensor], me: int) -> None:
        # Every rank's newest chunk, own included: S_im + S_mi for all of them. One matmul per
        # model per direction; the own chunk's diagonal entries sit at selected (masked)
        # candidates, and no other rank's example is a candidate here, so no positive-pair
        # fix-up is needed.
        members = everyone[0] if len(everyone) == 1 else torch.cat(everyone)
        part_l, part_r = self._per_model(self.unpack(members))
        rows = _combine(
            self.w_l,
            self.w_r,
            lambda: self.blocks_l.member_rows(part_l[0]),
            lambda: self.blocks_r.member_rows(part_r[0]),
        )
        cols = _combine(
            self.w_l,
            self.w_r,
            lambda: self.blocks_l.member_cols(part_l[1]),
            lambda: self.blocks_r.member_cols(part_r[1]),
        )
        _fold(self.running, rows, cols)
        self.logits = self.diag + self.running


class _SoftmaxBlock(_EmbeddingBlock):
    def __init__(self, learner, reference, w_l, w_r, first, sizes, temperature, generator):
        if first is None:
            first = _combine(
                w_l,
                w_r,
                lambda: clip_example_losses(learner),
                lambda: clip_example_losses(reference),
            )
        self.gain_l = SoftmaxGain(learner) if w_l else None
        self.gain_r = SoftmaxGain(reference) if w_r else None
        super().__init__(learner, reference, w_l, w_r, first, sizes, temperature, generator)

    def fold(self, everyone: list[Tensor], me: int) -> None:
        # Own examples join A by index; the other ranks' by their embeddings (external
        # members), so that their row and column normalisers count too.
        others = [p for rank, p in enumerate(everyone) if rank != me]
        ext_l = ext_r = None
        if others:
            ext_l, ext_r = self._per_model(self.unpack(torch.cat(others)))
        new = self.drawn[-1]

        def term(gain: SoftmaxGain, external) -> Tensor:
            gain.add(new, external)
            return gain.gains()

        self.logits = _combine(
            self.w_l,
            self.w_r,
            lambda: term(self.gain_l, ext_l),
            lambda: term(self.gain_r, ext_r),
        )


def embedding_block(
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
) -> _EmbeddingBlock:
    """Validate one rank's inputs and build its :class:`Block` (the chunk loop's state)."""
    n, w_l, w_r = _check_models(learner, reference, loss, criterion)
    k = _check_k(k, n, n_chunks)
    temperature = _check_temperature(temperature)
    if learner is not None:
        learner = Embeddings(*learner)
    if reference is not None:
        reference = Embeddings(*reference)
    if own_scores is not None:
        if not isinstance(own_scores, Tensor) or tuple(own_scores.shape) != (n,):
            raise ValueError(
                f"own_scores must be a [B={n}] tensor from example_scores(), got "
                f"{tuple(own_scores.shape) if isinstance(own_scores, Tensor) else own_scores!r}"
            )
        _check_finite(own_scores, "own_scores")
        device, dtype = _device_dtype(learner, reference)
        own_scores = own_scores.to(device=device, dtype=dtype)
    cls = _SigmoidBlock if loss == "sigmoid" else _SoftmaxBlock
    return cls(
        learner, reference, w_l, w_r, own_scores, chunk_sizes(k, n_chunks), temperature, generator
    )


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

    This is :func:`blocked_joint_sample` with one block.

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
    block = embedding_block(
        learner,
        reference,
        k,
        loss=loss,
        criterion=criterion,
        n_chunks=n_chunks,
        temperature=temperature,
        generator=generator,
        own_scores=own_scores,
    )
    return chunk_loop([block], [0], n_chunks)[0]


def _as_list(x, w: int, name: str) -> list:
    if x is None:
        return [None] * w
    if isinstance(x, (list, tuple)) and not isinstance(x, Embeddings):
        if len(x) != w:
            raise ValueError(f"{name} has {len(x)} entries but there are {w} blocks (ranks)")
        return list(x)
    raise TypeError(f"{name} must be a list with one entry per block (rank), got {type(x)}")


def blocked_joint_sample(
    learners: Sequence[Embeddings | None] | None,
    references: Sequence[Embeddings | None] | None,
    ks: Sequence[int],
    *,
    loss: str = "sigmoid",
    criterion: str = "learnability",
    n_chunks: int = 16,
    temperature: float = 1.0,
    generators: Sequence[torch.Generator | None] | None = None,
) -> list[Tensor]:
    """Joint selection from one global super-batch split into per-rank blocks, in one process.

    The definition that :func:`jeststream.distributed.global_joint_sample` computes across
    processes. Block r holds B_r examples and draws exactly ``ks[r]`` of its own, in
    ``chunk_sizes(ks[r], n_chunks)`` chunks. Chunk 1: each block draws by its own examples'
    scores (sigmoid: S_mm; softmax: each example's CLIP loss against its *own* block, the
    super-batch its rank holds). Chunk j > 1: every candidate's conditional logit is taken
    against the examples selected so far by **all** blocks, A (sigmoid: S_mm + Σ_{i∈A}(S_im +
    S_mi), with S over the concatenated super-batch; softmax: the exact gain L(A ∪ {m}) − L(A)
    of the sum-form CLIP loss), and each block draws its chunk from its own candidates
    (Gumbel-top-c, −inf masking, one ``torch.rand([B_r])`` per chunk from ``generators[r]``).

    With one block this is :func:`joint_sample_from_embeddings`, index for index.

    Args:
        learners, references: per block :class:`Embeddings` (a list, or None for all-None as
            the criterion allows); all blocks use the same models and embedding width.
        ks: per-block quotas k_r (1 <= n_chunks <= k_r <= B_r).
        loss, criterion, n_chunks, temperature: as in :func:`joint_sample_from_embeddings`.
        generators: one torch.Generator (or None) per block.

    Returns:
        One LongTensor[k_r] per block: its local indices, in draw order.
    """
    if isinstance(ks, int) or not isinstance(ks, Sequence) or not ks:
        raise TypeError(f"ks must be a non-empty list of per-block quotas, got {ks!r}")
    w = len(ks)
    learners = _as_list(learners, w, "learners")
    references = _as_list(references, w, "references")
    generators = _as_list(generators, w, "generators")
    blocks = []
    for r in range(w):
        try:
            blocks.append(
                embedding_block(
                    learners[r],
                    references[r],
                    ks[r],
                    loss=loss,
                    criterion=criterion,
                    n_chunks=n_chunks,
                    temperature=temperature,
                    generator=generators[r],
                )
            )
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"block {r}: {exc}") from None
    spec = {(b.payload_width, b.payload_dtype, tuple(b.widths)) for b in blocks}
    if len(spec) > 1:
        raise ValueError(
            f"the blocks' embeddings differ in width or dtype ({sorted(map(str, spec))}); every "
            "rank must score with the same models"
        )
    if len({b.logits.device for b in blocks}) > 1:
        raise ValueError("the blocks' embeddings are on different devices; move them to one")
    return chunk_loop(blocks, list(range(w)), n_chunks)


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
    return gumbel_top_k(scores, k, temperature, generator)


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
