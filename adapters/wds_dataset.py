"""The sharded webdataset dataset behind :func:`webdataset_loader`: shards split by rank and
DataLoader worker, decoded and batched, with a deterministic order that resume replays.

Invariants:

- every batch is ``(images, texts, keys)`` of exactly ``batch_size`` examples (each worker drops
  its last partial batch); ``keys`` are the samples' ``__key__``;
- shards are split by node (``wds.split_by_node``) then by worker (``wds.split_by_worker``).
  Without ``num_samples`` an epoch is one pass over the shards. With it every rank yields exactly
  ``num_samples // (batch_size * world_size)`` batches: worker w of W has a fixed share
  (``rank_batches // W``, plus one for the first ``rank_batches % W`` workers), reads its shards
  again when they run out first (pass p reshuffled by (seed, epoch, p) with
  ``shuffle_shards``), and never yields more. A worker that must yield batches but has no shard,
  or whose whole pass gives no full batch, raises ValueError rather than borrow another's shards;
- a bad shard is reported once per epoch (:class:`BadShardWarning`, ``stats["bad_shards"]``),
  however many passes read it;
- ``shuffle_shards`` orders shards per (seed, epoch), the same on every rank, before splitting;
  ``shuffle_buffer=N`` is webdataset's ``shuffle`` over N raw samples per worker, filled before
  the first leaves, seeded by (seed, epoch, rank, worker, pass): the same order under webdataset
  0.2.x and 1.0.x;
- resume: a tar stream has no random access, so ``state_dict`` records ``(epoch, batches
  yielded)`` and ``load_state_dict`` replays the epoch's seeded order, skipping that many
  batches. Exact for the same shards, ``num_workers`` and world size;
- augmentation: each sample's ``transform`` runs with its random draws seeded by (seed, epoch,
  ``__key__``) (:class:`jeststream.deferred.SeededTransform`), so a replayed epoch and the
  deferred pipeline give the same pixels. ``deferred=True`` with ``score_resolution=R`` yields
  the images as a :class:`jeststream.deferred.Deferred` field (R-px scoring views, the training
  transform after selection; :mod:`jeststream.adapters.deferred_images`).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from jeststream.adapters.deferred_images import (
    MaterialiseImage,
    SkipBadRecord,
    collate_deferred,
    deferred_mode,
    deferred_sample,
    normalisation,
)
from jeststream.adapters.wds_decode import (
    IMAGE_EXTS,
    TEXT_EXTS,
    decode_image,
    default_image_transform,
    first_field,
)
from jeststream.adapters.wds_tar import (
    BadShardWarning,
    ReportOnce,
    ShardErrorCounter,
    checked_tarfile_samples,
    expand_urls,
)
from jeststream.deferred import Deferred, SeededTransform, example_seed

__all__ = ["WebDatasetLoader", "webdataset_loader"]

# under the public module's name, which users' logging configuration names
logger = logging.getLogger("jeststream.adapters.webdataset")


class _Pipeline(IterableDataset):
    """shards -> node split -> worker split -> samples -> decode -> batches of exactly b."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        transform: Callable[[Any], Any],
        tokenizer: Callable[[list[str]], Any] | None,
        image_exts: Sequence[str],
        text_exts: Sequence[str],
        shuffle_shards: bool,
        seed: int,
        counter: ShardErrorCounter,
        num_samples: int | None = None,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        deferred: str | None = None,
        score_resolution: int | None = None,
    ) -> None:
        super().__init__()
        # deferred: None (eager), "encoded" or "decoded" (adapters/deferred_images.py)
        self.deferred = deferred
        self.score_resolution = score_resolution
        self.normalise = normalisation(transform)
        # every sample's augmentation is seeded by (seed, epoch, key): eager and deferred
        # pipelines give the same pixels (default_image_transform draws nothing)
        self.seeded = None if transform is default_image_transform else SeededTransform(transform)
        self.shuffle_buffer = shuffle_buffer
        self.num_samples = num_samples  # over all ranks; None: one pass over the shards
        self.world_size = world_size  # the world num_samples was divided by (at construction)
        self.urls = urls
        self.batch_size = batch_size
        self.transform = transform
        self.tokenizer = tokenizer
        self.image_exts = tuple(image_exts)
        self.text_exts = tuple(text_exts)
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch = 0
        self.counter = counter
        # the tar reader, (shards, handler) -> raw sample dicts: the checked ustar reader; a
        # caller may set another before iterating (benchmarks/pipeline.py compares one)
        self.read_samples: Callable[..., Iterator[dict[str, Any]]] = checked_tarfile_samples

    def shard_order(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            # same order on every rank and worker: seeded by (seed, epoch), before splitting
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        return urls

    def rank_batches(self) -> int | None:
        """Batches each rank yields per epoch (None without ``num_samples``: one pass)."""
        if self.num_samples is None:
            return None
        return self.num_samples // (self.batch_size * self.world_size)

    def worker_batches(self, worker: int, num_workers: int) -> int | None:
        """Worker ``worker``'s fixed share of :meth:`rank_batches` (the shares sum to it)."""
        total = self.rank_batches()
        if total is None:
            return None
        return total // num_workers + (1 if worker < total % num_workers else 0)

    def _pass_order(self, shards: list[str], pass_: int) -> list[str]:
        # pass 0 is the epoch's order; later passes (only with num_samples) reshuffle the
        # worker's own shards by (seed, epoch, pass): a str seed is hashed with sha512, so the
        # order is the same in every process (resume replays it)
        if pass_ == 0 or not self.shuffle_shards:
            return shards
        out = list(shards)
        random.Random(f"jeststream-wds:{self.seed}:{self.epoch}:{pass_}").shuffle(out)
        return out

    def _decode(self, raw: dict[str, Any]) -> tuple[Any, str, str] | None:
        key, url = raw["__key__"], raw["__url__"]
        try:
            img = first_field(raw, self.image_exts)
            txt = first_field(raw, self.text_exts)
            if img is None or txt is None:
                missing = "image " + "/".join(self.image_exts) if img is None else "caption"
                raise KeyError(
                    f"no {missing} field (has {sorted(k for k in raw if not k.startswith('__'))})"
                )
            if self.deferred is not None:
                image = deferred_sample(
                    self.deferred, self.score_resolution, decode=decode_image,
                    seed=self.seed, epoch=self.epoch,
                )((img[1], img[0], key, url))
            else:
                with decode_image(img[1], img[0]) as im:
                    if self.seeded is None:
                        image = self.transform(im)
                    else:
                        image = self.seeded(im, example_seed(self.seed, self.epoch, key))
            text = txt[1].decode("utf-8").strip()
        except Exception as exc:  # noqa: BLE001 -- a bad sample is skipped and counted
            self.counter.sample_error(key, url, exc)
            return None
        return image, text, key

    def _collate(self, samples: list[tuple[Any, str, str]]) -> tuple[Any, Any, list[str]]:
        images = [s[0] for s in samples]
        if self.deferred is not None:  # materialise/on_error are attached in the main process
            images = collate_deferred(
                [v for v, _ in images], [r for _, r in images], normalise=self.normalise
            )
        elif isinstance(images[0], (torch.Tensor, np.ndarray)):
            try:
                if isinstance(images[0], np.ndarray):  # e.g. an albumentations/numpy transform
                    images = torch.from_numpy(np.stack(images))
                else:
                    images = torch.stack(images)
            except (RuntimeError, ValueError, TypeError) as exc:
                kinds = sorted({f"{type(i).__name__}{tuple(i.shape)}" for i in images})
                raise ValueError(
                    f"cannot stack images of types/shapes {kinds}"
                    "; pass a transform that resizes/crops them to one size (e.g. open_clip's "
                    "preprocess)"
                ) from exc
        texts: Any = [s[1] for s in samples]
        if self.tokenizer is not None:
            texts = self.tokenizer(texts)
        return images, texts, [s[2] for s in samples]

    def _raw_samples(
        self, shards: Sequence[str], reported: set[str] | None, buffer_seed: str
    ) -> Iterator[dict[str, Any]]:
        raws = self.read_samples(shards, ReportOnce(self.counter, reported))
        if self.shuffle_buffer <= 1:
            return raws
        import webdataset as wds

        # webdataset's shuffle stage (the same algorithm in 0.2.x and 1.0.x), filled to the
        # whole buffer before the first sample leaves it, seeded for the deterministic replay
        size = self.shuffle_buffer
        return wds.shuffle(size, initial=size, rng=random.Random(buffer_seed))(raws)

    def _batches(
        self, shards: Sequence[str], reported: set[str] | None = None, buffer_seed: str = ""
    ) -> Iterator[tuple[Any, Any, list[str]]]:
        pending: list[tuple[Any, str, str]] = []
        for raw in self._raw_samples(shards, reported, buffer_seed):
            sample = self._decode(raw)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []
        # the last partial batch is dropped: every batch has batch_size examples

    def _buffer_seed(self, rank: int, worker: int, pass_: int) -> str:
        # a str seed is hashed with sha512: the same stream in every process (resume replays it)
        return f"jeststream-wds-buffer:{self.seed}:{self.epoch}:{rank}:{worker}:{pass_}"

    def __iter__(self) -> Iterator[tuple[Any, Any, list[str]]]:
        import webdataset as wds
        from webdataset.utils import pytorch_worker_info

        shards = list(wds.split_by_worker(wds.split_by_node(iter(self.shard_order()))))
        rank, world, worker, num_workers = pytorch_worker_info()
        if self.num_samples is None:
            # one pass: the epoch ends with the shards
            yield from self._batches(shards, None, self._buffer_seed(rank, worker, 0))
            return
        if world != self.world_size:
            raise ValueError(
                f"webdataset_loader was built for world size {self.world_size} but iterates "
                f"in world size {world}: num_samples={self.num_samples} per rank would not "
                "match len(); build the loader after init_process_group (or set RANK/"
                "WORLD_SIZE before building it)"
            )
        quota = self.worker_batches(worker, num_workers)
        assert quota is not None
        if quota == 0:
            return
        if not shards:
            per_rank = len(self.urls) // world
            fewer = f"num_workers={per_rank} or " if 0 < per_rank < num_workers else ""
            raise ValueError(
                f"rank {rank} DataLoader worker {worker} has no shard ({len(self.urls)} shards "
                f"for {world} ranks x {num_workers} workers) but must yield {quota} of the "
                f"rank's {self.rank_batches()} batches (num_samples={self.num_samples}); use "
                f"{fewer}at least {world * num_workers} shards"
            )
        bad: set[str] = set()  # reported once per epoch, however many passes read them
        done = pass_ = 0
        while True:
            before = done
            order = self._pass_order(shards, pass_)
            for batch in self._batches(order, bad, self._buffer_seed(rank, worker, pass_)):
                yield batch
                done += 1
                if done == quota:
                    return  # never more than the share: every rank yields the same count
            if done == before:
                raise ValueError(
                    f"rank {rank} DataLoader worker {worker}: a whole pass over its "
                    f"{len(shards)} shard(s) gave no batch of {self.batch_size} (bad shards: "
                    f"{sorted(bad) or 'none'}), so it cannot yield its {quota} batches "
                    f"(num_samples={self.num_samples}); fix or drop the bad shards, or use "
                    "fewer workers so that each has more shards"
                )
            pass_ += 1
            logger.info(
                "webdataset: rank %d worker %d read its %d shards; pass %d for batches %d..%d",
                rank, worker, len(shards), pass_, done, quota,
            )


class WebDatasetLoader:
    """Iterable of ``(images, texts, keys)`` batches from webdataset shards (see module doc).

    Exposes what JESTLoader and open_clip_train look at: ``batch_size``, ``stats`` (with
    ``bad_shards``), ``set_epoch``, ``state_dict``/``load_state_dict``, ``num_batches`` /
    ``num_samples`` / ``len`` when ``num_samples`` was given, ``dataset``, ``loader`` (the
    underlying torch DataLoader).
    """

    def __init__(
        self,
        pipeline: _Pipeline,
        loader: DataLoader,
        num_samples: int | None = None,
        world_size: int = 1,
    ) -> None:
        self.dataset = pipeline
        self.loader = loader
        self.batch_size = pipeline.batch_size
        self.sampler = None
        self._counter = pipeline.counter
        self._num_samples = num_samples
        self._world = max(1, int(world_size))  # ranks sharing num_samples (split_by_node)
        self._yielded = 0
        self._skip = 0
        self._materialise = (
            None
            if pipeline.deferred is None
            else MaterialiseImage(pipeline.transform, decode_image)
        )

    @property
    def stats(self) -> dict[str, Any]:
        out = self._counter.as_dict()
        out["batches"] = self._yielded
        return out

    @property
    def bad_shards(self) -> int:
        return self._counter.bad_shards

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order (with ``shuffle_shards``); call before iterating.

        A restored position belongs to the restored epoch: moving to another epoch drops it
        (a checkpoint taken at the end of epoch e must not skip batches of epoch e + 1).
        """
        epoch = int(epoch)
        if epoch != self.dataset.epoch and self._skip:
            logger.info(
                "webdataset: set_epoch(%d) after resuming inside epoch %d; starting epoch %d "
                "from its beginning",
                epoch,
                self.dataset.epoch,
                epoch,
            )
            self._skip = 0
            self._yielded = 0
        self.dataset.epoch = epoch

    @property
    def num_batches(self) -> int:
        if self._num_samples is None:
            # AttributeError, so that getattr(loader, "num_batches", None) means "unknown"
            raise AttributeError(
                "the number of batches of a webdataset stream is unknown; pass num_samples= to "
                "webdataset_loader (e.g. from your dataset's sizes.json)"
            )
        return self._num_samples // (self.batch_size * self._world)

    @property
    def num_samples(self) -> int:
        """Examples this rank yields per epoch (``num_batches * batch_size``)."""
        return self.num_batches * self.batch_size

    def __len__(self) -> int:
        if self._num_samples is None:
            raise TypeError("a webdataset stream has no len(); pass num_samples= to know it")
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        # Eager part (not in the generator) so that state_dict() right after iter() is exact.
        skip, self._skip = self._skip, 0
        self._yielded = skip
        return self._generate(skip)

    def _generate(self, skip: int) -> Iterator[Any]:
        it = iter(self.loader)
        if skip:
            logger.info("webdataset resume: replaying %d batches of epoch %d", skip, self.epoch)
        for _ in range(skip):
            try:
                next(it)
            except StopIteration:
                logger.warning(
                    "webdataset resume: the epoch has fewer than %d batches (shards changed?)",
                    skip,
                )
                return
        seen = self._counter.bad_shards
        for batch in it:
            self._yielded += 1
            if isinstance(batch[0], Deferred):
                batch[0].materialise = self._materialise
                batch[0].on_error = SkipBadRecord(self._counter.sample_error)
            if self.loader.num_workers > 0 and self._counter.bad_shards != seen:
                seen = self._report_from_workers(seen)
            yield batch
        if self.loader.num_workers > 0 and self._counter.bad_shards != seen:
            self._report_from_workers(seen)

    def _report_from_workers(self, seen: int) -> int:
        # A worker's warning goes to its own stderr; repeat it in the training process.
        now = self._counter.bad_shards
        names = self._counter.bad_shard_names[seen:now]
        warnings.warn(
            f"{now - seen} bad webdataset shard(s) skipped by DataLoader workers: "
            f"{', '.join(names) or '(names not recorded)'} (total {now})",
            BadShardWarning,
            stacklevel=3,
        )
        return now

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches"}``: the position after the last yielded batch."""
        return {"epoch": self.epoch, "batches": self._yielded, "seed": self.dataset.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next ``iter()`` replays the epoch and skips ``state["batches"]``."""
        if not isinstance(state, Mapping) or not {"epoch", "batches"} <= state.keys():
            raise ValueError(
                f"not a WebDatasetLoader state_dict (needs 'epoch' and 'batches'): {state!r}"
            )
        if state.get("seed", self.dataset.seed) != self.dataset.seed:
            logger.warning(
                "resuming with seed %s, the state was saved with seed %s: shard order differs",
                self.dataset.seed,
                state["seed"],
            )
        self.dataset.epoch = int(state["epoch"])
        self._skip = int(state["batches"])
        self._yielded = self._skip


def convert_batch(batch: tuple) -> tuple:
    """The DataLoader's ``collate_fn`` for the pipeline's own batches: torch's
    ``default_convert`` for fields that may need it (e.g. a tokenizer's numpy array), not for
    the image tensor, the Deferred field or the list of keys (its per-element walk through
    abstract-class checks cost ~1 % of a deferred JEST pass, once per base batch)."""
    from torch.utils.data import default_convert

    return tuple(
        f if isinstance(f, (torch.Tensor, Deferred)) or (
            type(f) is list and all(type(k) is str for k in f)
        ) else default_convert(f)
        for f in batch
    )


def webdataset_loader(
    urls: str | Sequence[str],
    batch_size: int,
    *,
    tokenizer: Callable[[list[str]], Any] | None = None,
    transform: Callable[[Any], Any] | None = None,
    num_workers: int = 0,
    image_exts: Sequence[str] = IMAGE_EXTS,
    text_exts: Sequence[str] = TEXT_EXTS,
    shuffle_shards: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    num_samples: int | None = None,
    on_bad_shard: str = "warn",
    pin_memory: bool = False,
    deferred: bool | str = False,
    score_resolution: int | None = None,
    **dataloader_kwargs: Any,
) -> WebDatasetLoader:
    """Build a JEST-ready base loader over webdataset shards.

    Args:
        urls: shard URLs (brace-expanded string, ``::``-joined, or a list); anything
            ``webdataset.gopen`` opens (paths, ``pipe:``, http, ...).
        batch_size: the training batch size b (every batch has exactly b examples).
        tokenizer: ``list[str] -> tensor [b, ctx]`` (e.g. ``open_clip.get_tokenizer(...)``);
            None keeps captions as a list of str.
        transform: ``PIL image -> tensor`` (e.g. open_clip's preprocess) or ``-> numpy
            array`` (stacked into one tensor per batch); default
            :func:`default_image_transform`.
        num_workers: DataLoader workers; shards are split between them (and between ranks).
        image_exts / text_exts: sample fields tried in order for the image and the caption.
        shuffle_shards: shuffle the shard order each epoch, seeded by ``seed`` and the epoch.
        shuffle_buffer: shuffle samples through a buffer of this many raw samples per worker
            (0: off; open_clip uses 5000), seeded by (seed, epoch, rank, worker, pass).
        num_samples: examples per epoch over all ranks, if known (e.g. the sum of
            ``sizes.json``, like open_clip's ``--train-num-samples``); gives ``len`` /
            ``num_batches`` = ``num_samples // (batch_size * world_size)`` per rank, and every
            rank then yields exactly that many batches per epoch, reading its shards again
            when they run out first (so that DDP ranks end the epoch together; module doc).
            None: an epoch is one pass over the shards.
        on_bad_shard: "warn" (count and continue) or "raise".
        deferred: True, "encoded" or "decoded": yield images as a
            :class:`jeststream.deferred.Deferred` field -- a scoring view of
            ``score_resolution`` pixels now, the training tensor (``transform`` applied to the
            examples JESTLoader selects) after selection; the yielded batches are what the eager
            loader gives (:mod:`jeststream.adapters.deferred_images`). For a JESTLoader only.
            A sample that fails to decode after selection is skipped and counted like any bad
            sample (``stats["bad_samples"]``) and replaced by the next candidate.
        score_resolution: the side of the scoring view (with ``deferred``), e.g. the
            JESTLoader's ``score_resolution``.
        **dataloader_kwargs: passed to ``torch.utils.data.DataLoader``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(
            f"shuffle_buffer must be an int >= 0 (samples; 0 turns it off), got {shuffle_buffer!r}"
        )
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer must be callable list[str] -> tensor, got {tokenizer!r}")
    if "batch_size" in dataloader_kwargs or "collate_fn" in dataloader_kwargs:
        raise TypeError("batching happens in the pipeline; do not pass batch_size/collate_fn")
    if dataloader_kwargs.get("persistent_workers"):
        raise TypeError(
            "persistent_workers=True is not supported: the workers must be restarted each pass "
            "to see set_epoch() and a resumed position; drop the argument"
        )
    dataloader_kwargs.pop("persistent_workers", None)
    url_list = expand_urls(urls)
    from webdataset.utils import pytorch_worker_info

    _, world, _, _ = pytorch_worker_info()
    if len(url_list) < world * max(1, num_workers):
        logger.warning(
            "%d shards for %d ranks x %d workers: some workers get no shard and produce "
            "nothing%s",
            len(url_list),
            world,
            max(1, num_workers),
            "" if num_samples is None else " (with num_samples= iterating raises ValueError)",
        )
    if world > 1 and num_samples is None:
        logger.warning(
            "webdataset_loader under %d ranks without num_samples=: each rank yields the batches "
            "its shards hold. A JESTLoader with global selection (the default under torchrun) "
            "ends every rank's pass together when one runs out; used directly, or with "
            "distributed='local', a DDP rank that runs out first leaves the others waiting in "
            "their next all-reduce; pass num_samples= (the total over all ranks, e.g. the sum "
            "of sizes.json) so that every rank yields the same number of batches",
            world,
        )
    pipeline = _Pipeline(
        url_list,
        batch_size,
        transform or default_image_transform,
        tokenizer,
        image_exts,
        text_exts,
        shuffle_shards,
        seed,
        ShardErrorCounter(on_bad_shard, dataloader_kwargs.get("multiprocessing_context")),
        num_samples,
        world,
        shuffle_buffer,
        deferred_mode(deferred, score_resolution, transform or default_image_transform),
        score_resolution,
    )
    loader = DataLoader(
        pipeline,
        batch_size=None,
        collate_fn=convert_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers must see set_epoch()/resume each pass
        **dataloader_kwargs,
    )
    return WebDatasetLoader(pipeline, loader, num_samples, world_size=world)
