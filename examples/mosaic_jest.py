"""JEST over MosaicML streaming (MDS) shards, with an exact mid-epoch checkpoint/resume.

    python examples/mosaic_jest.py                       # writes demo MDS shards to a temp dir
    python examples/mosaic_jest.py --shards /data/mds    # or --remote s3://bucket/mds --shards /cache

Swap in real models for real runs (learner: the model you train; reference: a model trained on
curated data).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from streaming import MDSWriter

from jeststream.adapters.streaming import streaming_loader
from jeststream.loader import JESTLoader

CONTEXT = 16


def write_demo_mds(out: Path, n: int = 256) -> str:
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    rng = np.random.default_rng(0)
    columns = {"key": "str", "image": "jpeg", "text": "str"}
    with MDSWriter(out=str(out), columns=columns, size_limit=1 << 16) as writer:
        for i in range(n):
            name = list(colours)[i % 3]
            arr = np.clip(rng.normal(colours[name], 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            caption = f"a {name} square" if rng.random() > 0.3 else "unrelated noisy text"
            writer.write({"key": f"demo{i:06d}", "image": Image.fromarray(arr), "text": caption})
    return str(out)


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
    p.add_argument("--shards", help="local MDS directory (cache dir with --remote); default: demo")
    p.add_argument("--remote", help="remote MDS location (s3://, gs://, ...)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)

    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    with tempfile.TemporaryDirectory() as tmp:
        local = args.shards or write_demo_mds(Path(tmp) / "mds")
        learner, reference = tiny_clip(0), tiny_clip(1)
        opt = torch.optim.AdamW(learner.parameters(), lr=1e-3)
        loss_fn = ClipLoss()

        def make_loader() -> JESTLoader:
            base = streaming_loader(
                local,
                args.batch_size,
                remote=args.remote,
                tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT),
                transform=open_clip.transform.image_transform(32, is_train=False),
                num_workers=args.workers,
                shuffle=True,
            )
            # loss="softmax": the step below trains with open_clip's ClipLoss (CLIP, not SigLIP)
            return JESTLoader(base, learner, reference, ratio=args.ratio, loss="softmax",
                              n_chunks=min(4, args.batch_size))

        def train(batches) -> int:
            steps = 0
            for batch in batches:
                img = learner.encode_image(batch["image"], normalize=True)
                txt = learner.encode_text(batch["text"], normalize=True)
                loss = loss_fn(img, txt, learner.logit_scale.exp())
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
            return steps

        jest = make_loader()
        it = iter(jest)
        done = train(next(it) for _ in range(2))
        ckpt = {"model": learner.state_dict(), "opt": opt.state_dict(), "data": jest.state_dict()}
        print(f"checkpoint after {done} steps: data state {ckpt['data']['base']}")
        jest.close()
        # drop the old StreamingDataset before building the new one: streaming refuses a
        # second dataset on the same local directory while the first is alive
        del it, jest
        gc.collect()

        # ... the job restarts: rebuild everything, then restore the checkpoint
        jest = make_loader()
        learner.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        jest.load_state_dict(ckpt["data"])
        with jest:
            rest = train(jest)
        print(f"resumed and finished the epoch: {done} + {rest} steps of {args.batch_size}, "
              f"stats {jest.stats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
