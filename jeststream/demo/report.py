"""Summaries of the demo's runs: headline figures, the stdout table and the learning curves."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import textwrap
from pathlib import Path

from jeststream.demo.data import NOISE_TYPES, n_classes
from jeststream.demo.model import RETRIEVAL

# An accuracy is read as the mean of this many consecutive evaluations, so that one lucky
# evaluation neither sets the target nor reaches it.
SMOOTH = 3
# Steadier measures than steps to uniform's final accuracy (a moving target while uniform still
# climbs): FLOPs to reach these fixed accuracies, and accuracy at these shares of uniform's FLOPs.
FIXED_ACCURACIES = (0.7, 0.8)
UNIFORM_FLOPS_SHARES = (0.25, 0.5)
# Methods that use no reference, for results written before runs recorded "uses_reference".
REFERENCE_FREE = ("uniform", "oracle", "hard_learner")
DRAWS = (
    "selected",
    "independent",
    "uniform",
    "selected_minus_independent",
    "selected_minus_uniform",
    "independent_minus_uniform",
    "overlap",
)
RETRIEVAL_LABELS = {
    "i2t_recall_at_1": "i→t R@1",
    "i2t_recall_at_5": "i→t R@5",
    "t2i_recall_at_1": "t→i R@1",
    "t2i_recall_at_5": "t→i R@5",
}


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


def _stats(values: list[float | None], seeds: list[int] | None = None) -> dict:
    """mean, std, min, max over the values that are not None (n of them, of all); with
    ``seeds`` (one per value) also every value by seed, None included."""
    got = [v for v in values if v is not None]
    out: dict = {"mean": None, "std": None, "min": None, "max": None, "n": 0, "of": len(values)}
    if got:
        out = {
            "mean": statistics.fmean(got),
            "std": statistics.stdev(got) if len(got) > 1 else 0.0,
            "min": min(got),
            "max": max(got),
            "n": len(got),
            "of": len(values),
        }
    if seeds is not None:
        out["per_seed"] = {str(s): v for s, v in zip(seeds, values)}
    return out


def _last_within(curve: list[dict], budget: float, extra: float = 0.0) -> int | None:
    """Index of the last evaluation whose FLOPs (plus `extra`) are within `budget`; None when
    even the first is over it."""
    i = None
    for j, c in enumerate(curve):
        if c["flops"] + extra <= budget * (1 + 1e-9):
            i = j
    return i


def reference_flops(run: dict, references: dict) -> float:
    """FLOPs of training the reference `run` used (0 for a method that uses none): what counting
    every FLOP adds to the run's curve, which already has its scoring forwards and the
    reference's one pass over the pool."""
    if not run.get("uses_reference", run["method"] not in REFERENCE_FREE):
        return 0.0
    ref = references.get(run["seed"]) or references.get(str(run["seed"])) or {}
    return float(ref.get("train_flops") or 0.0)


