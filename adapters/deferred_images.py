"""Deferred image decoding for the adapters: cheap scoring views now, training images later.

An image sample becomes a scoring view (its uint8 centre square at the decoded scale) and an
:class:`ImageRecord`; :func:`collate_deferred` resizes the views to ``score_resolution`` in one
batched resize and stacks them into a :class:`jeststream.deferred.Deferred` (view: uint8
``[B, R, R, 3]``, 4x smaller to collate, concatenate and hold than floats) whose
``view_transform`` is :class:`NormaliseView` (float ``[B, 3, R, R]``, normalised like the
training transform's ``Normalize``, made once per super-batch for the scorer) and whose
``materialise`` is :class:`MaterialiseImage` -- the training transform, seeded per example by
(seed, epoch, key), applied after selection, its float conversion and normalisation once per
batch on the training device. Two
record kinds, chosen by the scoring resolution (:func:`deferred_mode`):

- ``"encoded"`` (scoring below the training size): the record keeps the encoded bytes; the view
  is decoded at reduced scale (JPEG draft / DCT scaling: the smallest of 1/1, 1/2, 1/4, 1/8 that
  still covers the view; other formats decode in full), and the selected images are decoded
  again in full after selection.
- ``"decoded"`` (scoring at the training size): the image is decoded once, kept as uint8 (its
  own mode) and the augmentation and normalisation run only on the selected ones.

Both decode with the adapter's own decoder (``decode=``), so a deferred example's pixels equal
the eager pipeline's. For your own ``wds`` pipeline: ``.map(deferred_sample(...))`` after
``to_tuple("jpg;png", "txt", "__key__")``-style samples, then ``.batched(b,
collation_fn=collate_deferred(...))`` (docs/cheaper_scoring.md).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from jeststream.deferred import Deferred, SeededTransform, example_seed

__all__ = [
    "DEFERRED_MODES",
    "ImageRecord",
    "MaterialiseImage",
    "NormaliseView",
    "SkipBadRecord",
    "centre_square",
    "collate_deferred",
    "deferred_mode",
    "deferred_sample",
    "normalisation",
    "pil_decode",
    "pil_decode_rgb",
    "resize_views",
    "scoring_view",
    "training_size",
]

DEFERRED_MODES = ("encoded", "decoded")


class ImageRecord(NamedTuple):
    """One deferred image: ``data`` is the encoded bytes (mode "encoded") or uint8 pixels
    ``[H, W(, C)]`` in the image's own PIL ``mode`` (mode "decoded": a numpy array per sample,
    a view into one shared uint8 tensor per batch after :func:`collate_deferred`, so that
    DataLoader workers hand them over through shared memory, not pickled bytes); ``seed``
    seeds its augmentation; ``view_resolution``: the side :func:`collate_deferred` resizes
    this example's view to (None: the view is final)."""

    data: Any
    ext: str
    mode: str | None
    key: str
    url: str
    seed: int
    view_resolution: int | None = None


