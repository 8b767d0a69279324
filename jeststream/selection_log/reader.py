"""The selection log's reader: :func:`read_selection_log` and the chunked readers both formats
need (:mod:`.format`), for ``jeststream inspect`` and ``jeststream report``.

Reads a directory of Parquet segments (in sequence order; temporary files and step rows whose
segment is missing are never read), a single Parquet file (older jeststream) or a JSON-lines
file of format 1 or 2, also both mixed in one file, as a resumed run appends format-2 lines to a
format-1 log. Every example row is given its step's batch-level values (NaN for a step without
them). Records are identified by (step, pos): when a resumed run rewrote steps the interrupted
run had logged, the last record written is kept, so a resumed log reads as the resumed run.
Needs numpy only (pyarrow for Parquet), not torch or pandas.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.selection_log.format import (
    COLUMNS,
    FORMAT_VERSION,
    HEADER_KEY,
    LEARNABILITY_COLUMNS,
    have_pyarrow,
    schema,
    segment_files,
)

__all__ = [
    "concat_columns",
    "is_parquet",
    "jsonl_chunks",
    "read_selection_log",
    "read_step_rows",
    "require_pyarrow",
    "step_columns",
]

logger = logging.getLogger(__name__)

_PARQUET_MAGIC = b"PAR1"


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a Parquet file (a single-file log of older jeststream)."""
    with open(path, "rb") as f:
        return f.read(4) == _PARQUET_MAGIC


def require_pyarrow(path: str | os.PathLike) -> None:
    """ValueError naming the log and the fix when pyarrow is missing."""
    if not have_pyarrow():
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
            cols = _table_columns(table.select(names).cast(schema(extra)))
            if steps_file is not None:
                name = steps_file.name
                cols.update(step_columns(cols["step"], read_step_rows(steps_file)))
        except Exception as exc:  # noqa: BLE001 -- name the file; a segment is never half-written
            raise ValueError(
                f"selection log {path}: segment {name} cannot be read ({type(exc).__name__}: "
                f"{exc})"
            ) from exc
        parts.append(cols)
    return concat_columns(parts)


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
                if HEADER_KEY in rec:
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
        version = rec.get(HEADER_KEY)
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
        cols = concat_columns([*jsonl_chunks(path)] or [_empty_columns()])
    if dedupe and len(cols["step"]):
        ids = cols["step"] * (int(cols["pos"].max()) + 1) + cols["pos"]
        # keep the last occurrence of each (step, pos), preserving write order
        _, last_rev = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last_rev)
        if len(keep) != len(ids):
            logger.info("%s: %d records rewritten after a resume", path, len(ids) - len(keep))
            cols = {c: ([v[i] for i in keep] if c == "key" else v[keep]) for c, v in cols.items()}
    return cols


def concat_columns(parts: list[dict[str, Any]]) -> dict[str, Any]:
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
