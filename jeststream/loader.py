"""JESTLoader: the user-facing, drop-in data loader that does joint example selection.

    loader = JESTLoader(base_loader, learner, reference, ratio=0.2)
    for images, texts in loader:     # same structure and batch size as base_loader's
        ...                          # unchanged training step

Each yielded batch is selected from a super-batch of n = round(1/ratio) consecutive base
batches, scored by a snapshot of the learner and by the frozen reference. The loader wires
batch -> scoring -> selection and owns the public surface and the resumable state; the
threading lives in :mod:`jeststream.pipeline`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from jeststream.batch import batch_size as _batch_size
from jeststream.batch import concat_batches, find_keys, iter_tensors
from jeststream.deferred import Materializer
from jeststream.diagnostics import BatchLearnability, measure_draws
from jeststream.distributed import Coordinator, check_not_sharded, check_resume, resolve_mode
from jeststream.losses import CRITERIA, Embeddings, criterion_weights
from jeststream.pipeline import END, ThreadPipeline, call_with_timeout, to_device
from jeststream.reference_cache import ReferenceCache
from jeststream.scoring import EmbedFn, Scorer, ScoreResult
from jeststream.selection import LOSSES, example_scores, joint_sample_from_embeddings
from jeststream.selection_log import SelectionLog, write_run_config
from jeststream.snapshot import (
    LearnerSnapshot,
    _Stopped,
    is_accelerator,
    scheduled_step,
    scoring_device,
    unwrap_model,
)

__all__ = ["JESTLoader", "SelectionInfo"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 2
_DEFAULT_N_CHUNKS = 16
_BAD_SCORES = ("raise", "uniform")
SCORING = ("auto", "sync", "lagged", "latest")
_LOG_MODES = ("auto", "a", "w")


def resolve_scoring(
    scoring: str,
    async_scoring: bool | None,
    deterministic: bool | None,
    prefetch: int | None,
    device: torch.device,
) -> tuple[str, bool, bool, int]:
    """``scoring`` (or the deprecated booleans) -> (name, async_scoring, deterministic, prefetch).

    "sync": inline, the current learner (lag 0). "lagged": a background thread scores super-batch
    t with the snapshot after step t - prefetch (deterministic). "latest": a background thread
    scores with whatever snapshot is newest (timing-dependent). "auto": "sync" on the CPU,
    "lagged" with prefetch 1 on an accelerator.
    """
    if scoring not in SCORING:
        raise ValueError(f"scoring={scoring!r} is not one of {SCORING}")
    if async_scoring is not None or deterministic is not None:
        if scoring != "auto":
            raise ValueError(
                f"scoring={scoring!r} and the deprecated async_scoring=/deterministic= were both "
                "given; pass scoring= alone"
            )
        a = True if async_scoring is None else bool(async_scoring)
        d = bool(deterministic)
        name = "lagged" if d else ("latest" if a else "sync")
        spelling = (
            "scoring='lagged' (which scores in a background thread)"
            if d and not a
            else f"scoring={name!r}"
        )
        warnings.warn(
            f"JESTLoader(async_scoring=, deterministic=) is deprecated; pass {spelling}",
            DeprecationWarning,
            stacklevel=3,
        )
        return name, a, d, 2 if prefetch is None else prefetch  # their default was prefetch=2
    if scoring == "auto":
        scoring = "lagged" if is_accelerator(device) else "sync"
    return scoring, scoring != "sync", scoring == "lagged", 1 if prefetch is None else prefetch


def _epoch_seed(seed: int, epoch: int) -> int:
    # a distinct, reproducible generator stream per (seed, epoch)
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 1) % (2**63 - 1)


@dataclasses.dataclass
class SelectionInfo:
    """What happened to one yielded batch.

    indices: positions of the yielded examples in their super-batch (cpu LongTensor[k], draw
    order); scores: their per-example scores (``selection.example_scores``); timings in seconds:
    waited_s (consumer blocked in ``next()``), scored_s (both forwards), selected_s (sampling);
    staleness: yielded batches between the snapshot refresh and this batch's yield;
    batch_learnability: with ``JESTLoader(batch_learnability=True)``, the criterion's score of
    the yielded sub-batch as a whole next to an independent and a uniform draw from the same
    super-batch (:mod:`jeststream.diagnostics`), else None; replaced: (position, replacement)
    pairs for deferred records that failed to materialise after selection
    (:mod:`jeststream.deferred`), each replaced by the next candidate by score -- ``indices``
    hold the replacements.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    super_batch_mean: float
    selected_mean: float
    waited_s: float
    scored_s: float
    selected_s: float
    snapshot_version: int
    staleness: int
    fallback: bool
    step: int
    epoch: int
    super_batch_size: int
    batch_learnability: BatchLearnability | None = None
    replaced: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass
class _Item:
    batch: Any
    info: SelectionInfo
    resume: dict  # loader state right after this super-batch: restoring it draws the next one
    keys: list[str] | None
    all_scores: torch.Tensor  # cpu [B]
    selected: torch.Tensor  # cpu bool [B]


def _bad_examples(
    learner: Embeddings, reference: Embeddings | None, size: int
) -> torch.Tensor | None:
    """cpu bool [size] marking examples whose embeddings (either model) are non-finite; all of
    them when a logit scale/bias is; None when everything is finite."""
    bad = torch.zeros(size, dtype=torch.bool)
    for e in (learner, reference):
        if e is None:
            continue
        scalars = [e.logit_scale] + ([] if e.logit_bias is None else [e.logit_bias])
        if not all(bool(torch.isfinite(torch.as_tensor(s)).all()) for s in scalars):
            bad[:] = True
        rows_ok = torch.isfinite(e.image).all(dim=1) & torch.isfinite(e.text).all(dim=1)
        bad |= ~rows_ok.cpu()
    return bad if bool(bad.any()) else None


@dataclasses.dataclass
class _Scored:
    super_batch: Any  # on the scoring device
    size: int
    k: int
    step: int
    base_state: Any
    keys: list[str] | None
    scored: ScoreResult


