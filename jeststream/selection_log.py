"""Per-example selection log: one record per example that entered a super-batch.

    with SelectionLog("run/selection.parquet") as log:
        log.write(keys=keys, epoch=0, step=12, scores=scores, selected=mask)

Each example row holds per-example fields only (``COLUMNS``): the sample key (when the source
provides one), epoch, step, the example's position in its super-batch, its score and whether
JEST selected it. Values of a whole super-batch go to one *step row* per step
(``STEP_COLUMNS``), written only when there are any: with ``batch_learnability=True`` the loader
logs ``batch_learnability`` of the selected sub-batch as a whole, and
``batch_learnability_independent`` / ``batch_learnability_uniform`` of an independent and a
uniform draw of its size from the same super-batch (:mod:`jeststream.diagnostics`). Readers
give every example row its step's values, as columns (NaN for a step without them).

Formats. A path ending with ``.parquet`` (and pyarrow importable) is a *directory of immutable
Parquet segments*: each flush writes one new file ``part-000000.parquet``, ``part-000001.parquet``,
... (numbered in write order) of example rows and, when its steps have batch-level values, their
step rows in ``_steps-000000.parquet`` (same number, written first). Each file is written under a
hidden temporary name in the same directory (``.part-000001.parquet.tmp``), fsynced, then renamed
to its final name, so a segment is either complete or absent (a step-row file whose segment is
missing is never read, and removed by the next writer). ``pyarrow.dataset.dataset(path)``,
``pandas.read_parquet(path)``, :func:`read_selection_log` and ``jeststream inspect`` read the
directory as one table of example rows (the first two skip the ``.``- and ``_``-prefixed files by
default). Any other suffix, or ``.parquet`` without pyarrow (then ``*.jsonl`` next to it, with a
warning), is one JSON-lines file, appended to and fsynced at each flush: each writer starts with
a header line ``{"jeststream_selection_log": 2, "columns": [...]}``, then per step its step row
as an object (``{"epoch":0,"step":12,"batch_learnability":...}``, when it has one) followed by
one JSON array per example in ``COLUMNS`` order (``["key",0,12,3,0.8123,false]``; scores as the
shortest decimal that reads back to the same float32, null for NaN/inf). Logs of format 1 (every
example a JSON object, the batch-level values repeated on each) are read as before, also when a
resumed run appended format-2 lines to one. (Sizes: ``docs/performance.md``.)

Why segments: a Parquet file is only readable once its footer is written, and it cannot be
appended to. One file per flush makes the log crash-safe -- a ``kill -9`` loses at most the rows
buffered since the last flush, and never damages what earlier flushes wrote -- and lets a resumed
run add rows without rewriting anything. A JSON-lines log killed mid-write may end with a torn
line: the reader skips it (with a warning) and a resumed writer ends it with a newline first.

Flushing off the training thread. ``write()`` only buffers numpy columns. Every ``flush_every``
rows the buffer is handed to one background thread ("jeststream-selection-log"), which encodes,
writes and fsyncs it; at most two hand-offs are pending at a time (``write()`` waits only when
both are), so memory stays bounded. ``flush()`` hands over what is buffered and returns once
everything is durably on disk (``JESTLoader.state_dict()`` calls it, so a checkpoint covers
every row logged before it). ``close()`` flushes and joins the thread; logs still open at exit are
closed then. A failure in the background (e.g. a full disk) is raised, as
:class:`SelectionLogError` chained to the original exception, by the next ``write()``,
``flush()`` or ``close()``; the rows it concerns stay queued and are retried by the next flush,
and the message says which rows, if any, are lost.

Resume: an existing log is appended to, never overwritten (mode="a"): new segments after the
existing ones, or new lines at the end of the file. Records are identified by (step, pos); when a
resumed run rewrites steps that the interrupted run had already logged, the reader keeps the
last record written (segments are read in sequence order), so ``read_selection_log`` and
``jeststream inspect`` describe the resumed run exactly. mode="w" deletes the old segments (and
refuses a directory holding anything else) or truncates the JSON-lines file. One writer per log:
a second process writing the same path at the same time is not detected.

``jeststream inspect LOG`` (:func:`inspect_main`) summarises a log and exports the selected keys.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import itertools
import json
import logging
import math
import os
import re
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.atomic import atomic_write

__all__ = [
    "COLUMNS",
    "LEARNABILITY_COLUMNS",
    "STEP_COLUMNS",
    "SelectionLog",
    "SelectionLogError",
    "is_parquet",
    "jsonl_chunks",
    "read_selection_log",
    "read_step_rows",
    "require_pyarrow",
    "segment_files",
    "step_columns",
    "read_run_config",
    "run_config_path",
    "write_run_config",
    "inspect_main",
    "summarize",
]

logger = logging.getLogger(__name__)

COLUMNS = ("key", "epoch", "step", "pos", "score", "selected")
# Optional per-super-batch columns (BatchLearnability's selected / independent / uniform).
LEARNABILITY_COLUMNS = (
    "batch_learnability",
    "batch_learnability_independent",
    "batch_learnability_uniform",
)
# A step's batch-level row (one per logged super-batch that has batch-level values).
STEP_COLUMNS = ("epoch", "step", *LEARNABILITY_COLUMNS)
FORMAT_VERSION = 2  # 1: batch-level values repeated on every example row (JSON objects)
_HEADER_KEY = "jeststream_selection_log"
_PARQUET_MAGIC = b"PAR1"
_THREAD_NAME = "jeststream-selection-log"
_MAX_PENDING = 2  # hand-offs queued or being written; write() waits beyond that
_SEGMENT_RE = re.compile(r"part-(\d{6,})\.parquet")
_TEMP_RE = re.compile(r"\.(?:_steps|part)-(\d{6,})\.parquet\.tmp")
# the step rows of segment N: a leading "_" hides them from pyarrow.dataset and pandas
_STEPS_RE = re.compile(r"_steps-(\d{6,})\.parquet")


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


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _schema(learnability: bool = False):
    import pyarrow as pa

    fields = [
        ("key", pa.string()),
        ("epoch", pa.int64()),
        ("step", pa.int64()),
        ("pos", pa.int32()),
        ("score", pa.float32()),
        ("selected", pa.bool_()),
    ]
    if learnability:
        fields += [(c, pa.float32()) for c in LEARNABILITY_COLUMNS]
    return pa.schema(fields)


def _steps_schema():
    import pyarrow as pa

    return pa.schema(
        [("epoch", pa.int64()), ("step", pa.int64())]
        + [(c, pa.float32()) for c in LEARNABILITY_COLUMNS]
    )


def _column(x: Any, dtype: type) -> np.ndarray:
    """A 1-d numpy copy of ``x`` (a torch tensor on any device, an array or a sequence).

    Tensors are converted through their own methods: reading or writing a log without torch
    imported keeps ``jeststream inspect`` and crash-recovery tools quick to start."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        x = x.float() if dtype is np.float32 else x.bool()
        x = x.numpy()
    return np.array(x, dtype=dtype).reshape(-1)  # a copy: the caller's tensor may be reused


