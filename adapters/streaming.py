"""MosaicML streaming (MDS shards) as a JEST-ready, resumable base loader.

    loader = streaming_loader("/data/mds", batch_size=256, remote="s3://bucket/mds",
                              tokenizer=open_clip.get_tokenizer("ViT-B-32"), transform=preprocess)
    jest = JESTLoader(loader, learner, reference, ratio=0.2)
    ...
    ckpt["data"] = jest.state_dict()     # -> StreamingDataLoader.state_dict() inside
    jest.load_state_dict(ckpt["data"])   # exact resume at the super-batch boundary

Samples are MDS rows with an image column (``jpeg``/``png``/``pil`` encodings decode to PIL;
``bytes`` is opened with PIL), a caption column (``str``) and an optional key column; the
dataset yields ``{"image": tensor, "text": tokens or str, "__key__": str}`` (or a tuple with
``as_tuple=True``), which JESTLoader's default embedding and key finder understand.

Two streaming pitfalls handled by :class:`JESTStreamingDataLoader`:

- A state loaded into a dataset that was already iterated is treated as *stale* by streaming
  (issues #437, #880): its epoch counter has moved past the checkpoint's epoch, so it silently
  restarts from the beginning of the next epoch. ``load_state_dict`` rewinds the shared epoch
  counter to the checkpoint's epoch first.
- Between ``iter()`` and a pass's first batch (JESTLoader takes a state there at the start of
  every pass) streaming has not advanced its epoch yet and its sample counter is the previous
  pass's, so its state would describe the previous epoch. Here it describes the coming one.

Only streaming's public API is used (``StreamingDataLoader.__iter__`` / ``state_dict`` /
``load_state_dict`` / ``num_samples_yielded``, ``StreamingDataset.next_epoch``), so the adapter
runs on ``mosaicml-streaming`` (0.13, the ``streaming`` extra) and on its maintained fork
``streaming-community`` (0.14.2 checked: the adapter's tests pass unchanged; docs/install.md).

Exact resume needs the same ``batch_size`` given to the dataset (its partitioning depends on
it), the same ``num_workers`` and world size. Tests: call
``streaming.base.util.clean_stale_shared_memory()`` between datasets and give each dataset its
own ``local`` directory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from torch.utils.data import default_collate

from jeststream.adapters.deferred_images import (
    ImageRecord,
    MaterialiseImage,
    centre_square,
    collate_deferred,
    deferred_mode,
    deferred_sample,
    normalisation,
    pil_decode,
)
from jeststream.adapters.webdataset import default_image_transform
from jeststream.deferred import Deferred, SeededTransform, example_seed

__all__ = ["DeferredCollate", "JESTStreamingDataLoader", "StreamingImageText", "streaming_loader"]

logger = logging.getLogger(__name__)


class StreamingImageText(StreamingDataset):
    """A ``StreamingDataset`` of image-caption pairs that decodes, transforms and tokenizes.

    Args:
        image_field / text_field / key_field: MDS column names (``key_field=None``: the key is
            the sample index as a string).
        transform: ``PIL image -> tensor``; default ToTensor-like.
        tokenizer: ``list[str] -> tensor [1, ctx]`` per caption (e.g. open_clip's); None keeps
            the caption string.
        as_tuple: yield ``(image, text, key)`` instead of a dict.
        deferred: None (eager), "encoded" or "decoded": the image becomes ``(uint8 scoring view,
            ImageRecord)`` for :class:`DeferredCollate` (``streaming_loader(deferred=True)``). A
            ``bytes`` column keeps its encoded bytes ("encoded": draft-decoded views); a
            column streaming decodes itself (``jpeg``, ``png``, ``pil``) is kept as uint8.
        score_resolution: the side of the scoring view (with ``deferred``).
        **kwargs: ``StreamingDataset`` arguments (``local``, ``remote``, ``batch_size``,
            ``shuffle``, ``shuffle_seed``, ...).
    """

    def __init__(
        self,
        *,
        image_field: str = "image",
        text_field: str = "text",
        key_field: str | None = "key",
        transform: Callable[[Any], Any] | None = None,
        tokenizer: Callable[[list[str]], Any] | None = None,
        as_tuple: bool = False,
        deferred: str | None = None,
        score_resolution: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.deferred = deferred
        self.score_resolution = score_resolution
        self._aug_epoch = 0  # the epoch being iterated (seeds the augmentation)
        self.image_field = image_field
        self.text_field = text_field
        self.key_field = key_field
        self.transform = transform or default_image_transform
        self.tokenizer = tokenizer
        self.as_tuple = as_tuple
        # every sample's augmentation is seeded by (shuffle_seed, epoch, key): eager and
        # deferred pipelines give the same pixels
        self.seeded = None if self.transform is default_image_transform else SeededTransform(
            self.transform
        )

    def __iter__(self) -> Iterator[Any]:
        # read when the pass starts, before streaming advances it (a resume rewinds it first)
        self._aug_epoch = self.next_epoch
        yield from super().__iter__()

    def __getitem__(self, idx: int) -> Any:
        row = super().__getitem__(idx)
        try:
            image = row[self.image_field]
            text = row[self.text_field]
        except KeyError as exc:
            raise KeyError(
                f"MDS sample {idx} has columns {sorted(row)}; set image_field/text_field "
                f"(now {self.image_field!r}/{self.text_field!r})"
            ) from exc
        key = str(row[self.key_field]) if self.key_field and self.key_field in row else str(idx)
        try:
            image = self._decode_image(image, key)
        except Exception as exc:
            # A map-style sample cannot be skipped (the partitioning fixes every position), so a
            # damaged one stops the run -- with the sample named, not PIL's bare message.
            raise ValueError(
                f"MDS sample {idx} (key {key!r}): cannot decode its {self.image_field!r} column "
                f"({type(exc).__name__}: {exc}); re-encode or remove the sample and rewrite "
                "the shard"
            ) from exc
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if self.tokenizer is not None:
            tokens = self.tokenizer([text])
            text = tokens[0] if isinstance(tokens, torch.Tensor) and tokens.ndim == 2 else tokens
        if self.as_tuple:
            return image, text, key
        return {"image": image, "text": text, "__key__": key}


    def _decode_image(self, image: Any, key: str) -> Any:
        seed = example_seed(self.shuffle_seed, self._aug_epoch, key)
        if self.deferred is not None and isinstance(image, (bytes, bytearray, memoryview)):
            make = deferred_sample(
                self.deferred, self.score_resolution, seed=self.shuffle_seed,
                epoch=self._aug_epoch,
            )
            return make((bytes(image), "", key, "mds"))
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = pil_decode(bytes(image), "")
        elif isinstance(image, np.ndarray):
            from PIL import Image

            image = Image.fromarray(image)
        if self.deferred is not None:  # decoded by streaming: keep it as uint8
            r = self.score_resolution
            view = centre_square(image, r)  # resized to r, batched, by collate_deferred
            return view, ImageRecord(np.array(image), "", image.mode, key, "mds", seed, r)
        if self.seeded is None:
            return self.transform(image)
        return self.seeded(image, seed)


class DeferredCollate:
    """DataLoader ``collate_fn`` for :class:`StreamingImageText` with ``deferred``: the image
    field's ``(view, record)`` pairs become one :class:`~jeststream.deferred.Deferred` (views
    normalised by ``normalise``), the other fields go through torch's ``default_collate``."""

    def __init__(self, normalise: tuple[Any, Any] | None) -> None:
        self.normalise = normalise

    def __call__(self, samples: list[Any]) -> Any:
        if isinstance(samples[0], Mapping):
            images = [s["image"] for s in samples]
            rest = default_collate([{k: v for k, v in s.items() if k != "image"} for s in samples])
            return {"image": self._field(images), **rest}
        images = [s[0] for s in samples]
        rest = default_collate([tuple(s[1:]) for s in samples])
        return (self._field(images), *rest)

    def _field(self, images: list) -> Deferred:
        return collate_deferred(
            [v for v, _ in images], [r for _, r in images], normalise=self.normalise
        )


