"""Decoding webdataset samples: the image and caption fields of a raw sample, images decoded
to PIL and to tensors, and any webdataset batch read as ``(images, texts, keys)``.

A damaged image fails in :func:`decode_image`, not later in a transform; binary 8-bit PGM/PPM
skip PIL's per-file reader, with the same result as PIL's (the tests compare the two).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "IMAGE_EXTS",
    "NETPBM_EXTS",
    "TEXT_EXTS",
    "decode_image",
    "default_image_transform",
    "first_field",
    "normalize_batch",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pnm")
NETPBM_EXTS = ("ppm", "pgm", "pnm")
TEXT_EXTS = ("txt", "text", "caption")


# A binary 8-bit netpbm header: magic, width, height, maxval, then exactly one whitespace byte
# before the raster (which may itself start with whitespace-valued bytes).
_NETPBM_HEADER = re.compile(rb"(P[56])\s+(\d+)\s+(\d+)\s+(\d+)\s")
_NETPBM_MODES = {b"P5": ("L", 1), b"P6": ("RGB", 3)}


def _netpbm_raster(data: bytes) -> tuple[str, tuple[int, int], memoryview] | None:
    """(PIL mode, (width, height), raster) of a binary 8-bit PGM/PPM, or None for any other
    netpbm form (comments, 16-bit, ASCII, bitmaps), which PIL then reads."""
    m = _NETPBM_HEADER.match(data, 0, 64)
    if m is None or m.group(4) != b"255":
        return None
    mode, channels = _NETPBM_MODES[m.group(1)]
    width, height = int(m.group(2)), int(m.group(3))
    if width == 0 or height == 0:
        return None  # PIL's error message names the problem
    need = width * height * channels
    have = len(data) - m.end()
    if have < need:
        raise ValueError(
            f"truncated {mode} netpbm image: {have} of {width}x{height}x{channels} = {need} "
            "raster bytes"
        )
    return mode, (width, height), memoryview(data)[m.end() : m.end() + need]


def decode_image(data: bytes, ext: str) -> Any:
    """The PIL image stored as ``data`` in a sample's ``ext`` field, decoded now (a damaged
    file fails here, not in a transform). Binary 8-bit PGM/PPM, the cheapest format for small
    images, become an image over their raster in place: PIL's own reader spends tens of
    microseconds per file on plugin and stream set-up, more than the whole decode of a small
    image, and a JEST base loader decodes 1/ratio batches per step. Everything else goes
    through ``PIL.Image.open``."""
    from PIL import Image

    if ext in NETPBM_EXTS:
        raster = _netpbm_raster(data)
        if raster is not None:
            mode, size, pixels = raster
            return Image.frombuffer(mode, size, pixels, "raw", mode, 0, 1)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def default_image_transform(image: Any) -> torch.Tensor:
    """PIL image -> float tensor [3,H,W] in [0,1] (like torchvision's ToTensor)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def first_field(sample: Mapping[str, Any], exts: Sequence[str]) -> tuple[str, Any] | None:
    """(ext, value) of the first of ``exts`` (e.g. :data:`IMAGE_EXTS`) that a raw sample holds,
    or None."""
    for ext in exts:
        if ext in sample:
            return ext, sample[ext]
    return None


def normalize_batch(
    batch: Any,
    *,
    image_keys: Sequence[str] = ("image", *IMAGE_EXTS),
    text_keys: Sequence[str] = ("text", *TEXT_EXTS),
) -> tuple[Any, Any, list[str] | None]:
    """Any webdataset batch -> ``(images, texts, keys)``.

    webdataset 0.2.x collates ``to_tuple`` samples into a *list* of fields, 1.0.x into a tuple
    (or a dict for dict samples); images may come as a tensor or a list of tensors. Lists of
    tensors are stacked; keys are the ``__key__`` field (or the first list of str after the
    texts), None when absent.
    """
    if isinstance(batch, Mapping):
        img = next((batch[k] for k in image_keys if k in batch), None)
        txt = next((batch[k] for k in text_keys if k in batch), None)
        if img is None or txt is None:
            raise ValueError(
                f"batch dict has keys {sorted(map(str, batch))}; expected an image field among "
                f"{list(image_keys)} and a text field among {list(text_keys)}"
            )
        keys = batch.get("__key__", batch.get("key"))
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        img, txt = batch[0], batch[1]
        keys = next(
            (f for f in batch[2:] if isinstance(f, (list, tuple)) and f and isinstance(f[0], str)),
            None,
        )
    else:
        raise TypeError(
            f"cannot read a {type(batch).__name__} batch as (images, texts[, keys]); map your "
            "pipeline with .to_tuple('jpg;png', 'txt', '__key__') before batching"
        )
    if isinstance(img, (list, tuple)) and img and isinstance(img[0], torch.Tensor):
        img = torch.stack(list(img))
    elif isinstance(img, np.ndarray):
        img = torch.from_numpy(img)
    if isinstance(txt, (list, tuple)) and txt and isinstance(txt[0], torch.Tensor):
        txt = torch.stack(list(txt))
    elif isinstance(txt, tuple):
        txt = list(txt)
    return img, txt, (None if keys is None else [str(k) for k in keys])
