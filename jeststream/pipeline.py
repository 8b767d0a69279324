"""Background producer: a thread (plus a dedicated device stream on accelerators) that fills a
bounded queue, and the consumer side that waits on it.

Knows threads and streams, not the maths. The loader hands it a ``produce(should_stop)``
callable that returns one item per call (or ``END``); everything about super-batches lives in
the loader.

Guarantees:
- at most ``prefetch`` items are in flight -- being made, between stages or buffered -- beyond
  the one the consumer holds: the producer takes a slot before it starts an item and the
  consumer gives it back when it takes the item (so a multi-stage pipeline is not ``prefetch``
  plus one per stage ahead, which would make scoring that many learner steps staler);
- an exception in the producer re-raises in the consumer at its next ``get()`` with the
  original chained (``raise ... from original``), never a hang;
- ``call_with_timeout`` is the synchronous path's watchdog: one step on a worker thread, the
  same ``TimeoutError`` (``producer_timeout``) past the deadline;
- ``close()`` (called by the iterator's ``close``/``__del__``, ``with`` exit, loader GC, and at
  interpreter exit) stops and joins the thread and drops buffered items;
- on an accelerator each item carries an event recorded on the producer stream after the item
  was made; the consumer's current stream waits on it, and tensors that cross to the consumer's
  stream are ``record_stream``-ed so the caching allocator does not reuse them early.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from jeststream.batch import map_tensors
from jeststream.device import is_accelerator

__all__ = [
    "END",
    "ThreadPipeline",
    "call_with_timeout",
    "producer_timeout",
    "reraise_from_producer",
    "to_device",
]

logger = logging.getLogger(__name__)

END = object()  # produce() returns this when the source is exhausted
_POLL_S = 0.05  # how often blocked queue operations re-check the stop flag / thread liveness
_JOIN_TIMEOUT_S = 30.0

_LIVE: weakref.WeakSet[ThreadPipeline] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # daemon threads mid-CUDA-call at interpreter exit can crash it
    for p in list(_LIVE):
        p.close(timeout=1.0)


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_PRODUCER_NOTE = "[raised in the JESTLoader producer thread; original traceback above]"


def _add_note(exc: BaseException, note: str) -> None:
    # what BaseException.add_note (PEP 678, Python >= 3.11) does, as a new list: a copied
    # exception shares its original's; 3.10's traceback does not show notes, the chain does
    exc.__notes__ = [*getattr(exc, "__notes__", ()), note]


def reraise_from_producer(exc: BaseException) -> None:
    """Raise an exception of the same type in the consumer, chained to the producer's original.

    The copy keeps the original's ``args`` and attributes (a ``KeyError`` still names its key
    alone); where it came from is a note (PEP 678) under the message, not glued into it.
    """
    if isinstance(exc, (StopIteration, StopAsyncIteration)):
        # re-raised as is it would silently end the consumer's for loop (cf. PEP 479)
        raise RuntimeError(f"{type(exc).__name__} {exc} {_PRODUCER_NOTE}") from exc
    try:
        new = copy.copy(exc)  # type(exc)(*exc.args) plus its __dict__
        if type(new) is not type(exc) or new.args != exc.args:
            raise TypeError("the copy differs")  # a constructor that rewrites its arguments
    except Exception:  # noqa: BLE001 -- exception types with other constructor signatures
        new = RuntimeError(f"{type(exc).__name__}: {exc} {_PRODUCER_NOTE}")
    else:
        _add_note(new, _PRODUCER_NOTE)
    raise new from exc


def producer_timeout(timeout: float, doing: str) -> TimeoutError:
    """The error of a producer step that outlived ``timeout``, naming what it was doing."""
    return TimeoutError(
        f"the JESTLoader producer gave no batch within timeout={timeout:g}s; it is stuck in: "
        f"{doing}. Check that stage (a hung base loader worker, a blocked embed()), or raise "
        "timeout="
    )


def call_with_timeout(
    fn: Callable[[Callable[[], bool]], Any],
    *,
    timeout: float,
    device: torch.device,
    describe: Callable[[], str],
    name: str = "jeststream-producer",
) -> Any:
    """``fn(should_stop)`` on a worker thread, waited for at most ``timeout`` seconds: the
    synchronous path's watchdog. Returns its result or raises its exception (the same object,
    as an inline call would); past the deadline raises :func:`producer_timeout` and sets
    ``should_stop`` -- a thread blocked for good (a hung base loader) is a daemon and is left
    behind, as the asynchronous path's is. The thread runs with the caller's intra-op thread
    count and, on an accelerator, on the caller's current stream, so the work is ordered as
    it would be inline; it has ended whenever this returns or raises anything but the timeout.
    """
    stop = threading.Event()
    result: list[tuple[bool, Any]] = []
    num_threads = torch.get_num_threads()
    stream = torch.accelerator.current_stream(device) if is_accelerator(device) else None

    def run() -> None:
        try:
            torch.set_num_threads(num_threads)
            if stream is None:
                result.append((True, fn(stop.is_set)))
                return
            if device.index is not None:
                torch.accelerator.set_device_index(device.index)
            with stream:
                result.append((True, fn(stop.is_set)))
        except BaseException as exc:  # noqa: BLE001 -- raised in the caller
            result.append((False, exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        thread.join(timeout)
    except BaseException:  # e.g. KeyboardInterrupt while waiting: let the step wind down
        stop.set()
        raise
    if thread.is_alive():
        stop.set()
        raise producer_timeout(timeout, describe())
    ok, value = result[0]
    if not ok:
        try:
            raise value
        finally:
            del value, result  # no reference cycle through the traceback
    return value


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move every tensor of ``batch`` to ``device``; host tensors are pinned first so the copy
    can overlap with compute (numpy arrays and lists stay on the host)."""
    if not is_accelerator(device):
        return map_tensors(batch, lambda t: t if t.device == device else t.to(device))

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=non_blocking)

    return map_tensors(batch, move)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            continue
    return None


