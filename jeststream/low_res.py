"""Low-resolution learner scoring: the learner snapshot sees the super-batch's images resized,
with the ViT's positional embeddings resampled to the smaller patch grid.

JEST ranks examples; the ranking survives a coarser look far better than the training step
would (the paper's Flexi-JEST scores at a quarter of the patches). Halving the side of a ViT
input cuts its image-tower FLOPs about 4x. The live learner is never touched: only the scoring
snapshot's forward changes, and only for the learner (the reference, or its cache, scores the
full-resolution images).

Duck-typed like :func:`jeststream.scoring.default_embed`: an open_clip ``VisionTransformer``
(``visual.conv1``, ``class_embedding``, 2-D ``positional_embedding`` of ``1 + grid**2`` rows,
``ln_pre``, ``transformer``, ``_pool``) runs with its positional embeddings resampled bicubically
(antialiased, class token kept: timm's ``resample_abs_pos_embed`` convention) to the new grid.
Any other image tower gets the resized images as they are: fully convolutional ones take any
size; one with a fixed-size input (open_clip's ModifiedResNet attention pool, most timm ViTs)
raises in its forward rather than scoring wrongly.

:func:`encode_image_mixed` is the paper's remedy for what a coarser look costs in ranking
quality (Flexi-JEST): the live learner trains a share of each batch at the scoring resolution,
through the same resampled forward, so that the snapshot's low-resolution embeddings are ones
the learner was trained to produce. It is differentiable: the gradients of the low-resolution
share reach the native positional embeddings through the resampling, as in FlexiViT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "check_resolution",
    "encode_image_mixed",
    "encode_image_resampled",
    "resample_pos_embed",
    "resize_batch_images",
    "resize_images",
]


def check_resolution(value: Any, name: str = "resolution", *, optional: bool = False) -> None:
    """Raise unless ``value`` is an image side in pixels (an int >= 1; or None if ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be an image side in pixels (int >= 1){' or None' if optional else ''}, "
            f"got {value!r}"
        )


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """[n, c, h, w] images resized to ``resolution`` x ``resolution`` (bilinear, antialiased)."""
    if images.ndim != 4:
        raise ValueError(f"low-resolution scoring needs [n, c, h, w] images, got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) == (resolution, resolution):
        return images
    dtype = images.dtype
    x = images if dtype.is_floating_point else images.float()
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                      align_corners=False)
    return x if dtype.is_floating_point else x.round().clamp(0, 255).to(dtype)


def resize_batch_images(batch: Any, resolution: int) -> Any:
    """The batch with its images (position 0, or the ``"image"`` entry -- ``"pixel_values"``
    in a Hugging Face processor's dict) resized; the same convention as the default embed."""
    if isinstance(batch, Mapping):
        for name in ("image", "pixel_values"):
            if isinstance(batch.get(name), torch.Tensor):
                return {**batch, name: resize_images(batch[name], resolution)}
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        out = (resize_images(batch[0], resolution), *batch[1:])
        return type(batch)(out) if type(batch) in (tuple, list) else out
    raise TypeError(
        "score_resolution resizes the images at position 0 of a tuple/list batch or under "
        f"'image' / 'pixel_values' in a dict batch; got a {type(batch).__name__}. Resize in score_transform= instead"
    )


def resample_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> torch.Tensor:
    """[1 + gh*gw, w] positional embeddings (class token first) resampled to ``new_grid``."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = pos[:1], pos[1:]
    width = grid.shape[-1]
    x = grid.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(-1, width).to(pos.dtype)
    return torch.cat([prefix, x], dim=0)


def _vit(model: nn.Module) -> nn.Module | None:
    v = getattr(model, "visual", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "_pool")
    if v is None or not all(hasattr(v, a) for a in needed):
        return None
    grid = getattr(v, "grid_size", None)
    pos = v.positional_embedding
    if not (isinstance(grid, tuple) and isinstance(pos, torch.Tensor) and pos.ndim == 2):
        return None
    if pos.shape[0] != 1 + grid[0] * grid[1]:
        return None
    return v


def encode_image_resampled(model: nn.Module, images: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """``model.encode_image`` for images of any size a multiple of the patch: an open_clip ViT
    runs with resampled positional embeddings; other towers run on the images as they are."""
    v = _vit(model)
    if v is None:
        return model.encode_image(images, normalize=normalize)
    stride = v.conv1.stride
    h, w = images.shape[-2:]
    if h % stride[0] or w % stride[1]:
        raise ValueError(
            f"a {h}x{w} image does not tile into the ViT's {stride[0]}x{stride[1]} patches (its "
            "patch convolution would drop the remainder): choose a resolution that is a "
            f"multiple of {stride[0]}"
        )
    new_grid = (h // stride[0], w // stride[1])
    if new_grid == tuple(v.grid_size):  # native resolution: open_clip's own forward
        return model.encode_image(images, normalize=normalize)
    x = v.conv1(images)  # [n, width, gh, gw]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = v.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + resample_pos_embed(v.positional_embedding, new_grid, tuple(v.grid_size)).to(x.dtype)
    x = v.patch_dropout(x) if hasattr(v, "patch_dropout") else x
    x = v.ln_pre(x)
    x = v.transformer(x)
    pooled, _ = v._pool(x)
    if getattr(v, "proj", None) is not None:
        pooled = pooled @ v.proj
    return F.normalize(pooled, dim=-1) if normalize else pooled


def encode_image_mixed(
    model: nn.Module,
    images: torch.Tensor,
    *,
    resolution: int,
    share: float = 0.5,
    generator: torch.Generator | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Image features of a training batch with ``round(share * n)`` images, drawn at random,
    encoded at ``resolution`` (resized, and for an open_clip ViT with resampled positional
    embeddings: :func:`encode_image_resampled`) and the rest at their own resolution; rows in
    the batch's order, so the contrastive loss over the whole batch is written as usual::

        img = encode_image_mixed(model, images, resolution=112, share=0.5, generator=g)
        txt = model.encode_text(texts, normalize=True)

    Differentiable in every parameter the native forward uses. Which rows go low is drawn from
    ``generator`` (torch's global generator when None), so a seeded run repeats; a draw rather
    than a fixed half, because a selected sub-batch's order follows the sampler's chunks.
    ``share=0`` is the native forward; ``share=1`` trains at ``resolution`` only.
    """
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be a fraction of the batch in [0, 1], got {share!r}")
    check_resolution(resolution)
    n = images.shape[0]
    k = round(share * n)
    if k == 0:
        return model.encode_image(images, normalize=normalize)
    if k == n:
        return encode_image_resampled(model, resize_images(images, resolution), normalize=normalize)
    perm = torch.randperm(n, generator=generator).to(images.device)
    lo, hi = perm[:k], perm[k:]
    f_lo = encode_image_resampled(model, resize_images(images[lo], resolution), normalize=normalize)
    f_hi = model.encode_image(images[hi], normalize=normalize)
    return torch.cat([f_lo.to(f_hi.dtype), f_hi])[torch.argsort(perm)]