def summarise(cfg, runs: list[dict], references: dict, flops: dict) -> dict:
    """Headline figures per method, averaged over seeds, plus every raw curve.

    Target: uniform's final accuracy (smoothed over its last evaluations) in the same seed.
    steps_to_target: first evaluation whose smoothed accuracy reaches it; the ratio divides by
    uniform's full budget (`steps`), the comparison the paper makes. FLOPs are counted two ways:
    the training steps plus every scoring forward (and the reference's one pass over the pool,
    for its cache or static filtering), and ``..._with_reference`` adding the reference's own
    training (:func:`reference_flops`).

    Steadier measures: FLOPs to reach each of FIXED_ACCURACIES (smoothed), as a share of
    uniform's whole-run FLOPs in the same seed; and the smoothed accuracy at each of
    UNIFORM_FLOPS_SHARES of uniform's FLOPs (the last evaluation within that budget; None when
    the up-front cost alone exceeds it). Those and the headline ratios keep their per-seed
    values (``per_seed``).
    """
    chance = 1 / n_classes(cfg.data.task)
    by_seed: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["method"]] = r
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fixed = sorted({max(1, round(cfg.steps * f)) for f in (0.1, 0.25, 0.5, 1.0)})
    summary: dict[str, dict] = {}
    plateau = []
    for method in methods:
        acc_at = {s: [] for s in fixed}
        final, steps_to, ratio, flops_to, flops_ratio, wall = [], [], [], [], [], []
        final_seeds, ref_seeds, flops_ratio_ref = [], [], []
        to_acc = {t: [] for t in FIXED_ACCURACIES}
        to_acc_ref = {t: [] for t in FIXED_ACCURACIES}
        at_share = {f: [] for f in UNIFORM_FLOPS_SHARES}
        at_share_ref = {f: [] for f in UNIFORM_FLOPS_SHARES}
        retrieval = {k: [] for k in RETRIEVAL}
        vs_uniform = []  # steps to uniform's final accuracy ÷ uniform's own steps to it
        draws = {d: [] for d in DRAWS}
        draws_std = {d: [] for d in DRAWS}
        comp = {t: [] for t in NOISE_TYPES}
        for seed, per in by_seed.items():
            r = per.get(method)
            if r is None:
                continue
            curve = r["curve"]
            for s in fixed:
                acc_at[s].append(_at_step(curve, s))
            final.append(_smoothed(curve, len(curve) - 1))
            final_seeds.append(seed)
            for k in RETRIEVAL:
                retrieval[k].append(curve[-1].get(k))
            bl = r.get("batch_learnability")
            for d in DRAWS:  # .get: results written before a quantity was added
                draws[d].append(bl.get(d, {}).get("mean") if bl else None)
                draws_std[d].append(bl.get(d, {}).get("std") if bl else None)
            wall.append(r["wall_s"])
            for t in NOISE_TYPES:
                comp[t].append(r["composition"][t])
            uni = per.get("uniform")
            if uni is None:
                continue
            target = _smoothed(uni["curve"], len(uni["curve"]) - 1)
            uni_flops = uni["curve"][-1]["flops"]
            extra = reference_flops(r, references)
            i = _first_reach(curve, target)
            ref_seeds.append(seed)
            steps_to.append(curve[i]["step"] if i is not None else None)
            ratio.append(curve[i]["step"] / cfg.steps if i is not None else None)
            flops_to.append(curve[i]["flops"] if i is not None else None)
            flops_ratio.append(curve[i]["flops"] / uni_flops if i is not None else None)
            flops_ratio_ref.append(
                (curve[i]["flops"] + extra) / uni_flops if i is not None else None
            )
            for t in FIXED_ACCURACIES:
                k = _first_reach(curve, t)
                to_acc[t].append(curve[k]["flops"] / uni_flops if k is not None else None)
                to_acc_ref[t].append(
                    (curve[k]["flops"] + extra) / uni_flops if k is not None else None
                )
            for f in UNIFORM_FLOPS_SHARES:
                k = _last_within(curve, f * uni_flops)
                at_share[f].append(_smoothed(curve, k) if k is not None else None)
                k = _last_within(curve, f * uni_flops, extra)
                at_share_ref[f].append(_smoothed(curve, k) if k is not None else None)
            u = _first_reach(uni["curve"], target)
            vs_uniform.append(
                curve[i]["step"] / uni["curve"][u]["step"] if i is not None and u else None
            )
        summary[method] = {
            "accuracy_at_step": {str(s): _stats(v) for s, v in acc_at.items()},
            "final_accuracy": _stats(final, final_seeds),
            "final_retrieval": {k: _stats(v) for k, v in retrieval.items()},
            "steps_to_uniform_final": _stats(steps_to),
            "steps_ratio_vs_uniform_budget": _stats(ratio, ref_seeds),
            "steps_ratio_vs_uniform_reach": _stats(vs_uniform),
            "flops_to_uniform_final": _stats(flops_to),
            "flops_ratio_vs_uniform": _stats(flops_ratio, ref_seeds),
            "flops_ratio_vs_uniform_with_reference": _stats(flops_ratio_ref, ref_seeds),
            "flops_ratio_to_accuracy": {
                _pct(t): _stats(v, ref_seeds) for t, v in to_acc.items()
            },
            "flops_ratio_to_accuracy_with_reference": {
                _pct(t): _stats(v, ref_seeds) for t, v in to_acc_ref.items()
            },
            "accuracy_at_uniform_flops": {
                f"{f:g}": _stats(v, ref_seeds) for f, v in at_share.items()
            },
            "accuracy_at_uniform_flops_with_reference": {
                f"{f:g}": _stats(v, ref_seeds) for f, v in at_share_ref.items()
            },
            "wall_s": _stats(wall),
            "composition": {t: _stats(v) for t, v in comp.items()},
        }
        if any(v is not None for v in draws["selected"]):
            # per run: mean and std over its super-batches; here: over seeds
            summary[method]["batch_learnability"] = {
                d: {"mean_over_steps": _stats(draws[d]), "std_over_steps": _stats(draws_std[d])}
                for d in DRAWS
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
            and summary["uniform"]["final_accuracy"]["min"] > 2 * chance,
            "uniform_plateau_ok": gain["max"] is not None
            and gain["max"] < 0.02
            and summary["uniform"]["final_accuracy"]["min"] > 2 * chance,
        }
    return {
        "config": dataclasses.asdict(cfg),
        "flops": flops,
        "reference": {str(k): v for k, v in references.items()},
        "headline": headline,
        "methods": summary,
        "runs": runs,
    }


