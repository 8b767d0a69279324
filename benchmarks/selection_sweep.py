"""Where does joint selection beat independent selection? A resumable sweep over the demo.

    python benchmarks/selection_sweep.py run   [--results DIR] [--only KEY=V[,V]]... [--steps N]
                                               [--jobs N] [--seeds S...] [--quick]
    python benchmarks/selection_sweep.py list  [same options]     # the plan and what is done
    python benchmarks/selection_sweep.py summarise [--results DIR] [--docs DIR]

The plan (issue 18): on the noisy digits set (sigmoid loss) filtering ratios 0.5, 0.2 and 0.1
(super-batches 2x, 5x, 10x), JEST (16 chunks) against independent learnability sampling
(1 chunk), seeds 0 1 2, plus uniform; ratios 0.2 and 0.1 also at sampling temperature 0.25
(both samplers), where the pairwise terms decide more of each draw, and with a softmax (CLIP)
learner; and the fine-grained ``pairs`` task (100 two-digit classes) with uniform, JEST,
independent, easy-reference and the clean-only oracle, and JEST and independent at temperature
0.25 (``--pairs-ratio``/``--pairs-loss``: put it where the digits sweep shows the largest gap).
Every run is deterministic (``--scoring lagged``: super-batch t scored by the snapshot after step
t - 2, on the background thread), so a seed's figures repeat.

Resumable: each run's result is written to its own JSON file under ``--results`` (atomically)
as soon as it ends, with its wall time and full configuration; a later invocation skips the
runs whose file exists (refusing a file written with other settings) and trains the rest.
Uniform and the oracle depend on neither the ratio nor the temperature: they run once per task
and loss, and a ``ratio=`` or ``temperature=`` filter keeps them. ``summarise`` (also run at the end of ``run``) writes
``selection_sweep.md`` (a table per configuration: steps and FLOPs to uniform's final accuracy,
final accuracy, retrieval, batch learnability of the selected sub-batches against independent
and uniform draws, mean ± std) and ``selection_sweep.png`` under ``--docs`` and prints the
summary as JSON.

``--only`` keys: task (digits, pairs), loss (sigmoid, softmax), ratio, temperature, method, seed;
repeat it to AND filters, e.g. ``--only ratio=0.2 --only method=jest,uniform``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import write_json  # noqa: E402

DIGITS_RATIOS = (0.5, 0.2, 0.1)
SOFTMAX_RATIO = 0.2
DIGITS_STEPS = 2000  # the full comparison's budget: uniform near its plateau
RATIO_FREE = ("uniform", "oracle")  # their runs depend on neither the ratio nor the temperature
# Sampling temperatures tried besides the paper's 1 (JEST and independent, on digits with the
# sigmoid loss at ratios 0.2 and 0.1, and on the pairs task): a lower one lets the pairwise
# terms decide more of each draw (benchmarks/temperature_probe.py).
LOW_TEMPERATURES = (0.25,)
LOW_TEMPERATURE_RATIOS = (0.2, 0.1)  # digits, sigmoid
KEYS = ("task", "loss", "ratio", "temperature", "method", "seed")
METHOD_ORDER = ("uniform", "jest", "independent", "easy_reference", "oracle")


def temperature_tag(temperature: float) -> str:
    """The suffix a temperature adds to run ids, group directories and configuration names:
    none for the paper's 1, so the names of runs from before the temperature existed stand."""
    return "" if temperature == 1.0 else f"-t{temperature:g}"


@dataclasses.dataclass(frozen=True)
class Run:
    task: str
    loss: str
    ratio: float | None  # None: a ratio-free method (uniform, oracle)
    method: str
    seed: int
    temperature: float = 1.0  # the sampler's; ratio-free runs keep 1 (they sample nothing)

    @property
    def id(self) -> str:
        ratio = "" if self.ratio is None else f"-r{self.ratio:g}"
        temp = temperature_tag(self.temperature)
        return f"{self.task}-{self.loss}{ratio}{temp}-{self.method}-seed{self.seed}"

    def matches(self, filters: dict[str, set[str]]) -> bool:
        for key, values in filters.items():
            value = getattr(self, key)
            if key in ("ratio", "temperature"):
                if self.ratio is None:
                    continue  # uniform and the oracle serve every ratio and temperature
                if not any(abs(float(v) - value) < 1e-9 for v in values):
                    return False
            elif str(value) not in values:
                return False
        return True