class JESTStreamingDataLoader(StreamingDataLoader):
    """``StreamingDataLoader`` whose state survives JESTLoader's resume pattern (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started = False  # a batch was yielded in the current pass
        self._pending: dict[str, Any] | None = None  # loaded, not yet consumed by a pass

    def __iter__(self) -> Iterator[Any]:
        # Eager: StreamingDataLoader.__iter__ is a generator, so it resets its sample count only
        # at the first next(); a state taken between iter() and then must already be the new
        # pass's. Its own generator still does the counting (num_samples_yielded).
        self.num_samples_yielded = 0
        self._started = False
        return self._generate(super().__iter__())

    def _generate(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._started = True
            self._pending = None
            field = batch.get("image") if isinstance(batch, Mapping) else batch[0]
            if isinstance(field, Deferred):  # attached here: no pickling of the transform
                ds = self.dataset
                field.materialise = MaterialiseImage(ds.transform, pil_decode)
                field.on_error = None  # a damaged MDS sample stops the run (as eagerly), named
            yield batch

    def state_dict(self) -> dict[str, Any] | None:
        """Position after the last yielded batch; before a pass's first batch, its start."""
        if self._pending is not None:
            return dict(self._pending)
        state = super().state_dict()
        if state is not None and not self._started:
            # streaming advances its epoch counter only when the workers start, so before the
            # first batch it would describe the *previous* epoch: describe the coming one.
            state["epoch"] = self.dataset.next_epoch
            state["sample_in_epoch"] = 0
        return state

    def load_state_dict(self, obj: Mapping[str, Any]) -> None:
        if not isinstance(obj, Mapping) or "epoch" not in obj or "sample_in_epoch" not in obj:
            raise ValueError(
                f"not a StreamingDataLoader state_dict (needs 'epoch', 'sample_in_epoch'): {obj!r}"
            )
        ds = self.dataset
        if isinstance(ds, StreamingDataset):
            # streaming drops a state whose epoch is behind the dataset's next epoch (#437,
            # #880): rewind the shared counter so the checkpoint's epoch is the next one.
            epoch = max(0, int(obj["epoch"]))
            if ds.next_epoch > epoch:
                logger.info(
                    "rewinding the streaming epoch counter from %d to %d to resume",
                    ds.next_epoch,
                    epoch,
                )
            ds.next_epoch = epoch
        self.num_samples_yielded = 0
        self._started = False
        self._pending = dict(obj)
        super().load_state_dict(dict(obj))


