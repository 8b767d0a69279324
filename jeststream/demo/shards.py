"""The demo's shards read back: whole splits as tensors, subsets as new shards, and the base
loader the runs train from (the webdataset adapter's batches, epoch after epoch).

Images stay uint8 through the loader; :func:`model_input` converts a whole batch to the model's
float input in one call, so that JEST's base loader (1/ratio batches per step) pays no
per-sample float conversion. The decode draws no random numbers (``no_random_draws``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jeststream.deferred import no_random_draws
from jeststream.demo.data import WordTokenizer, to_model_input


def _decode_sample(sample: dict) -> tuple[torch.Tensor, str, str]:
    from jeststream.adapters.webdataset import IMAGE_EXTS, decode_image, first_field

    found = first_field(sample, IMAGE_EXTS)  # the demo writes pgm; a JPEG copy holds jpg
    if found is None:
        raise KeyError(f"sample {sample['__key__']!r} has no image field of {IMAGE_EXTS}")
    with decode_image(found[1], found[0]) as im:
        image = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return image, sample["txt"].decode(), sample["__key__"]


def iter_samples(shards: list[str], seed: int | None = None) -> Iterator[tuple]:
    """Decoded (image uint8 flat, caption, key) samples from webdataset shards.

    With a seed, the shard order and a 2,048-sample buffer are shuffled (webdataset's own
    shuffle stage), as a user's training pipeline would.
    """
    import webdataset as wds

    stages: list = [wds.SimpleShardList(list(shards))]
    if seed is not None:
        stages.append(wds.shuffle(len(shards), rng=random.Random(seed)))
    stages.append(wds.tarfile_to_samples())
    if seed is not None:
        stages.append(wds.shuffle(2048, initial=2048, rng=random.Random(seed + 1)))
    stages.append(wds.map(_decode_sample))
    return iter(wds.DataPipeline(*stages))


def load_split(shards: list[str], tokenizer: WordTokenizer, image_size: int) -> dict:
    """A whole split in memory (curated, held-out; the pool for static scoring)."""
    images, captions, keys, labels, noise = [], [], [], [], []
    split = Path(shards[0]).name.rsplit("-", 1)[0]
    meta = json.loads((Path(shards[0]).parent / f"{split}-meta.json").read_text())
    for image, text, key in iter_samples(shards):
        images.append(image)
        captions.append(text)
        keys.append(key)
        labels.append(meta[key]["label"])
        noise.append(meta[key]["noise"])
    images_u8 = torch.stack(images).view(-1, image_size, image_size)
    return {
        "image": to_model_input(images_u8),
        "text": tokenizer(captions),
        "label": torch.tensor(labels),
        "key": keys,
        "noise": noise,
    }


def subset_shards(
    src: list[str], keep: set[str], out_dir: Path, name: str, shard_size: int
) -> list[str]:
    """Copy the samples whose key is in `keep` into new shards (filter, then re-shard)."""
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / f"{name}.done"
    if not done.exists():
        for old in out_dir.glob(f"{name}-*.tar"):
            old.unlink()
        with wds.ShardWriter(
            str(out_dir / f"{name}-%05d.tar"), maxcount=shard_size, verbose=0
        ) as sink:
            for sample in wds.DataPipeline(
                wds.SimpleShardList(list(src)), wds.tarfile_to_samples()
            ):
                if sample["__key__"] in keep:
                    sink.write(
                        {
                            k: v
                            for k, v in sample.items()
                            if k == "__key__" or not k.startswith("__")
                        }
                    )
        done.write_text(str(len(keep)))
    return sorted(str(p) for p in out_dir.glob(f"{name}-*.tar"))


class StreamLoader:
    """The base loader: the webdataset adapter's batches, epoch after epoch.

    `jeststream.adapters.webdataset.webdataset_loader` reads one epoch of (images, texts, keys)
    batches; this re-iterates it (a new shard order per epoch) until ``num_batches`` batches
    have been yielded, so that a JESTLoader on top runs for exactly num_batches // n steps.
    """

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        num_batches: int,
        tokenizer: WordTokenizer,
        seed: int,
        passes: int = 16,
        **loader_kwargs: Any,
    ) -> None:
        from jeststream.adapters.webdataset import webdataset_loader

        # No DataLoader worker: JESTLoader's producer thread decodes. On the demo's 2 cores the
        # runs already keep both busy (two at a time), and handing each batch's tensors over
        # from a worker (shared memory, a file descriptor passed per tensor) cost more CPU than
        # decoding the PGM shards: a pair of 300-step JEST runs took 52 s and 46 s this way,
        # against 58 s and 55 s with one worker. One adapter "epoch" lists the shards `passes`
        # times, shuffled together: that order is the one the README's figures were measured
        # with.
        self.epoch_loader = webdataset_loader(
            list(shards) * passes,
            batch_size,
            tokenizer=tokenizer,
            transform=_image_transform,
            shuffle_shards=True,
            seed=seed,
            **loader_kwargs,  # e.g. deferred=True, score_resolution=R
        )
        self.batch_size = batch_size
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple]:
        produced, epoch = 0, 0
        while True:
            self.epoch_loader.set_epoch(epoch)
            before = produced
            for batch in self.epoch_loader:
                yield batch
                produced += 1
                if produced == self.num_batches:
                    return
            if produced == before:
                raise ValueError("the shards hold fewer samples than one batch; lower batch_size")
            epoch += 1


@no_random_draws  # the base loader runs it on 1/ratio examples per trained one: no RNG swap
def _image_transform(image) -> torch.Tensor:
    """PIL grey-level image -> uint8 numpy [S,S], as stored.

    The loader ships bytes; :func:`model_input` turns a whole batch into the model's float
    input in one vectorised call (in the training step, and for scoring as JESTLoader's
    ``score_transform``). Per-sample float conversion and channel expansion while decoding cost
    more than the decode itself, and JEST's base loader decodes 1/ratio batches per step.
    """
    # numpy, not torch: a per-sample torch call costs more than the decode's own copy; the
    # adapter stacks the arrays into one tensor per batch
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(image.height, image.width)


def model_input(batch: tuple) -> tuple:
    """A base batch (uint8 images, tokens, keys) with the images as the model's float input."""
    images, *rest = batch
    return (to_model_input(images), *rest)


def view_model_input(batch: tuple) -> tuple:
    """A deferred base batch's scoring view (images: float [N, 3, R, R] in [0, 1], the
    adapter's view of a grey image without a ``Normalize``) as the model's float input: back to
    the uint8 pixels, then :func:`model_input`'s conversion, so that at the full resolution the
    learner scores exactly what it scores in the eager batch."""
    images, *rest = batch
    pixels = images[:, 0].mul(255.0).round_().to(torch.uint8)  # x / 255 -> x exactly
    return (to_model_input(pixels), *rest)