# -- durable file primitives (module level: tests replace them to simulate failures) -----------


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable, where the OS allows it (not Windows)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _write_parquet_segment(table: Any, path: Path) -> None:
    """Write ``table`` as one Parquet file at ``path`` and fsync it."""
    import pyarrow.parquet as pq

    pq.write_table(table, str(path))
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_jsonl(fd: int, data: bytes) -> None:
    """Append ``data`` (whole lines) to the file open at ``fd`` and fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


# -- sinks: the on-disk formats. write() runs on the writer thread and is durable on return ------


def _table(chunks: list[dict[str, Any]]):
    """The example rows of ``chunks``: per-example columns only."""
    import pyarrow as pa

    columns = {
        c: (
            [k for ch in chunks for k in ch[c]]
            if c == "key"
            else np.concatenate([ch[c] for ch in chunks])
        )
        for c in COLUMNS
    }
    return pa.table(columns, schema=_schema())


def _steps_table(chunks: list[dict[str, Any]]):
    """One row per chunk (step) that has batch-level values, or None when none has."""
    import pyarrow as pa

    rows = [ch for ch in chunks if ch.get("batch") is not None]
    if not rows:
        return None
    columns: dict[str, Any] = {
        "epoch": np.array([ch["at"][0] for ch in rows], np.int64),
        "step": np.array([ch["at"][1] for ch in rows], np.int64),
    }
    for i, c in enumerate(LEARNABILITY_COLUMNS):
        columns[c] = np.array([ch["batch"][i] for ch in rows], np.float32)
    return pa.table(columns, schema=_steps_schema())


def _json_floats(x: np.ndarray) -> list[str]:
    """float32 values as the shortest decimals that read back to the same float32 (numpy's
    float -> str), JSON's null for NaN/inf."""
    out = x.astype(np.float32).astype(str).tolist()
    if not np.isfinite(x).all():
        for i in np.flatnonzero(~np.isfinite(x)).tolist():
            out[i] = "null"
    return out