class _Stage:
    """One pipeline stage: ``fn(item) -> item``; ``tensors(item)`` lists the device tensors the
    stage reads that an earlier stage made on another stream."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        tensors: Callable[[Any], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        self.fn = fn
        self.tensors = tensors


def _stream_context(
    device: torch.device, num_threads: int, start_event: torch.Event | None = None
) -> tuple[torch.Stream | None, Any]:
    # OpenMP's thread count is per OS thread: without this a new thread ignores the user's
    # torch.set_num_threads() and, on a busy machine, its spinning intra-op pool was measured
    # 3-300x slower than the consumer's for the same selection maths.
    torch.set_num_threads(num_threads)
    if not is_accelerator(device):
        return None, contextlib.nullcontext()
    if device.index is not None:
        torch.accelerator.set_device_index(device.index)
    stream = torch.Stream(device=device)
    if start_event is not None:
        # Work the consumer queued before the pass started (a checkpoint load, an optimizer
        # step) must be visible to this stream's first reads of weights and batches.
        stream.wait_event(start_event)
    return stream, stream


def _run_source(
    produce: Callable[[Callable[[], bool]], Any],
    q: queue.Queue,
    stop: threading.Event,
    device: torch.device,
    num_threads: int,
    slots: threading.Semaphore,
    start_event: torch.Event | None,
) -> None:
    # Only plain objects are referenced here (never the consumer's iterator), so the iterator
    # can be garbage-collected -- which is what stops this thread after a `break`.
    try:
        stream, ctx = _stream_context(device, num_threads, start_event)
        with ctx:
            while not stop.is_set():
                if not slots.acquire(timeout=_POLL_S):
                    continue  # re-check the stop flag
                item = produce(stop.is_set)
                if item is None:  # stopped mid-way
                    return
                if item is END:
                    _put(q, END, stop)
                    return
                event = stream.record_event() if stream is not None else None
                if not _put(q, (item, event), stop):
                    return
    except BaseException as exc:  # noqa: BLE001 -- everything must reach the consumer
        _put(q, _Failure(exc), stop)


def _run_stage(
    stage: _Stage,
    q_in: queue.Queue,
    q_out: queue.Queue,
    stop: threading.Event,
    device: torch.device,
    num_threads: int,
    start_event: torch.Event | None,
) -> None:
    try:
        stream, ctx = _stream_context(device, num_threads, start_event)
        with ctx:
            while not stop.is_set():
                got = _get(q_in, stop)
                if got is None:
                    return
                if got is END or isinstance(got, _Failure):  # pass the end / failure along
                    _put(q_out, got, stop)
                    return
                item, event = got
                if stream is not None and event is not None:
                    stream.wait_event(event)
                    if stage.tensors is not None:
                        for t in stage.tensors(item):
                            if t.device.type == device.type:
                                t.record_stream(stream)
                out = stage.fn(item)
                del item, got
                event = stream.record_event() if stream is not None else None
                if not _put(q_out, (out, event), stop):
                    return
    except BaseException as exc:  # noqa: BLE001
        _put(q_out, _Failure(exc), stop)


class ThreadPipeline:
    """Run ``produce`` (and optional further stages) in daemon threads, keeping up to
    ``prefetch`` finished items ready. (Not torchdata's ``nodes.Prefetcher``, which a
    torchdata base loader may use below JESTLoader; this is JESTLoader's own producer.)

    Args:
        produce: called repeatedly in the first thread with a ``should_stop()`` callable;
            returns an item, ``END`` when exhausted, or None when it noticed ``should_stop()``.
        stages: further ``(fn, tensors)`` steps, each in its own thread (and stream), so that
            e.g. selection of super-batch k overlaps with scoring of k+1. Between stages the
            queue holds one item.
        prefetch: items in flight ahead of the consumer, in any stage or queue (at most).
        device: the device items live on; an accelerator gets a dedicated stream per thread.
        cross_stream_tensors: final item -> the device tensors the consumer will use.
        timeout: seconds ``get()`` waits for an item before it raises ``TimeoutError`` (None:
            for ever, like DataLoader's ``timeout=0``).
        describe: ``() -> str`` naming what the producer is doing, for that error.

    On an accelerator an event is recorded on the consumer's current stream when the
    pipeline starts, and every producer stream waits on it once before its first item.
    """

    def __init__(
        self,
        produce: Callable[[Callable[[], bool]], Any],
        *,
        prefetch: int,
        device: torch.device,
        stages: Sequence[
            tuple[Callable[[Any], Any], Callable[[Any], Iterable[torch.Tensor]] | None]
        ] = (),
        cross_stream_tensors: Callable[[Any], Iterable[torch.Tensor]] | None = None,
        name: str = "jeststream-producer",
        timeout: float | None = None,
        describe: Callable[[], str] | None = None,
    ) -> None:
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        self.device = torch.device(device)
        self.timeout = timeout
        self._describe = describe
        self._stuck = False
        start_event = (
            torch.accelerator.current_stream(self.device).record_event()
            if is_accelerator(self.device)
            else None
        )
        self._cross = cross_stream_tensors
        self._stop = threading.Event()
        self._slots = threading.Semaphore(prefetch)
        self._done = False
        queues = [queue.Queue(maxsize=1) for _ in stages] + [queue.Queue(maxsize=prefetch)]
        self._queues = queues
        self._queue = queues[-1]
        num_threads = torch.get_num_threads()  # the consumer's setting, for every producer thread
        threads = [
            threading.Thread(
                target=_run_source,
                args=(
                    produce,
                    queues[0],
                    self._stop,
                    self.device,
                    num_threads,
                    self._slots,
                    start_event,
                ),
                name=name,
                daemon=True,
            )
        ]
        for i, (fn, tensors) in enumerate(stages):
            threads.append(
                threading.Thread(
                    target=_run_stage,
                    args=(
                        _Stage(fn, tensors),
                        queues[i],
                        queues[i + 1],
                        self._stop,
                        self.device,
                        num_threads,
                        start_event,
                    ),
                    name=f"{name}-{i + 1}",
                    daemon=True,
                )
            )
        self._threads = threads
        for t in threads:
            t.start()
        _LIVE.add(self)

    @property
    def thread(self) -> threading.Thread:
        """The last stage's thread (the one that fills the consumer's queue)."""
        return self._threads[-1]

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def get(self) -> Any:
        """Next item; raises StopIteration at the end and re-raises producer failures."""
        if self._done:
            raise StopIteration
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                got = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    doing = self._describe() if self._describe is not None else "unknown"
                    self._done = True
                    self._stuck = True
                    self.close()
                    raise producer_timeout(self.timeout, doing) from None
                if not self._threads[-1].is_alive():
                    try:  # it may have put its last item just before exiting
                        got = self._queue.get_nowait()
                        break
                    except queue.Empty:
                        self._done = True
                        if self._stop.is_set():
                            raise StopIteration from None
                        raise RuntimeError(
                            "the JESTLoader producer thread exited without a result"
                        ) from None
        if got is END:
            self._done = True
            self.close()
            raise StopIteration
        if isinstance(got, _Failure):
            self._done = True
            self.close()
            reraise_from_producer(got.exc)
        item, event = got
        self._slots.release()  # the producer may start the next item
        if event is not None and item is not END:  # a stage may end the pass (global mode)
            consumer = torch.accelerator.current_stream(self.device)
            consumer.wait_event(event)
            if self._cross is not None:
                for t in self._cross(item):
                    if t.device.type == self.device.type:
                        t.record_stream(consumer)
        return item

    def close(self, timeout: float = _JOIN_TIMEOUT_S) -> None:
        """Stop the producer, join it, and drop buffered items. Idempotent."""
        if self._stuck:  # it already outlived `timeout`: waiting longer helps nobody
            timeout = min(timeout, 1.0)
        self._stop.set()
        self._drain()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive() and threading.current_thread() is not t:
                t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            logger.warning(
                "a JESTLoader producer thread did not stop within %.0fs (blocked in the base "
                "loader?); it is a daemon thread and will not keep the process alive",
                timeout,
            )
        self._drain()
        _LIVE.discard(self)

    def _drain(self) -> None:
        for q in self._queues:
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close(timeout=5.0)
