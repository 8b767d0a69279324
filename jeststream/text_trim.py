"""Exact text trimming for scoring: run a causal, end-of-text-pooled text tower on captions cut
to the length they need.

open_clip's CLIP text tower is causal (each token attends only to itself and earlier tokens)
and pools the features of one token per caption: the end-of-text token (``argmax``: the largest
id, or ``eos``: a given id) or the first one. Tokens after that position can change nothing
the pooled feature depends on, so a caption of 12 tokens padded to a context of 77 gives the
same embedding from its first 12 positions, for a fraction of the FLOPs. The rows of a
super-batch are grouped by the length they need, rounded up to a multiple of ``bucket`` (so
one long caption doesn't undo it for the others), and each group runs at its own length.

Duck-typed like :func:`jeststream.scoring.default_embed` (no open_clip import): it recognises
open_clip's ``CLIP`` (text fields on the model) and a ``CustomTextCLIP`` whose ``text`` is a
``TextTransformer`` without a class token or padding mask. Anything it cannot prove exact
(no causal mask, ``last``/mean pooling as in non-causal SigLIP text towers, a class token,
other modules) gets ``None``, and the caller runs the tower untrimmed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["encode_text_trimmed", "needed_lengths", "trimmable_tower"]

_POOLS = ("argmax", "eos", "first")


class _Tower(NamedTuple):
    token_embedding: nn.Module
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    attn_mask: torch.Tensor | None
    text_projection: Any
    pool_type: str
    eos_id: int | None


def _is_causal(mask: Any) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    above = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu_(1)
    m = mask.detach()
    return bool(torch.all(torch.isneginf(m[above]))) and bool(torch.all(m[~above] == 0))


def trimmable_tower(model: nn.Module) -> _Tower | None:
    """The text tower's parts when trimming is exact for ``model``, else None."""
    names = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if all(hasattr(model, a) for a in (*names, "attn_mask", "text_pool_type")):
        tower = _Tower(
            model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
            model.attn_mask, getattr(model, "text_projection", None), model.text_pool_type,
            getattr(model, "text_eos_id", None),
        )
    else:
        text = getattr(model, "text", None)
        if text is None or not all(hasattr(text, a) for a in (*names, "attn_mask", "pool_type")):
            return None
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            return None
        if getattr(text, "output_tokens", False):
            return None
        tower = _Tower(
            text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
            text.attn_mask, getattr(text, "text_projection", None), text.pool_type,
            getattr(text, "eos_id", None),
        )
    if tower.pool_type not in _POOLS or (tower.pool_type == "eos" and tower.eos_id is None):
        return None
    if not isinstance(tower.token_embedding, nn.Embedding) or not _is_causal(tower.attn_mask):
        return None
    get_cast = getattr(tower.transformer, "get_cast_dtype", None)
    if not callable(get_cast):
        return None
    # open_clip >= 3 transformers take [batch, seq, width]; older ones were fed [seq, batch,
    # width] by encode_text, and a batch-first call would attend across the batch.
    if getattr(tower.transformer, "batch_first", False) is not True:
        return None
    return tower


def _pooled_positions(tower: _Tower, text: torch.Tensor) -> torch.Tensor:
    if tower.pool_type == "argmax":  # the first largest id: the same in any prefix holding it
        return text.argmax(dim=-1)
    if tower.pool_type == "eos":
        return (text == tower.eos_id).int().argmax(dim=-1)
    return torch.zeros(text.shape[0], dtype=torch.long, device=text.device)


def needed_lengths(model: nn.Module, text: torch.Tensor) -> torch.Tensor | None:
    """Per caption, the prefix length whose forward gives its exact embedding (None: no
    trimming is exact for this model)."""
    tower = trimmable_tower(model)
    return None if tower is None else _pooled_positions(tower, text) + 1


def _forward(tower: _Tower, text: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    length = text.shape[1]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast)
    x = x + tower.positional_embedding[:length].to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), pos]
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def encode_text_trimmed(
    model: nn.Module, text: torch.Tensor, *, normalize: bool = True, bucket: int = 8
) -> torch.Tensor | None:
    """``model.encode_text(text, normalize)`` computed on trimmed captions, or None when
    trimming is not exact for ``model`` (then call ``encode_text`` yourself).

    Rows are grouped by their needed length rounded up to a multiple of ``bucket``; each group
    runs at its own length, and the rows come back in the input order.
    """
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket must be an int >= 1, got {bucket!r}")
    tower = trimmable_tower(model)
    if tower is None or text.ndim != 2 or text.dtype not in (torch.long, torch.int):
        return None
    n_ctx = text.shape[1]
    if n_ctx > tower.positional_embedding.shape[0] or n_ctx > tower.attn_mask.shape[0]:
        return None
    pos = _pooled_positions(tower, text)
    lengths = torch.clamp((pos + bucket) // bucket * bucket, max=n_ctx)  # >= pos + 1
    out: torch.Tensor | None = None
    for length in torch.unique(lengths).tolist():
        rows = (lengths == length).nonzero(as_tuple=True)[0]
        feats = _forward(tower, text[rows, :length], pos[rows])
        if out is None:
            out = feats.new_empty((text.shape[0], feats.shape[1]))
        out[rows] = feats
    if out is None:  # an empty batch
        return None
    return F.normalize(out, dim=-1) if normalize else out