def _header_line() -> str:
    return json.dumps({_HEADER_KEY: FORMAT_VERSION, "columns": list(COLUMNS)}, separators=(",", ":"))


def _jsonl_bytes(chunks: list[dict[str, Any]]) -> bytes:
    """Format 2: per example one JSON array in ``COLUMNS`` order; before a step's examples, one
    object with its batch-level values (``STEP_COLUMNS``) when it has any."""
    enc = json.encoder.encode_basestring_ascii
    lines = []
    for ch in chunks:
        epoch, step = ch["at"]
        batch = ch.get("batch")
        if batch is not None:
            values = ",".join(
                f'"{c}":{v}' for c, v in zip(LEARNABILITY_COLUMNS, _json_floats(np.array(batch)))
            )
            lines.append(f'{{"epoch":{epoch},"step":{step},{values}}}')
        head = f",{epoch},{step},"
        for k, p, sc, sel in zip(
            ch["key"],
            ch["pos"].tolist(),
            _json_floats(ch["score"]),
            ch["selected"].tolist(),
        ):
            lines.append(
                f'[{"null" if k is None else enc(k)}{head}{p},{sc},{"true" if sel else "false"}]'
            )
    return ("\n".join(lines) + "\n").encode("ascii")


@dataclass
class _Listing:
    """A segment directory's entries: the segments (seq, name) in seq order, the step-row files
    by seq, leftover temp files, and anything else."""

    segments: list[tuple[int, str]]
    steps: dict[int, str]
    temps: list[str]
    other: list[str]


def _scan_segments(path: Path) -> _Listing:
    segments, steps, temps, other = [], {}, [], []
    with os.scandir(path) as entries:
        for entry in entries:
            if not entry.is_file():
                other.append(entry.name)
            elif m := _SEGMENT_RE.fullmatch(entry.name):
                segments.append((int(m.group(1)), entry.name))
            elif m := _STEPS_RE.fullmatch(entry.name):
                steps[int(m.group(1))] = entry.name
            elif _TEMP_RE.fullmatch(entry.name):
                temps.append(entry.name)
            else:
                other.append(entry.name)
    segments.sort()
    return _Listing(segments, steps, sorted(temps), sorted(other))


def segment_files(path: str | os.PathLike) -> list[tuple[Path, Path | None]]:
    """The segments of a directory log in write order, each with the file of its steps'
    batch-level rows (None when it has none). Temp files and step rows whose segment is missing
    (a writer killed between the two renames) are not listed."""
    path = Path(path)
    listing = _scan_segments(path)
    return [
        (path / name, path / listing.steps[seq] if seq in listing.steps else None)
        for seq, name in listing.segments
    ]


def _old_single_file_error(path: Path) -> ValueError:
    return ValueError(
        f"selection log {path} is a single Parquet file (the format of older jeststream "
        "versions, or a file that is not a log); Parquet logs are now directories of segments "
        f"and the writer does not touch that file. Move it aside (e.g. to {path}.old) or pass a "
        "new path; read_selection_log() and `jeststream inspect` still read it"
    )


