"""The demo's research harness: every knob of a comparison, the full comparison and sweep hooks.

    python benchmarks/demo_harness.py [options]     # --help lists them

A superset of ``jeststream demo`` (the library's user-sized command): the pool's noise mix,
the model's widths and depth, the reference's width, the reference pre-filter, scoring
schedules and resolution, Flexi-JEST's low-resolution training share, the fine-grained
``--task pairs`` (100 two-digit classes), ``--loss softmax`` (CLIP-style learners, selection
with the softmax loss), ``--scale`` and ``--full`` (every method over three seeds, also
``benchmarks/learning.py``). :func:`run_comparison` adds what the resumable sweeps
(``selection_sweep.py``, ``pays_for_itself.py``) need: a shared work directory, a subset of
the (seed, method) pairs and a callback per finished run. Built on the library's public
``jeststream.demo`` names only; a run's curve is the library's for the same configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Collection
from pathlib import Path

from jeststream.demo import (
    QUICK_DATA,
    QUICK_RUN,
    HelpFormatter,
    default_jobs,
    parse_methods,
    run_from_args,
)
from jeststream.demo.comparison import Comparison

# --scoring: which learner weights score super-batch t (see build_parser)
SCORING_SCHEDULES = ("sync", "lagged", "latest")

__all__ = ["build_parser", "config_from_args", "main", "run_comparison"]

DEFAULT_OUT = "runs/demo"


# The pairs task's model and schedule defaults (explicit options override them): 100 classes
# that share digits need a wider model and a longer run than digits to be learnt at all.
PAIRS_MODEL = {"width": 128, "layers": 2}
PAIRS_STEPS = 2000
# The text tower's width as a share of --width (ModelConfig's defaults): a narrow text tower
# gives the demo model CLIP's cost structure (docs/performance.md).
TEXT_WIDTH_SHARE = 0.5


def _pairs_defaults_help() -> str:
    return (
        f"width {PAIRS_MODEL['width']}, {PAIRS_MODEL['layers']} layer(s), {PAIRS_STEPS} steps, "
        "2,000 held-out examples"
    )


def build_parser() -> argparse.ArgumentParser:
    from jeststream.demo.data import TASKS, DataConfig
    from jeststream.demo.model import LOSSES
    from jeststream.demo.runs import METHODS, RunConfig

    d, r = DataConfig(), RunConfig()
    p = argparse.ArgumentParser(
        prog="benchmarks/demo_harness.py",
        description=(
            "Train one tiny open_clip SigLIP model per method on a noisy image-caption pool built "
            "from sklearn's handwritten digits (no download), with the same steps, batch size, "
            "optimizer and seeds for every method, and compare held-out zero-shot accuracy. "
            "Writes OUT/results.json and OUT/learning_curves.png."
        ),
        formatter_class=HelpFormatter,
    )
    mode = p.add_argument_group("presets")
    ex = mode.add_mutually_exclusive_group()
    ex.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: every method on a tiny pool (1,500 examples), batch size 32, "
        "12 steps, 12 reference steps, evaluation every 4 steps -- these override the "
        "corresponding options except --steps (checks the pipeline, not the headline figure)",
    )
    ex.add_argument(
        "--full",
        action="store_true",
        help="the full comparison: every method, seeds 0 1 2, the default steps (about half "
        "an hour on 2 CPU cores with --jobs 2, from the rebalanced model's single-run times; "
        "--scale, --methods or --seeds shorten it)",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        default="digits",
        help="digits: 10 classes; pairs: 100 two-digit numbers, two scans side by side "
        f"(captions like 'three eight'; its defaults: {_pairs_defaults_help()})",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (shards, cache, results)")
    p.add_argument(
        "--no-progress", action="store_true", help="no tqdm progress bars (on stderr by default)"
    )
    p.add_argument(
        "--details",
        action="store_true",
        help="also print accuracy at fixed steps, retrieval, the noise types trained on and the "
        "batch learnability of the draws (always with --full; all of it is in results.json)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} "
        f"(default: {','.join(r.methods)}; --full: all)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="model/data-order seeds (default: 0; --full: 0 1 2)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply learner and reference steps (and eval interval) by this",
    )

    t = p.add_argument_group("training (the same for every method)")
    t.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"learner steps per method (default {r.steps}; --task pairs {PAIRS_STEPS})",
    )
    t.add_argument("--batch-size", type=int, default=r.batch_size, help="training batch size b")
    t.add_argument("--lr", type=float, default=r.lr, help="AdamW peak learning rate")
    t.add_argument("--weight-decay", type=float, default=r.weight_decay)
    t.add_argument("--warmup", type=int, default=r.warmup, help="linear warm-up steps")
    t.add_argument(
        "--eval-every",
        type=int,
        default=r.eval_every,
        help="evaluate on the held-out split every N steps",
    )
    t.add_argument("--threads", type=int, default=r.threads, help="torch intra-op threads")
    t.add_argument(
        "--loss",
        choices=LOSSES,
        default=r.model.loss,
        help="the learner's and reference's training loss, and the loss JEST scores with: "
        "sigmoid (SigLIP, logit bias -10) or softmax (CLIP, no bias; exact conditional gains)",
    )
    t.add_argument(
        "--width",
        type=int,
        default=None,
        help=f"model width: the image tower's width and the embedding size (default "
        f"{r.model.width}; --task pairs: {PAIRS_MODEL['width']})",
    )
    t.add_argument(
        "--text-width",
        type=int,
        default=None,
        help=f"the text tower's width (default: {TEXT_WIDTH_SHARE:g} x --width, "
        f"{round(TEXT_WIDTH_SHARE * r.model.width)}: the image tower is most of a forward "
        "pass, as in CLIP)",
    )
    t.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"transformer layers of each tower (default {r.model.layers}; --task pairs: "
        f"{PAIRS_MODEL['layers']})",
    )
    t.add_argument(
        "--patch-size",
        type=int,
        default=r.model.patch_size,
        help="ViT patch side in pixels (must divide --image-size)",
    )
    t.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once, each in its own worker process with --threads threads (default: "
        "the CPU count, at most 2; --quick: 1). Runs are seeded on their own, so only timing "
        "differs (wall times; and with --scoring latest, which snapshot scores a super-batch)",
    )

    s = p.add_argument_group("selection")
    s.add_argument(
        "--ratio", type=float, default=r.ratio, help="JEST filtering ratio b/B (0.2 keeps 1 in 5)"
    )
    s.add_argument("--n-chunks", type=int, default=r.n_chunks, help="JEST sampling chunks")
    s.add_argument(
        "--temperature",
        type=float,
        default=r.temperature,
        help="sampling temperature of JEST and independent selection (0: greedy top-k by "
        "the chunk's logits; default 1, the paper's)",
    )
    s.add_argument(
        "--ref-steps",
        type=int,
        default=r.ref_steps,
        help="reference training steps on the curated split",
    )
    s.add_argument(
        "--ref-width",
        type=int,
        default=None,
        help="the reference's width (image tower and embedding; its text tower scaled alike): "
        "a cheaper reference when narrower (default: the learner's --width)",
    )
    s.add_argument(
        "--prefilter",
        type=float,
        default=1.0,
        help="reference pre-filter: the learner scores only the super-batch's top share q by "
        "reference score (JESTLoader's prefilter; needs a jeststream whose JESTLoader has it); "
        "1 = off",
    )
    s.add_argument(
        "--static-keep",
        type=float,
        default=r.static_keep,
        help="share of the pool kept by static (CLIP-score style) filtering",
    )
    s.add_argument(
        "--no-reference-cache",
        action="store_true",
        help="run the frozen reference on every super-batch, instead of embedding the pool "
        "with it once and looking its embeddings up by key (the same scores up to float "
        "rounding, more compute)",
    )
    s.add_argument(
        "--no-batch-learnability",
        action="store_true",
        help="do not record the selected sub-batches' learnability next to an independent and "
        "a uniform draw from the same super-batch (jeststream.diagnostics; it changes no "
        "selection, and costs a few b x b products per step)",
    )
    s.add_argument(
        "--scoring",
        choices=SCORING_SCHEDULES,
        default="sync",
        help="which learner weights score super-batch t. sync: the learner as it is when "
        "batch t is selected (inline, lag 0; the freshest, and on these CPU runs no slower); "
        "lagged: on JESTLoader's background thread, the snapshot after step t - --prefetch "
        "(deterministic, overlaps scoring with training); latest: the background thread's "
        "newest snapshot (figures depend on thread timing). sync and lagged repeat to the digit",
    )
    s.add_argument(
        "--prefetch",
        type=int,
        default=2,
        help="super-batches JESTLoader scores ahead (--scoring lagged and latest); under "
        "lagged scoring also how many steps stale the scoring weights are",
    )
    s.add_argument(
        "--score-resolution",
        type=int,
        default=None,
        help="score the learner snapshot on images resized to this side in pixels (its ViT's "
        "positional embeddings resampled; must be a multiple of --patch-size); FLOPs counted "
        "at that size",
    )
    s.add_argument(
        "--train-low-res-share",
        type=float,
        default=0.0,
        help="Flexi-JEST: the methods that score the learner (jest, independent, hard_learner) "
        "train this share of each batch at --score-resolution, drawn at random per step (the "
        "others train at full resolution); FLOPs counted so",
    )
    g = p.add_argument_group(
        "data (pool noise shares are fractions of the pool; the rest is clean)"
    )
    g.add_argument(
        "--mismatched",
        type=float,
        default=d.mismatched,
        help="captions unrelated to the image (web junk text)",
    )
    g.add_argument(
        "--wrong-class", type=float, default=d.wrong_class, help="captions naming another digit"
    )
    g.add_argument(
        "--garbage",
        type=float,
        default=d.garbage,
        help="blank, noise or scribble images with a digit caption",
    )
    g.add_argument(
        "--duplicate", type=float, default=d.duplicate, help="near-duplicates of a few scans"
    )
    g.add_argument("--pool-size", type=int, default=d.pool_size, help="training pool examples")
    g.add_argument(
        "--curated-scans",
        type=int,
        default=d.curated_scans,
        help="scans reserved for the curated (reference) split",
    )
    g.add_argument(
        "--curated-size", type=int, default=d.curated_size, help="augmented curated examples"
    )
    g.add_argument(
        "--heldout-scans",
        type=int,
        default=d.heldout_scans,
        help="scans reserved for the held-out split",
    )
    g.add_argument(
        "--heldout-size",
        type=int,
        default=None,
        help="held-out examples (default: one per held-out scan for digits, 2,000 for pairs)",
    )
    g.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels")
    g.add_argument("--data-seed", type=int, default=d.seed, help="seed of the data set itself")
    return p


def config_from_args(args: argparse.Namespace):
    """RunConfig from parsed arguments, presets applied."""
    from jeststream.demo.data import DataConfig
    from jeststream.demo.model import ModelConfig
    from jeststream.demo.runs import METHODS, RunConfig

    data = DataConfig(
        image_size=args.image_size,
        pool_size=args.pool_size,
        curated_scans=args.curated_scans,
        curated_size=args.curated_size,
        heldout_scans=args.heldout_scans,
        mismatched=args.mismatched,
        wrong_class=args.wrong_class,
        garbage=args.garbage,
        duplicate=args.duplicate,
        seed=args.data_seed,
        task=args.task,
        heldout_size=args.heldout_size,
    )
    pairs = args.task == "pairs"
    default_steps = PAIRS_STEPS if pairs else RunConfig().steps
    width = args.width
    if width is None:
        width = PAIRS_MODEL["width"] if pairs else ModelConfig().width
    layers = args.layers
    if layers is None:
        layers = PAIRS_MODEL["layers"] if pairs else ModelConfig().layers
    steps = default_steps if args.steps is None else args.steps
    ref_steps, eval_every = args.ref_steps, args.eval_every
    batch_size = args.batch_size
    methods = RunConfig().methods
    seeds: tuple[int, ...] = (0,)
    preset = "quick" if args.quick else "full" if args.full else "default"
    if args.quick:
        data = dataclasses.replace(data, **QUICK_DATA)
        ref_steps, eval_every = QUICK_RUN["ref_steps"], QUICK_RUN["eval_every"]
        batch_size = QUICK_RUN["batch_size"]
        steps = QUICK_RUN["steps"] if args.steps is None else args.steps
        methods = METHODS
    elif args.full:
        methods, seeds = METHODS, (0, 1, 2)
    if args.scale != 1.0:
        steps = max(1, round(steps * args.scale))
        ref_steps = max(1, round(ref_steps * args.scale))
        eval_every = max(1, round(eval_every * args.scale))
    methods = parse_methods(args.methods, methods)
    if args.seeds:
        seeds = tuple(args.seeds)
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.patch_size < 1 or args.image_size % args.patch_size:
        raise ValueError(
            f"--patch-size {args.patch_size} must divide --image-size {args.image_size}"
        )
    r = args.score_resolution
    if r is not None and not (args.patch_size <= r <= args.image_size and r % args.patch_size == 0):
        raise ValueError(
            f"--score-resolution {r} must be a multiple of --patch-size {args.patch_size} "
            f"between it and --image-size {args.image_size}"
        )
    if args.prefetch < 1:
        raise ValueError(f"--prefetch must be at least 1, got {args.prefetch}")
    share = args.train_low_res_share
    if not (math.isfinite(share) and 0.0 <= share <= 1.0):
        raise ValueError(f"--train-low-res-share must be a fraction in [0, 1], got {share}")
    if share and r is None:
        raise ValueError(
            f"--train-low-res-share {share} trains part of each batch at the scoring resolution: "
            "give --score-resolution too"
        )
    if width < 8 or width % 2:
        raise ValueError(f"--width must be an even number >= 8 (2 attention heads), got {width}")
    if layers < 1:
        raise ValueError(f"--layers must be at least 1, got {layers}")
    text_width = args.text_width
    if text_width is None:
        text_width = round(TEXT_WIDTH_SHARE * width)
    if text_width < 8 or text_width % 2:
        raise ValueError(
            f"--text-width must be an even number >= 8 (2 attention heads), got {text_width}"
        )
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(
            f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}"
        )
    if args.ref_width is not None and (args.ref_width < 8 or args.ref_width % 2):
        raise ValueError(
            f"--ref-width must be an even number >= 8 (2 attention heads), got {args.ref_width}"
        )
    if not (math.isfinite(args.prefilter) and 0.0 < args.prefilter <= 1.0):
        raise ValueError(f"--prefilter must be a share in (0, 1], got {args.prefilter}")
    jobs = args.jobs
    if jobs is None:
        jobs = default_jobs(args.quick)
    return RunConfig(
        steps=steps,
        batch_size=batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=min(args.warmup, max(1, steps // 4)),
        eval_every=eval_every,
        ratio=args.ratio,
        n_chunks=args.n_chunks,
        temperature=args.temperature,
        ref_steps=ref_steps,
        ref_width=args.ref_width,
        prefilter=args.prefilter,
        static_keep=args.static_keep,
        seeds=seeds,
        methods=methods,
        threads=args.threads,
        jobs=jobs,
        async_scoring=args.scoring != "sync",
        deterministic=args.scoring == "lagged",
        score_resolution=args.score_resolution,
        train_low_res_share=share,
        prefetch=args.prefetch,
        cache_reference=not args.no_reference_cache,
        batch_learnability=not args.no_batch_learnability,
        preset=preset,
        data=data,
        model=ModelConfig(
            image_size=args.image_size,
            context_length=data.context_length,
            width=width,
            patch_size=args.patch_size,
            text_width=text_width,
            embed_dim=width,
            layers=layers,
            text_layers=layers,
            loss=args.loss,
        ),
    )


def run_comparison(
    cfg,
    out_dir: Path,
    progress: bool = True,
    *,
    work_dir: Path | None = None,
    only: Collection[tuple[int, str]] | None = None,
    on_run: Callable[[dict, dict], None] | None = None,
) -> dict:
    """The library's :func:`jeststream.demo.run_comparison`, with the sweeps' hooks.

    Args:
        work_dir: where the shards and the reference caches go (default ``out_dir``); several
            comparisons can share one, each with its own ``out_dir``.
        only: run just these (seed, method) pairs of the cross product (a resumed sweep skips
            finished ones); a reference is trained only for seeds that need one.
        on_run: called as ``on_run(result, partial)`` with each run's result as soon as it
            ends (in this process), ``partial`` the summary so far (its "flops",
            "reference" and "config").
    """

    class SweepComparison(Comparison):
        def wanted(self, seed: int, reference: bool) -> list[str]:
            methods = super().wanted(seed, reference)
            return methods if only is None else [m for m in methods if (seed, m) in only]

        def finished(self, result: dict) -> dict:
            partial = super().finished(result)
            if on_run is not None:
                on_run(result, partial)
            return partial

    comparison = SweepComparison(cfg, out_dir, progress=progress)
    if work_dir is not None:
        comparison.work_dir = Path(work_dir)
    return comparison.run()


def main(argv: list[str] | None = None) -> int:
    """The harness's entry point (``jeststream demo`` with every knob); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_from_args(parser, args, config_from_args, details=args.details or args.full)


if __name__ == "__main__":
    sys.exit(main())
