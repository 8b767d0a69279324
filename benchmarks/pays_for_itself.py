"""Does JEST pay for itself? Issue 30's resumable sweep over the demo (rebalanced model).

    python benchmarks/pays_for_itself.py run       [--set dev|heldout|heldout2] [--only KEY=V[,V]]...
                                                   [--steps N] [--jobs N] [--commit] [--quick]
    python benchmarks/pays_for_itself.py list      [same options]   # the plan and what is done
    python benchmarks/pays_for_itself.py summarise [--set SET] [--results DIR]

Seed sets: ``dev`` (seeds 0-4) chooses the configuration; ``heldout`` (seeds 5-7) is run only
by an explicit ``--set heldout``, once, after the configuration is chosen, and summarised on
its own; ``heldout2`` (seeds 8-10), never looked at before, is for a configuration chosen on
the dev seeds after ``heldout`` had been seen (each held-out set confirms one choice).
Groups (each run trains the demo's default model, 2,000 steps, synchronous scoring):

  base          uniform, jest, independent, easy_reference, static (the demo's defaults)
  lowres        jest, independent scoring the learner at 8 px (--score-resolution 8)
  ref250/ref500 jest and easy_reference with a reference trained 250 / 500 steps (not 1,500)
  refw32        jest with a reference half as wide (--ref-width 32)
  prefilter0.6/prefilter0.4
                jest with the reference pre-filter (JESTLoader prefilter=q; q = 1 is base)
  prefilter0.4-lowres
                jest with both levers on the learner's scoring: prefilter 0.4 and 8-px scoring
  refw32-prefilter0.4
                jest with the half-width reference and prefilter 0.4

Uniform runs once per seed (base) and serves every group. ``run`` goes phase by phase, in
order: base's uniform and jest over every seed, then independent, then easy_reference and
static, then the other groups, so that a sweep cut short has the headline comparison on as many
seeds as it got to (on the shared 2-core machine one seed of uniform and JEST took ~25 min).

Resumable: each run's result is written to its own JSON file (atomically) under
``--results``/runs as soon as it ends, with the git commit and the uncommitted state of the code
it ran with, its wall time and full configuration, its reference's accuracy and cost; a later
invocation skips runs whose file exists (refusing one written with other settings).
``--commit`` commits each file as it is written (only that file). ``summarise`` prints, per
group and per seed, and as mean ± std: steps and FLOPs to uniform's final accuracy (FLOPs two
ways: training and scoring; and also the reference's training and its pass over the pool),
FLOPs to fixed accuracies, and accuracy at 0.25 and 0.5 of uniform's FLOPs
(:func:`jeststream.demo.report.summarise`), and writes ``summary-SET.json`` beside the runs.

``--only`` keys: group, method, seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import code_state, commit_file, write_json  # noqa: E402
from selection_sweep import settings_key  # noqa: E402

SEED_SETS = {"dev": (0, 1, 2, 3, 4), "heldout": (5, 6, 7), "heldout2": (8, 9, 10)}
STEPS = 2000
# group -> (extra `jeststream demo` options, methods); uniform only in base, shared by all
GROUPS = {
    "base": ([], ("uniform", "jest", "independent", "easy_reference", "static")),
    "lowres": (["--score-resolution", "8"], ("jest", "independent")),
    "ref250": (["--ref-steps", "250"], ("jest", "easy_reference")),
    "ref500": (["--ref-steps", "500"], ("jest", "easy_reference")),
    "refw32": (["--ref-width", "32"], ("jest",)),
    "prefilter0.6": (["--prefilter", "0.6"], ("jest",)),
    "prefilter0.4": (["--prefilter", "0.4"], ("jest",)),
    "prefilter0.4-lowres": (["--prefilter", "0.4", "--score-resolution", "8"], ("jest",)),
    "refw32-prefilter0.4": (["--ref-width", "32", "--prefilter", "0.4"], ("jest",)),
}
# the order `run` goes in: (group, methods) phases
PHASES = (
    ("base", ("uniform", "jest")),
    ("base", ("independent",)),
    ("base", ("easy_reference", "static")),
    ("lowres", GROUPS["lowres"][1]),
    ("ref500", GROUPS["ref500"][1]),
    ("ref250", GROUPS["ref250"][1]),
    ("refw32", GROUPS["refw32"][1]),
    ("prefilter0.6", GROUPS["prefilter0.6"][1]),
    ("prefilter0.4", GROUPS["prefilter0.4"][1]),
    ("prefilter0.4-lowres", GROUPS["prefilter0.4-lowres"][1]),
    ("refw32-prefilter0.4", GROUPS["refw32-prefilter0.4"][1]),
)
KEYS = ("group", "method", "seed")
# settings added after runs were written, at the value those runs had
LATER_SETTINGS: dict = {}


@dataclasses.dataclass(frozen=True)
class Run:
    group: str
    method: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.group}-{self.method}-seed{self.seed}"


def plan(seeds) -> list[Run]:
    """Every run of the sweep for `seeds`, in the order ``run`` trains them."""
    return [Run(g, m, s) for g, methods in PHASES for m in methods for s in seeds]


def parse_filters(items: list[str]) -> dict[str, set[str]]:
    filters: dict[str, set[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in KEYS or not values:
            raise ValueError(f"--only {item!r}: use KEY=V[,V...] with KEY one of {KEYS}")
        got = {v.strip() for v in values.split(",") if v.strip()}
        unknown = got - set(GROUPS) if key == "group" else set()
        if unknown:
            raise ValueError(f"--only {item!r}: unknown group(s) {sorted(unknown)}; {list(GROUPS)}")
        filters[key] = filters[key] & got if key in filters else got
    return filters


def matches(run: Run, filters: dict[str, set[str]]) -> bool:
    return all(str(getattr(run, k)) in v for k, v in filters.items())


def demo_argv(group: str, methods, seeds, args) -> list[str]:
    """The `jeststream demo` options of `group`'s runs."""
    argv = [
        *GROUPS[group][0],
        "--methods", ",".join(methods), "--seeds", *map(str, seeds),
        "--jobs", str(args.jobs), "--no-progress",
    ]
    if args.quick:
        argv += ["--pool-size", "1500", "--curated-size", "256", "--batch-size", "32",
                 "--eval-every", "4", "--steps", str(args.steps or 12)]
        if not any(a == "--ref-steps" for a in argv):
            argv += ["--ref-steps", "12"]
    else:
        argv += ["--steps", str(args.steps or STEPS)]
    return argv


