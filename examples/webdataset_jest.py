"""JEST over webdataset tar shards: train a (tiny) open_clip model on JEST-selected batches.

    python examples/webdataset_jest.py                      # writes demo shards to a temp dir
    python examples/webdataset_jest.py --shards "/data/shard-{0000..0099}.tar" --workers 8

Swap in real models for real runs: the learner is the model you train, the reference a model
trained on curated data (JEST paper, sec. 3), e.g. loaded from an open_clip checkpoint.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from open_clip.loss import ClipLoss
from PIL import Image

from jeststream.adapters.webdataset import webdataset_loader
from jeststream.loader import JESTLoader
from jeststream.selection_log import inspect_main

CONTEXT = 16


def write_demo_shards(root: Path, n_shards: int = 4, per_shard: int = 64) -> str:
    """Coloured-square images with captions naming their colour."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    rng = np.random.default_rng(0)
    pattern = str(root / "demo-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(n_shards * per_shard):
            name = list(colours)[i % 3]
            arr = np.clip(rng.normal(colours[name], 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG")
            caption = f"a {name} square" if rng.random() > 0.3 else "unrelated noisy text"
            sink.write({"__key__": f"demo{i:06d}", "jpg": buf.getvalue(), "txt": caption})
    return str(root / f"demo-{{0000..{n_shards - 1:04d}}}.tar")


def tiny_clip(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2,
                  "layers": 2},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", help="webdataset shard URLs (brace pattern); default: demo data")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size b")
    p.add_argument("--ratio", type=float, default=0.25, help="filtering ratio b/B")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--log", help="selection log path (default: temp dir)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or write_demo_shards(Path(tmp))
        base = webdataset_loader(
            shards,
            args.batch_size,
            tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT),
            transform=open_clip.transform.image_transform(32, is_train=False),
            num_workers=args.workers,
            shuffle_shards=True,
        )
        learner, reference = tiny_clip(0), tiny_clip(1)
        opt = torch.optim.AdamW(learner.parameters(), lr=1e-3)
        loss_fn = ClipLoss()
        log = args.log or str(Path(tmp) / "selection.parquet")
        # loss="softmax": the step below trains with open_clip's ClipLoss (CLIP, not SigLIP)
        jest = JESTLoader(base, learner, reference, ratio=args.ratio, loss="softmax",
                          n_chunks=min(4, args.batch_size), selection_log=log)
        with jest:
            for epoch in range(args.epochs):
                jest.set_epoch(epoch)
                for images, texts, _keys in jest:
                    info = jest.last_info  # what happened to this batch
                    img = learner.encode_image(images, normalize=True)
                    txt = learner.encode_text(texts, normalize=True)
                    loss = loss_fn(img, txt, learner.logit_scale.exp())
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if info.step % 10 == 0:
                        print(f"step {info.step}: loss {loss.item():.3f}, scores selected "
                              f"{info.selected_mean:.3f} / super-batch {info.super_batch_mean:.3f}")
                print(f"epoch {epoch} done: {jest.stats}")
        return inspect_main([log, "--top", "3"])


if __name__ == "__main__":
    raise SystemExit(main())
