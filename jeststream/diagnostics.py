"""Batch learnability: how learnable the selected sub-batch is *as a whole*, next to other draws.

JEST's claim over independent (RHO-LOSS-style) prioritisation is the joint part: the pairwise
terms should pick sub-batches whose examples teach each other. This module measures that on the
user's own run (the paper's Fig. 2). For a super-batch and its selected sub-batch A it returns the
criterion's score of A as a whole -- for the default criterion the *batch learnability*

    learnability(A) = L_learner(A) − L_reference(A)

with L the sum form of the contrastive loss over the sub-batch, pairwise terms included:
sigmoid (SigLIP) Σ_{i,j∈A} ℓ_ij = |A|·SigLipLoss(A), softmax (CLIP) Σ_{i∈A} CE_i(A) = |A|·ClipLoss(A)
(the quantities the joint sampler maximises, :mod:`jeststream.losses`) -- and the same score of two
other draws of |A| examples from the same super-batch: an independent draw
(:func:`jeststream.selection.independent_sample`, each example by its own score) and a uniform one.

Both draws use their own generator, seeded from the caller's (seed, epoch, step), never the
loader's: measuring leaves the selection unchanged. Cost: O(b²·d) per draw (the sub-batch's own
pair terms, in row tiles, nothing of size B×B), plus the independent draw's per-example scores
(O(B·d) for sigmoid; for softmax one O(B²·d) pass, as the sampler's first chunk makes).

Pure tensor code, like ``losses`` and ``selection``: no threads, no models, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from jeststream.losses import (
    Embeddings,
    SigmoidBlocks,
    clip_example_losses,
    criterion_weights,
)
from jeststream.selection import LOSSES, independent_sample

__all__ = ["BatchLearnability", "draw_seed", "measure_draws", "sub_batch_loss", "sub_batch_score"]

# Rows of the b×b sigmoid pair-loss matrix computed at once (memory O(tile·b), not O(b²)).
_ROW_TILE = 4096


class BatchLearnability(NamedTuple):
    """The criterion's score (learnability by default) of three sub-batches of one super-batch.

    Attributes:
        selected: of the yielded sub-batch (the joint draw, or whatever the loader selected).
        independent: of an independent draw of the same size (each example by its own score,
            at the loader's temperature).
        uniform: of a uniform draw of the same size.
        overlap: share of the selected examples that the independent draw holds too.
    """

    selected: float
    independent: float
    uniform: float
    overlap: float


def draw_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (e.g. the loader's seed, the epoch and the step): the
    same in every process and Python version, unlike ``hash``."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _sub(e: Embeddings, idx: Tensor) -> Embeddings:
    idx = idx.to(e.image.device)
    return Embeddings(
        e.image.index_select(0, idx), e.text.index_select(0, idx), e.logit_scale, e.logit_bias
    )


def sub_batch_loss(e: Embeddings, idx: Tensor | Sequence[int], *, loss: str = "sigmoid") -> Tensor:
    """Sum-form loss of the sub-batch ``idx`` on its own: a scalar tensor (compute dtype).

    sigmoid: Σ_{i,j∈A} ℓ_ij, which is |A| times ``open_clip.loss.SigLipLoss`` on A; softmax:
    Σ_{i∈A} [CE^{i→t}_i(A) + CE^{t→i}_i(A)] / 2, which is |A| times ``open_clip.loss.ClipLoss``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("idx is empty; a sub-batch needs at least one example")
    sub = _sub(e, idx)
    if loss == "softmax":
        return clip_example_losses(sub).sum()
    blocks = SigmoidBlocks(sub)
    n = blocks.size
    total = torch.zeros((), dtype=blocks.image.dtype, device=blocks.image.device)
    for start in range(0, n, _ROW_TILE):
        rows = torch.arange(start, min(n, start + _ROW_TILE), device=blocks.image.device)
        total = total + blocks.rows(rows).sum()
    return total


def sub_batch_score(
    learner: Embeddings | None,
    reference: Embeddings | None,
    idx: Tensor | Sequence[int],
    *,
    loss: str = "sigmoid",
    criterion: str = "learnability",
) -> float:
    """The criterion's score of the sub-batch ``idx`` as a whole: w_l·L_learner + w_r·L_ref in
    sum form (learnability = learner − reference loss for the default criterion)."""
    w_l, w_r = criterion_weights(criterion)
    total = 0.0
    for w, e, name in ((w_l, learner, "learner"), (w_r, reference, "reference")):
        if not w:
            continue
        if e is None:
            raise ValueError(f"criterion={criterion!r} needs the {name}'s embeddings, got None")
        total += w * float(sub_batch_loss(e, idx, loss=loss))
    return total


@torch.inference_mode()
def measure_draws(
    learner: Embeddings | None,
    reference: Embeddings | None,
    selected: Tensor | Sequence[int],
    *,
    loss: str = "sigmoid",
    criterion: str = "learnability",
    temperature: float = 1.0,
    seed: int | Sequence[int] = 0,
) -> BatchLearnability:
    """Score the selected sub-batch and an independent and a uniform draw of its size.

    Args:
        learner, reference: each model's :class:`Embeddings` of the whole super-batch (as the
            sampler got them).
        selected: the indices the sampler drew (k of the super-batch's B).
        loss, criterion, temperature: the sampler's; the independent draw uses the same.
        seed: an int, or ints such as (loader seed, epoch, step) mixed by :func:`draw_seed`,
            seeding the draws' own CPU generator.
    """
    selected = torch.as_tensor(selected, dtype=torch.long).reshape(-1).cpu()
    e = learner if learner is not None else reference
    if e is None:
        raise ValueError("measure_draws needs the learner's or the reference's embeddings")
    size, k = e.image.shape[0], selected.numel()
    if not 0 < k <= size:
        raise ValueError(f"selected has {k} indices for a super-batch of B={size}")
    parts = (seed,) if isinstance(seed, int) else tuple(seed)
    gen = torch.Generator(device="cpu").manual_seed(draw_seed(*parts))
    independent = independent_sample(
        learner,
        reference,
        k,
        loss=loss,
        criterion=criterion,
        temperature=temperature,
        generator=gen,
    ).cpu()
    uniform = torch.randperm(size, generator=gen)[:k]

    def score(idx: Tensor) -> float:
        return sub_batch_score(learner, reference, idx, loss=loss, criterion=criterion)

    mask = torch.zeros(size, dtype=torch.bool)
    mask[independent] = True
    return BatchLearnability(
        selected=score(selected),
        independent=score(independent),
        uniform=score(uniform),
        overlap=float(mask[selected].float().mean()),
    )
