"""The demo's reference: trained once per seed on the curated split, frozen, and its pool
embeddings written as a library ``ReferenceCache`` (the reference is frozen and the demo's
input deterministic, so one pass over the pool serves every super-batch of every run).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from jeststream.demo.data import WordTokenizer
from jeststream.demo.model import (
    ModelConfig,
    build_model,
    contrastive_loss,
    evaluate,
    make_optimizer,
)
from jeststream.losses import Embeddings

if TYPE_CHECKING:
    from collections.abc import Callable

    from jeststream.demo.runs import RunConfig


def reference_model_config(cfg: RunConfig) -> ModelConfig:
    """The reference's architecture: the learner's, or at ``cfg.ref_width`` (image tower width
    and embedding size; the text tower keeps the learner's text/image width proportion)."""
    if cfg.ref_width is None or cfg.ref_width == cfg.model.width:
        return cfg.model
    w = cfg.ref_width
    text = max(8, 2 * round(w * cfg.model.text_width / cfg.model.width / 2))
    return replace(cfg.model, width=w, embed_dim=w, text_width=text)


def load_reference(cfg: RunConfig, vocab_size: int, cache: Path) -> tuple[torch.nn.Module, dict]:
    """The reference saved by :func:`train_reference` at `cache`, frozen, and its eval."""
    model = build_model(reference_model_config(cfg), vocab_size, seed=0)  # every weight comes from the file
    blob = torch.load(cache, map_location="cpu", weights_only=True)
    model.load_state_dict(blob["state_dict"])
    model.eval().requires_grad_(False)
    return model, blob["eval"]


def train_reference(
    cfg: RunConfig,
    curated: dict,
    heldout: dict,
    tokenizer: WordTokenizer,
    seed: int,
    cache: Path | None,
    progress: Callable | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train (or load from `cache`) the reference on the curated split; return it frozen."""
    if cache is not None and cache.exists():
        return load_reference(cfg, tokenizer.vocab_size, cache)
    model = build_model(reference_model_config(cfg), tokenizer.vocab_size, seed=10_000 + seed)
    model.train()
    opt, sched = make_optimizer(model, cfg, cfg.ref_steps)
    loss_fn = contrastive_loss(cfg.model.loss)
    gen = torch.Generator().manual_seed(10_000 + seed)
    n, b = len(curated["label"]), cfg.batch_size
    perm, pos = torch.randperm(n, generator=gen), 0
    bar = progress(total=cfg.ref_steps, desc=f"reference seed {seed}") if progress else None
    for _ in range(cfg.ref_steps):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + b]
        pos += b
        loss = loss_fn(model, curated["image"][idx], curated["text"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar:
            bar.update()
    if bar:
        bar.close()
    ev = evaluate(model, heldout["image"], heldout["label"], heldout["text"], tokenizer)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "eval": ev}, cache)
    model.eval().requires_grad_(False)
    return model, ev


@torch.inference_mode()
def reference_embeddings(reference: torch.nn.Module, pool: dict, chunk: int = 2048) -> Embeddings:
    """The frozen reference's embeddings of every pool pair, in pool order (one pass)."""
    images, texts = [], []
    for s in range(0, len(pool["label"]), chunk):
        images.append(reference.encode_image(pool["image"][s : s + chunk], normalize=True))
        texts.append(reference.encode_text(pool["text"][s : s + chunk], normalize=True))
    return Embeddings(
        torch.cat(images),
        torch.cat(texts),
        reference.logit_scale.exp().clone(),
        None if reference.logit_bias is None else reference.logit_bias.clone(),  # CLIP: none
    )


def reference_scores(cached: Embeddings) -> torch.Tensor:
    """Each pool pair's own reference loss (lower = more typical of curated data): its SigLIP
    positive-pair loss, or for a CLIP reference (no bias) the negative pair similarity (a
    softmax loss needs the other examples of a batch; static filtering ranks by CLIP score)."""
    if cached.logit_bias is None:
        return -(cached.image * cached.text).sum(-1)
    logit = cached.logit_scale * (cached.image * cached.text).sum(-1) + cached.logit_bias
    return -F.logsigmoid(logit)


def write_reference_cache(
    reference: torch.nn.Module, cached: Embeddings, keys: list[str], directory: Path, cfg: RunConfig
) -> Path:
    """Write the pool's reference embeddings as a library reference cache (``ReferenceCache``).

    The reference is frozen and the demo's image transform is deterministic, so its embeddings
    of a pool pair never change: computed once for the whole pool (and counted once in the
    FLOPs), JESTLoader then looks them up by sample key instead of running the reference on
    every super-batch. The learner snapshot is still run on every super-batch.
    """
    from jeststream.reference_cache import init_cache, reference_fingerprint, write_shard

    header = {
        "reference": {"architecture": "demo SigLIP", "fingerprint": reference_fingerprint(reference)},
        "preprocessing": {
            "image_size": cfg.data.image_size,
            "input": "uint8 / 255 (jeststream.demo.data.to_model_input), no augmentation",
            "tokenizer": {"class": "WordTokenizer", "context_length": cfg.data.context_length},
            "data": cfg.data.identity(),
        },
        "embed_dim": int(cached.image.shape[1]),
        "dtype": "float32",
        "logit_scale": float(cached.logit_scale),
        "logit_bias": None if cached.logit_bias is None else float(cached.logit_bias),
    }
    init_cache(directory, header)
    write_shard(directory, "pool", keys, cached.image.numpy(), cached.text.numpy())
    return directory
