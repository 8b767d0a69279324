"""The selection log's writer: :class:`SelectionLog`, which buffers on the caller's thread and
writes on one background thread, with bounded memory.

``write()`` only buffers numpy columns. Every ``flush_every`` rows the buffer is handed to one
background thread ("jeststream-selection-log"), which writes it to the log's sink
(:mod:`.sinks`); at most two hand-offs are pending at a time (``write()`` waits only when both
are). ``flush()`` returns once everything written before it is durably on disk
(``JESTLoader.state_dict()`` calls it, so a checkpoint covers every row logged before it);
``close()`` flushes and joins the thread, and logs still open at interpreter exit are closed
then. A background failure (e.g. a full disk) is raised by the next ``write()``, ``flush()`` or
``close()`` as :class:`SelectionLogError` chained to it; the rows it concerns stay queued and are
retried, and the message says which rows, if any, are lost. One writer per log: a second process
writing the same path at the same time is not detected.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.selection_log.format import LEARNABILITY_COLUMNS, have_pyarrow, write_run_config
from jeststream.selection_log.sinks import JsonlFile, SegmentDir

__all__ = ["SelectionLog", "SelectionLogError"]

logger = logging.getLogger(__name__)

_THREAD_NAME = "jeststream-selection-log"
_MAX_PENDING = 2  # hand-offs queued or being written; write() waits beyond that


class SelectionLogError(RuntimeError):
    """Writing the selection log failed in the background; ``__cause__`` is the original error."""


# Logs still open at interpreter exit (a loader never closed, an unhandled exception) are
# closed then, so that their buffered rows reach the disk.
_OPEN_LOGS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_logs() -> None:
    for log in list(_OPEN_LOGS):
        try:
            log.close()
        except Exception:  # noqa: BLE001 -- report, and close the others
            logger.exception("could not close selection log %s at exit", log.path)


def _column(x: Any, dtype: type) -> np.ndarray:
    """A 1-d numpy copy of ``x`` (a torch tensor on any device, an array or a sequence).

    Tensors are converted through their own methods: reading or writing a log without torch
    imported keeps ``jeststream inspect`` and crash-recovery tools quick to start."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        x = x.float() if dtype is np.float32 else x.bool()
        x = x.numpy()
    return np.array(x, dtype=dtype).reshape(-1)  # a copy: the caller's tensor may be reused


# -- the writer thread -----------------------------------------------------------------------


@dataclass
class _Batch:
    chunks: list[dict[str, Any]]
    rows: int
    first_step: int
    last_step: int


def _describe(batches: Sequence[_Batch]) -> str:
    rows = sum(b.rows for b in batches)
    if not rows:
        return "no rows"
    lo = min(b.first_step for b in batches)
    hi = max(b.last_step for b in batches)
    return f"{rows} row{'s' if rows != 1 else ''} of step{'s' if hi > lo else ''} {lo}{f'-{hi}' if hi > lo else ''}"


class _Writer:
    """Writes handed-over batches to a sink on one background thread.

    Holds no reference to its SelectionLog, so an unclosed log can still be garbage collected
    (its ``__del__`` closes it and joins the thread). ``pending`` holds the batches handed over
    and not yet durable, the one being written first; a batch leaves it only once written. A
    failure leaves the batch at the front and pauses the thread until the caller has been told
    (``take_error``); then it retries.
    """

    def __init__(self, sink: SegmentDir | JsonlFile) -> None:
        self.sink = sink
        self.cond = threading.Condition()
        self.pending: collections.deque[_Batch] = collections.deque()
        self.error: BaseException | None = None
        self.rows_written = 0
        self.stopping = False
        self.thread: threading.Thread | None = None

    # caller side (all under self.cond) ----------------------------------------------------

    def submit(self, batch: _Batch) -> None:
        self.pending.append(batch)
        if self.thread is None:
            thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
            try:
                thread.start()
            except RuntimeError:  # at exit: Python >= 3.12 starts no threads then
                return  # wait() writes on the caller's thread
            self.thread = thread
        self.cond.notify_all()

    def wait(self, done) -> None:
        """Wait until ``done()`` or a failure (``self.error``). Without a live writer thread
        (none could be started at interpreter exit) the caller writes the batches itself."""
        while not done() and self.error is None:
            if self.thread is None or not self.thread.is_alive():
                self._write_front()
                continue
            self.cond.wait(0.5)

    def take_error(self) -> BaseException | None:
        exc, self.error = self.error, None
        self.cond.notify_all()  # unpause: the thread retries the batches still pending
        return exc

    # writer side ---------------------------------------------------------------------------

    def _write_front(self) -> None:
        """Write the front batch (called with self.cond held, releases it while writing)."""
        batch = self.pending[0]
        self.cond.release()
        try:
            self.sink.write(batch.chunks)
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller, who re-raises it
            self.cond.acquire()
            self.error = exc
        else:
            self.cond.acquire()
            self.pending.popleft()
            self.rows_written += batch.rows
        self.cond.notify_all()

    def _run(self) -> None:
        with self.cond:
            while True:
                while self.error is None and not self.pending and not self.stopping:
                    self.cond.wait()
                if self.error is not None:
                    if self.stopping:
                        return
                    self.cond.wait()  # paused until the caller takes the error
                    continue
                if not self.pending:  # stopping, and everything is written
                    return
                self._write_front()