def _pct(t: float) -> str:
    return f"{100 * t:g}%"


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


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, 100, initial_indent=indent, subsequent_indent=indent + "  ")


def table(results: dict) -> str:
    """The stdout tables (mean±std over seeds) and the comparison at the run's own scale."""
    cfg = results["config"]
    steps = cfg["steps"]
    methods = results["methods"]
    fixed = list(next(iter(methods.values()))["accuracy_at_step"])
    rows = [
        ["method", *(f"acc@{s}" for s in fixed)]
        + ["steps→uni", "÷uni's", "÷budget", "FLOPs÷uni", "wall s"]
    ]
    for method, m in methods.items():
        rows.append(
            [method]
            + [_fmt(m["accuracy_at_step"][s], 100, pct=True) for s in fixed]
            + [
                _fmt(m["steps_to_uniform_final"], digits=0),
                _fmt(m["steps_ratio_vs_uniform_reach"], digits=2),
                _fmt(m["steps_ratio_vs_uniform_budget"], digits=2),
                _fmt(m["flops_ratio_vs_uniform"], digits=2),
                _fmt(m["wall_s"], digits=0),
            ]
        )
    seeds = cfg["seeds"]
    task = cfg["data"].get("task", "digits")
    loss = cfg["model"].get("loss", "sigmoid")
    out = [
        *_wrap(
            f"held-out zero-shot accuracy on {task} ({n_classes(task)} classes; mean over "
            f"{len(seeds)} seed(s) {seeds}), {steps} learner steps of b={cfg['batch_size']}, "
            f"{loss} loss, ratio {cfg['ratio']}"
            + ("" if cfg.get("temperature", 1.0) == 1.0 else f", temperature {cfg['temperature']:g}")
            + f"; acc@N = mean of the {SMOOTH} evaluations up to step "
            "N; steps→uni = steps to uniform's final accuracy, ÷uni's = over uniform's own steps "
            "to it, ÷budget = over uniform's whole budget"
        ),
        *_grid(rows),
        "",
        *_wrap(
            "retrieval at the end (class-level recall: image→text, text→image) and the share of "
            "trained examples by injected noise type"
        ),
    ]
    rows = [["method", *RETRIEVAL_LABELS.values(), "clean", "mism", "wrong", "garb", "dup"]]
    for method, m in methods.items():
        rows.append(
            [method]
            + [_fmt(m["final_retrieval"][k], 100, pct=True) for k in RETRIEVAL]
            + [_fmt(m["composition"][t], 100, pct=True) for t in NOISE_TYPES]
        )
    out += _grid(rows)
    out += _steadier(methods)
    measured = {k: m["batch_learnability"] for k, m in methods.items() if "batch_learnability" in m}
    if measured:
        out += [
            "",
            *_wrap(
                "batch learnability per super-batch (the criterion's score of the sub-batch as a "
                "whole, pairwise terms included, sum form; mean ± std over the run's "
                "super-batches, averaged over seeds): the selected sub-batch, an independent and "
                "a uniform draw of its size from the same super-batch"
            ),
        ]
        rows = [["method", "selected", "independent", "uniform", "sel − ind", "overlap"]]
        for method, bl in measured.items():
            rows.append(
                [method]
                + [
                    f"{bl[d]['mean_over_steps']['mean']:.3g} ± "
                    f"{bl[d]['std_over_steps']['mean'] or 0:.2g}"
                    for d in ("selected", "independent", "uniform", "selected_minus_independent")
                ]
                + [f"{100 * bl['overlap']['mean_over_steps']['mean']:.0f}%"]
            )
        out += _grid(rows)
    out += _scale_comparison(results)
    ref = results.get("reference", {})
    if ref:
        accs = ", ".join(f"{v['accuracy']:.3f}" for v in ref.values())
        out.append(f"reference (curated split only) held-out accuracy: {accs}")
    return "\n".join(out)


