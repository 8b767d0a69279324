"""Pairwise contrastive-loss terms from embeddings — the quantities JEST scores sub-batches with.

Notation follows Evans et al. 2024 ("Data curation via joint example selection further
accelerates multimodal learning", arXiv 2406.17711). A super-batch holds B image-text pairs with
L2-normalised embeddings x_i (image) and y_j (text), a temperature t (``logit_scale``, already
exponentiated) and an optional bias β; the pair logit is l_ij = t·<x_i, y_j> + β.

Sigmoid (SigLIP) loss. The loss of a sub-batch A is a sum of pairwise terms,

    L_sig(A) = Σ_{i,j ∈ A} ℓ_ij / |A|,    ℓ_ij = softplus(−z_ij · l_ij),  z_ii = +1, z_ij = −1,

so the *sum form* |A|·L_sig(A) = Σ_{i,j∈A} ℓ_ij is what the joint sampler works with: adding a
candidate m to A changes it by ℓ_mm + Σ_{i∈A} (ℓ_im + ℓ_mi).

Softmax (CLIP) loss. Its sum form, |A|·ClipLoss(A) = Σ_{i∈A} [CE^{i→t}_i(A) + CE^{t→i}_i(A)] / 2
with CE^{i→t}_i(A) = −l_ii + log Σ_{j∈A} exp(l_ij), has no pairwise decomposition: the
normalisers of every i ∈ A change when m joins. :class:`SoftmaxGain` keeps running row and column
log-sum-exps over A and gives the *exact* conditional gain L(A ∪ {m}) − L(A) for every candidate
in O(B·|A|·d) time per call (the [chunk, B] logit blocks of earlier chunks are recomputed, not
kept, so memory stays O(B·d + B·chunk) instead of O(B·k)). (β cancels inside a softmax, so the
softmax code ignores it.)

Criteria turn a learner's and a reference model's loss into a score to maximise:
``learnability`` = learner − reference (the paper's default), ``hard_learner`` = learner,
``easy_reference`` = −reference.

Everything here is pure tensor code: no threads, no models, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from jeststream.embed import Embeddings  # defined with the embed protocol; re-exported here

__all__ = [
    "CRITERIA",
    "Embeddings",
    "SigmoidBlocks",
    "SoftmaxGain",
    "clip_example_losses",
    "criterion_weights",
    "sigmoid_pair_loss_cols",
    "sigmoid_pair_loss_diagonal",
    "sigmoid_pair_loss_rows",
    "sigmoid_pair_losses",
]

CRITERIA = ("learnability", "hard_learner", "easy_reference")

# Rows of a B×B logit matrix materialised at once when a full pass over the super-batch is
# unavoidable (the softmax per-example losses): 2**24 float32 entries = 64 MiB per tile.
_TILE_ELEMENTS = 1 << 24


def criterion_weights(criterion: str) -> tuple[float, float]:
    """(learner weight, reference weight) such that score = w_l·learner_loss + w_r·ref_loss."""
    if criterion == "learnability":
        return 1.0, -1.0
    if criterion == "hard_learner":
        return 1.0, 0.0
    if criterion == "easy_reference":
        return 0.0, -1.0
    raise ValueError(f"criterion={criterion!r} is not one of {CRITERIA}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Selection arithmetic runs in float32 at least: bf16/fp16 sums over thousands of terms lose
    the differences between candidates."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(value: Tensor | float | None, like: Tensor) -> Tensor | None:
    if value is None:
        return None
    return torch.as_tensor(value).detach().to(device=like.device, dtype=like.dtype).reshape(())


def _parts(e: Embeddings) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(image, text, scale, bias) in the compute dtype, on the embeddings' device."""
    dtype = compute_dtype(e.image.dtype)
    # Scores are never differentiated: detach so that no autograd graph is built by accident.
    image = e.image.detach().to(dtype)
    text = e.text.detach().to(device=image.device, dtype=dtype)
    return image, text, _scalar(e.logit_scale, image), _scalar(e.logit_bias, image)


def _softplus_(x: Tensor) -> Tensor:
    """softplus(x), written into x when possible: saves one block-sized allocation per call."""
    if not x.requires_grad:
        try:
            return torch._C._nn.softplus(x, 1, 20, out=x)
        except (AttributeError, RuntimeError, TypeError):  # private API moved: fall back
            pass
    return F.softplus(x)


def _as_index(idx: Tensor | Sequence[int], device: torch.device) -> Tensor:
    return torch.as_tensor(idx, dtype=torch.long, device=device).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Sigmoid (SigLIP) pairwise losses