class _SegmentDir:
    """A directory of immutable Parquet segments, one per flush."""

    def __init__(self, path: Path, mode: str) -> None:
        if path.exists() and not path.is_dir():
            raise _old_single_file_error(path)
        # pyarrow imports pandas (when installed) at its first conversion, and pandas imports
        # concurrent.futures.thread, which cannot register its exit hook once the interpreter is
        # shutting down: import it now, so that a log first flushed at exit (atexit close) works
        import concurrent.futures.thread  # noqa: F401

        path.mkdir(parents=True, exist_ok=True)
        listing = _scan_segments(path)
        segments, temps, other = listing.segments, listing.temps, listing.other
        nxt = segments[-1][0] + 1 if segments else 0
        # step rows of a segment that never came (killed between the two renames): never read,
        # and a resumed writer writes that seq again
        orphans = [name for seq, name in sorted(listing.steps.items()) if seq >= nxt]
        if mode == "w":
            if other:
                raise ValueError(
                    f"selection log {path}: mode='w' deletes the log's segments, but the "
                    f"directory also holds {', '.join(map(repr, other[:5]))}"
                    f"{' ...' if len(other) > 5 else ''}, which a selection log does not "
                    "write; pass a new path or remove those first"
                )
            # the newest first: a kill in between leaves a prefix of the old log, still valid
            for seq, name in reversed(segments):
                os.remove(path / name)
                if seq in listing.steps:
                    os.remove(path / listing.steps[seq])
            for name in temps + orphans:
                os.remove(path / name)
            segments, nxt = [], 0
        else:
            for name in temps + orphans:  # a writer killed in the middle of a flush
                os.remove(path / name)
                logger.info("%s: removed %s, a segment a killed writer left unfinished", path, name)
            if other:
                logger.warning(
                    "selection log %s also holds %s, which are not segments: "
                    "read_selection_log() ignores them, pyarrow.dataset and pandas may not",
                    path,
                    ", ".join(other),
                )
            if segments:
                logger.info("appending to selection log %s (%d segments)", path, len(segments))
        if temps or orphans or mode == "w":
            _fsync_dir(path)
        self.path = path
        self.seq = nxt

    def write(self, chunks: list[dict[str, Any]]) -> None:
        # the steps' batch-level rows first: a segment is complete only with them
        steps = _steps_table(chunks)
        if steps is not None:
            self._publish(steps, f"_steps-{self.seq:06d}.parquet")
        self._publish(_table(chunks), f"part-{self.seq:06d}.parquet")
        _fsync_dir(self.path)
        self.seq += 1

    def _publish(self, table: Any, name: str) -> None:
        tmp = self.path / f".{name}.tmp"
        try:
            _write_parquet_segment(table, tmp)
            os.replace(tmp, self.path / name)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise

    def close(self) -> None:
        pass


class _JsonlFile:
    """One append-only JSON-lines file."""

    def __init__(self, path: Path, mode: str) -> None:
        created = not path.exists()
        torn = False
        if mode == "a" and not created and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)
        self._fd = os.open(path, flags | (os.O_TRUNC if mode == "w" else 0), 0o666)
        self.path = path
        try:
            if torn:  # a crash cut the last record: end it, so the next record stays readable
                _append_jsonl(self._fd, b"\n")
            if created:
                _fsync_dir(path.parent)
        except BaseException:
            os.close(self._fd)
            raise
        self._torn = False  # a failed write may have left part of a line
        self._header = True  # this writer's first lines start with the format's header

    def write(self, chunks: list[dict[str, Any]]) -> None:
        data = _jsonl_bytes(chunks)
        if self._header:
            data = (_header_line() + "\n").encode("ascii") + data
        if self._torn:
            data = b"\n" + data  # a blank line is skipped by the reader
        try:
            _append_jsonl(self._fd, data)
        except BaseException:
            self._torn = True
            raise
        self._torn = False
        self._header = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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

    def __init__(self, sink: _SegmentDir | _JsonlFile) -> None:
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


def run_config_path(log_path: str | os.PathLike) -> Path:
    """Where a log's run configuration lives: beside it, ``LOG.run.json`` (outside a Parquet
    log's directory, which holds its segments only)."""
    p = Path(log_path)
    return p.with_name(p.name + ".run.json")


