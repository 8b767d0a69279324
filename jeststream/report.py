"""``jeststream report``: what JEST kept and what it threw away, as one self-contained HTML page.

    jeststream report run/sel.parquet --shards "data/{00000..00099}.tar" --out report.html
    jeststream report sel.rank0.jsonl sel.rank1.jsonl --mds data/mds --config run.json
    write_report(["run/sel.parquet"], "data/{00000..00099}.tar", "report.html")

The page shows thumbnails with captions, scores and keys of the most and least selected samples
and of random samples selected often and never; the score distributions of selected and
rejected examples; the score margin between them and the mean scores over training steps; the selection
rate and the share of the selected batch of each value of a low-cardinality sample field (a
label, a noise type) over training; and the run as recorded: examples seen, super-batch size B
and sub-batch b per log (one log per rank), the ratio b/B they imply, and the configuration
the loader recorded beside each log (``LOG.run.json``: ratio, n_chunks, criterion, loss, ...),
or the one passed with ``config=`` / ``--config``, which takes its place. Everything is
inline: PNG/JPEG thumbnails as ``data:`` URIs, plots as SVG drawn here, CSS
in the page, no script; a Content-Security-Policy forbids any network access.

Memory is bounded by the number of distinct keys, never by the number of rows: the log is read in
chunks of ``CHUNK_ROWS`` rows and aggregated into numpy arrays -- a sorted array of the keys'
UTF-8 bytes (fixed width: the longest key) with per-key counts and score sums, per-step-bin sums
and exact score histograms whose bins widen by powers of two as values arrive. A log with a
resumed run (records of steps a later run rewrote) is read twice: the first pass finds where the
rewrites start, the second keeps the last record of each step, as
:func:`jeststream.selection_log.read_selection_log` does. Sample fields (the label or noise type
of each key) need one more pass over the log, after the shards.

Shards are read once, through the webdataset and MDS readers of ``jeststream.adapters``; only the
samples shown keep their image and caption. Fields come from a sample's ``json`` member (its
scalar entries), from any other small text member that is neither the image nor the caption
(e.g. ``cls``), from MDS columns other than the image, caption and key, and from sidecar files
mapping keys to field dicts: ``--meta FILE`` (a JSON object, or JSON lines with a ``key`` or
``__key__`` entry) and, found automatically, ``NAME-meta.json`` beside shards named
``NAME-00000.tar`` (the demo's layout). A field is plotted when it has at most
``MAX_FIELD_VALUES`` distinct values.

Missing keys, unreadable images or shards, keyless rows and an empty log each give a clear line
in the page's "Notes" section instead of an error.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.atomic import atomic_write
from jeststream.selection_log import (
    LEARNABILITY_COLUMNS,
    is_parquet,
    jsonl_chunks,
    read_step_rows,
    require_pyarrow,
    segment_files,
    step_columns,
)

__all__ = ["CHUNK_ROWS", "MAX_FIELD_VALUES", "ReportData", "collect_report", "main",
           "render_html", "write_report"]

logger = logging.getLogger(__name__)

CHUNK_ROWS = 65536  # log rows decoded at a time (Parquet)
_JSONL_ROWS = 16384  # JSON-lines records decoded at a time (Python objects)
MAX_FIELD_VALUES = 24  # a field with more distinct values is not plotted
_MAX_FIELDS = 8  # fields tracked per key
_HIST_BINS = 4096  # exact histogram resolution (display bins are sums of these)
_STEP_BINS = 512
_SHARD_BATCH = 4096  # samples looked up in the key table at once
_THUMB_PX = 96  # displayed thumbnail side
_RANK_RE = re.compile(r"rank[-_.]?(\d+)", re.IGNORECASE)
# optional per-super-batch columns of a log written with batch_learnability=True
_LEARNABILITY = LEARNABILITY_COLUMNS


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
        **{c: col(c, np.float64, math.nan) for c in _LEARNABILITY if c in names},
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
        **{c: cols[c].astype(np.float64) for c in _LEARNABILITY if c in cols},
    }


def _log_chunks(path: Path, rows: int = CHUNK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The log's rows in write order, ``rows`` at a time, as numpy columns (see module doc);
    each example row carries its step's batch-level values where the log has them."""
    if path.is_dir() or is_parquet(path):
        if path.is_dir():
            files = segment_files(path)
        else:
            files = [(path, None)]  # the single-file format of older jeststream versions
        if files:
            require_pyarrow(path)
        wanted = ["key", "epoch", "step", "pos", "score", "selected", *_LEARNABILITY]
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


class _Generations:
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


# -- compact aggregates --------------------------------------------------------------------------


