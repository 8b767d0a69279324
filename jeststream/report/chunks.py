"""The selection log read for the report: in chunks of numpy columns, never whole.

:func:`log_chunks` yields a log's example rows in write order, ``CHUNK_ROWS`` at a time, with
keys as a fixed-width array of their UTF-8 bytes (no Python object per row for Parquet logs)
and every row given its step's batch-level values where the log has them. It reads what
:func:`jeststream.selection_log.read_selection_log` reads (segment directories, single Parquet
files, JSON lines of format 1 or 2), with the selection log's public readers (segment listing,
step rows, JSON-lines chunks) and pyarrow's batch reader.

A log a resumed run appended to holds records of steps written twice. :class:`Generations`
numbers the runs in one pass (a new run starts where (step, pos) stops increasing) and, given
that pass's intervals, keeps only the last run's records of each step in the next, as
``read_selection_log`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.selection_log import (
    LEARNABILITY_COLUMNS,
    is_parquet,
    jsonl_chunks,
    read_step_rows,
    require_pyarrow,
    segment_files,
    step_columns,
)

__all__ = ["CHUNK_ROWS", "Generations", "log_chunks"]

CHUNK_ROWS = 65536  # log rows decoded at a time (Parquet)
_JSONL_ROWS = 16384  # JSON-lines records decoded at a time (Python objects)


# -- reading the log in chunks ----------------------------------------------------------------


def _arrow_keys(arr: Any) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow string column -> (fixed-width UTF-8 bytes array, has-key mask), without a
    Python object per row: the bytes are scattered from Arrow's data buffer by its offsets."""
    import pyarrow as pa

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        offset_type = np.int64
    else:
        if not (pa.types.is_string(arr.type) or pa.types.is_binary(arr.type)):
            arr = arr.cast(pa.string())
        offset_type = np.int32
    n = len(arr)
    valid = (
        ~arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.ones(n, bool)
    )
    if n == 0:
        return np.zeros(0, "S1"), valid
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, offset_type)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max()))
    out = np.zeros((n, width), np.uint8)
    out[np.arange(width) < lengths[:, None]] = data[offsets[0] : offsets[-1]]
    return out.view(f"S{width}").reshape(n), valid


def _chunk_from_arrow(batch: Any) -> dict[str, np.ndarray]:
    names = batch.schema.names
    missing = [c for c in ("step", "score", "selected") if c not in names]
    if missing:
        raise ValueError(f"not a selection log: no {', '.join(missing)} column (has {names})")
    n = batch.num_rows

    def col(name: str, dtype: Any, default: Any) -> np.ndarray:
        if name not in names:
            return np.full(n, default, dtype)
        c = batch.column(name)
        if c.null_count:
            c = c.fill_null(default)
        return c.to_numpy(zero_copy_only=False).astype(dtype, copy=False)

    if "key" in names:
        keys, has_key = _arrow_keys(batch.column("key"))
    else:
        keys, has_key = np.zeros(n, "S1"), np.zeros(n, bool)
    return {
        "key": keys,
        "has_key": has_key,
        "epoch": col("epoch", np.int64, 0),
        "step": col("step", np.int64, 0),
        "pos": col("pos", np.int64, 0),
        # a null score (none is written, but pandas may) reads as NaN, like a non-finite one
        "score": batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64),
        "selected": col("selected", bool, False),
        **{c: col(c, np.float64, math.nan) for c in LEARNABILITY_COLUMNS if c in names},
    }


def _chunk_from_columns(cols: dict[str, Any]) -> dict[str, np.ndarray]:
    """A chunk of :func:`jeststream.selection_log.jsonl_chunks` in this module's layout."""
    keys = cols["key"]
    n = len(keys)
    encoded = [b"" if k is None else k.encode("utf-8", "surrogatepass") for k in keys]
    return {
        "key": np.array(encoded, dtype="S") if n else np.zeros(0, "S1"),
        "has_key": np.fromiter((k is not None for k in keys), bool, n),
        "epoch": cols["epoch"],
        "step": cols["step"],
        "pos": cols["pos"].astype(np.int64),
        "score": cols["score"].astype(np.float64),  # NaN for null
        "selected": cols["selected"],
        **{c: cols[c].astype(np.float64) for c in LEARNABILITY_COLUMNS if c in cols},
    }