class _Producer:
    """One pass over the base loader, in two steps: ``draw_and_score`` (base batches ->
    super-batch -> both forwards) and ``select`` (scores -> indices -> sub-batch). The async
    path runs them in two threads so that selecting super-batch k overlaps with scoring k+1;
    the sync path runs the same two calls inline -- hence the same results for the same seed.

    Holds no reference to the consumer-side iterator (so dropping the iterator stops the thread).
    """

    def __init__(self, loader: JESTLoader, base_iter: Any, step: int, start: int) -> None:
        self.loader = loader
        self.base_iter = base_iter
        self.step = step  # global index of the next super-batch == index of its yielded batch
        self.start = start  # the pass's first step (the snapshot schedule counts from it)
        self.epoch = loader.epoch  # recorded once per pass: set_epoch() mid-pass is for the next
        self.activity = "starting"  # what the producer is doing (named by timeout errors)
        self.short: str | None = None  # a base batch shorter than b, until the pass ends
        # distributed="global": the pass's per-super-batch rounds (jeststream.distributed)
        self.rounds = loader._dist.start_pass() if loader._dist is not None else None

    def draw_and_score(self, should_stop: Callable[[], bool]) -> Any:
        ld = self.loader
        if self.base_iter is None:
            return END
        base_batches = []
        for i in range(ld.n):
            if should_stop():
                return None
            self.activity = f"next() on the base loader (base batch {i + 1} of {ld.n} for step {self.step})"
            try:
                batch = next(self.base_iter)
            except StopIteration:
                self.base_iter = None  # drop it now: a DataLoader iterator frees its workers
                break
            self.check_size(_batch_size(batch), f"base batch {i + 1} of {ld.n} for step {self.step}")
            base_batches.append(batch)
            ld._base_batches += 1
        if not base_batches or (len(base_batches) < ld.n and ld.drop_last):
            if base_batches:  # drop_last: count what is thrown away, never drop silently
                ld._dropped += sum(_batch_size(b) for b in base_batches)
                logger.info(
                    "drop_last: %d base batch(es) at the end of the pass make no full super-batch "
                    "of %d; dropped (stats['dropped_examples'])",
                    len(base_batches),
                    ld.n,
                )
            self.base_iter = None
            self.activity = "finished"
            return END
        # the base's state *before* the next super-batch is drawn (torchdata Prefetcher-style)
        base_state = ld._base_state()
        step = self.step
        self.step += 1

        # Move before concatenating: pinned base batches go straight to the device, and the
        # concatenation then runs there instead of as a host memcpy.
        super_batch = concat_batches([to_device(b, ld.device) for b in base_batches])
        del base_batches
        size = _batch_size(super_batch)
        k = max(1, min(size, math.floor(size / ld.n + 0.5)))
        want_keys = ld._log_path is not None or ld._scorer.needs_keys
        keys = find_keys(super_batch, ld.key_fn, size=size) if want_keys else None
        snap_step = ld._scheduled(step, self.start)
        self.activity = (
            f"scoring step {step}"
            + ("" if snap_step is None else f" (waiting for / using the snapshot of step {snap_step})")
        )
        try:
            scored = ld._scorer(
                super_batch, size, snapshot_step=snap_step, should_stop=should_stop, keys=keys
            )
        except _Stopped:
            return None
        self.activity = f"selecting step {step}"
        return _Scored(super_batch, size, k, step, base_state, keys, scored)

    def check_size(self, size: int, where: str) -> None:
        """One base batch's size against b: the first batch sets b when the base declares none;
        a larger one raises (the loader would yield more than ``batch_size``); a shorter one is
        legitimate at the end of the pass (drop_last=False), and warned about once when more
        base batches follow it."""
        ld = self.loader
        if ld._b is None:
            ld._set_batch_size(size, source="the first base batch")
            return
        if size > ld._b:
            raise ValueError(
                f"{where} has {size} examples, more than the batch size b={ld._b} (from "
                f"{ld._b_source}): JESTLoader yields batches of b and sizes its selection from "
                "it, so a larger base batch would make a larger yielded one. Make the base "
                "loader yield batches of one size (a shorter one only where the data runs out), "
                "e.g. DataLoader(batch_size=b) or webdataset's .batched(b)"
            )
        if self.short is not None and not ld._warned_short:
            ld._warned_short = True
            warnings.warn(
                f"the base batch size changed in the middle of a pass: {self.short} has fewer "
                f"examples than b={ld._b} and more base batches follow it, so the yielded batch "
                "of its super-batch has round(size / n) examples, not b. webdataset's "
                ".batched(b) does this with several workers (partial=True, its default: pass "
                "partial=False); otherwise check the base loader (warned once)",
                UserWarning,
                stacklevel=2,
            )
        self.short = f"{where} ({size} examples)" if size < ld._b else None

    def select(self, s: _Scored) -> _Item:
        ld = self.loader
        size, k, step, scored = s.size, s.k, s.step, s.scored
        t0 = time.perf_counter()
        with torch.inference_mode():
            # Common path first: the selection maths validates finiteness itself (ValueError),
            # so the per-row scan below runs only when something is wrong.
            bad: torch.Tensor | None = None
            own_scores: torch.Tensor | None = None  # on the scoring device, for the sampler
            try:
                own_scores = example_scores(
                    scored.learner, scored.reference, loss=ld.loss, criterion=ld.criterion
                )
                per_example = own_scores.float().cpu()
            except ValueError:
                bad = _bad_examples(scored.learner, scored.reference, size)
                if bad is None:  # a genuine error, not bad scores
                    raise
                per_example = torch.full((size,), math.nan)
            else:
                if not bool(torch.isfinite(per_example).all()):
                    bad = ~torch.isfinite(per_example)
            fallback = bad is not None
            if self.rounds is not None:  # global selection: the ranks agree on the outcome
                idx, fallback = self.rounds.sample(
                    scored.learner,
                    scored.reference,
                    k,
                    size=size,
                    step=step,
                    own_scores=None if fallback else own_scores,
                    bad_message=None if not fallback else f"{int(bad.sum())} of {size} non-finite",
                    loss=ld.loss,
                    criterion=ld.criterion,
                    n_chunks=ld.n_chunks,
                    temperature=ld.temperature,
                    generator=ld._generator,
                    on_bad_scores=ld.on_bad_scores,
                )
                idx = idx.cpu()
            elif fallback:
                n_bad = int(bad.sum())
                if ld.on_bad_scores == "raise":
                    raise ValueError(
                        f"JEST scores at step {step} have {n_bad} non-finite (NaN/inf) example "
                        f"score{'s' if n_bad != 1 else ''} out of {size} in the super-batch; check "
                        "the learner/reference outputs, or pass on_bad_scores='uniform' to select "
                        "uniformly for such super-batches"
                    )
                logger.warning(
                    "step %d: %d of %d JEST scores are non-finite; selecting uniformly",
                    step,
                    n_bad,
                    size,
                )
                idx = torch.randperm(size, generator=ld._generator)[:k]
            else:
                idx = joint_sample_from_embeddings(
                    scored.learner,
                    scored.reference,
                    k,
                    loss=ld.loss,
                    criterion=ld.criterion,
                    n_chunks=min(ld.n_chunks, k),
                    temperature=ld.temperature,
                    generator=ld._generator,
                    own_scores=own_scores,  # the first chunk's logits: not computed twice
                ).cpu()
        selected_s = time.perf_counter() - t0
        learnability = None  # measured after the draw, with its own generator: changes nothing
        if ld.batch_learnability and not fallback:
            learnability = measure_draws(
                scored.learner,
                scored.reference,
                idx,
                loss=ld.loss,
                criterion=ld.criterion,
                temperature=ld.temperature,
                seed=(ld.seed, self.epoch, step),
            )
        # Tensors made under inference_mode reject in-place use outside it; these reach the user.
        idx, per_example = idx.clone(), per_example.clone()
        # Deferred fields are materialised for the selected examples only (thread pool); a
        # record that fails is replaced by the next-best candidate, so the batch stays k.
        gathered = ld._materializer.gather(
            s.super_batch,
            idx,
            lambda: torch.argsort(per_example.nan_to_num(nan=-math.inf), descending=True),
        )
        batch, idx = gathered.batch, gathered.indices
        resume = ld._make_state(s.base_state, step + 1, self.start, self.epoch)
        chosen = per_example[idx]
        mask = torch.zeros(size, dtype=torch.bool)
        mask[idx] = True
        info = SelectionInfo(
            indices=idx,
            scores=chosen,
            super_batch_mean=float(per_example.mean()),
            selected_mean=float(chosen.mean()),
            waited_s=0.0,
            scored_s=scored.seconds,
            selected_s=selected_s,
            snapshot_version=scored.version,
            staleness=-1,
            fallback=fallback,
            step=step,
            epoch=self.epoch,
            super_batch_size=size,
            batch_learnability=learnability,
            replaced=gathered.replaced,
        )
        return _Item(batch, info, resume, s.keys, per_example, mask)

    def produce(self, should_stop: Callable[[], bool]) -> Any:
        """Step 1 (thread 1); under global selection its end or failure is told to every rank."""
        if self.rounds is None:
            return self.draw_and_score(should_stop)
        return self.rounds.produce(self.draw_and_score, should_stop, self.step)

    def finish(self, s: Any) -> Any:
        """Step 2 (thread 2); under global selection each super-batch is one round."""
        if self.rounds is None:
            return self.select(s)
        return self.rounds.finish(self.select, s, size=lambda s: s.size)

    def __call__(self, should_stop: Callable[[], bool]) -> Any:
        """Both steps inline (the sync path)."""
        s = self.produce(should_stop)
        return s if s is None or s is END else self.finish(s)