class _Binned:
    """Exact sums of several quantities in bins of a power-of-two width over an open range.

    Bin j covers [j * width, (j + 1) * width); ``nbins`` bins starting at ``i0`` are stored.
    A value outside them doubles the width (adjacent bins merge) until the range covers it, so
    memory is fixed and no range is needed up front. ``integer`` widths start at 1 (steps)."""

    def __init__(self, nbins: int, nrows: int, integer: bool = False) -> None:
        self.nbins, self.integer = nbins, integer
        self.sums = np.zeros((nrows, nbins), np.float64)
        self.width: float | None = None
        self.i0 = 0

    def _start(self, lo: float, hi: float) -> None:
        span = hi - lo
        if self.integer:
            width = 1.0
            while span >= self.nbins // 2 * width:
                width *= 2
        else:
            tiny = max(abs(lo), abs(hi), 1e-30) * 1e-9
            width = 2.0 ** math.ceil(math.log2(max(span, tiny) / (self.nbins // 2)))
        self.width = width
        self.i0 = int(math.floor(lo / width)) - self.nbins // 4

    def _coarsen(self) -> None:
        old = np.arange(self.i0, self.i0 + self.nbins) // 2  # floor division: negatives too
        i0 = self.i0 // 2 - self.nbins // 4
        merged = np.zeros_like(self.sums)
        for r in range(self.sums.shape[0]):
            merged[r] = np.bincount(old - i0, weights=self.sums[r], minlength=self.nbins)
        self.sums, self.i0 = merged, i0
        self.width = self.width * 2

    def index(self, x: np.ndarray) -> np.ndarray:
        """Bin of each value, widening the bins first if needed."""
        if self.width is None:
            self._start(float(x.min()), float(x.max()))
        lo, hi = float(x.min()), float(x.max())
        while (
            math.floor(lo / self.width) < self.i0
            or math.floor(hi / self.width) >= self.i0 + self.nbins
        ):
            self._coarsen()
        return (np.floor(x / self.width) - self.i0).astype(np.int64)

    def fixed_index(self, x: np.ndarray) -> np.ndarray:
        """Bins of values the range already covers (a later pass over the same rows)."""
        return (np.floor(x / self.width) - self.i0).astype(np.int64)

    def add(self, idx: np.ndarray, rows: Sequence[np.ndarray | None], start: int = 0) -> None:
        """Add per-value weights to rows ``start, start + 1, ...`` (None: count the values)."""
        for r, w in enumerate(rows, start):
            self.sums[r] += np.bincount(idx, weights=w, minlength=self.nbins)

    def occupied(self, row: int = 0) -> tuple[int, int]:
        nz = np.flatnonzero(self.sums[row])
        return (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)

    def edges(self, lo: int, hi: int) -> np.ndarray:
        return (self.i0 + np.arange(lo, hi + 1)) * self.width


class _KeyTable:
    """Sorted unique keys (fixed-width UTF-8 bytes) with per-key counts and score sums."""

    COLUMNS = (("seen", np.int32), ("sel", np.int32), ("ssum", np.float64), ("sn", np.int32))

    def __init__(self) -> None:
        self.keys = np.zeros(0, "S1")
        self.cols = {name: np.zeros(0, dtype) for name, dtype in self.COLUMNS}

    def __len__(self) -> int:
        return len(self.keys)

    def _same_width(self, keys: np.ndarray) -> np.ndarray:
        if keys.dtype.itemsize > self.keys.dtype.itemsize:
            self.keys = self.keys.astype(keys.dtype)
        elif keys.dtype.itemsize < self.keys.dtype.itemsize:
            keys = keys.astype(self.keys.dtype)
        return keys

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index, found) of each key."""
        if keys.dtype.itemsize > self.keys.dtype.itemsize:
            found = np.zeros(len(keys), bool)
            # a key longer than every table key is not in it; compare the others at table width
            fits = np.char.str_len(keys) <= self.keys.dtype.itemsize
            idx = np.zeros(len(keys), np.int64)
            if fits.any():
                i, f = self.lookup(keys[fits].astype(self.keys.dtype))
                idx[fits], found[fits] = i, f
            return idx, found
        keys = keys.astype(self.keys.dtype, copy=False)
        idx = np.searchsorted(self.keys, keys)
        found = idx < len(self.keys)
        found[found] = self.keys[idx[found]] == keys[found]
        return np.minimum(idx, max(len(self.keys) - 1, 0)), found

    def add(self, keys: np.ndarray, selected: np.ndarray, score: np.ndarray) -> None:
        if not len(keys):
            return
        uniq, inv = np.unique(keys, return_inverse=True)
        inv = inv.reshape(-1)
        uniq = self._same_width(uniq)
        at = np.searchsorted(self.keys, uniq)
        found = at < len(self.keys)
        found[found] = self.keys[at[found]] == uniq[found]
        if not found.all():
            new_at, new = at[~found], uniq[~found]
            self.keys = np.insert(self.keys, new_at, new)
            for name, col in self.cols.items():
                self.cols[name] = np.insert(col, new_at, 0)
            at = np.searchsorted(self.keys, uniq)
        m = len(uniq)
        finite = np.isfinite(score)
        c = self.cols
        c["seen"][at] += np.bincount(inv, minlength=m).astype(np.int32)
        c["sel"][at] += np.bincount(inv, weights=selected, minlength=m).astype(np.int32)
        c["ssum"][at] += np.bincount(inv[finite], weights=score[finite], minlength=m)
        c["sn"][at] += np.bincount(inv[finite], minlength=m).astype(np.int32)

    def nbytes(self) -> int:
        return self.keys.nbytes + sum(c.nbytes for c in self.cols.values())


@dataclasses.dataclass
class LogStats:
    """What one log file (one rank) recorded."""

    path: str
    name: str
    rows: int = 0
    selected: int = 0
    keyless: int = 0
    non_finite: int = 0
    rewritten: int = 0  # records of steps a resumed run wrote again (not counted)
    runs: int = 0  # runs that wrote the file (1 + resumes)
    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    epochs: dict[int, int] = dataclasses.field(default_factory=dict)  # epoch -> rows
    super_batch: dict[int, int] = dataclasses.field(default_factory=dict)  # B -> steps
    sub_batch: dict[int, int] = dataclasses.field(default_factory=dict)  # b -> steps


class _StepRuns:
    """Rows and selected rows of each step (a step's records are contiguous), counted into
    {B: steps} and {b: steps} without keeping a per-step array."""

    def __init__(self, stats: LogStats) -> None:
        self.stats = stats
        self.open: list[int] | None = None  # [step, rows, selected] of the last run

    def add(self, step: np.ndarray, selected: np.ndarray) -> None:
        if not len(step):
            return
        starts = np.flatnonzero(np.r_[True, step[1:] != step[:-1]])
        lengths = np.diff(np.r_[starts, len(step)])
        sels = np.add.reduceat(selected.astype(np.int64), starts)
        runs = [[int(s), int(n), int(k)] for s, n, k in zip(step[starts], lengths, sels)]
        if self.open is not None and self.open[0] == runs[0][0]:
            runs[0][1] += self.open[1]
            runs[0][2] += self.open[2]
        elif self.open is not None:
            self._close(self.open)
        for run in runs[:-1]:
            self._close(run)
        self.open = runs[-1]

    def _close(self, run: list[int]) -> None:
        s = self.stats
        s.steps += 1
        s.super_batch[run[1]] = s.super_batch.get(run[1], 0) + 1
        s.sub_batch[run[2]] = s.sub_batch.get(run[2], 0) + 1

    def finish(self) -> None:
        if self.open is not None:
            self._close(self.open)
            self.open = None


# step-bin rows: examples, selected, then score sums and finite counts of selected / rejected
_S_ROWS, _S_SEL, _S_SSUM, _S_SN, _S_RSUM, _S_RN = range(6)
_S_LEARN = 6  # then the sum and finite count of each batch-learnability column


class _Fields:
    """Per-key codes of low-cardinality sample fields (a label, a noise type)."""

    def __init__(self, n_keys: int) -> None:
        self.n_keys = n_keys
        self.codes: dict[str, np.ndarray] = {}
        self.values: dict[str, dict[str, int]] = {}
        self.dropped: dict[str, str] = {}

    def set(self, idx: int, fields: Mapping[str, Any]) -> None:
        for name, value in fields.items():
            if name in self.dropped or value is None or isinstance(value, (dict, list)):
                continue
            codes = self.codes.get(name)
            if codes is None:
                if len(self.codes) + len(self.dropped) >= _MAX_FIELDS:
                    continue
                codes = self.codes[name] = np.full(self.n_keys, -1, np.int16)
                self.values[name] = {}
            text = _value_text(value)
            vals = self.values[name]
            code = vals.get(text)
            if code is None:
                if len(vals) >= MAX_FIELD_VALUES:
                    self.dropped[name] = f"more than {MAX_FIELD_VALUES} distinct values"
                    del self.codes[name], self.values[name]
                    continue
                code = vals[text] = len(vals)
            codes[idx] = code

    def names(self) -> list[str]:
        return [n for n in self.codes if (self.codes[n] >= 0).any()]


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- the collected report --------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """A shown sample: what the shards hold for its key."""

    key: str
    seen: int
    selected: int
    mean_score: float
    caption: str | None = None
    image: str | None = None  # data: URI
    size: tuple[int, int] | None = None  # the original image's (width, height)
    problem: str | None = None
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ReportData:
    """Everything the page shows (:func:`collect_report`); :func:`render_html` draws it."""

    title: str
    logs: list[LogStats]
    config: dict[str, Any]
    rows: int
    selected: int
    unique_keys: int
    score: dict[str, dict[str, float]]  # "selected"/"rejected" -> n, mean, min, max
    hist: dict[str, Any] | None  # edges, selected, rejected (exact counts), below, above
    steps: dict[str, np.ndarray] | None  # x, rows, selected, mean scores per step bin
    fields: dict[str, dict[str, Any]]  # name -> values, per-bin seen/selected, totals
    galleries: list[tuple[str, str, list[Sample]]]  # (title, explanation, samples)
    notes: list[str]
    shards: str
    key_table_bytes: int = 0


def _rank_name(path: Path, n: int) -> str:
    m = _RANK_RE.search(path.name)
    if m:
        return f"rank {int(m.group(1))}"
    return path.name if n > 1 else "log"


def _aggregate(
    paths: list[Path], gens: list[_Generations] | None
) -> tuple[list[_Generations], list[LogStats], _KeyTable, _Binned, _Binned, dict]:
    """One pass over every log: per-key, per-step-bin and histogram aggregates."""
    table = _KeyTable()
    steps = _Binned(_STEP_BINS, _S_LEARN + 2 * len(_LEARNABILITY), integer=True)
    hist = _Binned(_HIST_BINS, 2)
    score = {g: {"n": 0, "sum": 0.0, "min": math.inf, "max": -math.inf} for g in ("selected",
                                                                              "rejected")}
    out_gens, out_stats = [], []
    for i, path in enumerate(paths):
        gen = _Generations(None if gens is None else gens[i].found)
        stats = LogStats(str(path), _rank_name(path, len(paths)))
        runs = _StepRuns(stats)
        epochs: Counter = Counter()
        for ch in _log_chunks(path):
            g = gen.assign(ch["step"], ch["pos"])
            keep = gen.keep(ch["step"], g)
            if not keep.all():
                stats.rewritten += int((~keep).sum())
                ch = {c: v[keep] for c, v in ch.items()}
            n = len(ch["step"])
            if not n:
                continue
            step, sel, sc = ch["step"], ch["selected"], ch["score"]
            stats.rows += n
            stats.selected += int(sel.sum())
            stats.keyless += int((~ch["has_key"]).sum())
            finite = np.isfinite(sc)
            stats.non_finite += int((~finite).sum())
            lo, hi = int(step.min()), int(step.max())
            stats.first_step = lo if stats.first_step is None else min(stats.first_step, lo)
            stats.last_step = hi if stats.last_step is None else max(stats.last_step, hi)
            e, cnt = np.unique(ch["epoch"], return_counts=True)
            epochs.update(dict(zip(e.tolist(), cnt.tolist())))
            runs.add(step, sel)
            has = ch["has_key"]
            table.add(ch["key"][has], sel[has], sc[has])
            idx = steps.index(step.astype(np.float64))
            fs, fr = finite & sel, finite & ~sel
            steps.add(
                idx,
                [None, sel.astype(np.float64), np.where(fs, sc, 0.0), fs.astype(np.float64),
                 np.where(fr, sc, 0.0), fr.astype(np.float64)],
            )
            for j, c in enumerate(_LEARNABILITY):
                if c in ch:
                    ok = np.isfinite(ch[c])
                    steps.add(idx, [np.where(ok, ch[c], 0.0), ok.astype(np.float64)],
                              start=_S_LEARN + 2 * j)
            if finite.any():
                hidx = hist.index(sc[finite])
                fsel = sel[finite]
                hist.add(hidx, [(~fsel).astype(np.float64), fsel.astype(np.float64)])
                for name, m in (("selected", fs), ("rejected", fr)):
                    if m.any():
                        v = sc[m]
                        d = score[name]
                        d["n"] += int(m.sum())
                        d["sum"] += float(v.sum())
                        d["min"] = min(d["min"], float(v.min()))
                        d["max"] = max(d["max"], float(v.max()))
        runs.finish()
        stats.runs = gen.gen + 1
        stats.epochs = dict(sorted(epochs.items()))
        out_gens.append(gen)
        out_stats.append(stats)
    return out_gens, out_stats, table, steps, hist, score


_BLOCK_KEYS = 65536  # keys ranked at a time: the galleries' memory does not grow with the log


def _key_metrics(table: _KeyTable, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Ranking quantities of the keys at ``idx`` (computed for a block at a time)."""
    c = table.cols
    seen = c["seen"][idx].astype(np.float64)
    sel = c["sel"][idx].astype(np.float64)
    sn = c["sn"][idx]
    mean = np.divide(c["ssum"][idx], sn, out=np.full(len(idx), np.nan), where=sn > 0)
    return {
        "seen": seen,
        "sel": sel,
        "share": np.divide(sel, seen, out=np.zeros_like(sel), where=seen > 0),
        "high": np.where(np.isnan(mean), -np.inf, mean),  # no finite score: ranked last
        "low": np.where(np.isnan(mean), np.inf, mean),
    }


def _ranked(table: _KeyTable, idx: np.ndarray, order, k: int) -> np.ndarray:
    """The first ``k`` of ``idx`` in the lexicographic order ``order(metrics)`` (a list of
    arrays, the first primary), ties by key (the table is sorted by key)."""
    if not len(idx):
        return idx
    m = _key_metrics(table, idx)
    keys = order(m)
    return idx[np.lexsort((idx, *reversed(keys)))[:k]]


def _galleries(table: _KeyTable, top: int, seed: int) -> list[tuple[str, str, np.ndarray]]:
    """Indices of the keys each gallery shows; block by block over the table, so that ranking
    a million keys needs a block's temporaries, not a million-row sort."""
    n = len(table)
    blocks = [(lo, min(n, lo + _BLOCK_KEYS)) for lo in range(0, n, _BLOCK_KEYS)]

    def most_order(m):
        return [-m["sel"], -m["share"], -m["high"]]

    def least_order(m):
        return [m["share"], -m["seen"], m["low"]]

    most = least = np.zeros(0, np.int64)
    for lo, hi in blocks:
        idx = np.arange(lo, hi)
        chosen = idx[table.cols["sel"][lo:hi] > 0]
        most = _ranked(table, np.r_[most, _ranked(table, chosen, most_order, top)],
                       most_order, top)
        least = _ranked(table, np.r_[least, _ranked(table, idx, least_order, top)],
                        least_order, top)
    shown = np.union1d(most, least)

    # random samples: the ``top`` smallest of a uniform priority per key (reservoir sampling),
    # once among the keys not shown above and once among all (for a small log)
    rng = np.random.default_rng(seed)
    empty = (np.zeros(0, np.int64), np.zeros(0))
    samples = {name: [empty, empty] for name in ("often", "never")}  # [others, anyone]
    for lo, hi in blocks:
        idx = np.arange(lo, hi)
        prio = rng.random(hi - lo)
        m = _key_metrics(table, idx)
        for name, mask in (("often", m["share"] >= 0.5), ("never", m["sel"] == 0)):
            for j, keep in enumerate((mask & ~np.isin(idx, shown), mask)):
                cand, p = idx[keep], prio[keep]
                ci, cp = samples[name][j]
                ci, cp = np.r_[ci, cand], np.r_[cp, p]
                best = np.argsort(cp, kind="stable")[:top]
                samples[name][j] = (ci[best], cp[best])

    def pick(name: str) -> np.ndarray:
        (others, _), (anyone, _) = samples[name]
        idx = others if len(others) >= min(top, len(anyone)) else anyone
        high = _key_metrics(table, idx)["high"]
        return idx[np.lexsort((idx, -high))]  # shown highest score first

    return [
        ("Most selected",
         "the keys selected most often (then: the largest share of their views selected, the "
         "highest mean score)", most),
        ("Least selected",
         "the smallest share of their views selected (then: the most views, the lowest mean "
         "score)", least),
        ("Selected often",
         "a random sample of the keys selected in at least half of their views (not shown "
         "above, when there are enough)", pick("often")),
        ("Never selected", "a random sample of the keys never selected (not shown above, when "
         "there are enough)", pick("never")),
    ]


# -- the shards ---------------------------------------------------------------------------------


class _ShardProblems:
    """The webdataset reader's error counter: collects lines for the report's notes."""

    def __init__(self, notes: list[str]) -> None:
        self.notes = notes

    def shard_error(self, url: str, exc: BaseException) -> None:
        self.notes.append(
            f"shard {url} could not be read to its end ({type(exc).__name__}: {exc}); its "
            "samples before the damage were read"
        )

    def sample_error(self, key: str, url: str, exc: BaseException) -> None:
        self.notes.append(f"sample {key!r} of shard {url}: {type(exc).__name__}: {exc}")


_META_SUFFIX = "-meta.json"
_SHARD_NAME_RE = re.compile(r"^(.+?)[-_]\d+\.tar$")


def _shard_urls(shards: str | Sequence[str] | None) -> list[str]:
    if shards is None:
        return []
    from jeststream.adapters.webdataset import expand_urls

    urls: list[str] = []
    for url in expand_urls(shards if isinstance(shards, str) else [os.fspath(s) for s in shards]):
        if os.path.isdir(url):
            found = sorted(str(p) for p in Path(url).glob("*.tar"))
            if not found:
                raise ValueError(f"--shards {url}: a directory without *.tar shards")
            urls.extend(found)
        else:
            urls.append(url)
    return urls


def _sidecars(urls: list[str]) -> list[Path]:
    """``NAME-meta.json`` beside local shards ``NAME-00000.tar`` (the demo's layout)."""
    out: list[Path] = []
    for url in urls:
        m = _SHARD_NAME_RE.match(os.path.basename(url))
        if m is None or ":" in url.split("/")[0]:  # not local (pipe:, http://, s3://)
            continue
        path = Path(url).parent / (m.group(1) + _META_SUFFIX)
        if path.is_file() and path not in out:
            out.append(path)
    return out


def _meta_records(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(key, fields) of a sidecar: JSON lines (records with ``key`` or ``__key__``), streamed,
    or one JSON object ``{key: {field: value}}`` (read whole, as it must be)."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
        try:
            rec = json.loads(first)
        except json.JSONDecodeError:
            rec = None
        f.seek(0)
        if not (isinstance(rec, dict) and ("key" in rec or "__key__" in rec)):
            data = json.load(f)
            if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
                raise ValueError(
                    f"--meta {path}: neither JSON lines with 'key' nor a JSON object "
                    "{key: {field: value}}"
                )
            yield from ((str(k), v) for k, v in data.items())
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            key = rec.get("__key__", rec.get("key")) if isinstance(rec, dict) else None
            if key is None:
                raise ValueError(f"--meta {path}:{lineno}: a record without 'key' or '__key__'")
            yield str(key), {k: v for k, v in rec.items() if k not in ("key", "__key__")}


def _sample_fields(raw: Mapping[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    """Scalar fields of a raw webdataset sample: its ``json`` member's entries and any other
    small text member (``cls``, ...) whose extension is not in ``skip`` (images, captions)."""
    out: dict[str, Any] = {}
    for ext, data in raw.items():
        if ext.startswith("__") or ext in skip or not isinstance(data, bytes):
            continue
        if ext == "json" or ext.endswith(".json"):
            try:
                obj = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict):
                out.update({k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool))})
        elif len(data) <= 64:
            try:
                text = data.decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
            if text and text.isprintable():
                out[ext] = text
    return out


def _thumbnail(image: Any) -> tuple[str, tuple[int, int]]:
    """A PIL image -> (data: URI of a small PNG or JPEG, original size)."""
    from PIL import Image

    size = image.size
    if image.mode not in ("L", "RGB"):
        if "A" in image.getbands() or image.mode == "P":
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        else:
            image = image.convert("RGB")
    if max(image.size) > 2 * _THUMB_PX:
        image = image.copy()
        image.thumbnail((2 * _THUMB_PX, 2 * _THUMB_PX))
    buf = io.BytesIO()
    if image.mode == "RGB" and max(image.size) > 64:
        image.save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        image.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", size


def _fill_sample(sample: Sample, image: Any, image_ext: str | None, caption: Any,
                 fields: Mapping[str, Any]) -> None:
    sample.fields = {k: _value_text(v) for k, v in fields.items()}
    if caption is not None:
        sample.caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else (
            str(caption))
        sample.caption = sample.caption.strip()
    if image is None:
        sample.problem = "the sample has no image field"
        return
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            from jeststream.adapters.webdataset import decode_image

            with decode_image(bytes(image), image_ext or "") as im:
                sample.image, sample.size = _thumbnail(im)
        else:
            from PIL import Image

            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            sample.image, sample.size = _thumbnail(image)
    except Exception as exc:  # noqa: BLE001 -- any decoding failure is reported, not raised
        sample.problem = f"image unreadable ({type(exc).__name__}: {exc})"


class _ShardReader:
    """One pass over the shards: fields of every logged key, images of the shown ones."""

    def __init__(self, table: _KeyTable, wanted: dict[bytes, Sample], fields: _Fields,
                 notes: list[str]) -> None:
        self.table, self.wanted, self.fields, self.notes = table, wanted, fields, notes
        self.in_log = np.zeros(len(table), bool)
        self.samples = 0
        self._pending: list[tuple[bytes, dict[str, Any]]] = []

    def _flush(self, in_shards: bool = True) -> None:
        """Look the pending keys up in the table at once; set their fields."""
        if not self._pending:
            return
        keys = np.array([k for k, _ in self._pending], dtype="S")
        idx, found = self.table.lookup(keys)
        for i, f, (_, fields) in zip(idx.tolist(), found.tolist(), self._pending):
            if f:
                if in_shards:
                    self.in_log[i] = True
                if fields:
                    self.fields.set(i, fields)
        self._pending = []

    def add(self, key: str, fields: dict[str, Any]) -> None:
        self.samples += 1
        self._pending.append((key.encode("utf-8", "surrogatepass"), fields))
        if len(self._pending) >= _SHARD_BATCH:
            self._flush()

    def webdataset(self, urls: list[str]) -> None:
        from jeststream.adapters.webdataset import IMAGE_EXTS, TEXT_EXTS, first_field, shard_samples

        problems = _ShardProblems(self.notes)
        skip = frozenset(IMAGE_EXTS) | frozenset(TEXT_EXTS)
        for url in urls:
            for raw in shard_samples(url, problems):  # type: ignore[arg-type]
                key = raw["__key__"]
                img = first_field(raw, IMAGE_EXTS)
                txt = first_field(raw, TEXT_EXTS)
                fields = _sample_fields(raw, skip)
                self.add(key, fields)
                sample = self.wanted.get(key.encode("utf-8", "surrogatepass"))
                if sample is not None and sample.image is None and sample.problem is None:
                    _fill_sample(sample, img and img[1], img and img[0], txt and txt[1], fields)
        self._flush()

    def mds(self, local: str, image_field: str, text_field: str, key_field: str | None) -> None:
        from streaming.base.format import reader_from_json

        from jeststream.adapters.precompute_reference import _mds_shards

        for shard in _mds_shards(local):
            reader = reader_from_json(os.path.dirname(shard.source), None, shard.mds_info)
            for i in range(int(shard.size or 0)):
                gidx = shard.mds_offset + i
                try:
                    row = reader.get_item(i)
                except Exception as exc:  # noqa: BLE001
                    self.notes.append(f"MDS sample {gidx} of {shard.source}: "
                                      f"{type(exc).__name__}: {exc}")
                    continue
                key = str(row[key_field]) if key_field and key_field in row else str(gidx)
                fields = {
                    k: (v.item() if isinstance(v, np.generic) else v)
                    for k, v in row.items()
                    if k not in (image_field, text_field, key_field)
                    and isinstance(v, (str, int, float, bool, np.generic))
                }
                self.add(key, fields)
                sample = self.wanted.get(key.encode("utf-8", "surrogatepass"))
                if sample is not None and sample.image is None and sample.problem is None:
                    _fill_sample(sample, row.get(image_field), None, row.get(text_field), fields)
        self._flush()

    def sidecar(self, path: Path) -> None:
        for key, fields in _meta_records(path):
            self._pending.append((key.encode("utf-8", "surrogatepass"), dict(fields)))
            sample = self.wanted.get(key.encode("utf-8", "surrogatepass"))
            if sample is not None:
                for k, v in fields.items():
                    if isinstance(v, (str, int, float, bool)):
                        sample.fields.setdefault(k, _value_text(v))
            if len(self._pending) >= _SHARD_BATCH:
                self._flush(in_shards=False)
        self._flush(in_shards=False)


# -- collecting ---------------------------------------------------------------------------------


def _field_pass(paths: list[Path], gens: list[_Generations], table: _KeyTable, steps: _Binned,
                fields: _Fields) -> dict[str, dict[str, Any]]:
    """Per step bin and field value: examples seen and selected (one more pass over the logs)."""
    names = fields.names()
    acc = {n: np.zeros((2, steps.nbins, len(fields.values[n]) + 1), np.int64) for n in names}
    for i, path in enumerate(paths):
        gen = _Generations(gens[i].found)
        for ch in _log_chunks(path):
            g = gen.assign(ch["step"], ch["pos"])
            keep = gen.keep(ch["step"], g) & ch["has_key"]
            if not keep.any():
                continue
            idx, found = table.lookup(ch["key"][keep])
            b = steps.fixed_index(ch["step"][keep].astype(np.float64))
            sel = ch["selected"][keep]
            for n in names:
                nv = len(fields.values[n])
                code = np.where(found, fields.codes[n][idx], -1).astype(np.int64)
                code[code < 0] = nv  # unknown value
                flat = b * (nv + 1) + code
                size = steps.nbins * (nv + 1)
                acc[n][0] += np.bincount(flat, minlength=size).reshape(steps.nbins, nv + 1)
                acc[n][1] += np.bincount(flat[sel], minlength=size).reshape(steps.nbins, nv + 1)
    out = {}
    for n in sorted(names, key=lambda n: len(fields.values[n])):  # the fewest values first
        values = list(fields.values[n])
        counts = acc[n]
        order = _value_order(values, counts[0].sum(0)[: len(values)])
        cols = [*order, len(values)]  # known values, then unknown
        labels = [values[j] for j in order] + ["(unknown)"]
        keep = [j for j, c in enumerate(cols) if counts[0][:, c].sum()]
        out[n] = {
            "values": [labels[j] for j in keep],
            "seen": counts[0][:, [cols[j] for j in keep]],
            "selected": counts[1][:, [cols[j] for j in keep]],
        }
    return out


def _value_order(values: list[str], seen: np.ndarray) -> list[int]:
    """Numbers in numeric order, other values by examples seen (the commonest first)."""
    def num(v: str) -> float | None:
        try:
            return float(v)
        except ValueError:
            return None

    if all(num(v) is not None for v in values):
        return sorted(range(len(values)), key=lambda i: num(values[i]))
    return sorted(range(len(values)), key=lambda i: (-int(seen[i]), values[i]))


def _recorded_config(paths: Sequence[Path], notes: list[str]) -> dict[str, Any]:
    """The run configuration the loader wrote beside the logs (``LOG.run.json``). Settings that
    differ between the logs (one per rank) are shown per log."""
    from jeststream.selection_log import read_run_config

    found = {}
    for p in paths:
        try:
            c = read_run_config(p)
        except (OSError, ValueError) as exc:
            notes.append(f"{p}: its run configuration is unreadable ({exc})")
            continue
        if c is not None:
            found[p] = c
    if not found:
        return {}
    merged: dict[str, Any] = {}
    for k in dict.fromkeys(k for c in found.values() for k in c):
        values = {p: c.get(k) for p, c in found.items()}
        distinct = {json.dumps(v, sort_keys=True, default=str) for v in values.values()}
        merged[k] = (
            next(iter(values.values()))
            if len(distinct) == 1
            else ", ".join(f"{p.name}: {v}" for p, v in values.items())
        )
    return merged


def collect_report(
    log_paths: Sequence[str | os.PathLike],
    shards: str | Sequence[str | os.PathLike] | None = None,
    *,
    mds: str | os.PathLike | None = None,
    meta: Sequence[str | os.PathLike] = (),
    config: Mapping[str, Any] | None = None,
    top: int = 24,
    seed: int = 0,
    title: str | None = None,
    image_field: str = "image",
    text_field: str = "text",
    key_field: str | None = "key",
) -> ReportData:
    """Read the logs (streamed) and the shards (once) into a :class:`ReportData`."""
    paths = [Path(p) for p in log_paths]
    if not paths:
        raise ValueError("no selection log given")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"selection log {p} does not exist")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1 (samples per gallery), got {top!r}")
    meta = [Path(m) for m in meta]
    for m in meta:
        if not m.is_file():
            raise FileNotFoundError(f"--meta {m} does not exist")
    urls = _shard_urls(shards)  # bad patterns fail now, not after reading the log
    notes: list[str] = []
    gens, stats, table, steps, hist, score = _aggregate(paths, None)
    if any(g.gen > 0 for g in gens):  # a resumed run rewrote steps: count its records only
        gens, stats, table, steps, hist, score = _aggregate(paths, gens)
    rows = sum(s.rows for s in stats)
    for s in stats:
        if not s.rows:
            notes.append(f"{s.path}: the log is empty (no records); nothing to report for it")
        if s.rewritten:
            notes.append(
                f"{s.path}: written by {s.runs} runs (resumed); {s.rewritten} records of steps "
                "a later run wrote again are left out, as read_selection_log does"
            )
        if s.keyless:
            notes.append(
                f"{s.path}: {s.keyless} of {s.rows} records have no sample key (no thumbnails, "
                "no per-sample statistics for them): give JESTLoader a keyed base loader or "
                "key_fn="
            )
        if s.non_finite:
            notes.append(
                f"{s.path}: {s.non_finite} records have no finite score (fallback super-batches "
                "selected uniformly); they count in the shares, not in the score plots"
            )

    galleries = _galleries(table, top, seed) if len(table) else []
    wanted: dict[bytes, Sample] = {}
    c = table.cols
    for _, _, idx in galleries:
        for i in idx.tolist():
            k = bytes(table.keys[i])
            if k not in wanted:
                sn = int(c["sn"][i])
                wanted[k] = Sample(
                    key=k.decode("utf-8", "surrogatepass"),
                    seen=int(c["seen"][i]),
                    selected=int(c["sel"][i]),
                    mean_score=float(c["ssum"][i] / sn) if sn else math.nan,
                )

    fields = _Fields(len(table))
    reader = _ShardReader(table, wanted, fields, notes)
    sources = []
    if urls:
        reader.webdataset(urls)
        sources.append(f"{len(urls)} webdataset shard{'s' if len(urls) != 1 else ''}")
    if mds is not None:
        reader.mds(os.fspath(mds), image_field, text_field, key_field)
        sources.append(f"MDS {mds}")
    sidecars = meta + [p for p in _sidecars(urls) if p not in meta]
    for path in sidecars:
        reader.sidecar(path)
        sources.append(f"fields from {path}")
    if not urls and mds is None:
        notes.append("no shards given (--shards / --mds): no thumbnails or captions")
    elif len(table):
        missing = [s.key for s in wanted.values() if s.image is None and s.problem is None]
        for s in wanted.values():
            if s.image is None and s.problem is None:
                s.problem = "key not in the shards"
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            notes.append(
                f"{len(missing)} of the {len(wanted)} shown keys are not in the shards "
                f"({shown}): wrong --shards/--mds, or a key_fn that does not give the shards' "
                "keys"
            )
        in_log = int(reader.in_log.sum())
        if in_log < len(table):
            notes.append(
                f"{len(table) - in_log} of the log's {len(table)} keys are not in the shards "
                f"({reader.samples} samples read)"
            )
    for s in wanted.values():
        if s.problem and s.problem.startswith("image unreadable"):
            notes.append(f"sample {s.key}: {s.problem}")
    for name, why in fields.dropped.items():
        notes.append(f"field {name!r} is not plotted: {why}")

    field_data = _field_pass(paths, gens, table, steps, fields) if fields.names() else {}
    return ReportData(
        title=title or "JEST selection report",
        logs=stats,
        config=dict(config) if config is not None else _recorded_config(paths, notes),
        rows=rows,
        selected=sum(s.selected for s in stats),
        unique_keys=len(table),
        score={
            g: {
                "n": d["n"],
                "mean": d["sum"] / d["n"] if d["n"] else math.nan,
                "min": d["min"] if d["n"] else math.nan,
                "max": d["max"] if d["n"] else math.nan,
            }
            for g, d in score.items()
        },
        hist=_hist_data(hist) if hist.width is not None else None,
        steps=_step_data(steps) if rows else None,
        fields=field_data,
        galleries=[
            (t, why, [wanted[bytes(table.keys[i])] for i in idx.tolist()])
            for t, why, idx in galleries
        ],
        notes=notes,
        shards=", ".join(sources) or "none",
        key_table_bytes=table.nbytes(),
    )


def _hist_data(hist: _Binned, max_bins: int = 40) -> dict[str, Any]:
    """Display bins: the central 99 % of the scores in at most ``max_bins`` bins, with the
    counts below and above said separately; exact counts (sums of the fine bins)."""
    total = hist.sums.sum(0)
    cdf = np.cumsum(total)
    n = cdf[-1]
    lo = int(np.searchsorted(cdf, 0.005 * n, side="right"))
    hi = int(np.searchsorted(cdf, 0.995 * n, side="left")) + 1
    lo, hi = min(lo, hi - 1), min(max(hi, lo + 1), hist.nbins)
    group = max(1, math.ceil((hi - lo) / max_bins))
    starts = np.arange(lo, hi, group)
    sums = np.add.reduceat(hist.sums[:, lo:hi], starts - lo, axis=1)
    edges = (hist.i0 + np.r_[starts, hi]) * hist.width
    return {
        "edges": edges,
        "rejected": sums[0],
        "selected": sums[1],
        "below": hist.sums[:, :lo].sum(1),
        "above": hist.sums[:, hi:].sum(1),
    }


def _step_data(steps: _Binned, max_points: int = 120) -> dict[str, np.ndarray]:
    lo, hi = steps.occupied(_S_ROWS)
    group = max(1, math.ceil((hi - lo) / max_points))
    starts = np.arange(lo, hi, group)
    sums = np.add.reduceat(steps.sums[:, lo:hi], starts - lo, axis=1)
    edges = steps.edges(lo, hi)
    x = edges[starts - lo]  # first step of each display bin
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "x": x,
            "group": np.array(group * steps.width),
            "rows": sums[_S_ROWS],
            "share": sums[_S_SEL] / sums[_S_ROWS],
            "mean_selected": sums[_S_SSUM] / sums[_S_SN],
            "mean_rejected": sums[_S_RSUM] / sums[_S_RN],
            "mean_all": (sums[_S_SSUM] + sums[_S_RSUM]) / (sums[_S_SN] + sums[_S_RN]),
            # per step the same value on every row: the row-weighted mean is the step mean
            "learnability": np.stack([
                sums[_S_LEARN + 2 * j] / sums[_S_LEARN + 2 * j + 1]
                for j in range(len(_LEARNABILITY))
            ]),
            "lo": np.array(lo),
            "hi": np.array(hi),
            "bin_group": np.array(group),
            "i0": np.array(steps.i0),
            "width": np.array(steps.width),
        }


# -- drawing ------------------------------------------------------------------------------------

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939")
_SEL_COLOR, _REJ_COLOR = "#ff7f0e", "#1f77b4"


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{100 * x:.1f} %"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    t = first
    while t <= hi + step * 1e-9:
        out.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return out


class _Plot:
    """An SVG plot area with axes (x and y in data units)."""

    W, H, L, R, T, B = 600, 230, 58, 14, 12, 40

    def __init__(self, xlo: float, xhi: float, ylo: float, yhi: float, xlabel: str,
                 ylabel: str, label: str) -> None:
        if xhi <= xlo:
            xlo, xhi = xlo - 0.5, xhi + 0.5
        if yhi <= ylo:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        self.xlo, self.xhi, self.ylo, self.yhi = xlo, xhi, ylo, yhi
        self.parts: list[str] = []
        self.xlabel, self.ylabel, self.label = xlabel, ylabel, label

    def x(self, v: float) -> float:
        return self.L + (v - self.xlo) / (self.xhi - self.xlo) * (self.W - self.L - self.R)

    def y(self, v: float) -> float:
        return self.T + (self.yhi - v) / (self.yhi - self.ylo) * (self.H - self.T - self.B)

    def line(self, xs: np.ndarray, ys: np.ndarray, color: str, width: float = 1.8,
             dash: str | None = None) -> None:
        segs, cur = [], []
        for xv, yv in zip(xs.tolist(), ys.tolist()):
            if math.isfinite(yv):
                cur.append(f"{self.x(xv):.1f},{self.y(yv):.1f}")
            elif cur:
                segs.append(cur)
                cur = []
        if cur:
            segs.append(cur)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        for seg in segs:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                self.parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            else:
                self.parts.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="{width}"{extra} '
                    f'points="{" ".join(seg)}"/>'
                )

    def rect(self, x0: float, x1: float, y0: float, y1: float, color: str, opacity: float,
             tip: str) -> None:
        px0, px1 = self.x(x0), self.x(x1)
        py0, py1 = self.y(y1), self.y(y0)
        self.parts.append(
            f'<rect x="{px0:.1f}" y="{py0:.1f}" width="{max(px1 - px0, 0.5):.1f}" '
            f'height="{max(py1 - py0, 0):.1f}" fill="{color}" fill-opacity="{opacity}">'
            f"<title>{html.escape(tip)}</title></rect>"
        )

    def svg(self, yfmt=_fmt) -> str:
        ax = []
        x0, x1 = self.L, self.W - self.R
        y0, y1 = self.T, self.H - self.B
        for t in _ticks(self.ylo, self.yhi):
            py = self.y(t)
            ax.append(f'<line x1="{x0}" x2="{x1}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e5e5e5"/>')
            ax.append(f'<text x="{x0 - 4}" y="{py + 3.5:.1f}" text-anchor="end">{yfmt(t)}</text>')
        for t in _ticks(self.xlo, self.xhi, 6):
            px = self.x(t)
            ax.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y1}" y2="{y1 + 4}" stroke="#444"/>')
            ax.append(f'<text x="{px:.1f}" y="{y1 + 15}" text-anchor="middle">{_fmt(t)}</text>')
        ax.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" '
                  'stroke="#444"/>')
        ax.append(f'<text x="{(x0 + x1) / 2}" y="{self.H - 6}" text-anchor="middle">'
                  f"{html.escape(self.xlabel)}</text>")
        ax.append(f'<text transform="translate(13,{(y0 + y1) / 2}) rotate(-90)" '
                  f'text-anchor="middle">{html.escape(self.ylabel)}</text>')
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.W} {self.H}" '
            f'width="{self.W}" height="{self.H}" role="img" aria-label="{html.escape(self.label)}"'
            f' font-family="sans-serif" font-size="11">{"".join(self.parts)}{"".join(ax)}</svg>'
        )


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{c}"></i>{html.escape(name)}</span>' for name, c in items
    ) + "</div>"