def pil_decode(data: bytes, ext: str) -> Any:
    """Encoded bytes -> a loaded PIL image (any format PIL reads)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pil_decode_rgb(data: bytes, ext: str) -> Any:
    """Encoded bytes -> a loaded RGB PIL image (webdataset's ``"pilrgb"`` decoding)."""
    image = pil_decode(data, ext)
    if image.mode == "RGB":
        return image
    with image:
        return image.convert("RGB")


def training_size(transform: Any) -> int | None:
    """The side of the images ``transform`` makes, read from a torchvision ``Compose``'s
    ``RandomResizedCrop`` / ``CenterCrop`` / ``Resize`` (the last one that has a size); None
    when it cannot be told."""
    steps = getattr(transform, "transforms", None)
    size = None
    for t in steps if isinstance(steps, list) else [transform]:
        name = type(t).__name__
        if name in ("RandomResizedCrop", "CenterCrop", "Resize") and hasattr(t, "size"):
            s = t.size
            size = max(s) if isinstance(s, (tuple, list)) else int(s)
    return size


def normalisation(transform: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` of the ``Normalize`` step of a torchvision ``Compose``, or None."""
    steps = getattr(transform, "transforms", None)
    for t in steps if isinstance(steps, list) else [transform]:
        params = _normalize_params(t)
        if params is not None:
            return params
    return None


def _normalize_params(step: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` of a torchvision ``Normalize`` step (a scalar or a sequence each, as
    torchvision takes them), or None for any other step."""
    if type(step).__name__ != "Normalize" or not hasattr(step, "mean") or not hasattr(step, "std"):
        return None
    return tuple(
        tuple(torch.as_tensor(v, dtype=torch.float64).flatten().tolist())
        for v in (step.mean, step.std)
    )


def deferred_mode(deferred: bool | str, score_resolution: int | None, transform: Any) -> str | None:
    """Which record kind ``deferred=`` asks for: None (eager), "encoded" or "decoded"; True
    picks "encoded" when ``score_resolution`` is below the transform's training size (or the
    size is unknown), else "decoded"."""
    if deferred is False or deferred is None:
        return None
    if deferred is not True and deferred not in DEFERRED_MODES:
        raise ValueError(f"deferred must be a bool or one of {DEFERRED_MODES}, got {deferred!r}")
    if isinstance(score_resolution, bool) or not isinstance(score_resolution, int) or (
        score_resolution < 1
    ):
        raise ValueError(
            f"deferred={deferred!r} needs score_resolution= (the side in pixels of the images the "
            f"scorer sees, e.g. 112 with JESTLoader(score_resolution=112)), got {score_resolution!r}"
        )
    if deferred is True:
        train = training_size(transform)
        return "decoded" if train is not None and score_resolution >= train else "encoded"
    return deferred


def centre_square(image: Any, resolution: int) -> np.ndarray:
    """uint8 ``[S, S, 3]``: the image's centre square (RGB) at its decoded scale, to be resized
    to ``resolution`` by :func:`resize_views` (batched: ~4x cheaper than one PIL resize per
    image); an image more than twice ``resolution`` is brought to it here (bilinear), so that
    a view is never large to hold or to pass between processes."""
    from PIL import Image

    image = image if image.mode == "RGB" else image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    if side > 2 * resolution:
        s = resolution / side
        w, h = max(resolution, round(w * s)), max(resolution, round(h * s))
        image, side = image.resize((w, h), Image.BILINEAR), resolution
    left, top = (w - side) // 2, (h - side) // 2
    if (w, h) != (side, side):
        image = image.crop((left, top, left + side, top + side))
    return np.asarray(image)


def resize_views(views: Sequence[np.ndarray], resolution: int) -> torch.Tensor:
    """uint8 ``[B, R, R, C]``: square uint8 views ``[S, S, C]`` resized to ``resolution``
    (bilinear, antialiased, as PIL resizes), one batched resize per size present."""
    shapes = {v.shape for v in views}
    bad = sorted(str(sh) for sh in shapes if len(sh) != 3 or sh[0] != sh[1] or sh[0] < 1)
    if bad or len({sh[2] for sh in shapes}) > 1:
        raise ValueError(
            f"views must be square uint8 [S, S, C] arrays of one channel count, got shapes "
            f"{sorted(str(sh) for sh in shapes)}; make them with centre_square()"
        )
    out = torch.empty((len(views), resolution, resolution, views[0].shape[2]), dtype=torch.uint8)
    for shape in shapes:
        rows = [i for i, v in enumerate(views) if v.shape == shape]
        pixels = torch.from_numpy(np.stack([views[i] for i in rows]))
        if shape[0] != resolution:
            pixels = torch.nn.functional.interpolate(
                pixels.permute(0, 3, 1, 2), size=(resolution, resolution), mode="bilinear",
                antialias=True, align_corners=False,
            ).permute(0, 2, 3, 1)
        out[rows] = pixels
    return out


def scoring_view(image: Any, resolution: int) -> np.ndarray:
    """uint8 [R, R, 3]: the image's centre square resized to ``resolution`` (the view
    :func:`deferred_sample` and :func:`collate_deferred` make, for one image)."""
    return resize_views([centre_square(image, resolution)], resolution)[0].numpy()


def _draft_view(data: bytes, resolution: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft("RGB", (resolution, resolution))  # DCT scaling: still >= resolution
        image.load()
        return centre_square(image, resolution)


class MaterialiseImage:
    """``ImageRecord -> training tensor``: decode (``decode(data, ext)``, the eager pipeline's
    decoder) or rebuild the kept uint8 image, then the training transform seeded by the
    record's seed. Picklable when ``transform`` and ``decode`` are.

    When ``transform`` is a torchvision ``Compose`` that ends in ``ToTensor`` (or open_clip's
    ``MaybeToTensor``), optionally followed by ``Normalize``, an example stops at uint8
    ``[C, H, W]`` and :meth:`collate` converts the batch to float and normalises it in one pass
    on the batch's device (the accelerator, when there is one): the same floats, bit for bit,
    as the transform's own per-example ``to_tensor`` and ``normalize``, without their
    per-example float tensors. An image of a mode that is not 8-bit (e.g. float ``"F"``) runs
    the whole transform."""

    def __init__(self, transform: Callable[[Any], Any], decode: Callable[[bytes, str], Any]) -> None:
        self.transform = transform
        self.decode = decode
        prefix, self.tail, self.normalise = _split_to_tensor(transform)
        self.seeded = SeededTransform(prefix if prefix is not None else transform)

    def __getstate__(self) -> dict:
        return {"transform": self.transform, "decode": self.decode}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["transform"], state["decode"])

    def __call__(self, record: ImageRecord) -> Any:
        if isinstance(record.data, (np.ndarray, torch.Tensor)):
            from PIL import Image

            pixels = record.data.numpy() if isinstance(record.data, torch.Tensor) else record.data
            return self._finish_one(self.seeded(Image.fromarray(pixels, record.mode), record.seed))
        with self.decode(record.data, record.ext) as image:
            return self._finish_one(self.seeded(image, record.seed))

    def _finish_one(self, image: Any) -> Any:
        if self.tail is None:
            return image  # the whole transform ran
        if getattr(image, "mode", None) in _UINT8_MODES:
            from torchvision.transforms.functional import pil_to_tensor

            pixels = pil_to_tensor(image)  # uint8 [C, H, W]: collate() makes the floats
            channels = len(self.normalise[0]) if self.normalise else 1
            if channels not in (1, pixels.shape[0]):  # where Normalize would fail: now, so
                raise ValueError(  # that the record goes to the bad-sample policy
                    f"a {image.mode} image has {pixels.shape[0]} channels and the transform's "
                    f"Normalize {channels}; convert the image's mode in the transform (e.g. "
                    "open_clip's MaybeConvertMode or .convert('RGB'))"
                )
            return pixels
        for t in self.tail:  # e.g. a float image: to_tensor does not divide it by 255
            image = t(image)
        return image

    def collate(self, tensors: list[torch.Tensor], device: Any) -> torch.Tensor:
        """The examples as one ``[b, C, H, W]`` tensor on ``device``: uint8 rows converted and
        normalised there, exactly as ``to_tensor`` and ``normalize`` convert one image."""
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(
                f"the selected examples' images have different shapes {sorted(shapes)}; make "
                "the transform give every image one size and mode (e.g. a crop and "
                ".convert('RGB'))"
            )
        if self.tail is None or not any(t.dtype == torch.uint8 for t in tensors):
            return torch.stack(tensors).to(device)
        device = torch.device(device)
        if device.type != "cpu" and all(t.dtype == torch.uint8 for t in tensors):
            # a quarter of the bytes to copy; one conversion of the batch on the device
            x = torch.stack(tensors).to(device).to(torch.get_default_dtype())
            return self._normalise(x, *self._factors(device, 4))
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.get_default_dtype())
        factors = self._factors(out.device, 3)
        for row, t in zip(out, tensors):  # row by row: each converted while in the cache
            self._normalise(row.copy_(t), *factors) if t.dtype == torch.uint8 else row.copy_(t)
        return out.to(device)

    def _factors(self, device: torch.device, ndim: int) -> tuple[torch.Tensor, ...]:
        """255, and the mean and std shaped for ``ndim``-d images ``[(B,) C, H, W]``."""
        dtype, shape = torch.get_default_dtype(), (1,) * (ndim - 3) + (-1, 1, 1)
        consts = [torch.full((1,), 255, dtype=dtype, device=device)]
        for v in self.normalise or ():
            consts.append(torch.as_tensor(v, dtype=dtype, device=device).view(shape))
        return tuple(consts)

    @staticmethod
    def _normalise(x: torch.Tensor, d255: torch.Tensor, *mean_std: torch.Tensor) -> torch.Tensor:
        # to_tensor: .to(float).div(255); normalize: .sub_(mean).div_(std): the same
        # element-wise operations, dividing by tensors (true division on any device)
        x.div_(d255)
        if mean_std:
            x.sub_(mean_std[0]).div_(mean_std[1])
        return x


_UINT8_MODES = frozenset({"RGB", "RGBA", "L", "LA"})  # to_tensor divides these by 255
_TO_TENSOR = frozenset({"ToTensor", "MaybeToTensor"})


def _split_to_tensor(
    transform: Any,
) -> tuple[Any, list | None, tuple[tuple[float, ...], tuple[float, ...]] | None]:
    """``(prefix Compose, [to_tensor(, normalize)] steps, (mean, std) or None)`` when
    ``transform`` is a torchvision ``Compose`` ending in ``ToTensor`` / ``MaybeToTensor`` and an
    optional ``Normalize``; else ``(None, None, None)``."""
    steps = getattr(transform, "transforms", None)
    if not type(transform).__name__ == "Compose" or not isinstance(steps, list) or not steps:
        return None, None, None
    normalise = _normalize_params(steps[-1])
    k = len(steps) - (normalise is not None)
    if k < 1 or type(steps[k - 1]).__name__ not in _TO_TENSOR:
        return None, None, None
    from torchvision.transforms import Compose

    return Compose(steps[: k - 1]), steps[k - 1 :], normalise


class SkipBadRecord:
    """``on_error`` for deferred images: warn and go on (the loader replaces the example);
    ``count(key, url, exc)`` (e.g. a ShardErrorCounter's ``sample_error``) counts it."""

    def __init__(self, count: Callable[[str, str, BaseException], None] | None = None) -> None:
        self.count = count

    def __call__(self, record: Any, exc: BaseException) -> None:
        key, url = getattr(record, "key", "?"), getattr(record, "url", "?")
        if self.count is not None:
            self.count(key, url, exc)
        else:
            warnings.warn(
                f"skipping deferred sample {key!r} of {url}: {type(exc).__name__}: {exc}; the "
                "next candidate of its super-batch takes its place",
                UserWarning,
                stacklevel=2,
            )


def deferred_sample(
    mode: str,
    score_resolution: int,
    *,
    decode: Callable[[bytes, str], Any] = pil_decode,
    seed: int = 0,
    epoch: int = 0,
) -> Callable[[tuple[bytes, str, str, str]], tuple[np.ndarray, ImageRecord]]:
    """``(data, ext, key, url) -> (uint8 view, ImageRecord)`` for one image (a ``wds`` map
    stage for your own pipeline; the adapters use it per sample). The view is the image's
    centre square at its decoded scale (:func:`centre_square`); :func:`collate_deferred`
    resizes the batch's views to ``score_resolution`` (the record says so). Raises for an
    image that cannot be decoded (the caller's bad-sample policy applies)."""
    if mode not in DEFERRED_MODES:
        raise ValueError(f"mode must be one of {DEFERRED_MODES}, got {mode!r}")

    def make(item: tuple[bytes, str, str, str]) -> tuple[np.ndarray, ImageRecord]:
        data, ext, key, url = item
        s = example_seed(seed, epoch, key)
        r = score_resolution
        if mode == "encoded":
            return _draft_view(data, r), ImageRecord(data, ext, None, key, url, s, r)
        with decode(data, ext) as image:
            view = centre_square(image, r)
            if image.mode in ("RGB", "L", "RGBA"):
                pixels = np.array(image)  # its own mode: the transform sees the same image
                return view, ImageRecord(pixels, ext, image.mode, key, url, s, r)
        return view, ImageRecord(data, ext, None, key, url, s, r)  # e.g. palette: keep the bytes

    return make


class NormaliseView:
    """uint8 views ``[B, R, R, C]`` -> float32 ``[B, C, R, R]`` in [0, 1], normalised by
    ``normalise`` (mean, std; None: not normalised), on the views' device: a Deferred field's
    ``view_transform``. The same float tensor, bit for bit, whether it runs per base batch or
    once on their concatenation (element-wise: one float conversion, one multiply, one add)."""

    def __init__(self, normalise: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        if normalise is not None:
            mean, std = (tuple(float(x) for x in v) for v in normalise)
            if len(mean) != len(std) or not mean or any(x == 0 for x in std):
                raise ValueError(
                    f"normalise must be (mean, std) of one non-zero std per channel, got "
                    f"{normalise!r}"
                )
            normalise = (mean, std)
        self.normalise = normalise

    def __repr__(self) -> str:
        return f"NormaliseView({self.normalise!r})"

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        if view.dtype != torch.uint8 or view.ndim != 4:
            raise ValueError(
                f"NormaliseView takes uint8 views [B, R, R, C], got {view.dtype} of shape "
                f"{tuple(view.shape)}"
            )
        pixels = view.permute(0, 3, 1, 2)
        arr = torch.empty(pixels.shape, dtype=torch.float32, device=view.device)
        arr.copy_(pixels)  # one pass: to float and channels-first (4-6x cheaper than chained ops)
        if self.normalise is None:
            return arr.mul_(1.0 / 255.0)
        mean = torch.tensor(self.normalise[0], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.normalise[1], dtype=torch.float32).view(1, -1, 1, 1)
        # factors made on the CPU, then moved: the same floats on any device
        scale, shift = (t.to(view.device) for t in (1.0 / (255.0 * std), -mean / std))
        return arr.mul_(scale).add_(shift)


def collate_deferred(
    views: Sequence[np.ndarray],
    records: Sequence[ImageRecord],
    *,
    transform: Callable[[Any], Any] | None = None,
    decode: Callable[[bytes, str], Any] = pil_decode,
    normalise: tuple[Sequence[float], Sequence[float]] | None = None,
    on_error: Callable[[Any, BaseException], None] | None = None,
) -> Deferred:
    """Stack uint8 views into a :class:`~jeststream.deferred.Deferred` field: view uint8
    ``[B, R, R, 3]`` (views resized to their records' ``view_resolution`` first, in one
    batched resize per size: :func:`resize_views`), scored as float ``[B, 3, R, R]`` in [0, 1] normalised by ``normalise``
    (mean, std; default: ``transform``'s ``Normalize``, if any) -- its ``view_transform``, a
    :class:`NormaliseView` (``field.scored_view()`` gives that tensor) -- with the records.
    ``transform`` None leaves ``materialise`` to be attached later (e.g. in the training
    process); ``on_error`` default: :class:`SkipBadRecord` (warn, replace)."""
    pixels = _stack_views(views, records)
    if normalise is None and transform is not None:
        normalise = normalisation(transform)
    materialise = None if transform is None else MaterialiseImage(transform, decode)
    return Deferred(
        pixels, _pooled(records), materialise, on_error if on_error else SkipBadRecord(),
        view_transform=NormaliseView(normalise),
    )


def _stack_views(views: Sequence[np.ndarray], records: Sequence[Any]) -> torch.Tensor:
    if len(views) != len(records) or not views:
        raise ValueError(
            f"collate_deferred needs one view per record and at least one, got {len(views)} "
            f"views and {len(records)} records"
        )
    sides = {getattr(r, "view_resolution", None) for r in records}
    if sides == {None}:  # final views (e.g. made with scoring_view): stacked as they are
        shapes = {v.shape for v in views}
        if len(shapes) > 1:
            raise ValueError(
                f"views of different shapes {sorted(str(sh) for sh in shapes)} and no "
                "view_resolution in their records to resize them to; make them with "
                "deferred_sample() or scoring_view()"
            )
        return torch.from_numpy(np.stack(views))
    if len(sides) > 1:
        raise ValueError(
            f"the records of one batch ask for views of different sides {sorted(map(str, sides))}"
            "; give every example of a loader the same score_resolution"
        )
    return resize_views(views, sides.pop())


def _pooled(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Decoded pixels moved into one uint8 tensor, each record holding a view of it: one
    shared-memory block crosses from a DataLoader worker instead of B pickled arrays."""
    arrays = [r.data for r in records if isinstance(r.data, np.ndarray)]
    if not arrays:
        return list(records)
    pool = torch.empty(sum(a.size for a in arrays), dtype=torch.uint8)
    out, offset = [], 0
    for r in records:
        if isinstance(r.data, np.ndarray):
            n = r.data.size
            view = pool[offset : offset + n].view(r.data.shape)
            view.numpy()[...] = r.data
            offset += n
            r = r._replace(data=view)
        out.append(r)
    return out