def _steadier(methods: dict) -> list[str]:
    """The --details table of the steadier measures: FLOPs to fixed accuracies and accuracy at
    shares of uniform's FLOPs, each also with the reference's training counted."""
    first = next(iter(methods.values()))
    if "flops_ratio_to_accuracy" not in first:
        return []  # results written before these measures
    accs, shares = list(first["flops_ratio_to_accuracy"]), list(first["accuracy_at_uniform_flops"])
    rows = [
        ["method"]
        + [f"F→{a}" for a in accs]
        + [f"F→{a} +ref" for a in accs]
        + [f"acc@{f}F" for f in shares]
        + [f"acc@{f}F +ref" for f in shares]
    ]
    for method, m in methods.items():
        rows.append(
            [method]
            + [_fmt(m["flops_ratio_to_accuracy"][a], digits=2) for a in accs]
            + [_fmt(m["flops_ratio_to_accuracy_with_reference"][a], digits=2) for a in accs]
            + [_fmt(m["accuracy_at_uniform_flops"][f], 100, pct=True) for f in shares]
            + [
                _fmt(m["accuracy_at_uniform_flops_with_reference"][f], 100, pct=True)
                for f in shares
            ]
        )
    return [
        "",
        *_wrap(
            "steadier measures: F→N% = FLOPs to reach N% accuracy ÷ uniform's whole-run FLOPs; "
            "acc@xF = accuracy at x × uniform's whole-run FLOPs (never: the up-front cost alone "
            "is over it); +ref = also counting the reference's training. Per-seed values are in "
            "results.json"
        ),
        *_grid(rows),
    ]


def summary(results: dict) -> str:
    """The short table ``jeststream demo`` ends with: per method its final accuracy, the steps
    and FLOPs it took to reach uniform's final accuracy as shares of uniform's whole run (FLOPs
    two ways: without and with training the reference), and its wall time (mean ± std over
    seeds when there are several)."""
    cfg, methods = results["config"], results["methods"]
    task = cfg["data"].get("task", "digits")
    seeds = cfg["seeds"]
    rows = [
        ["method", "final accuracy", "steps to uniform's final", "FLOPs to it",
         "+ reference training", "wall"]
    ]
    for method, m in methods.items():
        with_ref = m.get("flops_ratio_vs_uniform_with_reference")
        rows.append(
            [
                method,
                _fmt(m["final_accuracy"], 100, pct=True),
                _ratio(m["steps_ratio_vs_uniform_budget"]),
                _ratio(m["flops_ratio_vs_uniform"]),
                "-" if with_ref is None else _ratio(with_ref),
                _fmt(m["wall_s"], digits=0) + " s",
            ]
        )
    out = [
        f"{task} ({n_classes(task)} classes), {cfg['steps']} steps of {cfg['batch_size']} "
        f"examples, ratio {cfg['ratio']}, {cfg['model'].get('loss', 'sigmoid')} loss, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
        "",
        *_grid(rows),
    ]
    uni = methods.get("uniform")
    if uni is not None and uni["final_accuracy"]["mean"] is not None:
        out += [
            "",
            f"Steps and FLOPs to reach uniform's final accuracy "
            f"({100 * uni['final_accuracy']['mean']:.1f} %),",
            "as a share of uniform's whole run (never: not reached). FLOPs count training, "
            "scoring forwards",
            "and the reference's one pass over the pool; + reference training: also training "
            "the reference",
        ]
        ref_flops = [v.get("train_flops") for v in results.get("reference", {}).values()]
        budget = results["flops"]["train_step"] * cfg["steps"]
        if ref_flops and ref_flops[0]:
            out.append(
                f"({ref_flops[0] / budget:.2f} × uniform's whole run, once; a reference can be "
                "shared by many runs)."
            )
    return "\n".join(out)


def _ratio(st: dict) -> str:
    return _fmt(st, digits=2) + ("" if st["mean"] is None else " ×")


