"""Shared fixtures: tiny open_clip models built from a custom config (no downloads), a plain
dual-encoder with BatchNorm used through ``embed=``, and synthetic image-text batches.

Fixtures return factories so a test can build as many independent models as it needs:

    def test_x(tiny_clip, pair_batches):
        learner, reference = tiny_clip(seed=0), tiny_clip(seed=1)
        batches = pair_batches(n_batches=10, b=8)
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Tiny models on a shared 2-core machine: multi-threaded intra-op kernels only spin against each
# other (a 30x slowdown measured on the tiny CLIP forward), so tests run single-threaded.
torch.set_num_threads(1)

TINY_EMBED_DIM = 32
TINY_IMAGE_SIZE = 32
TINY_CONTEXT = 16
TINY_VOCAB = 64

TINY_CLIP_CFG = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {
        "image_size": TINY_IMAGE_SIZE,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 8,
    },
    "text_cfg": {
        "context_length": TINY_CONTEXT,
        "vocab_size": TINY_VOCAB,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


def make_tiny_clip(seed: int = 0, *, siglip: bool = False) -> nn.Module:
    """A tiny open_clip CLIP (ViT width 64, 2 layers, 32x32 images, patch 8; text width 64,
    2 layers, context 16). ``siglip=True`` adds a logit bias like SigLIP (init_logit_bias=-10)."""
    import open_clip

    kwargs = {}
    if siglip:
        kwargs = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}
    with torch.random.fork_rng():  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**TINY_CLIP_CFG, **kwargs)


def toy_tokenize(texts: list[str]) -> torch.Tensor:
    """A deterministic toy tokenizer within the tiny CLIP's vocab and context (16)."""
    out = torch.zeros(len(texts), TINY_CONTEXT, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [1 + (ord(c) % 62) for c in t[:TINY_CONTEXT]]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class TinyDual(nn.Module):
    """A plain dual encoder with BatchNorm and Dropout (things scoring must not disturb)."""

    def __init__(self, d_in: int = 12, d: int = 8, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.img = nn.Sequential(
                nn.Linear(d_in, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, d)
            )
            self.txt = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))


def tiny_dual_embed(model: nn.Module, batch):
    from jeststream.losses import Embeddings

    x, y = batch[0], batch[1]
    return Embeddings(
        F.normalize(model.img(x), dim=-1),
        F.normalize(model.txt(y), dim=-1),
        model.logit_scale.exp(),
        None,
    )


def make_pair_batches(n_batches: int = 10, b: int = 8, *, seed: int = 0, keys: bool = False):
    """List of (images [b,3,32,32], tokens [b,16] long[, keys list[str]]) batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        images = torch.randn(b, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
        tokens = torch.randint(1, TINY_VOCAB, (b, TINY_CONTEXT), generator=g)
        if keys:
            out.append((images, tokens, [f"s{i:03d}_{j:02d}" for j in range(b)]))
        else:
            out.append((images, tokens))
    return out


def make_vector_batches(n_batches: int = 10, b: int = 8, *, d_in: int = 12, seed: int = 0):
    """List of (x [b,d_in], y [b,d_in]) batches for TinyDual."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, d_in, generator=g), torch.randn(b, d_in, generator=g))
        for _ in range(n_batches)
    ]


class ResumableList(list):
    """A list of batches that is a resumable base loader: one pass, state = position."""

    pos = 0

    def __iter__(self):
        while self.pos < len(self):
            self.pos += 1
            yield self[self.pos - 1]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


@pytest.fixture(scope="module")
def models():
    """(learner, reference): two tiny open_clip CLIPs (seeds 0 and 1), one pair per module."""
    return make_tiny_clip(seed=0), make_tiny_clip(seed=1)


@pytest.fixture
def tiny_clip():
    return make_tiny_clip


@pytest.fixture
def pair_batches():
    return make_pair_batches


@pytest.fixture
def vector_batches():
    return make_vector_batches


@pytest.fixture
def tiny_dual():
    return TinyDual


@pytest.fixture
def no_thread_leak():
    """Fails the test if it leaves a jeststream producer thread alive."""
    yield
    for _ in range(100):  # give joins a moment; a real leak stays
        alive = [t for t in threading.enumerate() if t.name.startswith("jeststream")]
        if not alive:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"threads left alive: {alive}")


# Format-1 logs as jeststream wrote them before (selection_log.py at commit ed8ed12): steps 0-2 of
# six examples, keys k{step}_{i}, epoch step // 2, scores i + 10 step + 0.25 (step 1's last NaN),
# the first two selected, batch learnability (step + 0.5, step - 0.5, 0.125) on steps 1 and 2.
# The Parquet log holds two segments (steps 0-1, step 2) with the columns on every row.
SELECTION_LOG_V1 = Path(__file__).parent / "data" / "selection_log_v1"


def write_selection_log_v2(path, steps=range(3), offset=0.25, **kw):
    """The fixtures' records (``steps`` of them, scores shifted by ``offset``), written now."""
    from jeststream.selection_log import SelectionLog

    with SelectionLog(path, **kw) as log:
        for step in steps:
            scores = np.arange(6, dtype=np.float32) + step * 10 + offset
            if step == 1:
                scores[5] = np.nan
            log.write(keys=[f"k{step}_{i}" for i in range(6)], epoch=step // 2, step=step,
                      scores=scores, selected=np.arange(6) < 2,
                      batch_learnability=None if step == 0 else (step + 0.5, step - 0.5, 0.125))