def config_of(group: str, args):
    from demo_harness import build_parser, config_from_args

    argv = demo_argv(group, ["jest"], [0], args)
    return config_from_args(build_parser().parse_args(argv))


def _run_file(results: Path, run: Run) -> Path:
    return results / "runs" / f"{run.id}.json"


def status(runs: list[Run], args) -> tuple[list[Run], list[Run]]:
    """(finished, pending) runs; a finished file with other settings is an error."""
    done, todo, keys = [], [], {}
    for run in runs:
        path = _run_file(args.results, run)
        if not path.exists():
            todo.append(run)
            continue
        if run.group not in keys:
            keys[run.group] = settings_key(config_of(run.group, args))
        stored = {**LATER_SETTINGS, **json.loads(path.read_text())["settings"]}
        if stored != keys[run.group]:
            want = keys[run.group]
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
    code = code_state()
    if code["code_uncommitted_changes"]:
        print("warning: the code has uncommitted changes; each run records that", file=sys.stderr)
    (args.results / "runs").mkdir(parents=True, exist_ok=True)
    invocation = {"started": _now(), "runs": [], "argv": sys.argv[1:], **code}
    for group, methods in PHASES:
        members = [r for r in todo if r.group == group and r.method in methods]
        if not members:
            continue
        methods = list(dict.fromkeys(r.method for r in members))
        seeds = sorted({r.seed for r in members})
        cfg = config_from_args(build_parser().parse_args(demo_argv(group, methods, seeds, args)))
        by_key = {(r.seed, r.method): r for r in members}
        t0 = time.perf_counter()

        def on_run(result: dict, partial: dict, by_key=by_key, cfg=cfg, t0=t0) -> None:
            run = by_key[(result["seed"], result["method"])]
            path = _run_file(args.results, run)
            write_json(
                path,
                {
                    "id": run.id,
                    **dataclasses.asdict(run),
                    "seed_set": args.set,
                    "settings": settings_key(cfg),
                    "config": {**dataclasses.asdict(cfg), "methods": [run.method],
                               "seeds": [run.seed]},
                    "flops": partial["flops"],
                    "reference": partial["reference"].get(str(run.seed)),
                    "result": result,
                    "wall_s": result["wall_s"],
                    "phase_elapsed_s": time.perf_counter() - t0,
                    "finished": _now(),
                    "torch": torch.__version__,
                    # walls on a shared machine: the 1-minute load average when the run ended
                    "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    "cpu_count": os.cpu_count(),
                    "threads": cfg.threads,
                    "jobs": cfg.jobs,
                    **code,
                },
            )
            invocation["runs"].append(run.id)
            acc = result["curve"][-1]["accuracy"]
            print(f"done {run.id}: accuracy {acc:.3f}, {result['wall_s']:.0f}s", file=sys.stderr)
            if args.commit:
                commit_file(path, f"pays_for_itself: {run.id} ({result['wall_s']:.0f} s)")

        print(f"{group}: {len(members)} run(s) {methods} seeds {seeds}", file=sys.stderr)
        run_comparison(
            cfg,
            args.results / "groups" / group,
            progress=False,
            work_dir=args.results / "work",
            only=set(by_key),
            on_run=on_run,
        )
    invocation["ended"] = _now()
    log = args.results / "invocations.json"
    past = json.loads(log.read_text()) if log.exists() else []
    write_json(log, [*past, invocation])
    if args.commit:
        commit_file(log, "pays_for_itself: invocation log")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Summarising