def write_run_config(log_path: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write ``config`` to :func:`run_config_path` durably: temporary name, fsync, rename. A
    resumed run rewrites it with its own (normally identical) settings."""
    target = run_config_path(log_path)
    text = json.dumps(dict(config), indent=1, sort_keys=True, allow_nan=False)
    atomic_write(target, lambda fh: fh.write(text + "\n"), mode="w")
    return target


def read_run_config(log_path: str | os.PathLike) -> dict[str, Any] | None:
    """The run configuration written beside ``log_path``, or None when there is none."""
    p = run_config_path(log_path)
    if not p.is_file():
        return None
    config = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{p}: a run configuration must be a JSON object, got {type(config)}")
    return config


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
            if _have_pyarrow():
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
        sink = _SegmentDir(path, mode) if self.format == "parquet" else _JsonlFile(path, mode)
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


# -- reading ---------------------------------------------------------------------------------


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a Parquet file (a single-file log of older jeststream)."""
    with open(path, "rb") as f:
        return f.read(4) == _PARQUET_MAGIC


def require_pyarrow(path: str | os.PathLike) -> None:
    """ValueError naming the log and the fix when pyarrow is missing."""
    if not _have_pyarrow():
        raise ValueError(f"{path} is a Parquet log; pip install pyarrow to read it")


def _empty_columns() -> dict[str, Any]:
    return {
        "key": [],
        "epoch": np.zeros(0, np.int64),
        "step": np.zeros(0, np.int64),
        "pos": np.zeros(0, np.int32),
        "score": np.zeros(0, np.float32),
        "selected": np.zeros(0, bool),
    }


def _table_columns(table: Any) -> dict[str, Any]:
    return {
        "key": table.column("key").to_pylist(),
        "epoch": table.column("epoch").to_numpy().astype(np.int64),
        "step": table.column("step").to_numpy().astype(np.int64),
        "pos": table.column("pos").to_numpy().astype(np.int32),
        "score": table.column("score").to_numpy(zero_copy_only=False).astype(np.float32),
        "selected": table.column("selected").to_numpy(zero_copy_only=False).astype(bool),
        **{
            c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
            for c in LEARNABILITY_COLUMNS
            if c in table.column_names
        },
    }


def read_step_rows(file: str | os.PathLike) -> dict[int, tuple[float, ...]]:
    """A segment's step rows (``_steps-N.parquet``): step -> its ``LEARNABILITY_COLUMNS``
    values; a step written twice keeps the last."""
    import pyarrow.parquet as pq

    t = pq.read_table(str(file))
    steps = t.column("step").to_pylist()
    values = [t.column(c).to_numpy(zero_copy_only=False).astype(np.float32).tolist()
              for c in LEARNABILITY_COLUMNS]
    return {int(st): tuple(v[i] for v in values) for i, st in enumerate(steps)}


def step_columns(step: np.ndarray, rows: dict[int, tuple[float, ...]]) -> dict[str, np.ndarray]:
    """The batch-level columns per example row: each row gets its step's values (NaN where the
    step has no step row)."""
    out = np.full((len(LEARNABILITY_COLUMNS), len(step)), np.nan, np.float32)
    if rows:
        uniq, inverse = np.unique(step, return_inverse=True)
        table = np.array(
            [rows.get(int(st), (math.nan,) * len(LEARNABILITY_COLUMNS)) for st in uniq.tolist()],
            np.float32,
        ).reshape(len(uniq), len(LEARNABILITY_COLUMNS))
        out = table[inverse].T
    return {c: np.ascontiguousarray(out[i]) for i, c in enumerate(LEARNABILITY_COLUMNS)}


def _read_segments(path: Path) -> dict[str, Any]:
    """The segments of a directory log in sequence order; temp files are never read."""
    files = segment_files(path)
    if not files:
        return _empty_columns()
    require_pyarrow(path)
    import pyarrow.parquet as pq

    parts = []
    for file, steps_file in files:
        name = file.name
        try:
            table = pq.read_table(str(file))
            extra = LEARNABILITY_COLUMNS[0] in table.column_names  # format 1: on every row
            names = list(COLUMNS) + (list(LEARNABILITY_COLUMNS) if extra else [])
            cols = _table_columns(table.select(names).cast(_schema(extra)))
            if steps_file is not None:
                name = steps_file.name
                cols.update(step_columns(cols["step"], read_step_rows(steps_file)))
        except Exception as exc:  # noqa: BLE001 -- name the file; a segment is never half-written
            raise ValueError(
                f"selection log {path}: segment {name} cannot be read ({type(exc).__name__}: "
                f"{exc})"
            ) from exc
        parts.append(cols)
    return _concat(parts)


class _StepJoin:
    """Reads JSON-lines records in write order and gives each example row its step's batch-level
    values: a step's row comes right before its examples, so only the latest one is kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step: int | None = None
        self.values: tuple | None = None

    def columns(self, recs: list[Any]) -> dict[str, Any] | None:
        """The example rows among ``recs`` as columns (None when there are none); the
        ``LEARNABILITY_COLUMNS`` only when one of them has values."""
        keys, ints, score, selected, learn = [], [], [], [], []
        nan3 = (None,) * len(LEARNABILITY_COLUMNS)
        for rec in recs:
            if isinstance(rec, list):  # format 2: one example
                if len(rec) != len(COLUMNS):
                    raise ValueError(
                        f"{self.path}: not a selection-log record (a row of {len(COLUMNS)} "
                        f"columns {list(COLUMNS)} expected): {rec!r:.80}"
                    )
                k, e, st, p, sc, sel = rec
                learn.append(self.values if st == self.step and self.values else nan3)
            elif isinstance(rec, dict):
                if _HEADER_KEY in rec:
                    self._check_header(rec)
                    continue
                if "pos" not in rec:  # format 2: a step's batch-level row
                    self.step = rec.get("step")
                    self.values = tuple(rec.get(c) for c in LEARNABILITY_COLUMNS)
                    continue
                # format 1: one example, the batch-level values repeated on it
                k, e, st, p, sc, sel = (rec.get(c) for c in COLUMNS)
                learn.append(tuple(rec.get(c) for c in LEARNABILITY_COLUMNS))
            else:
                raise ValueError(f"{self.path}: not a selection-log record: {rec!r:.80}")
            keys.append(k if k is None or isinstance(k, str) else str(k))
            ints.append((e or 0, st or 0, p or 0))
            score.append(math.nan if sc is None else sc)
            selected.append(bool(sel))
        if not keys:
            return None
        n = len(keys)
        iv = np.array(ints, np.int64).reshape(n, 3)
        cols: dict[str, Any] = {
            "key": keys,
            "epoch": iv[:, 0].copy(),
            "step": iv[:, 1].copy(),
            "pos": iv[:, 2].astype(np.int32),
            "score": np.array(score, np.float32),
            "selected": np.array(selected, bool),
        }
        if any(v is not nan3 and any(x is not None for x in v) for v in learn):
            lv = np.array([[math.nan if x is None else x for x in v] for v in learn], np.float32)
            for i, c in enumerate(LEARNABILITY_COLUMNS):
                cols[c] = np.ascontiguousarray(lv[:, i])
        return cols

    def _check_header(self, rec: dict) -> None:
        version = rec.get(_HEADER_KEY)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: selection log format {version!r} is newer than this jeststream "
                f"reads ({FORMAT_VERSION}); upgrade jeststream"
            )
        if rec.get("columns", list(COLUMNS)) != list(COLUMNS):
            raise ValueError(
                f"{self.path}: selection log columns {rec.get('columns')} are not {list(COLUMNS)}"
            )


def jsonl_chunks(path: str | os.PathLike, rows: int = 16384) -> Iterator[dict[str, Any]]:
    """A JSON-lines log's example rows in write order, up to ``rows`` lines at a time, as the
    columns :func:`read_selection_log` returns (either format; a torn line is skipped with a
    warning, as a crash can leave one at the end)."""
    path = Path(path)
    join = _StepJoin(path)
    with open(path, encoding="utf-8") as f:
        lineno = 0
        while True:
            lines = [line for line in itertools.islice(f, rows) if not line.isspace()]
            if not lines:
                return
            first = lineno + 1
            lineno += len(lines)
            try:  # one parse for the whole chunk: twice as fast as a json.loads per line
                recs = json.loads("[" + ",".join(lines) + "]")
            except json.JSONDecodeError:
                recs = []
                for i, line in enumerate(lines, first):
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        # a crash can leave a half-written last line; everything before is good
                        logger.warning("%s:%d: skipping unreadable record (%s)", path, i, exc)
            cols = join.columns(recs)
            if cols is not None:
                yield cols


def read_selection_log(path: str | os.PathLike, *, dedupe: bool = True) -> dict[str, Any]:
    """Read a selection log into columns (no pandas needed).

    ``path`` is a directory of Parquet segments, a single Parquet file (older jeststream) or a
    JSON-lines file, of either format (version 1 repeated the batch-level values on every
    example row; version 2 writes them once per step). Returns ``{"key": list[str | None],
    "epoch": int64[N], "step": int64[N], "pos": int32[N], "score": float32[N] (NaN for fallback
    super-batches), "selected": bool[N]}`` plus, for a log written with batch learnability, its
    three float32 columns (``LEARNABILITY_COLUMNS``, each example row given its step's values;
    NaN where a step has none), rows in write order (an empty directory: no rows). With
    ``dedupe`` (default) a (step, pos) record written again after a resume replaces the earlier
    one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"selection log {path} does not exist")
    if path.is_dir():
        cols = _read_segments(path)
    elif is_parquet(path):
        require_pyarrow(path)
        import pyarrow.parquet as pq

        cols = _table_columns(pq.read_table(str(path)))
    else:
        cols = _concat([*jsonl_chunks(path)] or [_empty_columns()])
    if dedupe and len(cols["step"]):
        ids = cols["step"] * (int(cols["pos"].max()) + 1) + cols["pos"]
        # keep the last occurrence of each (step, pos), preserving write order
        _, last_rev = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last_rev)
        if len(keep) != len(ids):
            logger.info("%s: %d records rewritten after a resume", path, len(ids) - len(keep))
            cols = {c: ([v[i] for i in keep] if c == "key" else v[keep]) for c, v in cols.items()}
    return cols


