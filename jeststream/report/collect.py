"""``collect_report``: the logs (streamed) and the shards (read once) gathered into a
:class:`ReportData`, everything the page shows.

Passes: one over the logs (:func:`.aggregate.aggregate`; a second when a resumed run rewrote
steps, keeping the last run's records as ``read_selection_log`` does), one over the shards
(:class:`.shards.ShardReader`, after the galleries are chosen, so that only their samples keep
an image), and one more over the logs when the samples have fields to plot. The galleries are
ranked block by block over the key table, so their memory does not grow with the log. The run
configuration is the one given (``config=``) or the one the loader recorded beside each log
(``LOG.run.json``; settings that differ between ranks' logs are shown per log). Missing keys,
unreadable images or shards, keyless rows and an empty log become lines in ``notes``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.report.aggregate import (
    Fields,
    KeyTable,
    LogStats,
    aggregate,
    field_pass,
    hist_data,
    step_data,
)
from jeststream.report.shards import Sample, ShardReader, find_sidecars, shard_urls
from jeststream.selection_log import read_run_config

__all__ = ["ReportData", "collect_report"]


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


_BLOCK_KEYS = 65536  # keys ranked at a time: the galleries' memory does not grow with the log


def _key_metrics(table: KeyTable, idx: np.ndarray) -> dict[str, np.ndarray]:
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


def _ranked(table: KeyTable, idx: np.ndarray, order, k: int) -> np.ndarray:
    """The first ``k`` of ``idx`` in the lexicographic order ``order(metrics)`` (a list of
    arrays, the first primary), ties by key (the table is sorted by key)."""
    if not len(idx):
        return idx
    m = _key_metrics(table, idx)
    keys = order(m)
    return idx[np.lexsort((idx, *reversed(keys)))[:k]]


def _galleries(table: KeyTable, top: int, seed: int) -> list[tuple[str, str, np.ndarray]]:
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


def _recorded_config(paths: Sequence[Path], notes: list[str]) -> dict[str, Any]:
    """The run configuration the loader wrote beside the logs (``LOG.run.json``). Settings that
    differ between the logs (one per rank) are shown per log."""
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
    urls = shard_urls(shards)  # bad patterns fail now, not after reading the log
    notes: list[str] = []
    gens, stats, table, steps, hist, score = aggregate(paths, None)
    if any(g.gen > 0 for g in gens):  # a resumed run rewrote steps: count its records only
        gens, stats, table, steps, hist, score = aggregate(paths, gens)
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

    fields = Fields(len(table))
    reader = ShardReader(table, wanted, fields, notes)
    sources = []
    if urls:
        reader.webdataset(urls)
        sources.append(f"{len(urls)} webdataset shard{'s' if len(urls) != 1 else ''}")
    if mds is not None:
        reader.mds(os.fspath(mds), image_field, text_field, key_field)
        sources.append(f"MDS {mds}")
    sidecars = meta + [p for p in find_sidecars(urls) if p not in meta]
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

    field_data = field_pass(paths, gens, table, steps, fields) if fields.names() else {}
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
        hist=hist_data(hist) if hist.width is not None else None,
        steps=step_data(steps) if rows else None,
        fields=field_data,
        galleries=[
            (t, why, [wanted[bytes(table.keys[i])] for i in idx.tolist()])
            for t, why, idx in galleries
        ],
        notes=notes,
        shards=", ".join(sources) or "none",
        key_table_bytes=table.nbytes(),
    )