def _hist_svg(h: dict[str, Any]) -> str:
    edges = h["edges"]
    sel, rej = h["selected"], h["rejected"]
    ns, nr = sel.sum() + h["below"][1] + h["above"][1], rej.sum() + h["below"][0] + h["above"][0]
    fs = sel / ns if ns else sel * 0
    fr = rej / nr if nr else rej * 0
    p = _Plot(float(edges[0]), float(edges[-1]), 0.0, float(max(fs.max(), fr.max()) * 1.08),
              "score", "share of the group", "score histogram, selected vs rejected")
    for i in range(len(sel)):
        a, b = float(edges[i]), float(edges[i + 1])
        rng = f"[{_fmt(a)}, {_fmt(b)})"
        p.rect(a, b, 0, float(fr[i]), _REJ_COLOR, 0.55, f"rejected {rng}: {int(rej[i]):,}")
        p.rect(a, b, 0, float(fs[i]), _SEL_COLOR, 0.55, f"selected {rng}: {int(sel[i]):,}")
    return p.svg(lambda t: f"{100 * t:.0f}%")


def _lines_svg(x: np.ndarray, series: Sequence[tuple[str, np.ndarray, str]], ylabel: str,
               label: str, share: bool = False) -> str:
    ys = np.concatenate([s[1][np.isfinite(s[1])] for s in series] or [np.zeros(0)])
    if share:
        ylo, yhi = 0.0, max(float(ys.max()) * 1.08 if len(ys) else 1.0, 1e-3)
    else:
        ylo, yhi = (float(ys.min()), float(ys.max())) if len(ys) else (0.0, 1.0)
        pad = (yhi - ylo) * 0.06 or abs(yhi) * 0.06 or 0.5
        ylo, yhi = ylo - pad, yhi + pad
    xlo, xhi = float(x[0]), float(x[-1])
    p = _Plot(xlo, xhi, ylo, yhi, "training step (super-batch)", ylabel, label)
    for _, y, color in series:
        p.line(x, y, color)
    return p.svg((lambda t: f"{100 * t:.0f}%") if share else _fmt)


