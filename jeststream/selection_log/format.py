"""The selection log's on-disk layout, shared by its writer and its reader.

Example rows hold per-example fields only (``COLUMNS``); the values of a whole super-batch go to
one *step row* per step (``STEP_COLUMNS``), written only when there are any.

- A Parquet log is a directory of immutable segments ``part-NNNNNN.parquet`` (numbered in write
  order) of example rows, each with its steps' rows in ``_steps-NNNNNN.parquet`` (same number,
  written first) when it has any. A file is written under a hidden temporary name
  (``.part-NNNNNN.parquet.tmp``) and renamed into place, so a segment is complete or absent; a
  step-row file whose segment is missing is never read. The ``.``- and ``_``-prefixed files are
  skipped by ``pyarrow.dataset`` and pandas, which read the directory as the example rows.
- A JSON-lines log starts each writer's lines with a header ``{"jeststream_selection_log": 2,
  "columns": [...]}``, then per step its step row as an object (``{"epoch":0,"step":12,
  "batch_learnability":...}``, when it has one) followed by one JSON array per example in
  ``COLUMNS`` order (``["key",0,12,3,0.8123,false]``; a score is the shortest decimal that reads
  back to the same float32, null for NaN/inf). Format 1 (every example a JSON object, the
  batch-level values repeated on each) is still read, also mixed with format-2 lines.
- The run configuration lives beside the log, in ``LOG.run.json`` (outside a Parquet log's
  directory, which holds segments only).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jeststream.atomic import atomic_write

__all__ = [
    "COLUMNS",
    "FORMAT_VERSION",
    "HEADER_KEY",
    "LEARNABILITY_COLUMNS",
    "STEP_COLUMNS",
    "SegmentListing",
    "have_pyarrow",
    "read_run_config",
    "run_config_path",
    "scan_segments",
    "schema",
    "segment_files",
    "steps_schema",
    "write_run_config",
]

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
HEADER_KEY = "jeststream_selection_log"  # the key of a JSON-lines log's header line
_SEGMENT_RE = re.compile(r"part-(\d{6,})\.parquet")
_TEMP_RE = re.compile(r"\.(?:_steps|part)-(\d{6,})\.parquet\.tmp")
# the step rows of segment N: a leading "_" hides them from pyarrow.dataset and pandas
_STEPS_RE = re.compile(r"_steps-(\d{6,})\.parquet")


def have_pyarrow() -> bool:
    """Whether pyarrow (with its Parquet module) is importable."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def schema(learnability: bool = False):
    """The example rows' Arrow schema (format 1 also had the ``LEARNABILITY_COLUMNS``)."""
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


def steps_schema():
    """The step rows' Arrow schema (``STEP_COLUMNS``)."""
    import pyarrow as pa

    return pa.schema(
        [("epoch", pa.int64()), ("step", pa.int64())]
        + [(c, pa.float32()) for c in LEARNABILITY_COLUMNS]
    )


@dataclass
class SegmentListing:
    """A segment directory's entries: the segments (seq, name) in seq order, the step-row files
    by seq, leftover temp files, and anything else."""

    segments: list[tuple[int, str]]
    steps: dict[int, str]
    temps: list[str]
    other: list[str]


def scan_segments(path: Path) -> SegmentListing:
    """The entries of the segment directory ``path``, sorted into a :class:`SegmentListing`."""
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
    return SegmentListing(segments, steps, sorted(temps), sorted(other))


def segment_files(path: str | os.PathLike) -> list[tuple[Path, Path | None]]:
    """The segments of a directory log in write order, each with the file of its steps'
    batch-level rows (None when it has none). Temp files and step rows whose segment is missing
    (a writer killed between the two renames) are not listed."""
    path = Path(path)
    listing = scan_segments(path)
    return [
        (path / name, path / listing.steps[seq] if seq in listing.steps else None)
        for seq, name in listing.segments
    ]


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