# ---------------------------------------------------------------------------------------------


def _config(d: dict):
    from jeststream.demo.data import DataConfig
    from jeststream.demo.model import ModelConfig
    from jeststream.demo.runs import RunConfig

    return RunConfig(**{
        **d, "seeds": tuple(d["seeds"]), "methods": tuple(d["methods"]),
        "data": DataConfig(**d["data"]), "model": ModelConfig(**d["model"]),
    })


# the per-seed measures summarise prints: (key in report.summarise's methods, label)
MEASURES = (
    ("final_accuracy", "final accuracy"),
    ("steps_ratio_vs_uniform_budget", "steps to uniform's final ÷ its budget"),
    ("flops_ratio_vs_uniform", "FLOPs to it ÷ uniform's (training + scoring)"),
    ("flops_ratio_vs_uniform_with_reference", "FLOPs to it ÷ uniform's (+ reference training)"),
)


def summarise(results: Path, seed_set: str) -> dict:
    """Per group: :func:`jeststream.demo.report.summarise` of its runs and base's uniform runs
    of the same seeds (the seed set's only), and the reference's accuracy and cost."""
    from jeststream.demo import report

    seeds = set(SEED_SETS[seed_set])
    files = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    files = [f for f in files if f["seed"] in seeds]
    uniform = {f["seed"]: f for f in files if f["group"] == "base" and f["method"] == "uniform"}
    out: dict = {"seed_set": seed_set, "seeds": sorted(seeds), "groups": {}}
    for group in GROUPS:
        own = [f for f in files if f["group"] == group and f["method"] != "uniform"]
        if not own:
            continue
        members = [*own, *(u for s, u in uniform.items() if any(f["seed"] == s for f in own))]
        order = ("uniform", *GROUPS["base"][1][1:], *GROUPS[group][1])
        members.sort(key=lambda f: (f["seed"], order.index(f["method"])))
        cfg_d = own[0]["config"]
        run_seeds = sorted({f["seed"] for f in members})
        methods = tuple(dict.fromkeys(f["method"] for f in members))
        cfg = dataclasses.replace(_config(cfg_d), seeds=tuple(run_seeds), methods=methods)
        refs = {f["seed"]: f["reference"] for f in sorted(own, key=lambda f: f["seed"])
                if f["reference"]}  # seed order (file names put seed10 before seed8)
        s = report.summarise(cfg, [f["result"] for f in members], refs, own[0]["flops"])
        s.pop("runs")
        s["wall_s_per_run"] = {f["id"]: f["wall_s"] for f in members}
        s["commits"] = sorted({f.get("commit") or "?" for f in members})
        out["groups"][group] = s
    return out


