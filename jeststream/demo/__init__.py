"""The embedded demo: JEST vs uniform on a noisy image-caption set built from sklearn digits.

`jeststream demo` (what `make demo` runs) trains the same tiny open_clip SigLIP model with
uniform sampling, with JEST and with independent selection (both through JESTLoader), two runs
at a time, then prints a short table and writes ``runs/demo/results.json``,
``runs/demo/learning_curves.png`` and the JEST run's selection report. ``--quick`` is the smoke
test the test suite runs. The research knobs (noise mix, model widths, scoring schedules, the
pairs task, the full comparison, sweeps) live in ``benchmarks/demo_harness.py``, on top of
:class:`jeststream.demo.comparison.Comparison`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jeststream.demo.comparison import run_comparison

__all__ = [
    "QUICK_DATA",
    "QUICK_RUN",
    "build_parser",
    "config_from_args",
    "main",
    "run_comparison",
    "run_from_args",
]

DEFAULT_OUT = "runs/demo"
# --quick: a tiny pool and short runs (checks the pipeline, not the headline figure)
QUICK_DATA = {"pool_size": 1500, "curated_size": 256, "duplicate_sources": 8}
QUICK_RUN = {"steps": 12, "ref_steps": 12, "eval_every": 4, "batch_size": 32}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the None/False of flags whose default the help already explains."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from jeststream.demo.runs import METHODS, RunConfig

    r = RunConfig()
    p = argparse.ArgumentParser(
        prog="jeststream demo",
        description=(
            "Train one tiny open_clip SigLIP model per method on a noisy image-caption pool built "
            "from sklearn's handwritten digits (no download), with the same steps, batch size, "
            "optimizer and seeds for every method, and compare held-out zero-shot accuracy. "
            "Writes OUT/results.json, OUT/learning_curves.png and OUT/selection_report.html."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: every method on a tiny pool ({QUICK_DATA['pool_size']:,} examples), "
        f"batch size {QUICK_RUN['batch_size']}, {QUICK_RUN['steps']} steps and reference steps "
        "unless given (checks the pipeline, not the headline figure)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (shards, cache, results)")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} "
        f"(default: {','.join(r.methods)}; --quick: all)",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="model/data-order seeds (default: 0)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help=f"learner steps per method (default {r.steps})"
    )
    p.add_argument(
        "--ref-steps",
        type=int,
        default=None,
        help=f"reference training steps on the curated split (default {r.ref_steps})",
    )
    p.add_argument(
        "--ratio", type=float, default=r.ratio, help="JEST filtering ratio b/B (0.2 keeps 1 in 5)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once, each in its own worker process with --threads threads (default: "
        "the CPU count, at most 2; --quick: 1). Runs are seeded on their own: only wall times "
        "differ",
    )
    p.add_argument("--threads", type=int, default=r.threads, help="torch threads per run")
    p.add_argument(
        "--no-progress", action="store_true", help="no tqdm progress bars (on stderr by default)"
    )
    p.add_argument(
        "--details",
        action="store_true",
        help="also print accuracy at fixed steps, retrieval, the noise types trained on and the "
        "batch learnability of the draws (all of it is in results.json)",
    )
    return p


def parse_methods(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """``--methods`` as a tuple; an unknown name is an error naming the valid ones."""
    from jeststream.demo.runs import METHODS

    if not text:
        return default
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {','.join(METHODS)}")
    return methods


def default_jobs(quick: bool) -> int:
    """Runs at once unless ``--jobs`` says: 1 for --quick, else the CPU count, at most 2."""
    return 1 if quick else max(1, min(2, os.cpu_count() or 1))


def config_from_args(args: argparse.Namespace):
    """RunConfig from the parsed arguments, --quick applied."""
    from jeststream.demo.runs import METHODS, RunConfig

    r = RunConfig()
    quick = QUICK_RUN if args.quick else {}
    steps = args.steps if args.steps is not None else quick.get("steps", r.steps)
    ref_steps = args.ref_steps if args.ref_steps is not None else quick.get("ref_steps", r.ref_steps)
    for flag, value in (("--steps", steps), ("--ref-steps", ref_steps), ("--jobs", args.jobs),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if not 0.0 < args.ratio <= 1.0:
        raise ValueError(f"--ratio must be a share in (0, 1], got {args.ratio}")
    return dataclasses.replace(
        r,
        steps=steps,
        ref_steps=ref_steps,
        batch_size=quick.get("batch_size", r.batch_size),
        eval_every=quick.get("eval_every", r.eval_every),
        warmup=min(r.warmup, max(1, steps // 4)),
        ratio=args.ratio,
        methods=parse_methods(args.methods, METHODS if args.quick else r.methods),
        seeds=tuple(args.seeds) if args.seeds else r.seeds,
        threads=args.threads,
        jobs=default_jobs(args.quick) if args.jobs is None else args.jobs,
        preset="quick" if args.quick else "default",
        data=dataclasses.replace(r.data, **QUICK_DATA) if args.quick else r.data,
    )


def print_results(results: dict, out: Path, seconds: float, details: bool) -> None:
    """The short summary table (and with `details` the long one), then where the files are."""
    from jeststream.demo import report

    if details:
        print(report.table(results), end="\n\n")
    print(report.summary(results))
    print(
        f"\nWritten in {seconds:.0f} s:\n"
        f"  results   {out / 'results.json'}\n"
        f"  plot      {out / 'learning_curves.png'}\n"
        f"  report    {results.get('selection_report', '-')}  (what JEST kept and dropped)"
    )


def run_from_args(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    configure: Callable[[argparse.Namespace], Any],
    *,
    details: bool,
) -> int:
    """Build the comparison's config from parsed ``args`` (``configure``; a ValueError becomes
    ``parser``'s usage error), run it into ``args.out`` and print the results: the body of
    `jeststream demo`, shared with benchmarks/demo_harness.py. Returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = configure(args)
    except ValueError as exc:
        parser.error(str(exc))
    t0 = time.perf_counter()
    results = run_comparison(cfg, Path(args.out), progress=not args.no_progress)
    print_results(results, Path(args.out), time.perf_counter() - t0, details)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`jeststream demo` entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_from_args(parser, args, config_from_args, details=args.details)
