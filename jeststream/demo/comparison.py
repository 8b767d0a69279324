"""One comparison of the demo: every (seed, method) of a RunConfig, trained and summarised.

:class:`Comparison` builds the shards, measures the FLOPs, trains each seed's reference (once,
cached by its configuration), runs the methods and writes ``results.json`` (after every run,
``"complete": false`` until the last), ``learning_curves.png`` and the first seed's JEST
selection report. Runs go to :func:`jeststream.demo.workers.run_jobs`, longest first, with a
reference ahead of everything (it unlocks the longest runs).

Invariants: every run is seeded on its own and its job holds only plain data and file paths
(a worker loads the tensors itself), so a run's curve depends neither on ``cfg.jobs`` nor on
the order runs end in (with synchronous or lagged scoring). Wall times are on shared cores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from jeststream.demo.workers import Job, run_jobs

__all__ = [
    "HEADLINE_METHODS",
    "REFERENCE_FREE",
    "Comparison",
    "run_comparison",
    "selection_log_path",
    "write_selection_report",
]

logger = logging.getLogger(__name__)

HEADLINE_METHODS = ("uniform", "jest", "oracle")
# Methods that never look at the reference: they need not wait for it.
REFERENCE_FREE = ("uniform", "oracle", "hard_learner")


def run_comparison(cfg, out_dir: Path, progress: bool = True) -> dict:
    """Run every (seed, method) of `cfg`; write results.json, the plot and the JEST run's
    selection report into `out_dir`; return the results."""
    return Comparison(cfg, out_dir, progress=progress).run()


def priority(method: str) -> tuple:
    """Scheduling order: longest first; among equals the headline methods (a comparison cut
    short has them)."""
    return (-cost(method), method not in HEADLINE_METHODS)


def cost(method: str) -> int:
    """Relative cost of one run: 1 for the training alone, +1 for a JESTLoader method (it
    decodes 1/ratio base batches per step), +1 if it also runs the learner snapshot on every
    super-batch (every criterion but easy_reference)."""
    from jeststream.demo.runs import LOADER_METHODS
    from jeststream.losses import criterion_weights

    if method not in LOADER_METHODS:
        return 1
    return 2 + int(criterion_weights(LOADER_METHODS[method][0])[0] != 0)


def timed_reference(
    cfg, curated_shards: list[str], heldout_shards: list[str], tokenizer, seed: int,
    cache: Path, progress=None,
) -> dict:
    """Train one reference into its cache file (a job: plain data in, the splits read from
    their shards); its held-out eval and wall."""
    from jeststream.demo.reference import train_reference
    from jeststream.demo.shards import load_split

    t0 = time.perf_counter()
    curated = load_split(curated_shards, tokenizer, cfg.data.image_size)
    heldout = load_split(heldout_shards, tokenizer, cfg.data.image_size)
    _, ev = train_reference(cfg, curated, heldout, tokenizer, seed, cache, progress=progress)
    return {**ev, "wall_s": time.perf_counter() - t0}


class Comparison:
    """The runs of one configuration and their summary.

    Attributes a caller may set before :meth:`run`: ``work_dir``, where the shards and the
    reference caches go (default ``out_dir``; comparisons may share one). Methods a subclass
    may override: :meth:`wanted` (which runs to do) and :meth:`finished` (called with each
    run's result as it ends, in this process).
    """

    def __init__(self, cfg, out_dir: Path, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.work_dir = self.out_dir
        self.progress = progress
        self.runs: list[dict] = []
        self.references: dict[int, dict] = {}

    # -- what to run -----------------------------------------------------------------------

    def wanted(self, seed: int, reference: bool) -> list[str]:
        """The seed's methods to run that need (``reference``) or do not need the reference."""
        return [m for m in self.cfg.methods if (m not in REFERENCE_FREE) == reference]

    def reference_path(self, seed: int) -> Path:
        return self.work_dir / "cache" / f"reference-{self.ref_tag}-seed{seed}.pt"

    def reference_job(self, seed: int) -> Job:
        args = (self.cfg, self.shards["curated"], self.shards["heldout"], self.tokenizer, seed,
                self.reference_path(seed))
        return Job(f"reference-seed{seed}", timed_reference, args, (-1_000,), ("ref", seed))

    def method_jobs(self, seed: int, methods: Sequence[str]) -> list[Job]:
        """A job per method of `methods` for `seed`, longest first; a method that uses the
        reference needs it trained (in the cache). The arguments are plain data and file
        paths: no tensor crosses a process boundary (torch shares tensors through file
        descriptors, which a terminated worker leaves half-sent)."""
        from jeststream.demo.reference import (
            load_reference,
            reference_embeddings,
            reference_scores,
            write_reference_cache,
        )
        from jeststream.demo.runs import run_job
        from jeststream.demo.shards import subset_shards

        cfg, pool, flops, shards = self.cfg, self.pool, self.flops, self.shards
        data_dir = Path(shards["pool"][0]).parent
        cached_path = None
        if any(m not in REFERENCE_FREE for m in methods):
            reference, _ = load_reference(cfg, self.tokenizer.vocab_size, self.reference_path(seed))
            self.references[seed]["train_flops"] = cfg.ref_steps * flops["reference_train_step"]
            # the reference cache's one-time forward over the pool
            self.references[seed]["pool_forward_flops"] = (
                len(pool["key"]) * flops["per_example_forward"]
            )
            cached = reference_embeddings(reference, pool)
            cached_path = write_reference_cache(
                reference, cached, pool["key"],
                self.work_dir / "cache" / f"reference-cache-{self.ref_tag}-seed{seed}", cfg,
            )
        out = []
        for method in methods:
            upfront = 0.0
            if method == "static":
                scores = reference_scores(cached)
                n_keep = max(cfg.batch_size, round(cfg.static_keep * len(scores)))
                keep = {pool["key"][i] for i in scores.argsort()[:n_keep].tolist()}
                train = subset_shards(
                    shards["pool"], keep, data_dir,
                    f"static-{self.ref_tag}-seed{seed}-{cfg.static_keep}", cfg.data.shard_size,
                )
                upfront = len(scores) * flops["per_example_forward"]
            elif method == "oracle":
                keep = {k for k, n in self.noise_of.items() if n == "clean"}
                train = subset_shards(shards["pool"], keep, data_dir, "oracle", cfg.data.shard_size)
            else:
                train = shards["pool"]
            spec = {
                "method": method,
                "cfg": cfg,
                "seed": seed,
                "train_shards": train,
                "heldout_shards": shards["heldout"],
                "noise_of": self.noise_of,
                "tokenizer": self.tokenizer,
                "flops": flops,
                "upfront_flops": upfront,
                "reference_path": None if method in REFERENCE_FREE else self.reference_path(seed),
                "cached_path": cached_path if cfg.cache_reference else None,
                # the first seed's JEST run logs its selections for the HTML report (JSONL:
                # the demo extra has no pyarrow)
                "selection_log": selection_log_path(self.out_dir, cfg)
                if method == "jest" and seed == cfg.seeds[0]
                else None,
            }
            out.append(Job(f"{method}-seed{seed}", run_job, (spec,), priority(method),
                           ("run", seed)))
        out.sort(key=lambda j: j.priority)
        return out

    # -- running ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Shards, tokenizer, the pool in memory, FLOPs and the references' cache tag."""
        import torch

        from jeststream.demo import report
        from jeststream.demo.data import WordTokenizer, prepare_shards
        from jeststream.demo.model import build_model
        from jeststream.demo.reference import reference_model_config
        from jeststream.demo.runs import measure_flops
        from jeststream.demo.shards import load_split

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        self.t_start = time.perf_counter()
        self.shards = prepare_shards(cfg.data, self.work_dir / "data")
        self.tokenizer = WordTokenizer(cfg.data.context_length, cfg.data.task)
        # the pool in memory; the curated and held-out splits are read by the jobs
        self.pool = load_split(self.shards["pool"], self.tokenizer, cfg.data.image_size)
        self.noise_of = dict(zip(self.pool["key"], self.pool["noise"]))
        self.flops = measure_flops(
            build_model(cfg.model, self.tokenizer.vocab_size, seed=0), cfg, self.tokenizer,
            self.pool["text"],
        )
        self.setup_s = time.perf_counter() - self.t_start
        self.ref_tag = report.fingerprint(
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

    def summary(self, complete: bool) -> dict:
        from jeststream.demo import report

        results = report.summarise(self.cfg, self.runs, self.references, self.flops)
        results["wall_s"] = {"total": time.perf_counter() - self.t_start, "setup": self.setup_s}
        results["complete"] = complete
        return results

    def finished(self, result: dict) -> dict:
        """Record one run's result; write and return the summary so far."""
        self.runs.append(result)
        logger.info(
            "%s seed %d: final accuracy %.3f in %.1fs",
            result["method"], result["seed"], result["curve"][-1]["accuracy"], result["wall_s"],
        )
        rank = {m: i for i, m in enumerate(self.cfg.methods)}
        self.runs.sort(key=lambda r: (r["seed"], rank[r["method"]]))
        partial = self.summary(complete=False)
        (self.out_dir / "results.json").write_text(json.dumps(partial, indent=1))
        return partial

    def _done(self, job: Job, result) -> list[Job]:
        kind, seed = job.tag
        if kind == "ref":
            self.references[seed] = result
            return self.method_jobs(seed, self.wanted(seed, True))
        self.finished(result)
        return []

    def run(self) -> dict:
        """Every wanted run; then results.json, the plot and the selection report."""
        from jeststream.demo import report

        self.setup()
        cfg = self.cfg
        jobs: list[Job] = []
        for seed in cfg.seeds:
            if self.wanted(seed, True):
                jobs.append(self.reference_job(seed))
            jobs += self.method_jobs(seed, self.wanted(seed, False))
        run_jobs(jobs, workers=cfg.jobs, threads=cfg.threads, progress=self.progress,
                 on_done=self._done)
        results = self.summary(complete=True)
        path = self.out_dir / "results.json"
        path.write_text(json.dumps(results, indent=1))
        try:
            report.plot(results, self.out_dir / "learning_curves.png")
        except ImportError as exc:  # matplotlib is an optional extra of the demo
            logger.warning("no plot (%s); install jeststream[demo]", exc)
        if "jest" in cfg.methods:
            results["selection_report"] = str(
                write_selection_report(cfg, self.out_dir, self.shards["pool"])
            )
            path.write_text(json.dumps(results, indent=1))
        return results


def selection_log_path(out_dir: Path, cfg) -> Path:
    """Where the first seed's JEST run logs its selections."""
    return Path(out_dir) / f"selection-jest-seed{cfg.seeds[0]}.jsonl"


def write_selection_report(cfg, out_dir: Path, pool_shards: Sequence[str]) -> Path:
    """The `jeststream report` page of the first seed's JEST run, beside the plot."""
    from jeststream.demo.runs import LOADER_METHODS
    from jeststream.report import write_report

    criterion, n_chunks = LOADER_METHODS["jest"]
    return write_report(
        [selection_log_path(out_dir, cfg)],
        list(pool_shards),
        Path(out_dir) / "selection_report.html",
        title=f"JEST selection, demo seed {cfg.seeds[0]}",
        config={
            "ratio": cfg.ratio,
            "n_chunks": n_chunks or cfg.n_chunks,
            "temperature": cfg.temperature,
            "criterion": criterion,
            "loss": cfg.model.loss,
        },
    )
