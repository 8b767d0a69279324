"""Summaries of the demo's runs: headline figures, the stdout table and the learning curves."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from pathlib import Path

from jeststream.demo.data import NOISE_TYPES

# An accuracy is read as the mean of this many consecutive evaluations, so that one lucky
# evaluation neither sets the target nor reaches it.
SMOOTH = 3
CHANCE = 0.1  # ten digits


def fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _smoothed(curve: list[dict], i: int) -> float:
    lo = max(0, i - SMOOTH + 1)
    window = [c["accuracy"] for c in curve[lo : i + 1]]
    return sum(window) / len(window)


def _at_step(curve: list[dict], step: int) -> float:
    i = min(range(len(curve)), key=lambda j: abs(curve[j]["step"] - step))
    return _smoothed(curve, i)


def _first_reach(curve: list[dict], target: float) -> int | None:
    """Index of the first evaluation whose smoothed accuracy reaches `target`."""
    for i in range(1, len(curve)):
        if _smoothed(curve, i) >= target:
            return i
    return None


def _stats(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "of": len(values)}
    return {
        "mean": statistics.fmean(got),
        "std": statistics.stdev(got) if len(got) > 1 else 0.0,
        "min": min(got),
        "max": max(got),
        "n": len(got),
        "of": len(values),
    }


def summarise(cfg, runs: list[dict], references: dict, flops: dict) -> dict:
    """Headline figures per method, averaged over seeds, plus every raw curve.

    Target: uniform's final accuracy (smoothed over its last evaluations) in the same seed.
    steps_to_target: first evaluation whose smoothed accuracy reaches it; the ratio divides by
    uniform's full budget (`steps`), the comparison the paper makes. FLOPs count the training
    steps plus every scoring forward (and static filtering's one pass over the pool), not the
    reference's own training, which is reported separately.
    """
    by_seed: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["method"]] = r
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fixed = sorted({max(1, round(cfg.steps * f)) for f in (0.1, 0.25, 0.5, 1.0)})
    summary: dict[str, dict] = {}
    plateau = []
    for method in methods:
        acc_at = {s: [] for s in fixed}
        final, recall, steps_to, ratio, flops_to, flops_ratio, wall = [], [], [], [], [], [], []
        comp = {t: [] for t in NOISE_TYPES}
        for per in by_seed.values():
            r = per.get(method)
            if r is None:
                continue
            curve = r["curve"]
            for s in fixed:
                acc_at[s].append(_at_step(curve, s))
            final.append(_smoothed(curve, len(curve) - 1))
            recall.append(curve[-1]["recall_at_1"])
            wall.append(r["wall_s"])
            for t in NOISE_TYPES:
                comp[t].append(r["composition"][t])
            uni = per.get("uniform")
            if uni is None:
                continue
            target = _smoothed(uni["curve"], len(uni["curve"]) - 1)
            uni_flops = uni["curve"][-1]["flops"]
            i = _first_reach(curve, target)
            steps_to.append(curve[i]["step"] if i is not None else None)
            ratio.append(curve[i]["step"] / cfg.steps if i is not None else None)
            flops_to.append(curve[i]["flops"] if i is not None else None)
            flops_ratio.append(curve[i]["flops"] / uni_flops if i is not None else None)
        summary[method] = {
            "accuracy_at_step": {str(s): _stats(v) for s, v in acc_at.items()},
            "final_accuracy": _stats(final),
            "final_recall_at_1": _stats(recall),
            "steps_to_uniform_final": _stats(steps_to),
            "steps_ratio_vs_uniform_budget": _stats(ratio),
            "flops_to_uniform_final": _stats(flops_to),
            "flops_ratio_vs_uniform": _stats(flops_ratio),
            "wall_s": _stats(wall),
            "composition": {t: _stats(v) for t, v in comp.items()},
        }
    for per in by_seed.values():
        uni = per.get("uniform")
        if uni is None:
            continue
        curve = uni["curve"]
        end = _smoothed(curve, len(curve) - 1)
        # centred on the 3/4 point: the mean of the evaluations within 5% of the budget of it
        near = [
            c["accuracy"] for c in curve if abs(c["step"] - 0.75 * cfg.steps) <= 0.05 * cfg.steps
        ]
        three_quarters = (
            statistics.fmean(near) if near else _at_step(curve, round(0.75 * cfg.steps))
        )
        plateau.append(end - three_quarters)
    gain = _stats(plateau)
    headline = {}
    if "jest" in summary and "uniform" in summary:
        jr = summary["jest"]["steps_ratio_vs_uniform_budget"]
        headline = {
            "jest_steps_ratio": jr,
            "target_steps_ratio": 1 / 3,
            "target_met": jr["n"] == jr["of"] and jr["max"] is not None and jr["max"] <= 1 / 3,
            "target_met_on_mean": jr["mean"] is not None
            and jr["n"] == jr["of"]
            and jr["mean"] <= 1 / 3,
            "jest_flops_ratio": summary["jest"]["flops_ratio_vs_uniform"],
            "uniform_last_quarter_gain": gain,
            # A flat curve at chance is no plateau: uniform must also have learnt something.
            "uniform_learned": summary["uniform"]["final_accuracy"]["min"] is not None
            and summary["uniform"]["final_accuracy"]["min"] > 2 * CHANCE,
            "uniform_plateau_ok": gain["max"] is not None
            and gain["max"] < 0.02
            and summary["uniform"]["final_accuracy"]["min"] > 2 * CHANCE,
        }
    return {
        "config": dataclasses.asdict(cfg),
        "flops": flops,
        "reference": {str(k): v for k, v in references.items()},
        "headline": headline,
        "methods": summary,
        "runs": runs,
    }


def _fmt(st: dict, scale: float = 1.0, digits: int = 3, pct: bool = False) -> str:
    if st["mean"] is None:
        return "never"
    m = st["mean"] * scale
    text = f"{m:.1f}%" if pct else (f"{m:.{digits}f}" if digits else f"{m:.0f}")
    if st["of"] > 1:
        sd = st["std"] * scale
        text += f"±{sd:.1f}" if pct else (f"±{sd:.{digits}f}" if digits else f"±{sd:.0f}")
    if st["n"] < st["of"]:
        text += f" ({st['n']}/{st['of']})"
    return text


def table(results: dict) -> str:
    """The stdout table: one row per method, mean±std over seeds."""
    cfg = results["config"]
    steps = cfg["steps"]
    fixed = list(next(iter(results["methods"].values()))["accuracy_at_step"])
    head = (
        ["method"]
        + [f"acc@{s}" for s in fixed]
        + [
            "recall@1",
            "steps→uni",
            "÷budget",
            "FLOPs÷uni",
            "wall s",
            "clean",
            "mism",
            "wrong",
            "garb",
            "dup",
        ]
    )
    rows = [head]
    for method, m in results["methods"].items():
        comp = m["composition"]
        rows.append(
            [method]
            + [_fmt(m["accuracy_at_step"][s], 100, pct=True) for s in fixed]
            + [
                _fmt(m["final_recall_at_1"], 100, pct=True),
                _fmt(m["steps_to_uniform_final"], digits=0),
                _fmt(m["steps_ratio_vs_uniform_budget"], digits=2),
                _fmt(m["flops_ratio_vs_uniform"], digits=2),
                _fmt(m["wall_s"], digits=0),
            ]
            + [_fmt(comp[t], 100, pct=True) for t in NOISE_TYPES]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    seeds = cfg["seeds"]
    out = [
        f"held-out zero-shot accuracy (mean over {len(seeds)} seed(s) {seeds}), {steps} learner "
        f"steps of b={cfg['batch_size']}, ratio {cfg['ratio']}; composition = share of trained "
        f"examples by injected noise type; acc@N = mean of the {SMOOTH} evaluations up to step N",
        *lines,
    ]
    h = results.get("headline")
    if h:
        jr, gain = h["jest_steps_ratio"], h["uniform_last_quarter_gain"]
        ratio = "never reached" if jr["mean"] is None else f"{jr['mean']:.3f} (max {jr['max']:.3f})"
        out.append("")
        out.append(
            f"JEST reaches uniform's final accuracy at {ratio} of uniform's steps; target ≤ 1/3: "
            + (
                "MET in every seed"
                if h["target_met"]
                else "MET on the mean, NOT in every seed"
                if h["target_met_on_mean"]
                else "NOT MET"
            )
        )
        fr = h["jest_flops_ratio"]
        if fr["mean"] is not None:
            out.append(
                f"JEST FLOPs to get there (training + scoring forwards) ÷ uniform's: "
                f"{fr['mean']:.2f}"
            )
            ref_flops = [v.get("train_flops") for v in results.get("reference", {}).values()]
            budget = results["flops"]["train_step"] * steps
            if ref_flops and ref_flops[0]:
                out.append(
                    "  not counted: training the reference once on the curated split, "
                    f"{ref_flops[0] / budget:.2f} × uniform's whole budget (shared by every run "
                    "that uses it)"
                )
        if gain["mean"] is not None:
            out.append(
                f"uniform plateau check: last quarter gained {100 * gain['mean']:.1f} points "
                f"(max {100 * gain['max']:.1f}) — "
                f"{'near plateau (< 2)' if h['uniform_plateau_ok'] else 'NOT at plateau (>= 2)'}"
            )
    ref = results.get("reference", {})
    if ref:
        accs = ", ".join(f"{v['accuracy']:.3f}" for v in ref.values())
        out.append(f"reference (curated split only) held-out accuracy: {accs}")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    """Accuracy against learner steps and against total FLOPs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by_method: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_method.setdefault(r["method"], []).append(r)
    for method, runs in by_method.items():
        n = min(len(r["curve"]) for r in runs)
        for ax, x_key in zip(axes, ("step", "flops")):
            xs = [runs[0]["curve"][i][x_key] for i in range(n)]
            accs = [[r["curve"][i]["accuracy"] for r in runs] for i in range(n)]
            mean = [statistics.fmean(a) for a in accs]
            (line,) = ax.plot(xs, mean, label=method)
            if len(runs) > 1:
                ax.fill_between(
                    xs,
                    [min(a) for a in accs],
                    [max(a) for a in accs],
                    color=line.get_color(),
                    alpha=0.15,
                )
    uni = results["methods"].get("uniform")
    for ax, label in zip(axes, ("learner steps", "total FLOPs (training + scoring)")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out zero-shot accuracy")
        ax.grid(alpha=0.3)
        if uni and uni["final_accuracy"]["mean"] is not None:
            ax.axhline(
                uni["final_accuracy"]["mean"], color="grey", ls=":", lw=1, label="uniform final"
            )
    axes[1].set_xscale("log")
    axes[0].legend()
    seeds = results["config"]["seeds"]
    fig.suptitle(f"JEST vs uniform on noisy digits ({len(seeds)} seed(s); band = min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