# -- the page -----------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1280px;
padding:0 16px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:right;vertical-align:top}th{background:#f6f6f6}td.l,th.l{text-align:left}
.muted{color:#666;font-size:.92em}.notes li{margin:.2em 0}
.plots{display:flex;flex-wrap:wrap;gap:18px}.plots figure{margin:0}
figcaption{font-size:.9em;color:#444;max-width:600px}
.legend span{margin-right:14px;font-size:.9em}.legend i{display:inline-block;width:12px;
height:12px;margin-right:4px;vertical-align:-1px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;font-size:.82em;background:#fafafa;
overflow-wrap:anywhere}
.card .thumb{width:96px;height:96px;display:flex;align-items:center;justify-content:center;
margin:0 auto 4px;background:#fff;border:1px solid #eee}
.card img{max-width:96px;max-height:96px}.card img.px{image-rendering:pixelated}
.card .missing{color:#a33;font-size:.9em;text-align:center;padding:4px}
.card .key{font-family:ui-monospace,monospace;font-size:.95em}.card .cap{font-style:italic}
"""


def _card(s: Sample) -> str:
    if s.image is not None:
        w, h = s.size or (_THUMB_PX, _THUMB_PX)
        scale = _THUMB_PX / max(w, h)
        cls = ' class="px"' if scale > 1 else ""
        thumb = (f'<img{cls} src="{s.image}" width="{max(1, round(w * scale))}" '
                 f'height="{max(1, round(h * scale))}" alt="{html.escape(s.key)}">')
    else:
        thumb = f'<div class="missing">{html.escape(s.problem or "no image")}</div>'
    lines = [
        f'<div class="thumb">{thumb}</div>',
        f'<div class="key">{html.escape(s.key)}</div>',
    ]
    if s.caption is not None:
        lines.append(f'<div class="cap">“{html.escape(s.caption[:200])}”</div>')
    lines.append(
        f"<div>selected {s.selected} of {s.seen} · mean score "
        f"{html.escape(_fmt(s.mean_score))}</div>"
    )
    for k, v in list(s.fields.items())[:6]:
        lines.append(f'<div class="muted">{html.escape(k)}: {html.escape(v[:60])}</div>')
    return '<div class="card">' + "".join(lines) + "</div>"


def _mode_text(counts: Mapping[int, int]) -> str:
    if not counts:
        return "—"
    mode = max(counts, key=lambda k: (counts[k], k))
    if len(counts) == 1:
        return f"{mode:,}"
    return f"{mode:,} ({min(counts):,}–{max(counts):,})"


def _config_section(d: ReportData) -> str:
    out = ["<h2>The run</h2>"]
    head = ("log", "examples seen", "selected", "super-batches", "steps", "epochs",
            "B (examples per super-batch)", "b (selected per super-batch)", "b/B")
    out.append("<table><tr>" + "".join(
        f'<th class="{"l" if i == 0 else ""}">{h}</th>' for i, h in enumerate(head)) + "</tr>")
    for s in d.logs:
        mode_b = max(s.super_batch, key=lambda k: (s.super_batch[k], k)) if s.super_batch else 0
        mode_k = max(s.sub_batch, key=lambda k: (s.sub_batch[k], k)) if s.sub_batch else 0
        ratio = _fmt(mode_k / mode_b, 3) if mode_b else "—"
        epochs = (f"{min(s.epochs)}–{max(s.epochs)}" if len(s.epochs) > 1
                  else ", ".join(map(str, s.epochs)) or "—")
        steps = "—" if s.first_step is None else f"{s.first_step:,}–{s.last_step:,}"
        out.append(
            f'<tr><td class="l">{html.escape(s.name)}<br><span class="muted">'
            f"{html.escape(s.path)}</span></td><td>{s.rows:,}</td><td>{s.selected:,}</td>"
            f"<td>{s.steps:,}</td><td>{steps}</td><td>{epochs}</td>"
            f"<td>{_mode_text(s.super_batch)}</td><td>{_mode_text(s.sub_batch)}</td>"
            f"<td>{ratio}</td></tr>"
        )
    if len(d.logs) > 1:
        out.append(
            f'<tr><th class="l">all</th><th>{d.rows:,}</th><th>{d.selected:,}</th>'
            f"<th>{sum(s.steps for s in d.logs):,}</th><th></th><th></th><th></th><th></th>"
            "<th></th></tr>"
        )
    out.append("</table>")
    out.append('<p class="muted">B and b are the most common values over the super-batches '
               "(the range in brackets when they vary); b/B is the filtering ratio they imply.</p>")
    known = ("ratio", "n_chunks", "criterion", "loss")
    rows = [(k, d.config[k]) for k in known if k in d.config]
    rows += [(k, v) for k, v in d.config.items() if k not in known]
    if rows:
        out.append('<table><tr><th class="l">configuration</th><th class="l">value</th></tr>')
        for k, v in rows:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out.append(f'<tr><td class="l">{html.escape(str(k))}</td>'
                       f'<td class="l">{html.escape(str(text))}</td></tr>')
        out.append("</table>")
        missing = [k for k in known if k not in d.config]
        if missing:
            out.append(f'<p class="muted">Not given: {", ".join(missing)}.</p>')
    else:
        out.append('<p class="muted">Configuration: no run configuration was recorded beside '
                   "the log (LOG.run.json, which JESTLoader writes) and none was given; pass "
                   "--config FILE.json (or write_report(config=...)) to show it here.</p>")
    return "".join(out)


def _scores_section(d: ReportData) -> str:
    out = ["<h2>Scores</h2>", '<p class="muted">A score is the example\'s own score under the '
           "run's criterion, as logged (learnability, the default: learner loss minus reference "
           "loss, higher is more learnable). JEST draws sub-batches jointly, so selected "
           "examples need not be the top scores.</p>"]
    if d.hist is None:
        out.append("<p>No finite scores in the log.</p>")
        return "".join(out)
    sc = d.score
    out.append('<table><tr><th class="l"></th><th>examples</th><th>mean score</th><th>min</th>'
               "<th>max</th></tr>")
    for g in ("selected", "rejected"):
        s = sc[g]
        out.append(f'<tr><td class="l">{g}</td><td>{s["n"]:,}</td><td>{_fmt(s["mean"])}</td>'
                   f'<td>{_fmt(s["min"])}</td><td>{_fmt(s["max"])}</td></tr>')
    out.append("</table>")
    h = d.hist
    below, above = h["below"].sum(), h["above"].sum()
    tail = ""
    if below or above:
        tail = (f" {int(below):,} scores below {_fmt(float(h['edges'][0]))} and {int(above):,} "
                f"above {_fmt(float(h['edges'][-1]))} are outside the plot.")
    out.append(
        '<div class="plots"><figure>' + _hist_svg(h)
        + _legend([("selected", _SEL_COLOR), ("rejected", _REJ_COLOR)])
        + "<figcaption>Distribution of the logged scores of selected and rejected examples, "
        "each as a share of its group (exact counts on hover)." + tail + "</figcaption></figure>"
    )
    st = d.steps
    if st is not None and len(st["x"]):
        per = int(st["group"])
        note = f" Each point sums {per:,} steps." if per > 1 else ""
        share = st["share"][np.isfinite(st["share"])]
        fixed = (f" The selected share itself stays at {float(share.mean()):.1%} of the examples "
                 "seen (the ratio)." if len(share) else "")
        out.append(
            "<figure>" + _lines_svg(
                st["x"], [("score margin", st["mean_selected"] - st["mean_rejected"],
                           _SEL_COLOR)],
                "selected − rejected mean score", "score margin over training")
            + "<figcaption>Mean score of the selected minus that of the rejected examples: how "
            "far the selection pulls away from what it leaves." + fixed + note
            + "</figcaption></figure>"
        )
        out.append(
            "<figure>" + _lines_svg(
                st["x"],
                [("selected", st["mean_selected"], _SEL_COLOR),
                 ("rejected", st["mean_rejected"], _REJ_COLOR),
                 ("all", st["mean_all"], "#555")],
                "mean score", "mean score over training")
            + _legend([("selected", _SEL_COLOR), ("rejected", _REJ_COLOR), ("all", "#555")])
            + "<figcaption>Mean score of the selected, rejected and all examples seen."
            + note + "</figcaption></figure>"
        )
        learn = st["learnability"]
        if np.isfinite(learn).any():
            names = [("selected", _SEL_COLOR), ("independent draw", "#2ca02c"),
                     ("uniform draw", _REJ_COLOR)]
            out.append(
                "<figure>" + _lines_svg(
                    st["x"], [(n, learn[j], c) for j, (n, c) in enumerate(names)],
                    "batch learnability", "batch learnability over training")
                + _legend(names)
                + "<figcaption>Learnability of the selected sub-batch as a whole (pairwise "
                "terms included) against an independent and a uniform draw of its size from "
                "the same super-batch, as logged with batch_learnability=True." + note
                + "</figcaption></figure>"
            )
    out.append("</div>")
    return "".join(out)


def _fields_section(d: ReportData) -> str:
    if not d.fields:
        return ""
    out = ["<h2>By sample field</h2>"]
    st = d.steps
    for name, f in d.fields.items():
        seen, sel = f["seen"], f["selected"]
        tot_seen, tot_sel = seen.sum(0), sel.sum(0)
        all_sel = tot_sel.sum()
        out.append(f"<h3>{html.escape(name)}</h3>")
        out.append(f'<table><tr><th class="l">{html.escape(name)}</th><th>seen</th>'
                   "<th>selected</th><th>selection rate</th><th>share of seen</th>"
                   "<th>share of selected</th></tr>")
        for j, v in enumerate(f["values"]):
            rate = tot_sel[j] / tot_seen[j] if tot_seen[j] else math.nan
            out.append(
                f'<tr><td class="l">{html.escape(v)}</td><td>{int(tot_seen[j]):,}</td>'
                f"<td>{int(tot_sel[j]):,}</td><td>{_pct(rate)}</td>"
                f"<td>{_pct(tot_seen[j] / tot_seen.sum())}</td>"
                f"<td>{_pct(tot_sel[j] / all_sel if all_sel else math.nan)}</td></tr>"
            )
        out.append("</table>")
        if st is None:
            continue
        lo, hi, group = int(st["lo"]), int(st["hi"]), int(st["bin_group"])
        # coarser than the score plots, as each value gets a share of a bin's examples: at most
        # 40 points, and about 200 examples per value and point on average
        per_bin = seen.sum() / max(1, hi - lo)
        group = max(group, math.ceil((hi - lo) / 40),
                    math.ceil(200 * len(f["values"]) / max(per_bin, 1e-9)))
        group = min(group, max(1, hi - lo))
        starts = np.arange(lo, hi, group)
        s_seen = np.add.reduceat(seen[lo:hi], starts - lo, axis=0)
        s_sel = np.add.reduceat(sel[lo:hi], starts - lo, axis=0)
        x = (int(st["i0"]) + starts) * float(st["width"])
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = s_sel / s_seen
            comp = s_sel / s_sel.sum(1, keepdims=True)
        colors = [_COLORS[j % len(_COLORS)] for j in range(len(f["values"]))]
        rate_series = [(v, rate[:, j], colors[j]) for j, v in enumerate(f["values"])]
        comp_series = [(v, comp[:, j], colors[j]) for j, v in enumerate(f["values"])]
        per = group * int(float(st["width"]))
        out.append(
            '<div class="plots"><figure>'
            + _lines_svg(x, rate_series, "selection rate", f"selection rate per {name}", True)
            + f"<figcaption>Share of the examples of each {html.escape(name)} that were selected"
            f" (each point sums {per:,} steps).</figcaption></figure><figure>"
            + _lines_svg(x, comp_series, "share of selected", f"selected batch by {name}", True)
            + f"<figcaption>Composition of the selected examples by {html.escape(name)}."
            "</figcaption></figure></div>"
            + _legend([(v, colors[j]) for j, v in enumerate(f["values"])])
        )
    return "".join(out)


def render_html(d: ReportData) -> str:
    """The page for ``d``: one self-contained HTML document (no script, no network)."""
    share = d.selected / d.rows if d.rows else math.nan
    head = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(d.title)}</title><style>{_CSS}</style></head><body>"
    )
    body = [f"<h1>{html.escape(d.title)}</h1>"]
    logs = ", ".join(s.path for s in d.logs)
    body.append(f'<p class="muted">Logs: {html.escape(logs)}<br>Samples: '
                f"{html.escape(d.shards)}</p>")
    if d.rows:
        body.append(
            f"<p><b>{d.rows:,}</b> examples seen ({d.unique_keys:,} distinct keys), "
            f"<b>{d.selected:,}</b> selected ({_pct(share)}).</p>"
        )
    else:
        body.append("<p><b>The selection log is empty</b>: no example was recorded.</p>")
    if d.notes:
        body.append('<h2>Notes</h2><ul class="notes">' + "".join(
            f"<li>{html.escape(n)}</li>" for n in d.notes[:200]) + "</ul>")
        if len(d.notes) > 200:
            body.append(f'<p class="muted">... and {len(d.notes) - 200} more notes.</p>')
    body.append(_config_section(d))
    if d.rows:
        body.append(_scores_section(d))
        body.append(_fields_section(d))
    for title, why, samples in d.galleries:
        body.append(f"<h2>{html.escape(title)}</h2><p class=\"muted\">{html.escape(why)}; "
                    "score: the key's mean logged score.</p>")
        if samples:
            body.append('<div class="gallery">' + "".join(_card(s) for s in samples) + "</div>")
        else:
            body.append("<p>No sample in this group.</p>")
    return head + "".join(body) + "</body></html>\n"


def write_report(
    log_paths: str | os.PathLike | Sequence[str | os.PathLike],
    shards: str | Sequence[str | os.PathLike] | None,
    out_path: str | os.PathLike,
    **kwargs: Any,
) -> Path:
    """Write the report of ``log_paths`` (one log per rank) over ``shards`` (a brace pattern,
    a list of shard paths or directories of ``*.tar``) to ``out_path``; returns its path.
    ``kwargs`` go to :func:`collect_report` (``mds=``, ``meta=``, ``config=``, ``top=``...)."""
    if isinstance(log_paths, (str, os.PathLike)):
        log_paths = [log_paths]
    return _write(collect_report(log_paths, shards, **kwargs), Path(out_path))


def _write(data: ReportData, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(data)
    atomic_write(out, lambda fh: fh.write(page), mode="w")  # a reader never sees half a page
    return out


# -- CLI ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``jeststream report LOG [LOG ...] --shards SPEC [--mds DIR] --out report.html``."""
    p = argparse.ArgumentParser(
        prog="jeststream report",
        description="Write a self-contained HTML page of what JEST selected: thumbnails of the "
        "most and least selected samples, score distributions, selection over training, per "
        "label/noise type when the samples carry such a field.",
    )
    p.add_argument("log", nargs="+", help="selection log(s) (one per rank: sel.rank*.jsonl)")
    p.add_argument("--shards", help="webdataset shards: a brace pattern, '::'-separated list, "
                   "or a directory of *.tar")
    p.add_argument("--mds", metavar="DIR", help="a local MosaicML (MDS) dataset directory")
    p.add_argument("--meta", action="append", default=[], metavar="FILE",
                   help="sidecar fields: a JSON object {key: {field: value}} or JSON lines with "
                   "'key'; NAME-meta.json beside NAME-00000.tar shards is read without it")
    p.add_argument("--config", metavar="FILE.json",
                   help="the run's configuration to show (a JSON object: ratio, n_chunks, "
                   "criterion, loss, ...); the log does not record it")
    p.add_argument("--out", default="report.html", help="output HTML file (default report.html)")
    p.add_argument("--top", type=int, default=24, help="samples per gallery (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random galleries")
    p.add_argument("--title", default=None)
    p.add_argument("--image-field", default="image", help="MDS image column")
    p.add_argument("--text-field", default="text", help="MDS caption column")
    p.add_argument("--key-field", default="key", help="MDS key column (absent: sample index)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.top < 1:
        p.error(f"--top must be >= 1, got {args.top}")
    config = None
    try:
        if args.config:
            config = json.loads(Path(args.config).read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError(f"--config {args.config}: not a JSON object")
        data = collect_report(
            args.log, args.shards, mds=args.mds, meta=args.meta, config=config, top=args.top,
            seed=args.seed, title=args.title, image_field=args.image_field,
            text_field=args.text_field, key_field=args.key_field,
        )
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"jeststream report: {exc}", file=sys.stderr)
        return 2
    out = _write(data, Path(args.out))
    shown = sum(1 for _, _, ss in data.galleries for s in ss if s.image)
    print(f"report: {out} ({data.rows:,} examples, {data.unique_keys:,} keys, {shown} "
          f"thumbnails, {len(data.notes)} notes)")
    return 0
