"""``jeststream inspect LOG [LOG ...]``: a selection log summarised (counts, selected share,
score quantiles, the top and bottom keys, batch learnability when logged) and the selected keys
exported, the curated subset. Several logs (one per rank) are summarised together, each
de-duplicated on its own since each rank numbers its own steps. Reads through :mod:`.reader`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.selection_log.format import LEARNABILITY_COLUMNS
from jeststream.selection_log.reader import concat_columns, read_selection_log

__all__ = ["inspect_main", "selected_keys", "summarize"]

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
    cols = concat_columns(parts)
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
