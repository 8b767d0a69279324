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

import io
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from jeststream.adapters.webdataset import default_image_transform

__all__ = ["JESTStreamingDataLoader", "StreamingImageText", "streaming_loader"]

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_field = image_field
        self.text_field = text_field
        self.key_field = key_field
        self.transform = transform or default_image_transform
        self.tokenizer = tokenizer
        self.as_tuple = as_tuple

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
            image = self._decode_image(image)
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


    def _decode_image(self, image: Any) -> Any:
        if isinstance(image, (bytes, bytearray, memoryview)):
            from PIL import Image

            with Image.open(io.BytesIO(bytes(image))) as im:
                im.load()
                return self.transform(im)
        if isinstance(image, np.ndarray):
            from PIL import Image

            image = Image.fromarray(image)
        return self.transform(image)


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
    **dataloader_kwargs: Any,
) -> JESTStreamingDataLoader:
    """Build a resumable base loader over MDS shards (``local`` dir, or cache for ``remote``).

    Every batch has ``batch_size`` examples (``drop_last=True``); the dataset gets the same
    ``batch_size`` so that its partitioning makes resume exact across worker counts' batching.
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
        **dict(dataset_kwargs or {}),
    )
    dataloader_kwargs.setdefault("drop_last", True)
    return JESTStreamingDataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, **dataloader_kwargs
    )