# -- summary / CLI ---------------------------------------------------------------------------

_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def summarize(cols: dict[str, Any], top: int = 10) -> dict[str, Any]:
    """Summary of a read log: counts, selected share, score quantiles, top/bottom keys."""
    scores = cols["score"]
    selected = cols["selected"]
    n = int(len(scores))
    finite = np.isfinite(scores)
    out: dict[str, Any] = {
        "examples_seen": n,
        "super_batches": int(len(np.unique(cols["step"]))) if n else 0,
        "epochs": sorted(int(e) for e in np.unique(cols["epoch"])) if n else [],
        "selected": int(selected.sum()),
        "selected_share": float(selected.mean()) if n else math.nan,
        "non_finite_scores": int((~finite).sum()),
    }
    fs = scores[finite].astype(np.float64)
    out["score_quantiles"] = (
        {f"q{round(q * 100):02d}": float(np.quantile(fs, q)) for q in _QUANTILES} if len(fs) else {}
    )
    out["score_mean"] = float(fs.mean()) if len(fs) else math.nan
    sel_f = selected & finite
    rej_f = ~selected & finite
    out["selected_score_mean"] = float(scores[sel_f].mean()) if sel_f.any() else math.nan
    out["rejected_score_mean"] = float(scores[rej_f].mean()) if rej_f.any() else math.nan

    # per-key aggregates: a key can be seen in several epochs
    keys = cols["key"]
    agg: dict[str, list[float]] = {}  # key -> [score_sum, finite_count, seen, selected]
    for k, s, sel in zip(keys, scores.tolist(), selected.tolist()):
        if k is None:
            continue
        a = agg.setdefault(k, [0.0, 0, 0, 0])
        if math.isfinite(s):
            a[0] += s
            a[1] += 1
        a[2] += 1
        a[3] += int(sel)
    out["unique_keys"] = len(agg)
    ranked = sorted(
        ((a[0] / a[1], k, a[2], a[3]) for k, a in agg.items() if a[1]), key=lambda t: (-t[0], t[1])
    )

    def rows(items):
        return [{"key": k, "score": s, "seen": seen, "selected": sel} for s, k, seen, sel in items]

    out["top_keys"] = rows(ranked[:top])
    out["bottom_keys"] = rows(ranked[::-1][:top]) if top else []
    if LEARNABILITY_COLUMNS[0] in cols:
        out["batch_learnability"] = _learnability_summary(cols)
    return out


