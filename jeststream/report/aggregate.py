"""The report's aggregates of a log: memory bounded by the number of distinct keys, never by rows.

Rows are folded chunk by chunk (:mod:`.chunks`) into numpy arrays: a :class:`KeyTable` (the
sorted keys' UTF-8 bytes, fixed width, with per-key counts and score sums), per-step-bin sums
and exact score histograms in :class:`Binned` bins that widen by powers of two as values arrive
(no range needed up front), {B: steps} and {b: steps} counts per log (:class:`LogStats`), and
per-key codes of low-cardinality sample fields (:class:`Fields`; a field with more than
``MAX_FIELD_VALUES`` distinct values is dropped). :func:`aggregate` is one pass over the logs;
:func:`field_pass` one more, once the shards have given the fields; :func:`hist_data` and
:func:`step_data` turn the fine bins into what the page plots.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.report.chunks import Generations, log_chunks
from jeststream.selection_log import LEARNABILITY_COLUMNS

__all__ = [
    "MAX_FIELD_VALUES",
    "Binned",
    "Fields",
    "KeyTable",
    "LogStats",
    "StepRuns",
    "aggregate",
    "field_pass",
    "hist_data",
    "step_data",
    "value_text",
]

MAX_FIELD_VALUES = 24  # a field with more distinct values is not plotted
_MAX_FIELDS = 8  # fields tracked per key
_HIST_BINS = 4096  # exact histogram resolution (display bins are sums of these)
_STEP_BINS = 512
_RANK_RE = re.compile(r"rank[-_.]?(\d+)", re.IGNORECASE)


# -- compact aggregates --------------------------------------------------------------------------


class Binned:
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


class KeyTable:
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


class StepRuns:
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


class Fields:
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
            text = value_text(value)
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


def value_text(value: Any) -> str:
    """A field value as the report shows and counts it (``true``, ``3`` for 3.0, ...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _rank_name(path: Path, n: int) -> str:
    m = _RANK_RE.search(path.name)
    if m:
        return f"rank {int(m.group(1))}"
    return path.name if n > 1 else "log"


def aggregate(
    paths: list[Path], gens: list[Generations] | None
) -> tuple[list[Generations], list[LogStats], KeyTable, Binned, Binned, dict]:
    """One pass over every log: per-key, per-step-bin and histogram aggregates."""
    table = KeyTable()
    steps = Binned(_STEP_BINS, _S_LEARN + 2 * len(LEARNABILITY_COLUMNS), integer=True)
    hist = Binned(_HIST_BINS, 2)
    score = {g: {"n": 0, "sum": 0.0, "min": math.inf, "max": -math.inf} for g in ("selected",
                                                                              "rejected")}
    out_gens, out_stats = [], []
    for i, path in enumerate(paths):
        gen = Generations(None if gens is None else gens[i].found)
        stats = LogStats(str(path), _rank_name(path, len(paths)))
        runs = StepRuns(stats)
        epochs: Counter = Counter()
        for ch in log_chunks(path):
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
            for j, c in enumerate(LEARNABILITY_COLUMNS):
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


def field_pass(paths: list[Path], gens: list[Generations], table: KeyTable, steps: Binned,
               fields: Fields) -> dict[str, dict[str, Any]]:
    """Per step bin and field value: examples seen and selected (one more pass over the logs)."""
    names = fields.names()
    acc = {n: np.zeros((2, steps.nbins, len(fields.values[n]) + 1), np.int64) for n in names}
    for i, path in enumerate(paths):
        gen = Generations(gens[i].found)
        for ch in log_chunks(path):
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


def hist_data(hist: Binned, max_bins: int = 40) -> dict[str, Any]:
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


def step_data(steps: Binned, max_points: int = 120) -> dict[str, np.ndarray]:
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
                for j in range(len(LEARNABILITY_COLUMNS))
            ]),
            "lo": np.array(lo),
            "hi": np.array(hi),
            "bin_group": np.array(group),
            "i0": np.array(steps.i0),
            "width": np.array(steps.width),
        }