# ---------------------------------------------------------------------------------------------


class SigmoidBlocks:
    """Blocks of one model's sigmoid pair-loss matrix ℓ, computed on demand from embeddings.

    The temperature is folded into the image embeddings once (O(B·d)), so that every block is
    one matmul, an in-place bias add and an in-place softplus; nothing of size B×B is kept.
    """

    def __init__(self, e: Embeddings) -> None:
        image, text, scale, bias = _parts(e)
        self.image = image * scale  # t·x_i
        self.text = text
        self.scale = scale
        self.bias = bias

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def _block(self, image: Tensor, text: Tensor) -> Tensor:
        # addmm folds the bias into the GEMM's output pass; softplus then runs in place.
        if self.bias is None:
            logits = image @ text.T
        else:
            logits = torch.addmm(self.bias, image, text.T)
        return _softplus_(logits)

    def _positive_logits(self, idx: Tensor | None = None) -> Tensor:
        image, text = self.image, self.text
        if idx is not None:
            image, text = image.index_select(0, idx), text.index_select(0, idx)
        logit = (image * text).sum(dim=1)
        return logit if self.bias is None else logit.add_(self.bias)

    def diagonal(self) -> Tensor:
        """ℓ_mm = softplus(−l_mm) for every m: [B]."""
        return F.softplus(self._positive_logits().neg_())

    def full(self) -> Tensor:
        """The whole matrix: [B, B]; the diagonal (z_ii = +1) is written by index."""
        losses = self._block(self.image, self.text)
        idx = torch.arange(self.size, device=losses.device)
        losses[idx, idx] = self.diagonal()
        return losses

    def rows(self, idx: Tensor | Sequence[int], *, exact_diagonal: bool = True) -> Tensor:
        """ℓ_{i,·} for i in idx: [len(idx), B]."""
        idx = _as_index(idx, self.image.device)
        block = self._block(self.image.index_select(0, idx), self.text)
        if exact_diagonal:
            at = torch.arange(idx.numel(), device=block.device)
            block[at, idx] = F.softplus(self._positive_logits(idx).neg_())
        return block

    def cols(self, idx: Tensor | Sequence[int], *, exact_diagonal: bool = True) -> Tensor:
        """ℓ_{·,j} for j in idx: [B, len(idx)]."""
        idx = _as_index(idx, self.image.device)
        block = self._block(self.image, self.text.index_select(0, idx))
        if exact_diagonal:
            at = torch.arange(idx.numel(), device=block.device)
            block[idx, at] = F.softplus(self._positive_logits(idx).neg_())
        return block


    def member_rows(self, image: Tensor) -> Tensor:
        """ℓ_{i,·} for examples i held elsewhere (another rank's), given their unscaled image
        embeddings [c, d]: [c, B]. No i is one of these B candidates, so every entry is a
        negative pair. Scaling here rather than before indexing gives the same floats as
        :meth:`rows` (one multiplication per entry either way)."""
        return self._block(image.to(self.image.dtype) * self.scale, self.text)

    def member_cols(self, text: Tensor) -> Tensor:
        """ℓ_{·,i} for examples i held elsewhere, given their text embeddings [c, d]: [B, c]."""
        return self._block(self.image, text.to(self.text.dtype))


def sigmoid_pair_loss_diagonal(e: Embeddings) -> Tensor:
    """ℓ_mm = softplus(−(t·<x_m, y_m> + β)) for every m: [B]. O(B·d), no B×B matrix."""
    return SigmoidBlocks(e).diagonal()


def sigmoid_pair_losses(e: Embeddings) -> Tensor:
    """The full matrix of pairwise sigmoid losses ℓ_ij: [B, B].

    Σ_{i,j∈A} ℓ_ij / |A| equals ``open_clip.loss.SigLipLoss()`` on the sub-batch A. Off-diagonal
    entries are softplus(l_ij); the diagonal (positive pairs, z_ii = +1) is written by index.
    """
    return SigmoidBlocks(e).full()


def sigmoid_pair_loss_rows(
    e: Embeddings, rows: Tensor | Sequence[int], *, exact_diagonal: bool = True
) -> Tensor:
    """Rows ℓ_{r,·} of the sigmoid pair-loss matrix for the indices ``rows``: [len(rows), B].

    Args:
        exact_diagonal: write the positive-pair entries ℓ_rr by index. The joint sampler passes
            False: it only ever reads the block at unselected columns, and the entries (r, r) sit
            at selected ones, so it saves the fix-up.
    """
    return SigmoidBlocks(e).rows(rows, exact_diagonal=exact_diagonal)