def _cell(v, scale: float = 1.0, digits: int = 3) -> str:
    return "—" if v is None else f"{v * scale:.{digits}f}"


def _mean_std(st: dict, scale: float = 1.0, digits: int = 3) -> str:
    if st.get("mean") is None:
        return "never"
    text = f"{st['mean'] * scale:.{digits}f} ± {(st['std'] or 0) * scale:.{digits}f}"
    return text + ("" if st["n"] == st["of"] else f" ({st['n']}/{st['of']})")


def text(summary: dict) -> str:
    """Per group and method: each measure's per-seed values and mean ± std."""
    lines = [f"seed set {summary['seed_set']} (seeds {summary['seeds']})"]
    for group, s in summary["groups"].items():
        ref = s.get("reference") or {}
        lines += ["", f"== {group} (commits {', '.join(c[:8] for c in s['commits'])})"]
        if ref:
            budget = s["flops"]["train_step"] * s["config"]["steps"]
            lines.append(
                "reference: accuracy "
                + ", ".join(f"seed {k} {100 * v['accuracy']:.1f} %" for k, v in ref.items())
                + f"; training {next(iter(ref.values())).get('train_flops', 0) / budget:.2f} × "
                "uniform's whole run"
            )
        for method, m in s["methods"].items():
            rows = [(k, label, m[k]) for k, label in MEASURES if k in m]
            for thr, st in m.get("flops_ratio_to_accuracy", {}).items():
                rows.append(("", f"FLOPs to {thr} accuracy ÷ uniform's budget", st))
            for thr, st in m.get("flops_ratio_to_accuracy_with_reference", {}).items():
                rows.append(("", f"FLOPs to {thr} accuracy ÷ uniform's budget (+ ref.)", st))
            for frac, st in m.get("accuracy_at_uniform_flops", {}).items():
                rows.append(("", f"accuracy at {frac} × uniform's FLOPs", st))
            for frac, st in m.get("accuracy_at_uniform_flops_with_reference", {}).items():
                rows.append(("", f"accuracy at {frac} × uniform's FLOPs (+ ref.)", st))
            lines.append(f"  {method}:")
            for key, label, st in rows:
                pct = key == "final_accuracy" or label.startswith("accuracy")
                scale, digits = (100.0, 1) if pct else (1.0, 3)
                per = st.get("per_seed", {})
                seeds = "  ".join(f"s{k} {_cell(v, scale, digits)}" for k, v in per.items())
                lines.append(f"    {label:<52} {_mean_std(st, scale, digits):<22} {seeds}")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """:func:`text` as one markdown table per group (written beside the runs)."""
    lines = [
        f"# Issue 30 sweep, seed set {summary['seed_set']} (seeds {summary['seeds']})",
        "",
        "Written by `python benchmarks/pays_for_itself.py summarise`. FLOPs ÷ uniform's = as a "
        "share of uniform's whole-run FLOPs in the same seed; (+ ref.) also counts the "
        "reference's training; — = not reached (or, at equal FLOPs, the up-front cost alone "
        "is over the budget). Accuracies are trailing means of 3 evaluations, every 50 steps.",
    ]
    for group, s in summary["groups"].items():
        seeds = [str(x) for x in s["config"]["seeds"]]
        lines += ["", f"## {group}", "", f"commits: {', '.join(c[:8] for c in s['commits'])}"]
        ref = s.get("reference") or {}
        if ref:
            budget = s["flops"]["train_step"] * s["config"]["steps"]
            cost = next(iter(ref.values())).get("train_flops", 0) / budget
            lines.append(
                f"reference ({s['config']['ref_steps']} steps, width "
                f"{s['config'].get('ref_width') or s['config']['model']['width']}): held-out "
                "accuracy " + ", ".join(f"{100 * v['accuracy']:.1f} %" for v in ref.values())
                + f" (seeds {', '.join(ref)}); training {cost:.2f} × uniform's whole run"
            )
        lines += [
            "",
            "| method | measure | mean ± std | " + " | ".join(f"seed {x}" for x in seeds) + " |",
            "|---|---|---|" + "---|" * len(seeds),
        ]
        for method, m in s["methods"].items():
            rows = [(k, label, m[k]) for k, label in MEASURES if k in m]
            for thr, st in m.get("flops_ratio_to_accuracy", {}).items():
                rows.append(("", f"FLOPs to {thr} ÷ uniform's", st))
            for thr, st in m.get("flops_ratio_to_accuracy_with_reference", {}).items():
                rows.append(("", f"FLOPs to {thr} ÷ uniform's (+ ref.)", st))
            for frac, st in m.get("accuracy_at_uniform_flops", {}).items():
                rows.append(("", f"accuracy at {frac} × uniform's FLOPs", st))
            for frac, st in m.get("accuracy_at_uniform_flops_with_reference", {}).items():
                rows.append(("", f"accuracy at {frac} × uniform's FLOPs (+ ref.)", st))
            for key, label, st in rows:
                pct = key == "final_accuracy" or label.startswith("accuracy")
                scale, digits = (100.0, 1) if pct else (1.0, 3)
                per = st.get("per_seed", {})
                cells = [_cell(per.get(x), scale, digits) for x in seeds]
                lines.append(
                    f"| {method} | {label} | {_mean_std(st, scale, digits)} | "
                    + " | ".join(cells) + " |"
                )
        walls = s.get("wall_s_per_run", {})
        if walls:
            lines += ["", "training wall per run (s, shared 2-core machine, one run at a time): "
                      + ", ".join(f"{k} {v:.0f}" for k, v in walls.items())]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=("run", "list", "summarise"))
    p.add_argument(
        "--results", type=Path, default=Path("docs/experiments/pays_for_itself"),
        help="where each run's JSON goes (runs/) and the work files (work/, groups/: ignore)",
    )
    p.add_argument(
        "--set", choices=tuple(SEED_SETS), default="dev",
        help="dev: seeds 0-4; heldout: seeds 5-7, only once the configuration is chosen; "
             "heldout2: seeds 8-10, for a configuration chosen after heldout was seen",
    )
    p.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]")
    p.add_argument("--steps", type=int, default=None, help=f"learner steps (default {STEPS})")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (worker processes)")
    p.add_argument("--commit", action="store_true", help="git-commit each run's file as it ends")
    p.add_argument(
        "--quick", action="store_true",
        help="smoke test: the demo's --quick pool and batch size, 12 steps unless --steps",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        filters = parse_filters(args.only)
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        if args.command == "summarise":
            summary = summarise(args.results, args.set)
            write_json(args.results / f"summary-{args.set}.json", summary)
            (args.results / f"summary-{args.set}.md").write_text(markdown(summary))
            print(text(summary))
            return 0
        runs = [r for r in plan(SEED_SETS[args.set]) if matches(r, filters)]
        done, todo = status(runs, args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "list":
        for run in runs:
            print(f"{'done' if run in done else 'todo'}  {run.id}")
        return 0
    run_sweep(runs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