def _scored_tensors(s: _Scored):
    if not isinstance(s, _Scored):  # a distributed round's marker: no tensors
        return
    yield from iter_tensors(s.super_batch)
    for e in (s.scored.learner, s.scored.reference):
        if e is not None:
            yield from (t for t in e if isinstance(t, torch.Tensor))


def _item_tensors(item: _Item):
    return iter_tensors(item.batch)


class _JESTIterator:
    """One pass (epoch) over a JESTLoader. Dropping it (``break`` + GC) stops its producer."""

    def __init__(self, loader: JESTLoader) -> None:
        self._loader = loader
        self._prefetcher: ThreadPipeline | None = None
        self._done = False
        self._superseded: str | None = None  # why a later call ended this pass (next() raises it)
        self._base_batches_at_start = loader._base_batches
        step = loader._step
        restored = loader._restored and loader._resume is not None
        pass_start = loader._resume.get("pass_start") if restored else None
        # A restore in the middle of a pass continues that pass: the snapshot schedule still
        # counts from its first step, as it did in the uninterrupted run.
        mid_pass = pass_start is not None and pass_start < step
        self._start_step = start = int(pass_start) if mid_pass else step
        snap = loader._snapshot
        if not (mid_pass and loader._loaded_snapshot is not None):
            snap.release_before(step)  # the previous pass's versions are not needed any more
            snap.refresh(step)  # the learner may have trained since the last pass
            if mid_pass and loader._lag() is not None and loader._scheduled(step, start) < step:
                logger.info(
                    "resumed at step %d without the snapshot weights "
                    "(state_dict(include_snapshot=True)): the super-batches scheduled for "
                    "snapshots taken before step %d are scored with the learner as restored",
                    step,
                    step,
                )
        snap.release_before(loader._scheduled(step, start))
        base_iter = iter(loader.base_loader)
        if not loader._restored:  # else keep the loaded state: nothing was drawn since
            loader._resume = loader._make_state(loader._base_state(), step, step, loader.epoch)
        producer = _Producer(loader, base_iter, step, start)
        self._producer = producer
        self._rounds = producer.rounds
        if loader.async_scoring:
            self._prefetcher = ThreadPipeline(
                producer.produce,
                stages=[(producer.finish, _scored_tensors)],
                prefetch=loader.prefetch,
                device=loader.device,
                cross_stream_tensors=_item_tensors,
                timeout=loader.timeout,
                describe=lambda: producer.activity,
            )
            self._producer = None  # the thread owns it now

    def __iter__(self) -> _JESTIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            if self._superseded is not None:  # never a silent end of a pass still consumed
                raise RuntimeError(self._superseded)
            raise StopIteration
        ld = self._loader
        step = ld._step
        t0 = time.perf_counter()
        try:
            ld._snapshot.release_before(ld._scheduled(step, self._start_step))
            if ld.refresh_every and step > self._start_step and step % ld.refresh_every == 0:
                ld._snapshot.refresh(step)
            if self._prefetcher is not None:
                item = self._prefetcher.get()
            else:
                try:
                    item = self._sync_step()
                except StopIteration as exc:  # from user code: must not end the loop silently
                    raise RuntimeError(
                        "StopIteration raised while building a super-batch (embed, "
                        "score_transform or key_fn?)"
                    ) from exc
            if item is END:  # the base ended (or, under global selection, a rank's did)
                raise StopIteration
            info = dataclasses.replace(
                item.info,
                waited_s=time.perf_counter() - t0,
                staleness=ld._snapshot.staleness(item.info.snapshot_version, step),
            )
            ld._on_yield(item, info)  # validates and logs first; state advances only after
        except StopIteration:
            self.close()
            if ld._step == self._start_step and not ld._restored:
                logger.warning(
                    "the JESTLoader pass yielded no batch: the base loader gave %d base batch(es) "
                    "this pass (a super-batch needs n=%d = round(1/ratio)%s); check the base "
                    "loader's length, or lower n (raise ratio)",
                    ld._base_batches - self._base_batches_at_start,
                    ld.n,
                    ", and drop_last=True drops a short one" if ld.drop_last else "",
                )
            # The pass is over and the base exhausted: from now on the state is the end of this
            # epoch (a resumable base then starts the next one), not the last super-batch's
            # boundary, which a StatefulDataLoader would resume as an empty rest of the epoch.
            # Also after a restore whose pass had nothing left: the next pass is a new one.
            ld._resume = ld._make_state(ld._base_state(), ld._step, None, ld._resume["epoch"])
            ld._restored = False
            ld._loaded_snapshot = None
            raise
        except BaseException:
            self.close()
            raise
        return (item.batch, info) if ld.return_info else item.batch

    def _sync_step(self) -> Any:
        """The synchronous path: the producer's two steps on this thread; with ``timeout`` set,
        the first (base batches and scoring) runs under :func:`call_with_timeout`'s watchdog, so
        a hung base loader raises TimeoutError naming it, as the asynchronous path does."""
        producer, ld = self._producer, self._loader
        if ld.timeout is None:
            return producer(lambda: False)
        s = call_with_timeout(
            producer.produce,
            timeout=ld.timeout,
            device=ld.device,
            describe=lambda: producer.activity,
        )
        return s if s is END else producer.finish(s)

    def close(self, superseded: str | None = None) -> None:
        """End this pass: stop and join the producer. ``superseded`` (the loader's own calls):
        an unfinished pass's later ``next()`` raises RuntimeError with it instead of ending."""
        if superseded is not None and not self._done:
            self._superseded = superseded
        self._done = True
        alive = False
        if self._prefetcher is not None:
            self._prefetcher.close()
            alive = any(t.is_alive() for t in self._prefetcher.threads)
            self._prefetcher = None
        self._producer = None
        rounds, self._rounds = getattr(self, "_rounds", None), None
        if rounds is not None:  # global selection: release peers still in this pass's round
            rounds.close(threads_alive=alive)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from GC (e.g. at interpreter exit)
            pass