def _scale_comparison(results: dict) -> list[str]:
    """What this run measured, in words: steps to uniform's final
    accuracy per method and their ratio to uniform's, and whether uniform was still climbing
    (a moving target makes those ratios look better than they are)."""
    cfg, methods = results["config"], results["methods"]
    uni = methods.get("uniform")
    if uni is None:
        return []
    steps = cfg["steps"]
    out = ["", f"at this scale ({steps} steps, {len(cfg['seeds'])} seed(s)):"]
    target = uni["final_accuracy"]["mean"]
    if target is not None:
        reach = [f"uniform {_fmt(uni['steps_to_uniform_final'], digits=0)}"]
        for k, m in methods.items():
            if k == "uniform":
                continue
            st, r = m["steps_to_uniform_final"], m["steps_ratio_vs_uniform_reach"]
            fr = m["flops_ratio_vs_uniform"]
            reach.append(
                f"{k} {_fmt(st, digits=0)}"
                + ("" if r["mean"] is None else f" ({r['mean']:.2f}× uniform's steps")
                + ("" if fr["mean"] is None or r["mean"] is None else f", {fr['mean']:.2f}× its FLOPs")
                + ("" if r["mean"] is None else ")")
            )
        out += _wrap(
            f"steps to uniform's final accuracy ({100 * target:.1f}%): " + "; ".join(reach),
            indent="  ",
        )
    h = results.get("headline") or {}
    gain = h.get("uniform_last_quarter_gain", {})
    if gain.get("mean") is not None:
        verdict = (
            "near its plateau (< 2)"
            if h["uniform_plateau_ok"]
            else "still climbing (>= 2)"
            if h["uniform_learned"]
            else "it has not learnt yet (final accuracy <= 2x chance)"
        )
        out.append(
            f"  uniform's last quarter gained {100 * gain['mean']:.1f} points (max "
            f"{100 * gain['max']:.1f}): {verdict}"
        )
    return out


def plot(results: dict, path: Path) -> None:
    """Accuracy against learner steps and against total FLOPs, one line per method; with batch
    learnability measured, a third panel: the selected sub-batches' learnability over training
    next to the independent and uniform draws from the same super-batches (the paper's Fig. 2
    on this run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_method.setdefault(r["method"], []).append(r)
    measured = {
        m: runs for m, runs in by_method.items() if all("batch_learnability" in r for r in runs)
    }
    fig, axes = plt.subplots(1, 3 if measured else 2, figsize=(18 if measured else 12, 4.5))
    colors = {}
    for method, runs in by_method.items():
        n = min(len(r["curve"]) for r in runs)
        for ax, x_key in zip(axes[:2], ("step", "flops")):
            xs = [runs[0]["curve"][i][x_key] for i in range(n)]
            accs = [[r["curve"][i]["accuracy"] for r in runs] for i in range(n)]
            mean = [statistics.fmean(a) for a in accs]
            (line,) = ax.plot(xs, mean, label=method)
            colors[method] = line.get_color()
            if len(runs) > 1:
                ax.fill_between(
                    xs,
                    [min(a) for a in accs],
                    [max(a) for a in accs],
                    color=line.get_color(),
                    alpha=0.15,
                )
    uni = results["methods"].get("uniform")
    for ax, label in zip(axes[:2], ("learner steps", "total FLOPs (training + scoring)")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out zero-shot accuracy")
        ax.grid(alpha=0.3)
        if uni and uni["final_accuracy"]["mean"] is not None:
            ax.axhline(
                uni["final_accuracy"]["mean"], color="grey", ls=":", lw=1, label="uniform final"
            )
    axes[1].set_xscale("log")
    axes[0].legend()
    if measured:
        ax = axes[2]
        styles = {"selected": "-", "independent": "--", "uniform": ":"}
        for method, runs in measured.items():
            windows = [r["batch_learnability"]["windows"] for r in runs]
            n = min(len(w["end_step"]) for w in windows)
            xs = windows[0]["end_step"][:n]
            for draw, ls in styles.items():
                if draw != "selected" and method != next(iter(measured)):
                    continue  # the reference draws once, for the first measured method
                ys = [statistics.fmean(w[draw][i] for w in windows) for i in range(n)]
                label = f"{method}: selected" if draw == "selected" else f"{draw} draw ({method})"
                ax.plot(xs, ys, ls=ls, color=colors.get(method), label=label)
        ax.set_xlabel("learner steps")
        ax.set_ylabel("batch learnability (sum form, window mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = results["config"]["seeds"]
    task = results["config"]["data"].get("task", "digits")
    fig.suptitle(
        f"Held-out zero-shot accuracy on noisy {task}, per method: "
        + (
            f"mean of {len(seeds)} seeds, band = min–max over seeds"
            if len(seeds) > 1
            else f"seed {seeds[0]}"
        )
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