def streaming_loader(
    local: str,
    batch_size: int,
    *,
    remote: str | None = None,
    tokenizer: Callable[[list[str]], Any] | None = None,
    transform: Callable[[Any], Any] | None = None,
    num_workers: int = 0,
    shuffle: bool = False,
    shuffle_seed: int = 9176,
    image_field: str = "image",
    text_field: str = "text",
    key_field: str | None = "key",
    as_tuple: bool = False,
    dataset_kwargs: Mapping[str, Any] | None = None,
    deferred: bool | str = False,
    score_resolution: int | None = None,
    **dataloader_kwargs: Any,
) -> JESTStreamingDataLoader:
    """Build a resumable base loader over MDS shards (``local`` dir, or cache for ``remote``).

    Every batch has ``batch_size`` examples (``drop_last=True``); the dataset gets the same
    ``batch_size`` so that its partitioning makes resume exact across worker counts' batching.
    The augmentation of each sample is seeded by (``shuffle_seed``, epoch, key).

    ``deferred=True`` (or "encoded" / "decoded", as in ``webdataset_loader``) with
    ``score_resolution=R`` yields the image field as a :class:`jeststream.deferred.Deferred`:
    R-px scoring views now, ``transform`` on the examples a JESTLoader selects after selection
    (the same tensors as the eager loader's). Draft-decoded views need a ``bytes`` image column;
    ``jpeg``/``png`` columns are decoded by streaming and kept as uint8. A sample that fails to
    decode after selection raises naming it, as a damaged sample does eagerly.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    dataset = StreamingImageText(
        local=local,
        remote=remote,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        image_field=image_field,
        text_field=text_field,
        key_field=key_field,
        transform=transform,
        tokenizer=tokenizer,
        as_tuple=as_tuple,
        deferred=deferred_mode(deferred, score_resolution, transform or default_image_transform),
        score_resolution=score_resolution,
        **dict(dataset_kwargs or {}),
    )
    dataloader_kwargs.setdefault("drop_last", True)
    if dataset.deferred is not None:
        if "collate_fn" in dataloader_kwargs:
            raise TypeError("deferred=True brings its own collate_fn; do not pass one")
        dataloader_kwargs["collate_fn"] = DeferredCollate(normalisation(dataset.transform))
    return JESTStreamingDataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, **dataloader_kwargs
    )
