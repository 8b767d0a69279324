"""One pass (epoch) of a JESTLoader: the consumer-side iterator and its producer.

``JESTIterator`` starts a :class:`~jeststream.superbatch.Producer` for the pass (in a
:class:`~jeststream.pipeline.ThreadPipeline` for asynchronous scoring, inline otherwise),
refreshes the learner snapshot on schedule, and commits each yielded item and the pass's end
to the loader's cursor (:mod:`jeststream.loader_state`) -- the only writes to the loader's
state, all on the consumer's thread. Dropping or closing the iterator stops and joins the
producer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from jeststream.pipeline import END, ThreadPipeline, call_with_timeout
from jeststream.superbatch import Producer, item_tensors, scored_tensors

if TYPE_CHECKING:
    from jeststream.loader import JESTLoader

__all__ = ["JESTIterator"]

logger = logging.getLogger("jeststream.loader")  # the loader's messages, as before the split


class JESTIterator:
    """One pass (epoch) over a JESTLoader. Dropping it (``break`` + GC) stops its producer."""

    @classmethod
    def start(cls, loader: JESTLoader) -> JESTIterator:
        """A new pass from the last yielded (or restored) boundary (the loader ended the pass
        before it)."""
        cursor = loader._cursor
        if cursor.resume is not None:
            # A pass left early (break, or an iterator dropped before its first batch after a
            # restore) consumed generator draws for super-batches it scored ahead and never
            # yielded: the next pass starts from the last yielded (or restored) boundary.
            loader._generator.set_state(cursor.resume["generator"])
            if cursor.restored and cursor.restore_drawn and cursor.resume["base"] is not None:
                # an iterator since the restore drew base batches it never yielded: restore
                # the base to the boundary again, as load_state_dict() left it
                loader.base_loader.load_state_dict(cursor.resume["base"])
        loader._apply_pending_seed()
        cursor.restore_drawn = cursor.restored
        return cls(loader)

    def __init__(self, loader: JESTLoader) -> None:
        self._loader = loader
        cursor = loader._cursor
        self._prefetcher: ThreadPipeline | None = None
        self._done = False
        self._superseded: str | None = None  # why a later call ended this pass (next() raises it)
        self._base_batches_at_start = cursor.base_batches
        step = cursor.step
        restored = cursor.restored and cursor.resume is not None
        pass_start = cursor.resume.get("pass_start") if restored else None
        # A restore in the middle of a pass continues that pass: the snapshot schedule still
        # counts from its first step, as it did in the uninterrupted run.
        mid_pass = pass_start is not None and pass_start < step
        self._start_step = start = int(pass_start) if mid_pass else step
        snap = loader._snapshot
        if not (mid_pass and cursor.loaded_snapshot is not None):
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
        if not cursor.restored:  # else keep the loaded state: nothing was drawn since
            cursor.resume = loader._make_state(loader._base_state(), step, step, cursor.epoch)
        producer = Producer(loader, base_iter, step, start)
        self._producer: Producer | None = producer
        self._pass_producer = producer  # its ``leftover`` is read once END has come through
        self._rounds = producer.rounds
        if loader.async_scoring:
            self._prefetcher = ThreadPipeline(
                producer.produce,
                stages=[(producer.finish, scored_tensors)],
                prefetch=loader.prefetch,
                device=loader.device,
                cross_stream_tensors=item_tensors,
                timeout=loader.timeout,
                describe=lambda: producer.activity,
            )
            self._producer = None  # the thread owns it now

    def __iter__(self) -> JESTIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            if self._superseded is not None:  # never a silent end of a pass still consumed
                raise RuntimeError(self._superseded)
            raise StopIteration
        ld = self._loader
        cursor = ld._cursor
        step = cursor.step
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
            leftover = self._pass_producer.leftover
            if cursor.step == self._start_step and not cursor.restored:
                logger.warning(
                    "the JESTLoader pass yielded no batch: the base loader gave %d base batch(es) "
                    "this pass (a super-batch needs n=%d = round(1/ratio)%s); check the base "
                    "loader's length, or lower n (raise ratio)",
                    cursor.base_batches + leftover.base_batches - self._base_batches_at_start,
                    ld.n,
                    ", and drop_last=True drops a short one" if ld.drop_last else "",
                )
            # Also after a restore whose pass had nothing left: the next pass is a new one.
            cursor.commit_end(
                leftover,
                ld._make_state(ld._base_state(), cursor.step, None, cursor.resume["epoch"]),
            )
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