class JESTLoader:
    """Wrap ``base_loader`` so that each yielded batch is JEST-selected from n base batches.

    Args:
        base_loader: iterable of batches of b examples (any tuple/list/dict structure).
        learner: the live model being trained (DDP / torch.compile wrappers are unwrapped).
        reference: frozen reference model (None only with ``criterion="hard_learner"``), or a
            :class:`~jeststream.reference_cache.ReferenceCache` of its embeddings (looked up by
            per-example key instead of running it: the batches must carry keys, see key_fn).
        ratio: filtering ratio b/B; n = round(1/ratio) base batches make a super-batch.
        n_chunks, loss, criterion, temperature: passed to the joint sampler.
        embed: ``fn(model, batch) -> Embeddings``; default: open_clip duck typing.
        refresh_every: copy the live learner into the snapshot every this many yielded
            batches (0: only at the start of each pass).
        snapshot_dtype: optional dtype of the learner snapshot (e.g. torch.bfloat16).
        scoring: which learner weights score a super-batch, and where:
            "sync": inline in the caller's thread with the current learner (lag 0);
            "lagged": a background thread (its own stream on an accelerator) scores super-batch
            t with the snapshot taken after step t - ``prefetch``, so runs repeat exactly;
            "latest": a background thread scores with whatever snapshot is newest
            (timing-dependent: runs do not repeat); "auto" (default): "sync" on the CPU, where
            overlap buys no wall time, "lagged" with ``prefetch=1`` on an accelerator. Each step
            of lag costs learning speed (measured in ``docs/performance.md``).
        prefetch: super-batches scored ahead by the background thread (a bounded queue); under
            "lagged" also the lag. Default 1.
        async_scoring, deterministic: deprecated spellings of ``scoring`` (``DeprecationWarning``):
            (True, False) is "latest", (True, True) "lagged", (False, False) "sync"; (False, True)
            runs the "lagged" schedule inline. Their default prefetch stays 2.
        device: scoring device; defaults to the learner's.
        seed: seeds the loader's own CPU generator (sampling is device-independent).
        drop_last: drop a trailing super-batch of fewer than n base batches.
        score_transform: ``batch -> batch`` applied to the super-batch before scoring only.
        score_resolution: score the learner snapshot on images resized to this side (pixels);
            an open_clip ViT runs with resampled positional embeddings (``jeststream.low_res``).
            The reference, the live learner and the yielded batch are unchanged.
        on_bad_scores: "raise" or "uniform" for super-batches with NaN/inf scores.
        return_info: deprecated: yield ``(batch, SelectionInfo)`` instead of ``batch``. Read
            ``loader.last_info`` after each batch instead (the batch structure stays the base's).
        batch_learnability: also measure each yielded sub-batch's learnability as a whole next
            to an independent and a uniform draw of its size (``SelectionInfo.batch_learnability``
            and the selection log's columns; :mod:`jeststream.diagnostics`). Its own generator:
            the selection is the same with or without it.
        selection_log: a path, or a :class:`~jeststream.selection_log.SelectionLog` that carries
            its own mode. A path is opened at the first yielded batch: it overwrites an old log
            there, but appends after ``load_state_dict``. To append always (a run resumed from a
            checkpoint that holds no loader state), pass ``SelectionLog(path, mode="a")``. The
            loader closes the log when it is closed.
        selection_log_mode: deprecated: "a" is ``selection_log=SelectionLog(path, mode="a")``,
            "w" is ``SelectionLog(path, mode="w")``.
        key_fn: ``batch -> list[str]`` of per-example keys for the selection log and a
            reference cache (default: ``jeststream.batch.find_keys``'s rules).
        timeout: seconds the consumer waits for the next selected batch, and a snapshot wait
            may take, before a ``TimeoutError`` that names the stuck stage (e.g. ``next()`` on
            the base loader); also bounds the collectives under distributed="global". None
            (default) waits for ever.
        distributed: "global": under torch.distributed, select from the super-batches of all
            ranks as from one (each rank still yields b of its own examples; the ranks
            all-gather the embeddings of each chunk they draw, :mod:`jeststream.distributed`),
            end every pass together when any rank's base loader ends, and raise on every rank
            when one fails; "local": each rank selects from its own super-batch alone, no
            collectives; "auto" (default): "global" when torch.distributed is initialised with
            world size > 1, else None (a single process). Under "global" each rank's generator
            is seeded by (seed, rank, epoch), the group's collectives wait at most ``timeout``
            seconds (torch's default when None), and every rank must build its loader, start
            and leave each pass at the same points (it is collective).
        process_group: the ranks that select together and the backend of the loader's own
            process group (default: all ranks, the default group's backend).
        materialise_workers: threads that materialise the selected examples of
            :class:`~jeststream.deferred.Deferred` fields (a base loader built with
            ``deferred=True``); 0: on the producer's thread. Started at the first such batch.
    """

    def __init__(
        self,
        base_loader: Any,
        learner: nn.Module,
        reference: nn.Module | ReferenceCache | None,
        ratio: float = 0.2,
        *,
        n_chunks: int | None = None,
        loss: str = "sigmoid",
        criterion: str = "learnability",
        temperature: float = 1.0,
        embed: EmbedFn | None = None,
        refresh_every: int = 1,
        snapshot_dtype: torch.dtype | None = None,
        scoring: str = "auto",
        prefetch: int | None = None,
        async_scoring: bool | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
        drop_last: bool = True,
        score_transform: Callable[[Any], Any] | None = None,
        score_resolution: int | None = None,
        on_bad_scores: str = "raise",
        return_info: bool = False,
        selection_log: str | os.PathLike | SelectionLog | None = None,
        selection_log_mode: str | None = None,
        key_fn: Callable[[Any], Sequence[str]] | None = None,
        deterministic: bool | None = None,
        timeout: float | None = None,
        batch_learnability: bool = False,
        distributed: str | None = "auto",
        process_group: Any = None,
        materialise_workers: int = 4,
    ) -> None:
        self._closed = True  # until construction succeeds, so __del__ has nothing to do
        self._materializer = Materializer(materialise_workers)  # threads start on first use
        self._dist: Coordinator | None = None
        if not hasattr(base_loader, "__iter__"):
            raise TypeError(f"base_loader must be iterable, got {type(base_loader).__name__}")
        if not isinstance(learner, nn.Module):
            raise TypeError(f"learner must be a torch.nn.Module, got {type(learner).__name__}")
        if reference is not None and not isinstance(reference, (nn.Module, ReferenceCache)):
            raise TypeError(
                "reference must be a torch.nn.Module, a ReferenceCache or None, got "
                f"{type(reference).__name__}"
            )
        ref_model = reference if isinstance(reference, nn.Module) else None
        if ref_model is not None and unwrap_model(ref_model) is unwrap_model(learner):
            raise ValueError(
                "reference is the learner itself; pass a separate frozen reference model "
                "(freezing it would stop the learner from training)"
            )
        if ref_model is not None:
            live = {id(p): n for n, p in unwrap_model(learner).named_parameters()}
            shared = [live[id(p)] for p in unwrap_model(ref_model).parameters() if id(p) in live]
            if shared:
                raise ValueError(
                    f"the reference shares {len(shared)} parameter(s) with the learner (e.g. "
                    f"{shared[:3]}); freezing the reference would freeze them in the learner too. "
                    "Pass an independent reference, e.g. copy.deepcopy of the reference model"
                )
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
            raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}")
        n = round(1 / ratio)
        if n < 2:
            raise ValueError(
                f"ratio={ratio} gives n=round(1/ratio)={n} base batches per super-batch; "
                "JEST needs n >= 2, i.e. ratio <= 2/3"
            )
        if abs(1 / n - ratio) > 1e-9:
            logger.warning("ratio=%s is applied as 1/%d = %.4f", ratio, n, 1 / n)
        if n_chunks is not None and (
            isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1
        ):
            raise ValueError(f"n_chunks must be an int >= 1 or None (min(16, b)), got {n_chunks!r}")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, numbers.Real)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r} is not one of {CRITERIA}")
        if reference is None and criterion != "hard_learner":
            raise ValueError(
                f"reference=None only works with criterion='hard_learner', got {criterion!r}; "
                "pass the frozen reference model"
            )
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if (
            isinstance(refresh_every, bool)
            or not isinstance(refresh_every, int)
            or refresh_every < 0
        ):
            raise ValueError(f"refresh_every must be an int >= 0, got {refresh_every!r}")
        if prefetch is not None and (
            isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1
        ):
            raise ValueError(f"prefetch must be an int >= 1 or None (1), got {prefetch!r}")
        if on_bad_scores not in _BAD_SCORES:
            raise ValueError(f"on_bad_scores={on_bad_scores!r} is not one of {_BAD_SCORES}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if key_fn is not None and not callable(key_fn):
            raise TypeError(f"key_fn must be callable batch -> list[str], got {key_fn!r}")
        dist_mode = resolve_mode(distributed, process_group)
        check_not_sharded(learner)

        self.base_loader = base_loader
        self.n = n
        self.ratio = float(ratio)
        # None: min(16, b), resolved once b is known; only an explicit n_chunks > b is an error
        self._n_chunks_explicit = n_chunks is not None
        self.n_chunks = _DEFAULT_N_CHUNKS if n_chunks is None else n_chunks
        self.loss = loss
        self.criterion = criterion
        self.temperature = float(temperature)
        self.refresh_every = refresh_every
        # the scoring schedule: scoring= names it; the loader runs on these three
        self.scoring, self.async_scoring, self.deterministic, self.prefetch = resolve_scoring(
            scoring, async_scoring, deterministic, prefetch, scoring_device(learner, device)
        )
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.on_bad_scores = on_bad_scores
        if return_info:
            warnings.warn(
                "JESTLoader(return_info=True) is deprecated; read loader.last_info after each "
                "batch instead",
                DeprecationWarning,
                stacklevel=2,
            )
        self.return_info = bool(return_info)
        self.key_fn = key_fn
        self.batch_learnability = bool(batch_learnability)
        self.timeout = None if timeout is None else float(timeout)
        self.epoch = 0
        self.last_info: SelectionInfo | None = None

        self._b: int | None = None
        self._b_source = ""  # where b came from, for error messages
        self._warned_short = False  # a short base batch in the middle of a pass, warned once
        base_b = getattr(base_loader, "batch_size", None)
        if isinstance(base_b, int) and not isinstance(base_b, bool) and base_b > 0:
            self._set_batch_size(base_b)

        # Deterministic scoring with lag L holds the snapshots of steps t-L..t: L + 1 copies.
        # Otherwise two, so that a refresh writes one while a forward reads the other.
        self._snapshot = LearnerSnapshot(
            learner,
            dtype=snapshot_dtype,
            device=device,
            max_copies=max(2, self.prefetch + 1) if self.deterministic else 2,
            timeout=self.timeout,
        )
        self.device = self._snapshot.device
        # easy_reference gives the learner no weight: its snapshot forward would be wasted
        self._scorer = Scorer(
            self._snapshot,
            reference,
            embed=embed,
            score_transform=score_transform,
            score_resolution=score_resolution,
            score_learner=criterion_weights(criterion)[0] != 0,
        )
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        # set_epoch()'s epoch, whose seed is applied when the next pass starts: a producer still
        # running for the current pass may be drawing from the generator at that moment.
        self._pending_epoch: int | None = None

        self._step = 0  # batches yielded (== super-batches consumed), across passes
        self._fallbacks = 0
        self._base_batches = 0  # base batches drawn, across passes
        self._dropped = 0  # examples drop_last threw away
        # the snapshot versions load_state_dict() restored (state_dict() returns them until a
        # batch is yielded); None when the restore had none
        self._loaded_snapshot: dict | None = None
        self._restore_drawn = False  # an iterator has run since load_state_dict()
        self._resume: dict | None = None
        self._restored = False  # a load_state_dict() not yet followed by a yielded batch
        self._active: weakref.ref[_JESTIterator] | None = None
        # A path is opened at the first yielded batch: a fresh run overwrites an old log at that
        # path, a run restored with load_state_dict() appends to it (the reader keeps the last
        # record of a re-drawn step). The directory is checked now, before any GPU-hour. A
        # SelectionLog the caller opened keeps its own mode; the run configuration is written
        # beside it at the first yielded batch, as for a path.
        if selection_log_mode is not None:
            if selection_log_mode not in _LOG_MODES:
                raise ValueError(
                    f"selection_log_mode={selection_log_mode!r} must be 'auto', 'a' (append) or "
                    "'w' (overwrite)"
                )
            if isinstance(selection_log, SelectionLog):
                raise ValueError(
                    "selection_log_mode= applies to a path; the SelectionLog passed as "
                    f"selection_log carries its own mode ({selection_log.mode!r})"
                )
            if selection_log_mode != "auto":
                warnings.warn(
                    f"JESTLoader(selection_log_mode={selection_log_mode!r}) is deprecated; pass "
                    f"selection_log=SelectionLog(path, mode={selection_log_mode!r})",
                    DeprecationWarning,
                    stacklevel=2,
                )
        self._log_mode = selection_log_mode or "auto"
        self._log_append = self._log_mode == "a"
        self._log: SelectionLog | None = None
        self._log_config_due = False  # a caller's SelectionLog whose run config is not written
        if isinstance(selection_log, SelectionLog):
            self._log, self._log_config_due = selection_log, True
            self._log_path: str | None = os.fspath(selection_log.path)
        elif selection_log is None or isinstance(selection_log, (str, os.PathLike)):
            self._log_path = None if selection_log is None else os.fspath(selection_log)
        else:
            raise TypeError(
                "selection_log must be a path, a jeststream.selection_log.SelectionLog or None, "
                f"got {type(selection_log).__name__}"
            )
        if self._log_path is not None and self._log is None:
            parent = os.path.dirname(os.path.abspath(self._log_path))
            os.makedirs(parent, exist_ok=True)
            if not os.access(parent, os.W_OK):
                raise ValueError(
                    f"selection_log={self._log_path!r}: directory {parent!r} is not writable; "
                    "pass a path in a writable directory"
                )
        if dist_mode == "global" and self.batch_learnability:
            raise ValueError(
                "batch_learnability=True measures draws from one super-batch, but "
                "distributed='global' selects from the super-batches of all ranks; pass "
                "distributed='local' to measure per rank, or leave batch_learnability off"
            )
        if dist_mode is not None:  # last: its process group is made only for a built loader
            self._dist = Coordinator(dist_mode, process_group, self.timeout)
            # per rank from the start (a single process keeps `seed`)
            self._generator.manual_seed(self._epoch_generator_seed(0))
        self._closed = False

    # -- sizes -------------------------------------------------------------------------------

    def _set_batch_size(self, b: int, source: str = "base_loader.batch_size") -> None:
        if b == 1:
            warnings.warn(
                f"batch size b=1 (from {source}): every yielded batch holds a single example, "
                "so a contrastive loss (CLIP softmax or SigLIP sigmoid) has no negatives in it "
                "and JEST has no joint selection to make; use a base batch size of at least 2",
                UserWarning,
                stacklevel=3,
            )
        if not self._n_chunks_explicit:
            self.n_chunks = min(_DEFAULT_N_CHUNKS, b)
        elif self.n_chunks > b:
            raise ValueError(
                f"n_chunks={self.n_chunks} exceeds the batch size b={b}: each chunk must select "
                "at least one example; lower n_chunks (or leave it unset: min(16, b))"
            )
        self._b = b
        self._b_source = source

    # -- the snapshot schedule ---------------------------------------------------------------

    def _lag(self) -> int | None:
        """Steps between the snapshot and the super-batch it scores: ``prefetch`` when
        deterministic, 0 for synchronous scoring, None (whatever is latest) otherwise."""
        if self.deterministic:
            return self.prefetch
        return None if self.async_scoring else 0

    def _scheduled(self, step: int, start: int) -> int | None:
        """The step whose snapshot scores super-batch ``step`` (None: whatever is latest). It is
        also the pool's floor: no super-batch from ``step`` on needs a snapshot taken before."""
        lag = self._lag()
        if lag is None:
            return None
        return scheduled_step(step, start=start, lag=lag, refresh_every=self.refresh_every)

    @property
    def batch_size(self) -> int | None:
        """b: examples per yielded batch (None until known for base loaders without batch_size)."""
        return self._b

    @property
    def super_batch_size(self) -> int | None:
        """B = n * b."""
        return None if self._b is None else self.n * self._b

    def __len__(self) -> int:
        try:
            base_len = len(self.base_loader)
        except TypeError:
            raise TypeError(
                f"the base loader ({type(self.base_loader).__name__}) has no length, so neither "
                "has the JESTLoader"
            ) from None
        return base_len // self.n if self.drop_last else -(-base_len // self.n)

    @property
    def num_batches(self) -> int:
        """Yielded batches per epoch (open_clip_train reads this)."""
        base = getattr(self.base_loader, "num_batches", None)
        if isinstance(base, int):
            return base // self.n if self.drop_last else -(-base // self.n)
        return len(self)

    @property
    def num_samples(self) -> int:
        """Training examples yielded per epoch (open_clip_train reads this)."""
        if self._b is not None:
            return self.num_batches * self._b
        base = getattr(self.base_loader, "num_samples", None)
        if isinstance(base, int):
            return base // self.n
        raise TypeError("num_samples is unknown until the first batch (the base has no batch_size)")

    # -- passthrough -------------------------------------------------------------------------

    @property
    def dataset(self) -> Any:
        return self.base_loader.dataset

    @property
    def sampler(self) -> Any:
        return self.base_loader.sampler

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch and pass it to the base loader (or its sampler) when it takes one.

        Call it between passes, like ``DistributedSampler.set_epoch``. The sampler's generator is
        reseeded from ``(seed, epoch)``, so each epoch's selection randomness is reproducible
        without the loader's state (open_clip_train resumes from epoch checkpoints that do not
        hold it); right after ``load_state_dict`` for the same epoch the restored generator is kept.
        The reseed takes effect when the next pass starts, never in the middle of a running one.
        """
        epoch = int(epoch)
        if not (self._restored and epoch == self.epoch):
            self._pending_epoch = epoch
        self.epoch = epoch
        if hasattr(self.base_loader, "set_epoch"):
            self.base_loader.set_epoch(epoch)
        else:
            sampler = getattr(self.base_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    @property
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batches": self._step,
            "fallbacks": self._fallbacks,
            "base_batches": self._base_batches,
            "dropped_examples": self._dropped,
            # deferred records that failed to materialise, each replaced by the next candidate
            "replaced_examples": self._materializer.failed,
        }
        base_stats = getattr(self.base_loader, "stats", None)
        if isinstance(base_stats, dict) and "bad_shards" in base_stats:
            out["bad_shards"] = base_stats["bad_shards"]
        elif hasattr(self.base_loader, "bad_shards"):
            out["bad_shards"] = self.base_loader.bad_shards
        if self._dist is not None:
            out["distributed"] = self._dist.stats()
        return out

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> _JESTIterator:
        """Start a pass (an epoch) over the base loader.

        One pass at a time, as a DataLoader without persistent workers makes a new iterator per
        ``for``: a new ``iter(loader)`` (or ``load_state_dict``) ends the pass before it, stops
        its producer and starts from the last yielded batch. So ``break`` and then a new ``for``
        simply works; but an unfinished earlier iterator is *superseded*, not silently ended:
        its next ``next()`` raises RuntimeError saying so (``zip(loader, loader)`` raises at its
        first step: build a second JESTLoader to iterate two passes at once). An iterator that
        had finished keeps raising StopIteration; one closed with ``it.close()`` ends quietly.
        """
        if self._closed:
            raise RuntimeError("this JESTLoader was closed; build a new one to iterate again")
        self._close_active("a new iter(loader)")
        if self._resume is not None:
            # A pass left early (break, or an iterator dropped before its first batch after a
            # restore) consumed generator draws for super-batches it scored ahead and never
            # yielded: the next pass starts from the last yielded (or restored) boundary.
            self._generator.set_state(self._resume["generator"])
            if self._restored and self._restore_drawn and self._resume["base"] is not None:
                # an iterator since the restore drew base batches it never yielded: restore
                # the base to the boundary again, as load_state_dict() left it
                self.base_loader.load_state_dict(self._resume["base"])
        self._apply_pending_seed()
        self._restore_drawn = self._restored
        it = _JESTIterator(self)
        self._active = weakref.ref(it)
        return it

    def _close_active(self, superseded_by: str | None = None) -> None:
        """Close the live pass, if any; ``superseded_by`` names the call that ends it, and its
        iterator's next ``next()`` raises naming it (unless the pass had finished)."""
        it = self._active() if self._active is not None else None
        if it is not None:
            it.close(
                None
                if superseded_by is None
                else (
                    f"this JESTLoader pass was superseded by {superseded_by}: a JESTLoader runs "
                    "one pass at a time (it has one base iterator, one generator and one "
                    "resumable state). Finish, break out of or close() a pass's iterator "
                    "before starting the next; to iterate two passes at once (e.g. "
                    "zip(loader, loader)), build a second JESTLoader"
                )
            )
        self._active = None

    def _epoch_generator_seed(self, epoch: int) -> int:
        """The sampling generator's seed for ``epoch``: per (seed, rank, epoch) under
        torch.distributed ("global" or "local": ranks never share a random stream), per
        (seed, epoch) in a single process."""
        if self._dist is not None:
            return self._dist.seed(self.seed, epoch)
        return _epoch_seed(self.seed, epoch)

    def _apply_pending_seed(self) -> None:
        if self._pending_epoch is not None:
            self._generator.manual_seed(self._epoch_generator_seed(self._pending_epoch))
            self._pending_epoch = None

    def _run_config(self) -> dict[str, Any]:
        """The selection settings recorded beside the selection log (``LOG.run.json``), which
        ``jeststream report`` shows."""
        return {
            "ratio": self.ratio,
            "n": self.n,
            "batch_size": self._b,
            "n_chunks": min(self.n_chunks, self._b) if self._b else self.n_chunks,
            "criterion": self.criterion,
            "loss": self.loss,
            "temperature": self.temperature,
            "refresh_every": self.refresh_every,
            "scoring": self.scoring,
            "deterministic": self.deterministic,
            "seed": self.seed,
            "distributed": None if self._dist is None else self._dist.mode,
            "rank": 0 if self._dist is None else self._dist.rank,
            "world_size": 1 if self._dist is None else self._dist.world_size,
        }

    def _on_yield(self, item: _Item, info: SelectionInfo) -> None:
        # Everything that can fail comes first: a failing next() leaves the state at the last
        # yielded batch, so a restore (or the caller's retry from a checkpoint) loses nothing.
        if self._log_path is not None and self._log is None:
            self._log = SelectionLog(
                self._log_path,
                mode="a" if self._log_append else "w",
                run_config=self._run_config(),
            )
        elif self._log_config_due:
            write_run_config(self._log.path, self._run_config())
            self._log_config_due = False
        if self._log is not None:
            self._log.write(
                keys=item.keys,
                epoch=info.epoch,
                step=info.step,
                scores=item.all_scores,
                selected=item.selected,
                batch_learnability=info.batch_learnability,
            )
        self._step = info.step + 1
        self._resume = item.resume
        self._restored = False
        self._loaded_snapshot = None
        if info.fallback:
            self._fallbacks += 1
        self.last_info = info

    def close(self) -> None:
        """Stop the producer, free its buffers and close the selection log. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._close_active()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dist is not None:
            self._dist.close()
        self._materializer.close()

    def __enter__(self) -> JESTLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from GC
            pass

    # -- state -------------------------------------------------------------------------------

    def _base_state(self) -> Any:
        fn = getattr(self.base_loader, "state_dict", None)
        return fn() if callable(fn) else None

    def _make_state(
        self, base_state: Any, step: int, pass_start: int | None, epoch: int
    ) -> dict:
        return {
            "version": _STATE_VERSION,
            "base": base_state,
            "generator": self._generator.get_state(),
            "step": step,
            "pass_start": pass_start,  # None: at the end of a pass (the next one starts afresh)
            "epoch": epoch,
            "fallbacks": self._fallbacks,
            **({"world_size": 1} if self._dist is None else self._dist.state()),
        }

    def state_dict(self, include_snapshot: bool = False) -> dict[str, Any]:
        """Resumable state at the super-batch boundary after the last yielded batch.

        Super-batches the producer scored ahead are not part of it: a restore draws them again.
        The selection log is flushed first (durably), so that everything this checkpoint covers
        is on disk.

        Args:
            include_snapshot: also save the learner-snapshot weights that the next super-batches
                of this pass are scheduled to be scored with (one copy of the learner per saved
                version, on the CPU). Without them a restore in the middle of a pass scores
                those super-batches with the learner as restored (the weights after the last
                yielded step) instead of the older snapshots: with synchronous or deterministic
                scoring the first ``L`` super-batches after the restore (L = ``prefetch`` when
                deterministic, else up to ``refresh_every - 1``) may select differently (and a
                learner trained on them diverges from then on). At a pass boundary nothing
                differs: every pass starts by copying the live learner.
        """
        if self._log is not None:
            self._log.flush()
        if self._resume is not None:
            state = dict(self._resume)
            state["fallbacks"] = self._fallbacks
            if self._pending_epoch is not None:
                # set_epoch() since the pass started: this state is still that pass's (its
                # position, generator and epoch); the next pass starts from the new epoch's seed.
                state["pending_epoch"] = self._pending_epoch
        else:
            self._apply_pending_seed()  # no pass has started, so no producer uses the generator
            state = self._make_state(self._base_state(), self._step, self._step, self.epoch)
        if include_snapshot:
            start = state["pass_start"]
            mid_pass = start is not None and start < state["step"]
            snap = None
            if mid_pass and self._loaded_snapshot is not None:
                snap = self._loaded_snapshot  # restored and nothing yielded since
            elif mid_pass:
                snap = self._snapshot.state_dict(self._scheduled(state["step"], start))
                if not snap["versions"]:  # restored without weights, not iterated yet
                    snap = None
            state["snapshot"] = snap
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the next iteration continues from that boundary."""
        if not callable(getattr(self.base_loader, "load_state_dict", None)):
            raise TypeError(
                f"cannot restore: the base loader ({type(self.base_loader).__name__}) has no "
                "load_state_dict(); use a resumable base such as "
                "torchdata.stateful_dataloader.StatefulDataLoader"
            )
        if not isinstance(state, dict) or state.get("version") not in (1, _STATE_VERSION):
            raise ValueError(
                f"not a JESTLoader state_dict (version {_STATE_VERSION} expected): "
                f"{type(state).__name__} with keys {sorted(state) if isinstance(state, dict) else '-'}"
            )
        if state["version"] == 1:  # before pass_start was recorded: resume as a pass start
            state = {**state, "version": _STATE_VERSION, "pass_start": state.get("step")}
        missing = {"base", "generator", "step", "pass_start"} - state.keys()
        if missing:
            raise ValueError(f"JESTLoader state_dict is missing {sorted(missing)}")
        if self._dist is None:
            check_resume(state, 1, 0)
        else:
            check_resume(state, self._dist.world_size, self._dist.rank)
        # scored-ahead super-batches are dropped and drawn again, by a new iter(loader)
        self._close_active("load_state_dict()")
        if state.get("snapshot") is not None:
            self._snapshot.load_state_dict(state["snapshot"])
        self._loaded_snapshot = state.get("snapshot")
        if state["base"] is not None:
            self.base_loader.load_state_dict(state["base"])
        self._generator.set_state(state["generator"])
        self._pending_epoch = None
        self._step = int(state["step"])
        self.epoch = int(state.get("epoch", self.epoch))
        if state.get("pending_epoch") is not None:
            self.epoch = self._pending_epoch = int(state["pending_epoch"])
        self._fallbacks = int(state.get("fallbacks", 0))
        self._resume = {k: v for k, v in state.items() if k not in ("snapshot", "pending_epoch")}
        self._restore_drawn = False
        if self._pending_epoch is not None:
            # set_epoch() had abandoned that pass: what comes next is a new pass, as it was for
            # the loader that saved this state (not the old pass's rest under the new seed)
            self._resume["pass_start"] = None
            self._loaded_snapshot = None
        self._restored = True
        self._log_append = self._log_mode != "w"
        if self._loaded_snapshot is None:
            self._snapshot.reset_steps(self._step)
