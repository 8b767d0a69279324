"""The embedded demo: JEST vs uniform on a noisy image-caption set built from sklearn digits.

`jeststream demo` (what `make demo` runs) trains the same tiny open_clip SigLIP model with
uniform sampling, with JEST and with independent selection (both through JESTLoader), then
prints a short table and writes ``runs/demo/results.json``, ``runs/demo/learning_curves.png`` and
the JEST run's selection report. ``--full`` runs every baseline over three seeds (also
``benchmarks/learning.py``); ``--quick`` is the smoke test the test suite runs. ``--task pairs`` is the fine-grained variant (100 two-digit classes),
``--loss softmax`` trains CLIP-style learners and selects with the softmax loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

# --scoring: which learner weights score super-batch t (see build_parser)
SCORING_SCHEDULES = ("sync", "lagged", "latest")

__all__ = ["build_parser", "config_from_args", "main", "run_comparison"]

logger = logging.getLogger(__name__)

DEFAULT_OUT = "runs/demo"
HEADLINE_METHODS = ("uniform", "jest", "oracle")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the None/False of flags whose default the help already explains."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


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
        prog="jeststream demo",
        description=(
            "Train one tiny open_clip SigLIP model per method on a noisy image-caption pool built "
            "from sklearn's handwritten digits (no download), with the same steps, batch size, "
            "optimizer and seeds for every method, and compare held-out zero-shot accuracy. "
            "Writes OUT/results.json and OUT/learning_curves.png."
        ),
        formatter_class=_HelpFormatter,
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
        data = dataclasses.replace(data, pool_size=1500, curated_size=256, duplicate_sources=8)
        ref_steps, eval_every, batch_size = 12, 4, 32
        steps = 12 if args.steps is None else args.steps
        methods = METHODS
    elif args.full:
        methods, seeds = METHODS, (0, 1, 2)
    if args.scale != 1.0:
        steps = max(1, round(steps * args.scale))
        ref_steps = max(1, round(ref_steps * args.scale))
        eval_every = max(1, round(eval_every * args.scale))
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {','.join(METHODS)}")
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
    if args.prefilter != 1.0:
        from jeststream.demo.runs import loader_has_prefilter

        if not loader_has_prefilter():
            raise ValueError(
                f"--prefilter {args.prefilter}: this jeststream's JESTLoader has no prefilter "
                "argument yet; leave it at 1"
            )
    jobs = args.jobs
    if jobs is None:
        jobs = 1 if args.quick else max(1, min(2, os.cpu_count() or 1))
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


# Worker-process state of a parallel comparison (set by _init_worker in each worker).
_WORKER: dict = {}


def _bar_factory(position: int | None = None):
    from tqdm.auto import tqdm

    def bar(**kw):
        return tqdm(leave=False, dynamic_ncols=True, position=position, **kw)

    return bar


def _init_worker(slots, threads: int, progress: bool, parent: int) -> None:
    import threading

    import torch

    torch.set_num_threads(threads)
    _WORKER["progress"] = _bar_factory(slots.get()) if progress else None

    def orphan_watch() -> None:
        # A killed comparison must not leave minutes-long runs behind: the executor notices a
        # dead parent only between jobs, so a worker exits as soon as its parent is gone.
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphan_watch, name="jeststream-orphan-watch", daemon=True).start()


def _stop_pool(pool_ex, started: dict, timeout: float = 10.0) -> None:
    """Stop every worker of a process pool now, and return only once none is left running.

    ``started`` holds each worker seen so far, by pid. The executor's own table is read again
    after each round (its management thread may still be replacing or reaping workers), and
    its management thread is joined, so that no worker and no thread outlives a failure.
    """
    # shutdown() forgets the executor's workers and thread: take them first.
    manager = getattr(pool_ex, "_executor_manager_thread", None)
    started.update(getattr(pool_ex, "_processes", None) or {})
    pool_ex.shutdown(wait=False, cancel_futures=True)
    for _ in range(3):
        started.update(getattr(pool_ex, "_processes", None) or {})
        alive = [p for p in started.values() if p.is_alive()]
        if not alive:
            break
        for proc in alive:
            proc.terminate()
        for proc in alive:
            proc.join(timeout=timeout)
            if proc.is_alive():  # SIGTERM not acted on in time: SIGKILL cannot be ignored
                proc.kill()
                proc.join(timeout=timeout)
    if manager is not None:
        manager.join(timeout=timeout)
    for proc in started.values():
        proc.join(timeout=timeout)


def _in_worker(fn, *args, **kwargs):
    """Run ``fn(*args, progress=..., **kwargs)`` in a worker, with its own progress-bar row."""
    return fn(*args, progress=_WORKER.get("progress"), **kwargs)


def _timed_reference(
    cfg, curated_shards: list[str], heldout_shards: list[str], tokenizer, seed: int,
    cache: Path, progress=None,
) -> dict:
    """Train one reference into its cache file (a job: plain data in, the splits read from
    their shards); its held-out eval and wall."""
    from jeststream.demo.runs import load_split, train_reference

    t0 = time.perf_counter()
    curated = load_split(curated_shards, tokenizer, cfg.data.image_size)
    heldout = load_split(heldout_shards, tokenizer, cfg.data.image_size)
    _, ev = train_reference(cfg, curated, heldout, tokenizer, seed, cache, progress=progress)
    return {**ev, "wall_s": time.perf_counter() - t0}


# Methods that never look at the reference: they need not wait for it.
REFERENCE_FREE = ("uniform", "oracle", "hard_learner")


def _priority(method: str) -> tuple:
    """Scheduling order: longest first; among equals the headline methods (a comparison cut
    short has them)."""
    return (-_cost(method), method not in HEADLINE_METHODS)


def _cost(method: str) -> int:
    """Relative cost of one run: 1 for the training alone, +1 for a JESTLoader method (it
    decodes 1/ratio base batches per step), +1 if it also runs the learner snapshot on every
    super-batch (every criterion but easy_reference)."""
    from jeststream.demo.runs import LOADER_METHODS
    from jeststream.losses import criterion_weights

    if method not in LOADER_METHODS:
        return 1
    return 2 + int(criterion_weights(LOADER_METHODS[method][0])[0] != 0)


def run_comparison(
    cfg,
    out_dir: Path,
    progress: bool = True,
    *,
    work_dir: Path | None = None,
    only: Collection[tuple[int, str]] | None = None,
    on_run: Callable[[dict, dict], None] | None = None,
) -> dict:
    """Run every (seed, method) of `cfg`; write results.json and the plot; return the results.

    With ``cfg.jobs > 1`` the references and then the runs go to that many worker processes
    (spawned, one torch thread each), longest runs first. Every run is seeded on its own, so
    its curve does not depend on ``jobs`` or on thread timing (synchronous scoring, the
    default, or deterministic asynchronous scoring; with ``deterministic=False`` and
    asynchronous scoring, which learner snapshot scores a super-batch depends on timing). Wall
    times are on shared cores.

    Args:
        work_dir: where the shards and the reference caches go (default ``out_dir``); several
            comparisons can share one, each with its own ``out_dir``.
        only: run just these (seed, method) pairs of the cross product (a resumed sweep skips
            finished ones); a reference is trained only for seeds that need one.
        on_run: called as ``on_run(result, partial)`` with each run's result as soon as it
            ends (in the parent process), ``partial`` the summary so far (its "flops",
            "reference" and "config").
    """
    import torch

    from jeststream.demo import report
    from jeststream.demo.data import WordTokenizer, prepare_shards
    from jeststream.demo.model import build_model
    from jeststream.demo.runs import (
        load_reference,
        load_split,
        measure_flops,
        reference_embeddings,
        reference_model_config,
        reference_scores,
        run_job,
        subset_shards,
        write_reference_cache,
    )

    bar = _bar_factory() if progress else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir if work_dir is None else Path(work_dir)
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    shards = prepare_shards(cfg.data, work_dir / "data")
    data_dir = Path(shards["pool"][0]).parent
    tokenizer = WordTokenizer(cfg.data.context_length, cfg.data.task)
    s = cfg.data.image_size
    pool = load_split(shards["pool"], tokenizer, s)  # curated, held-out: read by the jobs
    noise_of = dict(zip(pool["key"], pool["noise"]))
    flops = measure_flops(
        build_model(cfg.model, tokenizer.vocab_size, seed=0), cfg, tokenizer, pool["text"]
    )
    setup_s = time.perf_counter() - t_start

    ref_tag = report.fingerprint(
        {
            "data": cfg.data.identity(),
            "model": reference_model_config(cfg).identity(),
            "ref_steps": cfg.ref_steps,
            "lr": cfg.lr,
            "wd": cfg.weight_decay,
            "warmup": cfg.warmup,
            "b": cfg.batch_size,
        }
    )
    runs: list[dict] = []
    references: dict[int, dict] = {}

    def ref_cache(seed: int) -> Path:
        return work_dir / "cache" / f"reference-{ref_tag}-seed{seed}.pt"

    def ref_args(seed: int) -> tuple:
        return (cfg, shards["curated"], shards["heldout"], tokenizer, seed, ref_cache(seed))

    def jobs_of(seed: int, methods: Sequence[str]) -> list[tuple]:
        """(method, callable, args) of each of `methods` for `seed`, longest first; a method
        that uses the reference needs it trained (in the cache). The arguments are plain data
        and file paths: a worker loads the tensors itself, so that no tensor crosses a process
        boundary (torch shares tensors through file descriptors, which a terminated worker
        leaves half-sent).
        """
        cached_path = None
        if any(m not in REFERENCE_FREE for m in methods):
            reference, _ = load_reference(cfg, tokenizer.vocab_size, ref_cache(seed))
            references[seed]["train_flops"] = cfg.ref_steps * flops["reference_train_step"]
            # the reference cache's one-time forward over the pool
            references[seed]["pool_forward_flops"] = len(pool["key"]) * flops["per_example_forward"]
            cached = reference_embeddings(reference, pool)
            cached_path = write_reference_cache(
                reference,
                cached,
                pool["key"],
                work_dir / "cache" / f"reference-cache-{ref_tag}-seed{seed}",
                cfg,
            )
        out = []
        for method in methods:
            upfront = 0.0
            if method == "static":
                scores = reference_scores(cached)
                n_keep = max(cfg.batch_size, round(cfg.static_keep * len(scores)))
                keep = {pool["key"][i] for i in scores.argsort()[:n_keep].tolist()}
                train = subset_shards(
                    shards["pool"],
                    keep,
                    data_dir,
                    f"static-{ref_tag}-seed{seed}-{cfg.static_keep}",
                    cfg.data.shard_size,
                )
                upfront = len(scores) * flops["per_example_forward"]
            elif method == "oracle":
                keep = {k for k, n in noise_of.items() if n == "clean"}
                train = subset_shards(shards["pool"], keep, data_dir, "oracle", cfg.data.shard_size)
            else:
                train = shards["pool"]
            spec = {
                "method": method,
                "cfg": cfg,
                "seed": seed,
                "train_shards": train,
                "heldout_shards": shards["heldout"],
                "noise_of": noise_of,
                "tokenizer": tokenizer,
                "flops": flops,
                "upfront_flops": upfront,
                "reference_path": None if method in REFERENCE_FREE else ref_cache(seed),
                "cached_path": cached_path if cfg.cache_reference else None,
                # the first seed's JEST run logs its selections for the HTML report (JSONL:
                # the demo extra has no pyarrow)
                "selection_log": selection_log_path(out_dir, cfg)
                if method == "jest" and seed == cfg.seeds[0]
                else None,
            }
            out.append((method, run_job, (spec,)))
        out.sort(key=lambda j: _priority(j[0]))
        return out

    def finished(result: dict) -> None:
        runs.append(result)
        logger.info(
            "%s seed %d: final accuracy %.3f in %.1fs",
            result["method"],
            result["seed"],
            result["curve"][-1]["accuracy"],
            result["wall_s"],
        )
        rank = {m: i for i, m in enumerate(cfg.methods)}
        runs.sort(key=lambda r: (r["seed"], rank[r["method"]]))
        partial = report.summarise(cfg, runs, references, flops)
        partial["wall_s"] = {"total": time.perf_counter() - t_start, "setup": setup_s}
        partial["complete"] = False
        (out_dir / "results.json").write_text(json.dumps(partial, indent=1))
        if on_run is not None:
            on_run(result, partial)

    def wanted(seed: int, reference: bool) -> list[str]:
        """The seed's methods to run that need (or do not need) the reference."""
        return [
            m
            for m in cfg.methods
            if (m not in REFERENCE_FREE) == reference and (only is None or (seed, m) in only)
        ]

    if cfg.jobs <= 1:
        for seed in cfg.seeds:
            if wanted(seed, True):
                references[seed] = _timed_reference(*ref_args(seed), progress=bar)
            for _, fn, args in jobs_of(seed, wanted(seed, True) + wanted(seed, False)):
                finished(fn(*args, progress=bar))
    else:
        import heapq
        import itertools
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # Longest first, as soon as it can start: the references first (they unlock the
        # longest runs), runs without a reference meanwhile; never more than `jobs` at once,
        # so that the order is ours and not the executor's queue's.
        order = itertools.count()
        ready: list[tuple] = []

        def push(priority: tuple, kind: str, seed: int, fn, args: tuple) -> None:
            heapq.heappush(ready, (priority, next(order), kind, seed, fn, args))

        for seed in cfg.seeds:
            if wanted(seed, True):
                push((-1_000,), "ref", seed, _timed_reference, ref_args(seed))
            for method, fn, args in jobs_of(seed, wanted(seed, False)):
                push(_priority(method), "run", seed, fn, args)

        ctx = mp.get_context("spawn")  # the parent runs threads (tqdm); never fork them
        slots = ctx.Queue()
        for slot in range(cfg.jobs):
            slots.put(slot)
        pool_ex = ProcessPoolExecutor(
            cfg.jobs,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(slots, cfg.threads, progress, os.getpid()),
        )
        running: dict = {}
        # Every worker the executor has started, by pid: it starts them on demand in submit(),
        # and a failure must stop each one, not only those its table still lists at that moment.
        started: dict = {}
        try:
            while ready or running:
                while ready and len(running) < cfg.jobs:
                    _, _, kind, seed, fn, args = heapq.heappop(ready)
                    running[pool_ex.submit(_in_worker, fn, *args)] = (kind, seed)
                    started.update(getattr(pool_ex, "_processes", None) or {})
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    kind, seed = running.pop(fut)
                    if kind == "ref":
                        references[seed] = fut.result()
                        for method, fn, args in jobs_of(seed, wanted(seed, True)):
                            push(_priority(method), "run", seed, fn, args)
                    else:
                        finished(fut.result())
        except BaseException:
            # A failed run or Ctrl-C: stop the others now instead of waiting for them to end.
            _stop_pool(pool_ex, started)
            raise
        pool_ex.shutdown(wait=True)
    results = report.summarise(cfg, runs, references, flops)
    results["wall_s"] = {"total": time.perf_counter() - t_start, "setup": setup_s}
    results["complete"] = True
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    try:
        report.plot(results, out_dir / "learning_curves.png")
    except ImportError as exc:  # matplotlib is an optional extra of the demo
        logger.warning("no plot (%s); install jeststream[demo]", exc)
    if "jest" in cfg.methods:
        results["selection_report"] = str(write_selection_report(cfg, out_dir, shards["pool"]))
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def selection_log_path(out_dir: Path, cfg) -> Path:
    return out_dir / f"selection-jest-seed{cfg.seeds[0]}.jsonl"