# -- the log ---------------------------------------------------------------------------------


class SelectionLog:
    """Append-only, crash-safe writer of selection records with bounded memory.

    Args:
        path: where to write. ``*.parquet`` -> a directory of Parquet segments when pyarrow is
            importable (else JSON lines next to it, ``*.jsonl``, with a warning); any other
            suffix -> one JSON-lines file.
        flush_every: rows buffered before they are handed to the writer thread.
        mode: "a" appends to an existing log (resume-safe, the default); "w" starts afresh.
        run_config: the run's selection settings (ratio, n_chunks, criterion, loss, ...): written
            as JSON beside the log, to :func:`run_config_path` (``PATH.run.json``, atomically),
            where ``jeststream report`` finds them; JSON-serialisable values only.

    ``rows_written`` counts the rows this writer has made durable (not the rows of an earlier run
    it appends to). Raises :class:`SelectionLogError` from ``write``/``flush``/``close`` when the
    background writer failed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        flush_every: int = 65536,
        mode: str = "a",
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self._closed = True
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if mode not in ("a", "w"):
            raise ValueError(f"mode must be 'a' (append) or 'w' (overwrite), got {mode!r}")
        path = Path(path)
        self.format = "jsonl"
        if path.suffix == ".parquet":
            if have_pyarrow():
                self.format = "parquet"
            else:
                fallback = path.with_suffix(".jsonl")
                logger.warning(
                    "pyarrow is not installed: writing the selection log %s as JSON lines to %s "
                    "(pip install pyarrow for Parquet)",
                    path,
                    fallback,
                )
                path = fallback
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.flush_every = flush_every
        self.mode = mode
        self._lock = threading.RLock()  # the caller-side buffer
        self._chunks: list[dict[str, Any]] = []  # one per write(): numpy columns + keys
        self._n_buf = 0
        if run_config is not None:  # first: a failure here must not leave an open (or truncated) log
            write_run_config(path, run_config)
        sink = SegmentDir(path, mode) if self.format == "parquet" else JsonlFile(path, mode)
        self._writer = _Writer(sink)
        self._pid = os.getpid()
        self._closed = False
        _OPEN_LOGS.add(self)

    @property
    def rows_written(self) -> int:
        """Rows this writer has durably written (fsynced)."""
        return self._writer.rows_written

    # -- writing -----------------------------------------------------------------------------

    def write(
        self,
        *,
        keys: Sequence[str] | None,
        epoch: int,
        step: int,
        scores: Any,
        selected: Any,
        batch_learnability: Any = None,
    ) -> None:
        """Record one super-batch: ``scores`` and bool ``selected`` are [B] (tensors or arrays);
        ``keys`` B or None; ``batch_learnability`` optionally a
        :class:`jeststream.diagnostics.BatchLearnability` (or a (selected, independent, uniform)
        triple), written once, to the step's batch-level row. Only buffers: the rows are written
        on the writer thread."""
        if self._closed:
            raise RuntimeError(f"SelectionLog {self.path} is closed")
        scores_np = _column(scores, np.float32)
        selected_np = _column(selected, np.bool_)
        size = scores_np.shape[0]
        if selected_np.shape[0] != size:
            raise ValueError(
                f"scores has {size} entries but selected has {selected_np.shape[0]}; both must "
                "be the super-batch size"
            )
        if keys is not None and len(keys) != size:
            raise ValueError(
                f"got {len(keys)} keys for a super-batch of {size} scores; pass one key per "
                "example or keys=None"
            )
        chunk: dict[str, Any] = {
            "key": [None] * size if keys is None else [str(k) for k in keys],
            "epoch": np.full(size, int(epoch), dtype=np.int64),
            "step": np.full(size, int(step), dtype=np.int64),
            "pos": np.arange(size, dtype=np.int32),
            "score": scores_np,
            "selected": selected_np,
            "at": (int(epoch), int(step)),
        }
        if batch_learnability is not None:
            values = tuple(batch_learnability)[: len(LEARNABILITY_COLUMNS)]
            if len(values) != len(LEARNABILITY_COLUMNS):
                raise ValueError(
                    f"batch_learnability must hold (selected, independent, uniform), got "
                    f"{batch_learnability!r}"
                )
            chunk["batch"] = tuple(float(v) for v in values)  # the step's row, not every row's
        with self._lock:
            w = self._writer
            with w.cond:
                self._raise_error(w, "write")
                if self._n_buf + size >= self.flush_every:
                    # bounded memory: wait while two hand-offs are pending; a failure meanwhile
                    # is raised before this super-batch is buffered
                    w.wait(lambda: len(w.pending) < _MAX_PENDING)
                    self._raise_error(w, "write")
            self._chunks.append(chunk)
            self._n_buf += size
            if self._n_buf >= self.flush_every:
                self._hand_off()

    def flush(self) -> None:
        """Write everything buffered and return once it is durably on disk (fsynced).

        A no-op after close()."""
        if self._closed:
            return
        with self._lock:
            w = self._writer
            with w.cond:
                self._raise_error(w, "")
            self._hand_off()
            with w.cond:
                w.wait(lambda: not w.pending)
                self._raise_error(w, "")

    def _hand_off(self) -> None:
        """Pass the buffer to the writer thread (caller holds self._lock)."""
        if not self._n_buf:
            return
        chunks = self._chunks
        steps = [int(ch["step"][0]) for ch in chunks if len(ch["step"])]
        batch = _Batch(chunks, self._n_buf, min(steps, default=0), max(steps, default=0))
        w = self._writer
        with w.cond:
            w.wait(lambda: len(w.pending) < _MAX_PENDING)  # after a failure: one batch more
            w.submit(batch)
        self._chunks = []
        self._n_buf = 0

    def _raise_error(self, w: _Writer, call: str) -> None:
        """Raise a background failure, once (caller holds w.cond); the thread then retries."""
        if w.error is None:
            return
        queued = list(w.pending)
        exc = w.take_error()
        buffered = [
            _Batch([], len(ch["step"]), int(ch["step"][0]), int(ch["step"][0]))
            for ch in self._chunks
            if len(ch["step"])
        ]
        not_logged = " (the super-batch passed to this write() is not logged)" if call else ""
        raise SelectionLogError(
            f"selection log {self.path}: writing in the background failed "
            f"({type(exc).__name__}: {exc}). Nothing is lost yet: {_describe(queued)} are queued "
            f"and {_describe(buffered)} buffered{not_logged}; the writer retries them, flush() "
            "waits for them, and close() reports the rows it still cannot write as lost"
        ) from exc

    def close(self) -> None:
        """Write everything buffered, stop and join the writer thread, close the file.

        Idempotent. Raises :class:`SelectionLogError` when a background write failed since the
        last call (after retrying what it concerned) or when rows could not be written now."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        _OPEN_LOGS.discard(self)
        if os.getpid() != self._pid:
            return  # a forked copy (e.g. a data-loader worker): the parent owns the log
        with self._lock:
            w = self._writer
            with w.cond:
                earlier = w.take_error()  # not raised yet: retry what it concerned first
            try:
                self._hand_off()
                with w.cond:
                    w.wait(lambda: not w.pending)
            finally:
                with w.cond:
                    # the thread writes what is pending and exits; after a failure (still set)
                    # it exits at once
                    w.stopping = True
                    w.cond.notify_all()
                thread = w.thread
                if thread is not None and thread is not threading.current_thread():
                    thread.join()
                w.sink.close()
            failure, lost = w.error, list(w.pending)
            if failure is not None:
                raise SelectionLogError(
                    f"selection log {self.path}: writing failed at close "
                    f"({type(failure).__name__}: {failure}); {_describe(lost)} are lost (the "
                    f"{w.rows_written} rows this writer wrote before are on disk)"
                ) from failure
            if earlier is not None:
                raise SelectionLogError(
                    f"selection log {self.path}: a background write failed earlier "
                    f"({type(earlier).__name__}: {earlier}); close() retried it and wrote every "
                    "row, nothing is lost"
                ) from earlier

    def __enter__(self) -> SelectionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            writer = getattr(self, "_writer", None)
            if writer is not None and writer.thread is threading.current_thread():
                # collected on the writer thread itself, which cannot wait for itself
                threading.Thread(target=self.close, name=_THREAD_NAME, daemon=True).start()
                return
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from GC
            pass