def log_chunks(path: Path, rows: int = CHUNK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The log's rows in write order, ``rows`` at a time, as numpy columns (see module doc);
    each example row carries its step's batch-level values where the log has them."""
    if path.is_dir() or is_parquet(path):
        if path.is_dir():
            files = segment_files(path)
        else:
            files = [(path, None)]  # the single-file format of older jeststream versions
        if files:
            require_pyarrow(path)
        wanted = ["key", "epoch", "step", "pos", "score", "selected", *LEARNABILITY_COLUMNS]
        for file, steps_file in files:
            try:
                import pyarrow.parquet as pq

                name = steps_file.name if steps_file is not None else file.name
                step_rows = None if steps_file is None else read_step_rows(steps_file)
                name = file.name
                pf = pq.ParquetFile(str(file))
                cols = [c for c in wanted if c in pf.schema_arrow.names]
                batches = pf.iter_batches(batch_size=rows, columns=cols)
                for batch in batches:
                    ch = _chunk_from_arrow(batch)
                    if step_rows is not None:
                        ch.update(
                            (c, v.astype(np.float64))
                            for c, v in step_columns(ch["step"], step_rows).items()
                        )
                    yield ch
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 -- name the segment that failed
                raise ValueError(
                    f"selection log {path}: {name} cannot be read ({type(exc).__name__}: "
                    f"{exc})"
                ) from exc
        return
    for cols in jsonl_chunks(path, min(rows, _JSONL_ROWS)):
        yield _chunk_from_columns(cols)


# -- resumed runs: which records a later run rewrote ---------------------------------------------


class Generations:
    """Numbers the runs that wrote one log file: a new run starts where (step, pos) stops
    increasing (a resume rewrites steps from its checkpoint on). Records the step interval each
    run wrote, so that a second pass can keep only the last run's records of each step."""

    def __init__(self, intervals: list[tuple[int, int]] | None = None) -> None:
        self.prev: tuple[int, int] | None = None
        self.gen = -1
        self.found: list[list[int]] = []  # [first step, last step] per run
        self.intervals = intervals  # from an earlier pass: filter with them

    def assign(self, step: np.ndarray, pos: np.ndarray) -> np.ndarray:
        n = len(step)
        if not n:
            return np.zeros(0, np.int64)
        prev_step = np.empty(n, np.int64)
        prev_pos = np.empty(n, np.int64)
        prev_step[1:], prev_pos[1:] = step[:-1], pos[:-1]
        if self.prev is None:
            prev_step[0], prev_pos[0] = step[0], pos[0] - 1  # the first row starts run 0
            start = np.zeros(n, bool)
            start[0] = True
        else:
            prev_step[0], prev_pos[0] = self.prev
            start = np.zeros(n, bool)
        start |= (step < prev_step) | ((step == prev_step) & (pos <= prev_pos))
        gens = self.gen + np.cumsum(start)
        for i in np.flatnonzero(start).tolist():
            self.found.append([int(step[i]), int(step[i])])
        self.gen = int(gens[-1])
        # the last step of each run in this chunk (runs are increasing in step)
        ends = np.flatnonzero(np.r_[gens[1:] != gens[:-1], True])
        for i in ends.tolist():
            run = self.found[int(gens[i])]
            run[1] = max(run[1], int(step[i]))
        self.prev = (int(step[-1]), int(pos[-1]))
        return gens

    def keep(self, step: np.ndarray, gens: np.ndarray) -> np.ndarray:
        """Rows not rewritten by a later run (needs the intervals of a finished pass)."""
        keep = np.ones(len(step), bool)
        if not self.intervals or len(self.intervals) < 2:
            return keep
        for g in np.unique(gens).tolist():
            rows = gens == g
            for lo, hi in self.intervals[g + 1 :]:
                keep[rows & (step >= lo) & (step <= hi)] = False
        return keep