def plan(seeds, pairs_ratio: float, pairs_loss: str) -> list[Run]:
    runs: list[Run] = []
    for seed in seeds:
        runs.append(Run("digits", "sigmoid", None, "uniform", seed))
        for ratio in DIGITS_RATIOS:
            for method in ("jest", "independent"):
                runs.append(Run("digits", "sigmoid", ratio, method, seed))
        for ratio in LOW_TEMPERATURE_RATIOS:
            for temperature in LOW_TEMPERATURES:
                for method in ("jest", "independent"):
                    runs.append(Run("digits", "sigmoid", ratio, method, seed, temperature))
        runs.append(Run("digits", "softmax", None, "uniform", seed))
        for method in ("jest", "independent"):
            runs.append(Run("digits", "softmax", SOFTMAX_RATIO, method, seed))
        for method in ("uniform", "oracle"):
            runs.append(Run("pairs", pairs_loss, None, method, seed))
        for method in ("jest", "independent", "easy_reference"):
            runs.append(Run("pairs", pairs_loss, pairs_ratio, method, seed))
        for temperature in LOW_TEMPERATURES:
            for method in ("jest", "independent"):
                runs.append(Run("pairs", pairs_loss, pairs_ratio, method, seed, temperature))
    return runs


def parse_filters(items: list[str]) -> dict[str, set[str]]:
    filters: dict[str, set[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in KEYS or not values:
            raise ValueError(f"--only {item!r}: use KEY=V[,V...] with KEY one of {KEYS}")
        got = {v.strip() for v in values.split(",") if v.strip()}
        filters[key] = filters[key] & got if key in filters else got
    return filters


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def demo_argv(run_group: tuple, methods: list[str], seeds: list[int], args) -> list[str]:
    """The `jeststream demo` options of one group of runs (same task, loss, ratio and
    temperature)."""
    task, loss, ratio, temperature = run_group
    argv = [
        "--task", task, "--loss", loss, "--ratio", str(ratio), "--temperature", str(temperature),
        "--methods", ",".join(methods), "--seeds", *map(str, seeds),
        "--jobs", str(args.jobs), "--no-progress",
        # the schedule every run of the sweep was measured with: the snapshot after step
        # t - 2 scores super-batch t (the demo's default until it became synchronous)
        "--scoring", "lagged",
        # the model every run was measured with: the demo's before issue 30 rebalanced it
        # (8x8 patches, the text tower as wide as the image tower)
        "--patch-size", "8", "--text-width", "64" if task == "digits" else "128",
    ]
    steps = args.steps
    if args.quick:
        argv += [
            "--pool-size", "1500", "--curated-size", "256", "--batch-size", "32",
            "--ref-steps", str(args.ref_steps or 12), "--eval-every", "4",
        ]
        if task == "pairs":
            argv += ["--heldout-size", "200"]
        steps = steps or 12
    elif args.ref_steps:
        argv += ["--ref-steps", str(args.ref_steps)]
    if steps is None and task == "digits":
        steps = DIGITS_STEPS
    if steps is not None:
        argv += ["--steps", str(steps)]
        if not args.quick and steps < 200:
            argv += ["--eval-every", str(max(1, steps // 4))]
    return argv


def config_of(run_group: tuple, args):
    from demo_harness import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(demo_argv(run_group, ["uniform"], [0], args)))


# settings added after runs were written, at the value those runs had
LATER_SETTINGS = {
    "temperature": 1.0, "train_low_res_share": 0.0, "prefetch": 2, "prefilter": 1.0,
    "ref_width": None,
}


def settings_key(cfg) -> dict:
    """What must match for a finished run's file to count for this invocation: everything but
    the methods, seeds, jobs and threads (scheduling) of the configuration."""
    d = dataclasses.asdict(cfg)
    for k in ("methods", "seeds", "jobs", "threads", "preset"):
        d.pop(k)
    if "ratio" in d:
        d["ratio"] = float(d["ratio"])
    return json.loads(json.dumps(d))


def group_of(run: Run, pairs_ratio: float) -> tuple:
    """(task, loss, ratio, temperature) a run trains in; ratio-free runs go with their task's
    ratio at temperature 1."""
    if run.ratio is not None:
        return run.task, run.loss, run.ratio, run.temperature
    if run.task == "pairs":
        return run.task, run.loss, pairs_ratio, 1.0
    return run.task, run.loss, SOFTMAX_RATIO if run.loss == "softmax" else 0.2, 1.0


def group_name(group: tuple) -> str:
    """The group's work directory name (the temperature only when it is not 1)."""
    task, loss, ratio, temperature = group
    return f"{task}-{loss}-{ratio}{temperature_tag(temperature)}"


def _run_file(results: Path, run: Run) -> Path:
    return results / "runs" / f"{run.id}.json"


def status(runs: list[Run], args) -> tuple[list[Run], list[Run]]:
    """(finished, pending) runs; a finished file with other settings is an error."""
    done, todo = [], []
    keys: dict[tuple, dict] = {}
    for run in runs:
        path = _run_file(args.results, run)
        if not path.exists():
            todo.append(run)
            continue
        group = group_of(run, args.pairs_ratio)
        if group not in keys:
            keys[group] = settings_key(config_of(group, args))
        stored = {**LATER_SETTINGS, **json.loads(path.read_text())["settings"]}
        want = dict(keys[group])
        if run.ratio is None:  # a ratio-free run serves every ratio and temperature
            for d in (stored, want):
                for k in ("ratio", "n_chunks", "temperature"):
                    d.pop(k, None)
        if stored != want:
            diff = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
            raise ValueError(
                f"{path} was written with other settings (differing: {diff}); pass the same "
                "options as that sweep, or a new --results directory"
            )
        done.append(run)
    return done, todo


def run_sweep(runs: list[Run], args) -> None:
    import torch
    from demo_harness import build_parser, config_from_args, run_comparison

    done, todo = status(runs, args)
    print(f"{len(done)} finished (skipped), {len(todo)} to run", file=sys.stderr)
    (args.results / "runs").mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[Run]] = {}
    for run in todo:
        groups.setdefault(group_of(run, args.pairs_ratio), []).append(run)
    invocation = {"started": _now(), "runs": [], "argv": sys.argv[1:]}
    for group, members in groups.items():
        methods = list(dict.fromkeys(r.method for r in members))
        seeds = sorted({r.seed for r in members})
        cfg = config_from_args(build_parser().parse_args(demo_argv(group, methods, seeds, args)))
        by_key = {(r.seed, r.method): r for r in members}
        t0 = time.perf_counter()

        def on_run(result: dict, partial: dict, by_key=by_key, cfg=cfg, t0=t0) -> None:
            run = by_key[(result["seed"], result["method"])]
            ref = partial["reference"].get(str(run.seed))
            write_json(
                _run_file(args.results, run),
                {
                    "id": run.id,
                    **dataclasses.asdict(run),
                    "settings": settings_key(cfg),
                    "config": {
                        **dataclasses.asdict(cfg),
                        "methods": [run.method],
                        "seeds": [run.seed],
                    },
                    "flops": partial["flops"],
                    "reference": ref,
                    "result": result,
                    "wall_s": result["wall_s"],
                    "group_elapsed_s": time.perf_counter() - t0,
                    "finished": _now(),
                    "torch": torch.__version__,
                },
            )
            invocation["runs"].append(run.id)
            acc = result["curve"][-1]["accuracy"]
            print(f"done {run.id}: accuracy {acc:.3f}, {result['wall_s']:.0f}s", file=sys.stderr)

        print(f"group {group}: {len(members)} run(s) {methods} seeds {seeds}", file=sys.stderr)
        run_comparison(
            cfg,
            args.results / "groups" / group_name(group),
            progress=False,
            work_dir=args.results / "work",
            only=set(by_key),
            on_run=on_run,
        )
    invocation["ended"] = _now()
    log = args.results / "invocations.json"
    past = json.loads(log.read_text()) if log.exists() else []
    write_json(log, [*past, invocation])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Summarising
# ---------------------------------------------------------------------------------------------


def _load(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def _config(d: dict):
    from jeststream.demo.data import DataConfig
    from jeststream.demo.model import ModelConfig
    from jeststream.demo.runs import RunConfig

    return RunConfig(
        **{
            **d,
            "seeds": tuple(d["seeds"]),
            "methods": tuple(d["methods"]),
            "data": DataConfig(**d["data"]),
            "model": ModelConfig(**d["model"]),
        }
    )


def summarise(results: Path) -> dict:
    """Per configuration (task, loss, ratio): the demo's summary of its runs with uniform's
    (and the oracle's) runs of the same task and loss, plus JEST's steps ÷ independent's."""
    from jeststream.demo import report

    files = _load(results)
    for f in files:  # runs written before the temperature was a setting sampled at 1
        f.setdefault("temperature", 1.0)
    configs = sorted(
        {(f["task"], f["loss"], f["ratio"], f["temperature"]) for f in files
         if f["ratio"] is not None},
        key=lambda c: (c[0], c[1], -c[2], -c[3]),
    )
    out: dict = {"configurations": {}, "wall": _wall(results, files)}
    for task, loss, ratio, temperature in configs:

        def own(f, ratio=ratio, temperature=temperature) -> bool:
            return f["ratio"] == ratio and f["temperature"] == temperature

        members = [
            f
            for f in files
            if f["task"] == task and f["loss"] == loss and (own(f) or f["ratio"] is None)
        ]
        ordered = sorted(members, key=lambda f: (f["seed"], METHOD_ORDER.index(f["method"])))
        cfg_d = next(f for f in members if own(f))["config"]
        seeds = sorted({f["seed"] for f in members})
        methods = list(dict.fromkeys(f["method"] for f in ordered))
        cfg = dataclasses.replace(_config(cfg_d), seeds=tuple(seeds), methods=tuple(methods))
        refs = {f["seed"]: f["reference"] for f in ordered if f["reference"]}  # seed order
        flops = next(f for f in members if own(f))["flops"]
        summary = report.summarise(cfg, [f["result"] for f in ordered], refs, flops)
        m = summary["methods"]
        entry = {
            "task": task,
            "loss": loss,
            "ratio": ratio,
            "temperature": temperature,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "seeds": seeds,
            "methods": {k: _brief(v) for k, v in m.items()},
        }
        if "jest" in m and "independent" in m:
            value, relation = steps_ratio(
                m["jest"]["steps_ratio_vs_uniform_budget"],
                m["independent"]["steps_ratio_vs_uniform_budget"],
            )
            entry["jest_steps_over_independent"] = value
            entry["jest_steps_over_independent_relation"] = relation
        out["configurations"][f"{task}-{loss}-r{ratio:g}{temperature_tag(temperature)}"] = entry
    return out


def steps_ratio(jest: dict, independent: dict) -> tuple[float | None, str]:
    """JEST's mean steps to uniform's final accuracy ÷ independent's, from their budget shares
    (mean over the n of ``of`` seeds that got there): ("=", exact) when every seed of both got
    there. A seed that never got there is counted at the whole budget, which is less than it
    would have needed: with only independent's seeds missing that gives an upper bound ("<="),
    with only JEST's a lower bound (">="); with both, (None, "").
    """

    def counted(st: dict) -> float:
        return ((st["mean"] or 0.0) * st["n"] + (st["of"] - st["n"])) / st["of"]

    j_all, i_all = jest["n"] == jest["of"], independent["n"] == independent["of"]
    if not (j_all or i_all) or not jest["of"] or not independent["of"]:
        return None, ""
    value = counted(jest) / counted(independent)
    return value, "=" if j_all and i_all else ("<=" if j_all else ">=")


def _brief(m: dict) -> dict:
    keep = (
        "final_accuracy",
        "final_retrieval",
        "steps_to_uniform_final",
        "steps_ratio_vs_uniform_budget",
        "flops_ratio_vs_uniform",
        "wall_s",
        "batch_learnability",
    )
    out = {k: m[k] for k in keep if k in m}
    out["clean_share"] = m["composition"]["clean"]
    return out


def _wall(results: Path, files: list[dict]) -> dict:
    walls = [f["wall_s"] for f in files]
    log = results / "invocations.json"
    spans = []
    if log.exists():
        for inv in json.loads(log.read_text()):
            if inv.get("ended") and inv["runs"]:
                a = datetime.datetime.fromisoformat(inv["started"])
                b = datetime.datetime.fromisoformat(inv["ended"])
                spans.append((b - a).total_seconds())
    return {
        "runs": len(files),
        "run_wall_s_total": sum(walls),
        "invocations_elapsed_s": sum(spans),
    }


def _ms(st: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if not st or st.get("mean") is None:
        return "never" if st else "—"
    text = f"{st['mean'] * scale:.{digits}f}"
    if st.get("of", 1) > 1:
        text += f" ± {(st['std'] or 0) * scale:.{digits}f}"
    if st.get("n", 1) < st.get("of", 1):
        text += f" ({st['n']}/{st['of']})"
    return text


def _bl(m: dict, draw: str) -> str:
    bl = m.get("batch_learnability")
    if not bl:
        return "—"
    mean = bl[draw]["mean_over_steps"]["mean"]
    std = bl[draw]["std_over_steps"]["mean"]
    return "—" if mean is None else f"{mean:.3g} ± {std or 0:.2g}"


def markdown(summary: dict) -> str:
    lines = [
        "# Joint against independent selection: the sweep",
        "",
        "Written by `python benchmarks/selection_sweep.py summarise` from the per-run results; "
        "mean ± std over seeds. Steps and FLOPs are to reach uniform's final held-out accuracy "
        "(trailing mean of 3 evaluations) in the same seed, as fractions of uniform's budget "
        "and FLOPs; (n/3) when only n seeds got there. Retrieval is class-level recall at the "
        "end. Batch learnability is the criterion's score (learner − reference loss, sum form, "
        "pairwise terms included) of the selected sub-batch as a whole, and of an independent "
        "and a uniform draw of its size from the same super-batches: mean ± std over each "
        "run's super-batches, averaged over seeds; selected − independent is the paired "
        "difference per super-batch (its spread is free of the trend over training that "
        "dominates the spread of each draw's own values). Every run scores with the lag-2 "
        "schedule (`benchmarks/demo_harness.py --scoring lagged`: super-batch t scored by the learner "
        "snapshot after step t − 2), the same for both samplers; the demo's default scores "
        "with the current learner, which needs fewer steps (`docs/performance.md`).",
        "",
    ]
    for c in summary["configurations"].values():
        ratio = c.get("jest_steps_over_independent")
        lines += [
            f"## {c['task']}, {c['loss']} loss, ratio {c['ratio']:g}"
            + ("" if c.get("temperature", 1.0) == 1.0 else f", temperature {c['temperature']:g}")
            + " "
            f"(super-batch {round(1 / c['ratio'])}×, {c['steps']} steps of b={c['batch_size']}, "
            f"seeds {c['seeds']})",
            "",
        ]
        relation = c.get("jest_steps_over_independent_relation", "=")
        if ratio is not None:
            if relation == "=":
                verdict = "≤ 0.8: joint ahead" if ratio <= 0.8 else "> 0.8: no clear joint gain"
                shown = f"**{ratio:.2f}** ({verdict})"
            else:
                who = "independent" if relation == "<=" else "JEST"
                shown = (
                    f"**{'≤' if relation == '<=' else '≥'} {ratio:.2f}** ({who} never reached "
                    "uniform's final accuracy in some seeds, counted there at the whole budget)"
                )
            lines += [f"JEST's steps ÷ independent's (means over seeds): {shown}", ""]
        lines += [
            "| method | final acc | steps to uni ÷ budget | FLOPs ÷ uni | i→t R@1 | t→i R@1 | "
            "i→t R@5 | t→i R@5 | clean share | batch learnability: selected | independent "
            "draw | uniform draw | selected − independent (paired) | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, m in c["methods"].items():
            r = m["final_retrieval"]
            lines.append(
                f"| {method} | {_ms(m['final_accuracy'], 100, 1)} | "
                f"{_ms(m['steps_ratio_vs_uniform_budget'], 1, 3) if method != 'uniform' else '1'} | "
                f"{_ms(m['flops_ratio_vs_uniform'], 1, 2)} | "
                + " | ".join(
                    _ms(r[k], 100, 1)
                    for k in ("i2t_recall_at_1", "t2i_recall_at_1", "i2t_recall_at_5",
                              "t2i_recall_at_5")
                )
                + f" | {_ms(m['clean_share'], 100, 0)} | {_bl(m, 'selected')} | "
                f"{_bl(m, 'independent')} | {_bl(m, 'uniform')} | "
                f"{_bl(m, 'selected_minus_independent')} | {_ms(m['wall_s'], 1, 0)} |"
            )
        lines.append("")
    w = summary["wall"]
    lines += [
        f"{w['runs']} runs; their training wall times add up to {w['run_wall_s_total'] / 60:.0f} "
        f"min (evaluation excluded; two at a time with --jobs 2); the sweep's invocations took "
        f"{w['invocations_elapsed_s'] / 60:.0f} min.",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confs = summary["configurations"]
    names = list(confs)
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    width = 0.38
    for j, method in enumerate(("jest", "independent")):
        for ax, key, scale in (
            (axes[0], "steps_ratio_vs_uniform_budget", 1.0),
            (axes[1], "final_accuracy", 100.0),
        ):
            means, stds = [], []
            for n in names:
                st = confs[n]["methods"].get(method, {}).get(key)
                means.append((st or {}).get("mean") or 0.0)
                stds.append((st or {}).get("std") or 0.0)
            xs = [i + (j - 0.5) * width for i in range(len(names))]
            ax.bar(
                xs, [m * scale for m in means], width, yerr=[s * scale for s in stds],
                label=method, capsize=3,
            )
    for n_i, n in enumerate(names):
        uni = confs[n]["methods"].get("uniform", {}).get("final_accuracy", {})
        if uni.get("mean") is not None:
            axes[1].plot([n_i - 0.45, n_i + 0.45], [100 * uni["mean"]] * 2, color="grey", ls=":")
    axes[0].set_ylabel("steps to uniform's final accuracy ÷ uniform's budget")
    axes[1].set_ylabel("final held-out accuracy (%); dotted: uniform")
    ax = axes[2]
    draws = (
        ("selected_minus_uniform", "JEST's joint draw − uniform draw"),
        ("independent_minus_uniform", "independent draw − uniform draw"),
    )
    for j, (draw, label) in enumerate(draws):
        means, stds = [], []
        for n in names:
            bl = confs[n]["methods"].get("jest", {}).get("batch_learnability")
            means.append((bl[draw]["mean_over_steps"]["mean"] or 0.0) if bl else 0.0)
            stds.append((bl[draw]["std_over_steps"]["mean"] or 0.0) if bl else 0.0)
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        ax.bar(xs, means, width, yerr=stds, label=label, capsize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("batch learnability above a uniform draw\n(JEST's super-batches; ± std over them)")
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("Joint (JEST, 16 chunks) against independent selection (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(args) -> dict:
    summary = summarise(args.results)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "selection_sweep.md").write_text(markdown(summary))
    if summary["configurations"]:
        try:
            plot(summary, args.docs / "selection_sweep.png")
        except ImportError as exc:
            print(f"no plot ({exc}); install jeststream[demo]", file=sys.stderr)
    print(json.dumps(summary, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=("run", "list", "summarise"))
    p.add_argument("--results", type=Path, default=Path("docs/experiments/selection_sweep"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--steps", type=int, default=None,
        help=f"learner steps of every run (default: digits {DIGITS_STEPS}, pairs the demo's "
        "pairs default)",
    )
    p.add_argument("--ref-steps", type=int, default=None, help="reference steps (default 1500)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (worker processes)")
    p.add_argument("--pairs-ratio", type=float, default=0.2)
    p.add_argument("--pairs-loss", choices=("sigmoid", "softmax"), default="sigmoid")
    p.add_argument(
        "--quick", action="store_true",
        help="smoke test: the demo's --quick pool and batch size (1,500 examples, b = 32), 12 "
        "steps unless --steps, 12 reference steps",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        filters = parse_filters(args.only)
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        runs = [r for r in plan(args.seeds, args.pairs_ratio, args.pairs_loss)
                if r.matches(filters)]
        if args.command == "summarise":
            write_summary(args)
            return 0
        done, todo = status(runs, args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "list":
        for run in runs:
            print(f"{'done' if run in done else 'todo'}  {run.id}")
        return 0
    run_sweep(runs, args)
    write_summary(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