def _mean_std(x: np.ndarray) -> dict[str, float]:
    x = x.astype(np.float64)
    return {
        "mean": float(x.mean()) if len(x) else math.nan,
        "std": float(x.std(ddof=1)) if len(x) > 1 else (0.0 if len(x) else math.nan),
    }


def _learnability_summary(cols: dict[str, Any]) -> dict[str, Any]:
    """Per super-batch (one value per (epoch, step)): mean ± std of the selected, independent and
    uniform draws' batch learnability, and of selected − independent."""
    epoch, step = cols["epoch"], cols["step"]
    ids = epoch * (int(step.max()) + 1 if len(step) else 1) + step
    _, first = np.unique(ids, return_index=True)
    sel, ind, uni = (cols[c][first] for c in LEARNABILITY_COLUMNS)
    ok = np.isfinite(sel) & np.isfinite(ind) & np.isfinite(uni)
    sel, ind, uni = sel[ok], ind[ok], uni[ok]
    gap = sel.astype(np.float64) - ind
    return {
        "super_batches": int(ok.sum()),
        "selected": _mean_std(sel),
        "independent": _mean_std(ind),
        "uniform": _mean_std(uni),
        "selected_minus_independent": _mean_std(gap),
        "selected_above_independent_share": float((gap > 0).mean()) if len(gap) else math.nan,
    }


def selected_keys(cols: dict[str, Any]) -> list[str]:
    """Keys selected at least once, in order of first selection (the curated subset)."""
    seen: set[str] = set()
    out = []
    for k, sel in zip(cols["key"], cols["selected"].tolist()):
        if sel and k is not None and k not in seen:
            seen.add(k)
            out.append(k)
    return out


