"""What JEST's input pipeline costs on the CPU, eager vs deferred decoding (issue 28).

Prints one JSON object. Writes webdataset shards of 256-px JPEGs (quality 90) with photographic
statistics -- a random field with a 1/f amplitude spectrum plus sensor-like noise, so that the
files are 20-40 KB like img2dataset's, not flat colour -- and short captions; reference
embeddings come from a ReferenceCache written beside them. The training transform is open_clip's
(``image_transform(224, is_train=True)``: RandomResizedCrop, bicubic, normalise), captions go
through open_clip's tokenizer. For each ratio (0.2, 0.1) and ``num_workers`` (0, 2) it runs:

  - uniform: the eager base loader alone, one base batch per yielded batch (the unit; run
    over as many base batches as the JEST pipelines read, n per yielded batch, so that its
    figure is taken over as long a stretch of time as theirs);
  - eager: JESTLoader over the eager base loader (every example decoded and augmented);
  - deferred_112: ``webdataset_loader(deferred=True, score_resolution=112)`` (JPEG draft-decoded
    112-px views, the selected b decoded and augmented after selection) and
    ``JESTLoader(score_resolution=112)``;
  - deferred_224: ``deferred=True, score_resolution=224`` (decoded once to uint8, a centre view
    at 224 scored, augmentation and normalisation on the selected b only).

Figures: CPU seconds per yielded batch (``getrusage``: the process and its threads, plus the
DataLoader workers once they are joined at the end of the pass) and wall seconds per yielded
batch, each pipeline also as a multiple of uniform and of eager; every pipeline first runs once,
unmeasured, and the JSON records the commit it ran from. With ``--repeats``, the pipelines run
in turn, again and again, and each multiple is the median of the per-repeat ratios (a pipeline
against the uniform run beside it: the machine's slow drifts cancel); the ratio of the medians
is kept beside it. The learner scores through a
stand-in whose forward costs next to nothing (pooled pixels and token embeddings), so the CPU
figures are the input pipeline's (plus the same selection maths for every JEST row); torch runs
one intra-op thread, as in a DataLoader worker. Also: the bytes of one super-batch held by the
loader (eager float tensors vs views + records), and the selection agreement -- the share of
yielded examples that differ between scoring draft-decoded views and scoring the eagerly
prepared images resized to the same resolution, both with a tiny open_clip ViT learner (random
weights; same seed, same super-batches), under the learnability criterion (with the cached
reference, which both score alike) and under hard_learner (the learner's view alone decides:
the stricter figure).

    python benchmarks/input_pipeline.py            # b=64, 3 yielded batches per run
    python benchmarks/input_pipeline.py --quick    # a smoke test (b=8, tiny images)
    python benchmarks/input_pipeline.py --steps 12 --repeats 3   # medians of interleaved runs
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import code_state  # noqa: E402

WORDS = (
    "a photo of the small red dog on grass near a wooden house in summer light with trees "
    "blue sky old car city street people walking bridge river mountain snow beach sunset"
).split()


def photo_like(rng: np.random.Generator, side: int) -> np.ndarray:
    """uint8 [side, side, 3]: a 1/f-spectrum random field (natural images' statistics),
    correlated across channels, plus a little pixel noise."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amp = 1.0 / f**1.1
    base = rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)
    chans = []
    for _ in range(3):
        own = rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)
        field = np.fft.irfft2(amp * (base + 0.35 * own), s=(side, side))
        chans.append(field)
    img = np.stack(chans, axis=-1)
    img = (img - img.mean()) / (img.std() + 1e-9)
    img = 128 + 48 * img + rng.normal(0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_shards(root: Path, n_images: int, per_shard: int, side: int) -> tuple[list[str], list]:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    urls, sizes, keys = [], [], []
    for s in range(math.ceil(n_images / per_shard)):
        url = str(root / f"shard-{s:04d}.tar")
        with wds.TarWriter(url) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                if i >= n_images:
                    break
                buf = io.BytesIO()
                Image.fromarray(photo_like(rng, side)).save(buf, "JPEG", quality=90)
                words = rng.choice(WORDS, size=int(rng.integers(4, 12)))
                key = f"{i:07d}"
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": " ".join(words)})
                sizes.append(len(buf.getvalue()))
                keys.append(key)
        urls.append(url)
    return urls, [sizes, keys]


def write_reference_cache(directory: Path, keys: list[str], dim: int) -> None:
    """A ReferenceCache of fixed random unit embeddings (the reference is frozen: its cached
    embeddings are data to the loader, whatever model made them)."""
    from jeststream.reference_cache import init_cache, write_shard

    g = np.random.default_rng(1)
    header = {
        "reference": {"name": "benchmark-random"},
        "preprocessing": {"image_size": 224},
        "embed_dim": dim,
        "dtype": "float32",
        "logit_scale": 10.0,
        "logit_bias": -10.0,
    }
    init_cache(directory, header)
    img = g.normal(size=(len(keys), dim)).astype(np.float32)
    txt = img + 0.8 * g.normal(size=(len(keys), dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    write_shard(directory, "all", keys, img, txt)


class FreeLearner(nn.Module):
    """A stand-in learner whose scoring forward costs next to nothing: pooled pixels and mean
    token embeddings, projected (the benchmark measures the input pipeline)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = nn.Parameter(torch.randn(3 * 16, dim, generator=g))
        self.text = nn.Parameter(torch.randn(49408, dim, generator=g) * 0.1)


def free_embed(model: FreeLearner, batch):
    from jeststream.losses import Embeddings

    images, tokens = batch[0], batch[1]
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)
    img = torch.nn.functional.normalize(pooled @ model.image, dim=-1)
    txt = torch.nn.functional.normalize(model.text[tokens].mean(1), dim=-1)
    return Embeddings(img, txt, torch.tensor(10.0), torch.tensor(-10.0))


def tiny_vit(dim: int, *, quick: bool = False) -> nn.Module:
    """A small open_clip SigLIP: a 224-px, 2-layer ViT (16-px patches); ``quick``: a 32-px,
    1-layer CLIP (8-px patches) for the smoke run."""
    import open_clip

    side, layers, patch = (32, 1, 8) if quick else (224, 2, 16)
    siglip = {} if quick else {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return open_clip.model.CLIP(
            embed_dim=dim,
            vision_cfg={"image_size": side, "layers": layers, "width": 64, "patch_size": patch},
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                      "layers": layers},
            **siglip,
        )


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # joined DataLoader workers
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def base_loader(cfg, *, kind: str, num_workers: int, num_samples: int | None = None):
    from jeststream.adapters.webdataset import webdataset_loader

    kw = dict(tokenizer=cfg["tokenizer"], transform=cfg["transform"], num_workers=num_workers,
              seed=0, num_samples=num_samples or cfg["num_samples"])
    if kind.startswith("deferred_"):
        kw.update(deferred=True, score_resolution=int(kind.split("_")[1]))
    return webdataset_loader(cfg["urls"], cfg["b"], **kw)


def run(cfg, *, kind: str, ratio: float, num_workers: int, steps: int) -> dict:
    """CPU and wall seconds per yielded batch over one whole pass of ``steps`` yielded batches
    (the base loader is sized to exactly what the pass consumes, so that DataLoader workers
    prefetch nothing that is not used, and are joined -- their CPU time counted -- at its end)."""
    from jeststream import JESTLoader, ReferenceCache

    n = round(1 / ratio)
    b = cfg["b"]
    t0, c0 = time.perf_counter(), cpu_seconds()
    yielded = 0
    if kind == "uniform":
        steps *= n  # as many base batches as a JEST pass reads (module docstring)
        base = base_loader(cfg, kind="eager", num_workers=num_workers, num_samples=steps * b)
        for _ in base:
            yielded += 1
        del base
    else:
        base = base_loader(cfg, kind=kind, num_workers=num_workers, num_samples=steps * n * b)
        res = None if kind == "eager" else int(kind.split("_")[1])
        with JESTLoader(base, cfg["learner"], ReferenceCache(cfg["cache"]), ratio=ratio,
                        embed=free_embed, n_chunks=4, seed=0,
                        score_resolution=res if res and res < cfg["side_train"] else None,
                        materialise_workers=cfg["materialise_workers"]) as jest:
            for batch in jest:
                assert batch[0].shape == (b, 3, cfg["side_train"], cfg["side_train"])
                yielded += 1
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert yielded == steps, (kind, yielded)
    return {"cpu_s_per_batch": cpu / steps, "wall_s_per_batch": wall / steps, "n": n}


def super_batch_bytes(cfg, ratio: float, kinds: list[str]) -> dict:
    """Bytes of one super-batch as the loader holds it (tensors + deferred records)."""
    from jeststream.batch import concat_batches
    from jeststream.deferred import Deferred

    n = round(1 / ratio)
    out = {}
    for kind in kinds:
        base = base_loader(cfg, kind=kind, num_workers=0)
        sb = concat_batches([x for _, x in zip(range(n), base)])
        images, texts = sb[0], sb[1]
        total = texts.numel() * texts.element_size()
        if isinstance(images, Deferred):
            total += images.view.numel() * images.view.element_size()
            total += sum(
                len(r.data) if isinstance(r.data, bytes) else r.data.nbytes
                for r in images.records
            )
        else:
            total += images.numel() * images.element_size()
        out[kind] = total
    return out


def agreement(cfg, ratio: float, steps: int) -> dict:
    """Share of yielded examples that differ: deferred views vs eagerly prepared images scored
    at the same resolution (tiny open_clip ViT learner, the same seed and super-batches)."""
    from jeststream import JESTLoader, ReferenceCache

    out = {}
    side = cfg["side_train"]
    for criterion in ("learnability", "hard_learner"):
        for res in (side // 2, side):
            kind = f"deferred_{res}"
            picks = {}
            for k in ("eager", kind):
                base = base_loader(cfg, kind=k, num_workers=0)
                with JESTLoader(base, cfg["vit"], ReferenceCache(cfg["cache"]), ratio=ratio,
                                n_chunks=4, seed=0, criterion=criterion,
                                score_resolution=res if res < side else None) as jest:
                    picks[k] = [set(keys) for _, (_, _, keys) in zip(range(steps), jest)]
            diff = [len(a - b) / len(a) for a, b in zip(picks["eager"], picks[kind])]
            out.setdefault(criterion, {})[kind] = {
                "differ_share": float(np.mean(diff)), "steps": len(diff)
            }
    return out


def paired(runs: list[dict], units: list[dict], key: str = "cpu_s_per_batch") -> float:
    """The median of the per-repeat ratios of ``runs`` to the ``units`` run beside them."""
    return float(np.median([a[key] / u[key] for a, u in zip(runs, units)]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny images, b=8")
    p.add_argument("--image-side", type=int, default=None,
                   help="side of the stored JPEGs (default 256, as img2dataset writes them)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="yielded batches per run")
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    p.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.1])
    p.add_argument("--materialise-workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every pipeline, interleaved (uniform, eager, deferred, ...; "
                        "again): each figure is the median, the runs are kept beside it; "
                        "each multiple the median of the per-repeat ratios")
    p.add_argument("--no-agreement", action="store_true",
                   help="skip the selection-agreement measurement (the slow part)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    import open_clip

    side, train = (64, 32) if a.quick else (256, 224)
    side = a.image_side or side
    if side < train:
        p.error(f"--image-side {side} is below the training size {train}")
    b = a.batch_size or (8 if a.quick else 64)
    steps = a.steps or (2 if a.quick else 3)
    max_n = max(round(1 / r) for r in a.ratios)
    per_worker = steps * max_n * b + b
    n_images = per_worker * max(1, max(a.workers))
    tmp = tempfile.TemporaryDirectory(prefix="jest-input-")
    root = Path(tmp.name)
    urls, (sizes, keys) = write_shards(root, n_images, per_shard=per_worker, side=side)
    dim = 32
    write_reference_cache(root / "cache", keys, dim)
    cfg = {
        "urls": urls, "b": b, "cache": str(root / "cache"), "side_train": train,
        "tokenizer": open_clip.get_tokenizer("ViT-B-32"),
        "transform": open_clip.transform.image_transform(train, is_train=True),
        "learner": FreeLearner(dim), "num_samples": n_images,
        "materialise_workers": a.materialise_workers,
    }
    if a.quick:
        cfg["tokenizer"] = lambda texts: torch.zeros(len(texts), 77, dtype=torch.long)
    result = {
        "code": code_state(),
        "config": {"b": b, "steps": steps, "image_side": side, "train_side": train,
                   "jpeg_kb": {"mean": float(np.mean(sizes)) / 1e3,
                               "min": min(sizes) / 1e3, "max": max(sizes) / 1e3},
                   "torch_threads": 1, "materialise_workers": a.materialise_workers,
                   "workers": a.workers, "ratios": a.ratios, "repeats": a.repeats},
        "runs": {},
    }
    low, full = f"deferred_{train // 2}", f"deferred_{train}"
    kinds = ["uniform", "eager", low, full]
    for kind in kinds:  # unmeasured: first-call costs (lazy imports, the tokenizer's word
        # cache, PIL's plugins) would otherwise land on whichever pipeline runs first
        run(cfg, kind=kind, ratio=a.ratios[0], num_workers=0, steps=1)
    for w in a.workers:
        for ratio in a.ratios:
            reps = {kind: [] for kind in kinds}
            for _ in range(max(1, a.repeats)):  # interleaved: load drifts hit every pipeline
                for kind in kinds:
                    reps[kind].append(run(cfg, kind=kind, ratio=ratio, num_workers=w, steps=steps))
            row = {}
            for kind, rs in reps.items():
                row[kind] = {
                    "cpu_s_per_batch": float(np.median([r["cpu_s_per_batch"] for r in rs])),
                    "wall_s_per_batch": float(np.median([r["wall_s_per_batch"] for r in rs])),
                    "n": rs[0]["n"],
                    "cpu_s_per_batch_runs": [r["cpu_s_per_batch"] for r in rs],
                }
            for kind, r in row.items():
                r["x_uniform"] = paired(reps[kind], reps["uniform"])  # median of per-repeat ratios
                r["x_eager"] = paired(reps[kind], reps["eager"])
                r["wall_x_eager"] = paired(reps[kind], reps["eager"], "wall_s_per_batch")
                r["x_uniform_of_medians"] = r["cpu_s_per_batch"] / row["uniform"]["cpu_s_per_batch"]
                r["x_eager_of_medians"] = r["cpu_s_per_batch"] / row["eager"]["cpu_s_per_batch"]
            result["runs"][f"workers={w} ratio={ratio}"] = row
            print(json.dumps({f"workers={w} ratio={ratio}": {
                k: round(v["x_eager"], 3) for k, v in row.items()}}), file=sys.stderr)
    result["super_batch_bytes"] = {str(r): super_batch_bytes(cfg, r, kinds[1:]) for r in a.ratios}
    cfg["vit"] = tiny_vit(dim, quick=a.quick)
    if not a.no_agreement:
        result["selection_agreement"] = {
            str(r): agreement(cfg, r, steps=max(2, 2 * steps)) for r in a.ratios
        }
    targets = {}
    for key, row in result["runs"].items():
        ratio = float(key.split("ratio=")[1])
        d112, d224 = row[low], row[full]
        t = {"deferred_224_le_eager": d224["x_eager"] <= 1.0}
        if math.isclose(ratio, 0.2):
            t["deferred_112_le_0.5_eager"] = d112["x_eager"] <= 0.5
            t["deferred_112_le_2.5_uniform"] = d112["x_uniform"] <= 2.5
        if math.isclose(ratio, 0.1):
            t["deferred_112_le_0.4_eager"] = d112["x_eager"] <= 0.4
        targets[key] = t
    result["targets_met"] = targets
    print(json.dumps(result, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
