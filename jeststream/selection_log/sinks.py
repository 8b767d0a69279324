"""The selection log's sinks: the two on-disk formats (:mod:`.format`), written durably.

A sink's ``write(chunks)`` runs on the writer thread and is durable on return: a Parquet
segment (and its step rows, first) is written under a temporary name, fsynced and renamed into
place, so a ``kill -9`` loses at most what was not yet handed to a sink and never damages what
earlier writes left; a resumed writer adds new segments and rewrites nothing. A JSON-lines
write is appended and fsynced; a line torn by a crash or a failed write is ended with a newline
before the next lines, and the reader skips it. Opening in mode "a" appends (removing what a
killed writer left unfinished); mode "w" deletes the old segments (refusing a directory that
holds anything else) or truncates the file.

The durable file primitives are module-level functions: tests replace them to simulate
failures.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.selection_log.format import (
    COLUMNS,
    FORMAT_VERSION,
    HEADER_KEY,
    LEARNABILITY_COLUMNS,
    scan_segments,
    schema,
    steps_schema,
)

__all__ = ["JsonlFile", "SegmentDir"]

logger = logging.getLogger(__name__)

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
    return pa.table(columns, schema=schema())


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
    return pa.table(columns, schema=steps_schema())


def _json_floats(x: np.ndarray) -> list[str]:
    """float32 values as the shortest decimals that read back to the same float32 (numpy's
    float -> str), JSON's null for NaN/inf."""
    out = x.astype(np.float32).astype(str).tolist()
    if not np.isfinite(x).all():
        for i in np.flatnonzero(~np.isfinite(x)).tolist():
            out[i] = "null"
    return out


def _header_line() -> str:
    return json.dumps({HEADER_KEY: FORMAT_VERSION, "columns": list(COLUMNS)}, separators=(",", ":"))


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


def _old_single_file_error(path: Path) -> ValueError:
    return ValueError(
        f"selection log {path} is a single Parquet file (the format of older jeststream "
        "versions, or a file that is not a log); Parquet logs are now directories of segments "
        f"and the writer does not touch that file. Move it aside (e.g. to {path}.old) or pass a "
        "new path; read_selection_log() and `jeststream inspect` still read it"
    )


class SegmentDir:
    """A directory of immutable Parquet segments, one per flush."""

    def __init__(self, path: Path, mode: str) -> None:
        if path.exists() and not path.is_dir():
            raise _old_single_file_error(path)
        # pyarrow imports pandas (when installed) at its first conversion, and pandas imports
        # concurrent.futures.thread, which cannot register its exit hook once the interpreter is
        # shutting down: import it now, so that a log first flushed at exit (atexit close) works
        import concurrent.futures.thread  # noqa: F401

        path.mkdir(parents=True, exist_ok=True)
        listing = scan_segments(path)
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


class JsonlFile:
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