def _format(summary: dict[str, Any], path: Path | str) -> str:
    lines = [f"selection log: {path}"]
    lines.append(
        f"examples seen: {summary['examples_seen']} in {summary['super_batches']} super-batches"
        f" (epochs {summary['epochs']}), unique keys: {summary['unique_keys']}"
    )
    lines.append(
        f"selected: {summary['selected']} ({100 * summary['selected_share']:.1f}%)"
        + (
            f", non-finite scores: {summary['non_finite_scores']}"
            if summary["non_finite_scores"]
            else ""
        )
    )
    q = summary["score_quantiles"]
    if q:
        lines.append("score distribution: " + "  ".join(f"{k}={v:.4g}" for k, v in q.items()))
        lines.append(
            f"score mean: all {summary['score_mean']:.4g}, selected "
            f"{summary['selected_score_mean']:.4g}, rejected {summary['rejected_score_mean']:.4g}"
        )
    for title, name in (("top keys by score", "top_keys"), ("bottom keys by score", "bottom_keys")):
        if summary[name]:
            lines.append(f"{title} (mean score, seen, selected):")
            for r in summary[name]:
                lines.append(
                    f"  {r['score']:>10.4g}  {r['seen']:>4}  {r['selected']:>4}  {r['key']}"
                )
    bl = summary.get("batch_learnability")
    if bl and bl["super_batches"]:
        def ms(d: dict[str, float]) -> str:
            return f"{d['mean']:.4g} ± {d['std']:.3g}"

        lines.append(
            f"batch learnability over {bl['super_batches']} super-batches (mean ± std): "
            f"selected {ms(bl['selected'])}, independent draw {ms(bl['independent'])}, "
            f"uniform draw {ms(bl['uniform'])}"
        )
        lines.append(
            f"  selected − independent: {ms(bl['selected_minus_independent'])}, above it in "
            f"{100 * bl['selected_above_independent_share']:.0f}% of super-batches"
        )
    if not summary["unique_keys"] and summary["examples_seen"]:
        lines.append("(no sample keys in this log: pass key_fn= or a keyed base loader)")
    return "\n".join(lines)


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Columns of several reads end to end; the batch-level columns NaN where a part has none."""
    if len(parts) == 1:
        return parts[0]
    out = {
        c: ([k for p in parts for k in p[c]] if c == "key" else np.concatenate([p[c] for p in parts]))
        for c in COLUMNS
    }
    if any(LEARNABILITY_COLUMNS[0] in p for p in parts):
        for c in LEARNABILITY_COLUMNS:
            out[c] = np.concatenate(
                [p.get(c, np.full(len(p["step"]), np.nan, np.float32)) for p in parts]
            )
    return out


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """`jeststream inspect LOG [LOG ...] [--top N] [--export-selected OUT.txt] [--json]`."""
    parser = argparse.ArgumentParser(
        prog="jeststream inspect",
        description="Summarise a JEST selection log (Parquet or JSON lines).",
    )
    parser.add_argument(
        "log",
        nargs="+",
        help="selection log(s) written by JESTLoader(selection_log=...); several logs (one per "
        "rank, e.g. sel.rank*.jsonl) are summarised together",
    )
    parser.add_argument("--top", type=int, default=10, help="top/bottom keys to list (default 10)")
    parser.add_argument(
        "--export-selected",
        metavar="OUT.txt",
        help="write the keys selected at least once, one per line (the curated subset)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.top < 0:
        parser.error(f"--top must be >= 0, got {args.top}")
    paths = [Path(p) for p in args.log]
    try:
        # each rank numbers its own steps: resume-dedupe per file, then concatenate
        parts = [read_selection_log(p) for p in paths]
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"jeststream inspect: {exc}", file=sys.stderr)
        return 2
    cols = _concat(parts)
    path = paths[0] if len(paths) == 1 else f"{len(paths)} logs ({', '.join(map(str, paths))})"
    summary = summarize(cols, top=args.top)
    summary["super_batches"] = sum(int(len(np.unique(p["step"]))) for p in parts)
    if args.export_selected:
        keys = selected_keys(cols)
        out = Path(args.export_selected)
        out.write_text("".join(k + "\n" for k in keys), encoding="utf-8")
        summary["exported"] = {"path": str(out), "keys": len(keys)}
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=True))
    else:
        print(_format(summary, path))
        if args.export_selected:
            print(f"exported {summary['exported']['keys']} selected keys to {out}")
    return 0