def sigmoid_pair_loss_cols(
    e: Embeddings, cols: Tensor | Sequence[int], *, exact_diagonal: bool = True
) -> Tensor:
    """Columns ℓ_{·,c} of the sigmoid pair-loss matrix for the indices ``cols``: [B, len(cols)].

    ``exact_diagonal`` as in :func:`sigmoid_pair_loss_rows`.
    """
    return SigmoidBlocks(e).cols(cols, exact_diagonal=exact_diagonal)


# ---------------------------------------------------------------------------------------------
# Softmax (CLIP) loss: per-example losses and exact conditional gains
# ---------------------------------------------------------------------------------------------


def _tile_rows(n_rows: int, n_cols: int) -> int:
    # At most a sixteenth of the rows (no B×B block is ever materialised) and never more than
    # _TILE_ELEMENTS entries. One tiling for every caller: the sums then round alike.
    return max(1, min(-(-n_rows // 16), _TILE_ELEMENTS // max(1, n_cols)))


def clip_example_losses(e: Embeddings) -> Tensor:
    """Each example's CLIP loss against the whole super-batch: [B].

    loss_m = [ (−l_mm + log Σ_j exp l_mj) + (−l_mm + log Σ_j exp l_jm) ] / 2, so that
    ``clip_example_losses(e).mean()`` equals ``open_clip.loss.ClipLoss()`` on the super-batch.
    Computed in tiles of at most B/16 rows (and 2**24 entries), so no B×B matrix exists; the
    work is O(B²·d).
    """
    image, text, scale, _ = _parts(e)
    image = image * scale  # β cancels in a softmax
    n = image.shape[0]
    row_lse = torch.empty(n, dtype=image.dtype, device=image.device)
    col_lse = torch.full((n,), -math.inf, dtype=image.dtype, device=image.device)
    tile = _tile_rows(n, n)
    for start in range(0, n, tile):
        block = image[start : start + tile] @ text.T
        row_lse[start : start + tile] = block.logsumexp(dim=1)
        col_lse = torch.logaddexp(col_lse, block.logsumexp(dim=0))
    diag = (image * text).sum(dim=1)
    return (row_lse - diag + col_lse - diag) / 2


class SoftmaxGain:
    """Exact conditional gains of the sum-form CLIP loss as a selected set A grows.

    For the sum form L(A) = Σ_{i∈A} [CE^{i→t}_i(A) + CE^{t→i}_i(A)] / 2 (that is, |A|·ClipLoss(A))
    and a candidate m ∉ A,

        L(A ∪ {m}) − L(A) = [softplus(r_m − l_mm) + softplus(c_m − l_mm)] / 2            (m's own CE)
                          + Σ_{i∈A} [softplus(l_im − r_i) + softplus(l_mi − c_i)] / 2   (A's normalisers)

    with the running log-sum-exps r_m = log Σ_{j∈A} exp l_mj (image m against A's texts) and
    c_m = log Σ_{j∈A} exp l_jm (A's images against text m); for i ∈ A these are exactly i's own
    row and column normalisers. :meth:`add` folds a new chunk into r and c with one
    [chunk, B] and one [B, chunk] block; :meth:`gains` recomputes the second sum, whose terms
    all change when r_i and c_i grow, in O(B·|A|·d) time (earlier chunks' logit blocks are
    recomputed by matmul rather than cached, which would cost O(B·k) memory) and O(B·chunk)
    memory.

    A may also hold *external* members, examples that are not among these B candidates (another
    rank's selected examples, :func:`jeststream.selection.blocked_joint_sample`): ``add`` takes
    their embeddings, and their normalisers r_i, c_i over all of A are kept next to the
    candidates'. Without external members every step is the single-set computation above.

    With A empty every gain is 0 (a singleton's CLIP loss is zero), so the joint sampler scores
    its first chunk with :func:`clip_example_losses` instead.
    """

    def __init__(self, e: Embeddings) -> None:
        image, text, scale, _ = _parts(e)
        # Pre-scale once so that each block is a single matmul (β cancels in a softmax).
        self._scale = scale
        self._image = image * scale
        self._text = text
        self._diag = (self._image * text).sum(dim=1)
        n = image.shape[0]
        self._r = torch.full((n,), -math.inf, dtype=image.dtype, device=image.device)
        self._c = torch.full((n,), -math.inf, dtype=image.dtype, device=image.device)
        self._chunks: list[Tensor] = []
        # The newest chunk's blocks are reused by the next gains() call.
        self._last: tuple[Tensor, Tensor] | None = None
        # External members, one entry per chunk: (scaled image [c, d], text [c, d]), and their
        # normalisers over A in chunk order; the newest chunk's candidate blocks, for gains().
        self._ext: list[tuple[Tensor, Tensor]] = []
        self._ext_r = self._r.new_empty(0)
        self._ext_c = self._c.new_empty(0)
        self._ext_last: tuple[Tensor, Tensor] | None = None

    @property
    def selected(self) -> Tensor:
        """Indices added so far, in order."""
        if not self._chunks:
            return torch.empty(0, dtype=torch.long, device=self._image.device)
        return torch.cat(self._chunks)

    def add(
        self, idx: Tensor | Sequence[int], external: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """Add the candidates ``idx`` (not already added) to A, and with ``external`` = (image,
        text) [c', d] (unscaled, L2-normalised) as many members that are not candidates here."""
        idx = _as_index(idx, self._image.device)
        rows = self._image.index_select(0, idx) @ self._text.T  # [c, B]: l_im, i in the chunk
        cols = self._image @ self._text.index_select(0, idx).T  # [B, c]: l_mi, i in the chunk
        self._c = torch.logaddexp(self._c, rows.logsumexp(dim=0))
        self._r = torch.logaddexp(self._r, cols.logsumexp(dim=1))
        self._chunks.append(idx)
        self._last = (rows, cols)
        if external is None and not self._ext:
            return  # no external members, before or now: the single-set computation
        if external is None:
            external = (self._image.new_empty(0, self._image.shape[1]),) * 2
        e_image = external[0].to(self._image.dtype) * self._scale
        e_text = external[1].to(self._text.dtype)
        e_rows = e_image @ self._text.T  # [c', B]
        e_cols = self._image @ e_text.T  # [B, c']
        self._c = torch.logaddexp(self._c, e_rows.logsumexp(dim=0))
        self._r = torch.logaddexp(self._r, e_cols.logsumexp(dim=1))
        # The external members' normalisers: the old ones grow by this chunk (own and
        # external), the new ones are taken over all of A (this chunk included).
        new_image = torch.cat([self._image.index_select(0, idx), e_image])
        new_text = torch.cat([self._text.index_select(0, idx), e_text])
        if self._ext:
            old_image = torch.cat([im for im, _ in self._ext])
            old_text = torch.cat([tx for _, tx in self._ext])
            self._ext_r = torch.logaddexp(self._ext_r, (old_image @ new_text.T).logsumexp(dim=1))
            self._ext_c = torch.logaddexp(self._ext_c, (new_image @ old_text.T).logsumexp(dim=0))
        own = self.selected
        all_image = torch.cat([self._image.index_select(0, own), *(im for im, _ in self._ext),
                               e_image])
        all_text = torch.cat([self._text.index_select(0, own), *(tx for _, tx in self._ext),
                              e_text])
        self._ext_r = torch.cat([self._ext_r, (e_image @ all_text.T).logsumexp(dim=1)])
        self._ext_c = torch.cat([self._ext_c, (all_image @ e_text.T).logsumexp(dim=0)])
        self._ext.append((e_image, e_text))
        self._ext_last = (e_rows, e_cols)

    def gains(self) -> Tensor:
        """L(A ∪ {m}) − L(A) for every m: [B]. Entries for m ∈ A carry no meaning."""
        gain = F.softplus(self._r - self._diag) + F.softplus(self._c - self._diag)
        for n_chunk, idx in enumerate(self._chunks):
            if n_chunk == len(self._chunks) - 1 and self._last is not None:
                rows, cols = self._last
            else:
                rows = self._image.index_select(0, idx) @ self._text.T
                cols = self._image @ self._text.index_select(0, idx).T
            gain += F.softplus(rows - self._r[idx, None]).sum(dim=0)
            gain += F.softplus(cols - self._c[None, idx]).sum(dim=1)
        start = 0
        for n_chunk, (image, text) in enumerate(self._ext):
            stop = start + image.shape[0]
            if n_chunk == len(self._ext) - 1 and self._ext_last is not None:
                rows, cols = self._ext_last
            else:
                rows, cols = image @ self._text.T, self._image @ text.T
            gain += F.softplus(rows - self._ext_r[start:stop, None]).sum(dim=0)
            gain += F.softplus(cols - self._ext_c[None, start:stop]).sum(dim=1)
            start = stop
        return gain.mul_(0.5)
