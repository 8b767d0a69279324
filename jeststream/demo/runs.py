"""Training runs of the demo: one tiny SigLIP learner per method, same everything but the data.

Every method trains the same model (same init per seed), with the same optimizer, schedule,
batch size b and number of learner steps. Only what the learner sees differs:

- ``uniform``: the plain loader over the noisy pool;
- ``jest``: JESTLoader, learnability, joint sampling in ``n_chunks`` chunks;
- ``independent``: JESTLoader with ``n_chunks=1`` (each example's own learnability, sampled
  independently, RHO-LOSS style);
- ``hard_learner`` / ``easy_reference``: independent sampling by learner loss / −reference loss;
- ``static``: keep the pool's top share by reference score once before training, then uniform;
- ``oracle``: uniform over the pool's pairs that carry no injected noise (the upper bound).

With ``RunConfig.batch_learnability`` (the default) every JESTLoader run also records, per
yielded batch, the criterion's score of the selected sub-batch as a whole next to an
independent and a uniform draw from the same super-batch (:mod:`jeststream.diagnostics`; it does
not change the selection).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jeststream.demo.data import NOISE_TYPES, DataConfig, WordTokenizer
from jeststream.demo.model import (
    RETRIEVAL,
    ModelConfig,
    build_model,
    contrastive_loss,
    evaluate,
    make_optimizer,
)
from jeststream.demo.reference import load_reference, reference_model_config
from jeststream.demo.shards import StreamLoader, load_split, model_input, view_model_input

logger = logging.getLogger(__name__)

METHODS = (
    "uniform",
    "jest",
    "independent",
    "hard_learner",
    "easy_reference",
    "static",
    "oracle",
)
# Methods that go through JESTLoader, with their (criterion, n_chunks or None for the default).
LOADER_METHODS = {
    "jest": ("learnability", None),
    "independent": ("learnability", 1),
    "hard_learner": ("hard_learner", 1),
    "easy_reference": ("easy_reference", 1),
}


@dataclass
class RunConfig:
    """Every knob of a comparison. The same values apply to every method."""

    steps: int = 2000  # the full comparison's budget: uniform near its plateau
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 50
    eval_every: int = 50
    ratio: float = 0.2
    n_chunks: int = 16
    temperature: float = 1.0  # JESTLoader's sampling temperature (0: greedy)
    ref_steps: int = 1500
    # the reference's width (image tower and embedding; its text tower scaled as the learner's):
    # None = the learner's. A narrower reference is a cheaper one (issue 30's budget sweep)
    ref_width: int | None = None
    # Reference pre-filter: keep the super-batch's top share by reference score before the
    # learner scores it (JESTLoader's ``prefilter``); 1 = off. Needs a JESTLoader that has it.
    prefilter: float = 1.0
    static_keep: float = 0.3
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("uniform", "jest", "independent")
    threads: int = 1
    jobs: int = 1  # runs at once, in worker processes (see run_comparison)
    # Scoring schedule (the demo's --scoring): by default inline with the learner as it is
    # (lag 0, the freshest weights; deterministic without threads). async_scoring with
    # deterministic scores super-batch t with the snapshot after step t - prefetch whatever the
    # thread timing; async_scoring alone with whatever snapshot is latest.
    async_scoring: bool = False
    deterministic: bool = False
    prefetch: int = 2  # super-batches scored ahead; under deterministic scoring also the lag
    score_resolution: int | None = None  # the learner snapshot scores images resized to this
    # Flexi-JEST: the methods that score the learner (jest, independent, hard_learner) train
    # this share of each batch at score_resolution (jeststream.low_res.encode_image_mixed)
    train_low_res_share: float = 0.0
    cache_reference: bool = True  # embed the pool with the frozen reference once, look up by key
    # JESTLoader runs record the selected sub-batch's learnability next to an independent and a
    # uniform draw (jeststream.diagnostics); measuring changes no selection
    batch_learnability: bool = True
    preset: str = "default"  # "default", "quick" or "full": what the table reports against
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def measure_flops(
    model: torch.nn.Module,
    cfg: RunConfig,
    tokenizer: WordTokenizer,
    texts: torch.Tensor | None = None,
) -> dict:
    """FLOPs of one training step at b and of the scoring forwards at B, counted once each.

    The scoring forwards are the library's (``default_embed``: exactly trimmed captions, and for
    the learner the ``score_resolution`` images), on ``texts`` (the pool's own tokenized
    captions; zeros when None), so the count is what the runs compute. The reference's forward
    and training step are counted on its own architecture (:func:`reference_model_config`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from jeststream.low_res import resize_images
    from jeststream.scoring import default_embed

    b = cfg.batch_size
    big = b * round(1 / cfg.ratio)
    s = cfg.model.image_size

    def inputs(n: int):
        if texts is None:
            t = torch.zeros(n, cfg.model.context_length, dtype=torch.long)
        else:
            t = texts[torch.arange(n) % len(texts)]
        return torch.zeros(n, 3, s, s), t

    model.train()
    with FlopCounterMode(display=False) as counter:
        contrastive_loss(cfg.model.loss)(model, *inputs(b)).backward()
    model.zero_grad(set_to_none=True)
    train = counter.get_total_flops()
    train_mixed = train
    if cfg.train_low_res_share:
        mixed = mixed_resolution_encoder(cfg, torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter:
            contrastive_loss(cfg.model.loss)(model, *inputs(b), encode_image=mixed).backward()
        model.zero_grad(set_to_none=True)
        train_mixed = counter.get_total_flops()
    ref_model, ref_train = model, train
    if reference_model_config(cfg) != cfg.model:
        ref_model = build_model(reference_model_config(cfg), tokenizer.vocab_size, seed=0)
        ref_model.train()
        with FlopCounterMode(display=False) as counter:
            contrastive_loss(cfg.model.loss)(ref_model, *inputs(b)).backward()
        ref_train = counter.get_total_flops()
        ref_model.eval()
    model.eval()
    x, t = inputs(big)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        default_embed(ref_model, (x, t))
    reference = counter.get_total_flops()
    if cfg.score_resolution is not None:
        x = resize_images(x, cfg.score_resolution)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        default_embed(model, (x, t))
    learner = counter.get_total_flops()
    return {
        "train_step": train,
        # a selecting method's step with train_low_res_share of it at score_resolution
        "train_step_mixed": train_mixed,
        "reference_train_step": ref_train,
        "reference_forward_super_batch": reference,
        "learner_forward_super_batch": learner,
        "per_example_forward": reference / big,
    }


def uses_reference(method: str) -> bool:
    """Whether `method` needs the trained reference (and so, counted in full, its training)."""
    if method == "static":
        return True
    return method in LOADER_METHODS and LOADER_METHODS[method][0] != "hard_learner"


def mixed_resolution_encoder(cfg: RunConfig, generator: torch.Generator) -> Callable:
    """(model, images) -> features with ``cfg.train_low_res_share`` of the batch encoded at
    ``cfg.score_resolution`` (Flexi-JEST's mixed-resolution training)."""
    from jeststream.low_res import encode_image_mixed

    def encode(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return encode_image_mixed(
            model, images, resolution=cfg.score_resolution, share=cfg.train_low_res_share,
            generator=generator,
        )

    return encode


def run_method(
    method: str,
    cfg: RunConfig,
    seed: int,
    train_shards: list[str],
    heldout: dict,
    noise_of: dict[str, str],
    reference: torch.nn.Module | None,
    tokenizer: WordTokenizer,
    flops: dict,
    upfront_flops: float = 0.0,
    progress: Callable | None = None,
    reference_cache: Any = None,
    selection_log: str | os.PathLike | None = None,
    deferred: bool = False,
) -> dict:
    """Train one learner with `method`; return its curve, composition and costs.

    ``deferred``: the base loader defers decoding (``webdataset_loader(deferred=True,
    score_resolution=cfg.score_resolution or the image size)``): the learner scores views
    decoded at that scale (JPEG: DCT-scaled), and only the selected examples are decoded in
    full. For the methods that select (JESTLoader) only.

    ``selection_log``: a path for the JEST loader's per-example selection log (the demo's
    ``selection_report.html`` is drawn from it); ignored by methods without a loader.

    ``reference_cache``: a :class:`jeststream.ReferenceCache` of the pool
    (:func:`write_reference_cache`); a method that scores with the reference then looks its
    embeddings up by key, runs no reference forward, and pays for that one pass up front.
    """
    from jeststream.loader import JESTLoader

    learner = build_model(cfg.model, tokenizer.vocab_size, seed=seed)
    learner.train()
    opt, sched = make_optimizer(learner, cfg, cfg.steps)
    n = round(1 / cfg.ratio)
    selecting = method in LOADER_METHODS
    # batch learnability is measured for the learnability criterion (jest, independent): for
    # the others the criterion's score of a sub-batch is not its learnability
    measuring = (
        selecting and cfg.batch_learnability and LOADER_METHODS[method][0] == "learnability"
    )
    loss_fn = contrastive_loss(cfg.model.loss)
    if deferred and not selecting:
        raise ValueError(f"deferred=True needs a method that selects {tuple(LOADER_METHODS)}, "
                         f"not {method!r} (it reads every example it trains on)")
    view = {"deferred": True, "score_resolution": cfg.score_resolution or cfg.data.image_size}
    base = StreamLoader(
        train_shards, cfg.batch_size, cfg.steps * (n if selecting else 1), tokenizer, seed=seed,
        **(view if deferred else {}),
    )
    per_step = flops["train_step"]
    encode_image = None
    if selecting:
        criterion, n_chunks = LOADER_METHODS[method]
        scores_reference = criterion != "hard_learner"
        # scoring forwards per super-batch: the learner snapshot (JESTLoader skips it for
        # easy_reference, which gives the learner no weight) and the reference (none when its
        # embeddings come from the cache, paid for up front)
        if criterion != "easy_reference":
            if cfg.train_low_res_share:  # train part of each batch at the scoring resolution
                per_step = flops["train_step_mixed"]
                encode_image = mixed_resolution_encoder(
                    cfg, torch.Generator().manual_seed(7919 + seed)
                )
            # the reference pre-filter keeps ceil(q B) examples for the learner's forward
            # (its FLOPs are linear in the examples, up to the trimmed captions' lengths)
            kept = max(cfg.batch_size, math.ceil(cfg.prefilter * cfg.batch_size * n))
            per_step += flops["learner_forward_super_batch"] * kept / (cfg.batch_size * n)
        scorer = reference if scores_reference else None
        if scores_reference and reference_cache is not None:
            scorer = reference_cache
            upfront_flops += len(reference_cache) * flops["per_example_forward"]
        elif scores_reference:
            per_step += flops["reference_forward_super_batch"]
        extra = {}
        if cfg.prefilter != 1.0:
            extra["prefilter"] = cfg.prefilter
        loader = JESTLoader(
            base,
            learner,
            scorer,
            ratio=cfg.ratio,
            n_chunks=n_chunks or cfg.n_chunks,
            temperature=cfg.temperature,
            loss=cfg.model.loss,
            criterion=criterion,
            batch_learnability=measuring,
            scoring="lagged" if cfg.deterministic else "latest" if cfg.async_scoring else "sync",
            prefetch=cfg.prefetch,
            seed=seed,
            score_transform=view_model_input if deferred else model_input,
            score_resolution=cfg.score_resolution,
            selection_log=selection_log,
            **extra,
        )
    else:
        loader = base

    composition: Counter = Counter()
    draws: list[tuple[float, float, float, float]] = []  # per step: BatchLearnability
    curve: list[dict] = []
    t0 = time.perf_counter()
    eval_s = 0.0

    def record(step: int) -> None:
        nonlocal eval_s
        e0 = time.perf_counter()
        ev = evaluate(learner, heldout["image"], heldout["label"], heldout["text"], tokenizer)
        eval_s += time.perf_counter() - e0
        curve.append(
            {
                "step": step,
                "accuracy": ev["accuracy"],
                **{k: ev[k] for k in RETRIEVAL},
                "flops": upfront_flops + step * per_step,
                "wall_s": time.perf_counter() - t0 - eval_s,
            }
        )

    record(0)
    bar = progress(total=cfg.steps, desc=f"{method} seed {seed}") if progress else None
    step = 0
    try:
        for batch in loader:
            if measuring:
                info = loader.last_info
                if info.batch_learnability is not None:  # None: a uniform fallback
                    draws.append(tuple(info.batch_learnability))
            images, texts, keys = model_input(batch)
            composition.update(noise_of[k] for k in keys)
            loss = loss_fn(learner, images, texts, encode_image=encode_image)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if bar:
                bar.update()
                bar.set_postfix(acc=f"{curve[-1]['accuracy']:.3f}", refresh=False)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record(step)
            if step == cfg.steps:
                break
    finally:
        if selecting:
            loader.close()
        if bar:
            bar.close()
    if step < cfg.steps:
        raise RuntimeError(f"{method}: the loader ran dry after {step} of {cfg.steps} steps")
    total = sum(composition.values())
    out = {
        "method": method,
        "seed": seed,
        "curve": curve,
        "composition": {t: composition[t] / total for t in NOISE_TYPES},
        "wall_s": time.perf_counter() - t0 - eval_s,
        "flops_per_step": per_step,
        "upfront_flops": upfront_flops,
        "uses_reference": uses_reference(method),
    }
    if measuring:
        out["batch_learnability"] = summarise_draws(
            draws, LOADER_METHODS[method][0], cfg.eval_every
        )
    return out


DRAWS = ("selected", "independent", "uniform")


def summarise_draws(draws: list[tuple], criterion: str, window: int) -> dict:
    """A run's per-step batch learnability (selected, independent, uniform, overlap): mean and
    std over its steps, and the means over consecutive windows of ``window`` steps (the curve
    the report plots). Sum form: divide by b for open_clip's mean loss."""
    x = np.asarray(draws, dtype=np.float64).reshape(-1, 4)
    out: dict[str, Any] = {"criterion": criterion, "steps": len(x)}
    cols = {name: x[:, i] for i, name in enumerate((*DRAWS, "overlap"))}
    # paired differences, per super-batch: free of the trend over training that dominates the
    # spread of each draw's own values
    cols["selected_minus_independent"] = cols["selected"] - cols["independent"]
    cols["selected_minus_uniform"] = cols["selected"] - cols["uniform"]
    cols["independent_minus_uniform"] = cols["independent"] - cols["uniform"]
    for name, v in cols.items():
        out[name] = {
            "mean": float(v.mean()) if len(v) else None,
            "std": float(v.std(ddof=1)) if len(v) > 1 else None,
        }
    ends = list(range(window, len(x), window)) + [len(x)] if len(x) else []
    starts = [0] + ends[:-1]
    out["windows"] = {
        "end_step": ends,
        **{name: [float(cols[name][a:b].mean()) for a, b in zip(starts, ends)] for name in DRAWS},
    }
    return out


def run_job(spec: dict, progress: Callable | None = None) -> dict:
    """:func:`run_method` from a job spec of plain data and file paths (the demo's unit of
    work, in-process or in a worker process): loads the held-out split, the cached reference
    and its pool embeddings, then trains."""
    cfg, tokenizer = spec["cfg"], spec["tokenizer"]
    heldout = load_split(spec["heldout_shards"], tokenizer, cfg.data.image_size)
    reference = reference_cache = None
    if spec["reference_path"] is not None:
        reference, _ = load_reference(cfg, tokenizer.vocab_size, spec["reference_path"])
    if spec["cached_path"] is not None:
        from jeststream.reference_cache import ReferenceCache

        reference_cache = ReferenceCache(spec["cached_path"], reference=reference)
    return run_method(
        spec["method"],
        cfg,
        spec["seed"],
        spec["train_shards"],
        heldout,
        spec["noise_of"],
        reference,
        tokenizer,
        spec["flops"],
        upfront_flops=spec["upfront_flops"],
        progress=progress,
        reference_cache=reference_cache,
        selection_log=spec.get("selection_log"),
    )