def write_selection_report(cfg, out_dir: Path, pool_shards: Sequence[str]) -> Path:
    """The `jeststream report` page of the first seed's JEST run, beside the plot."""
    from jeststream.demo.runs import LOADER_METHODS
    from jeststream.report import write_report

    criterion, n_chunks = LOADER_METHODS["jest"]
    return write_report(
        [selection_log_path(out_dir, cfg)],
        list(pool_shards),
        out_dir / "selection_report.html",
        title=f"JEST selection, demo seed {cfg.seeds[0]}",
        config={
            "ratio": cfg.ratio,
            "n_chunks": n_chunks or cfg.n_chunks,
            "temperature": cfg.temperature,
            "criterion": criterion,
            "loss": cfg.model.loss,
        },
    )


def main(argv: list[str] | None = None) -> int:
    """`jeststream demo` entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from jeststream.demo import report

    t0 = time.perf_counter()
    results = run_comparison(cfg, Path(args.out), progress=not args.no_progress)
    if args.details or args.full:
        print(report.table(results), end="\n\n")
    print(report.summary(results))
    print(
        f"\nWritten in {time.perf_counter() - t0:.0f} s:\n"
        f"  results   {Path(args.out) / 'results.json'}\n"
        f"  plot      {Path(args.out) / 'learning_curves.png'}\n"
        f"  report    {results.get('selection_report', '-')}  (what JEST kept and dropped)"
    )
    return 0
