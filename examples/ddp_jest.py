"""JEST under DDP with global selection: every rank selects as from one global super-batch.

    torchrun --nproc_per_node 2 examples/ddp_jest.py                 # CPU, gloo, demo shards
    torchrun --nproc_per_node 8 examples/ddp_jest.py --shards "/data/shard-{0000..0999}.tar"
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/ddp_jest.py --shards ...                              # several nodes

Each rank reads its own shards (webdataset ``split_by_node``), scores its super-batch with its
learner snapshot and the reference, and yields b of its *own* examples; the ranks all-gather
only the embeddings of each chunk they draw, so the pairwise terms between ranks count, as in
the training loss when SigLIP/CLIP gathers features across ranks. The loader's collectives run
on a process group of its own, never mixed with DDP's all-reduces; when any rank's shards run
out, every rank ends the epoch together (so DDP's all-reduce never waits for a missing step).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import webdataset as wds
from open_clip.loss import SigLipLoss
from PIL import Image

from jeststream.adapters.webdataset import webdataset_loader
from jeststream.loader import JESTLoader

CONTEXT = 16


def write_demo_shards(root: Path, n_shards: int = 4, per_shard: int = 64) -> str:
    """Coloured-square images with captions naming their colour (30 % noisy captions)."""
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


def tiny_siglip(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2,
                  "layers": 2},
        init_logit_scale=np.log(10.0),
        init_logit_bias=-10.0,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", help="webdataset shard URLs (brace pattern); default: demo data")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size b per rank")
    p.add_argument("--ratio", type=float, default=0.25, help="filtering ratio b/B")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--backend", default=None, help="default: nccl on GPUs, else gloo")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # a tiny model: threads would only spin against the other rank
    cuda = torch.cuda.is_available()
    dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    tmp = None
    try:
        shards = args.shards
        if shards is None:  # rank 0 writes the demo shards; everyone reads the same files
            tmp = tempfile.TemporaryDirectory() if rank == 0 else None
            box = [write_demo_shards(Path(tmp.name)) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            shards = box[0]
        base = webdataset_loader(  # shards split by node: each rank reads its own
            shards,
            args.batch_size,
            tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT),
            transform=open_clip.transform.image_transform(32, is_train=False),
            shuffle_shards=True,
        )
        learner = tiny_siglip(0).to(device)  # the same initial weights on every rank
        ddp = torch.nn.parallel.DistributedDataParallel(learner)
        reference = tiny_siglip(1).to(device)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        loss_fn = SigLipLoss(rank=rank, world_size=world)  # negatives from every rank
        # distributed="auto" is "global" under torchrun with more than one rank
        with JESTLoader(base, ddp, reference, ratio=args.ratio, loss="sigmoid",
                        n_chunks=min(4, args.batch_size)) as jest:
            for epoch in range(args.epochs):
                jest.set_epoch(epoch)
                for images, texts, _keys in jest:
                    info = jest.last_info  # what happened to this batch
                    image_features, text_features, scale, bias = ddp(images, texts)
                    loss = loss_fn(image_features, text_features, scale, bias)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if rank == 0:
                        print(f"step {info.step}: loss {loss.item():.3f}, selected "
                              f"{info.selected_mean:.3f} / super-batch "
                              f"{info.super_batch_mean:.3f}", flush=True)
                stats = jest.stats
                print(f"rank {rank} epoch {epoch} done: {stats['batches']} batches, "
                      f"selection {stats['distributed']['mode'] if 'distributed' in stats else '-'}"
                      f" over {world} ranks, unread at the end "
                      f"{stats.get('distributed', {}).get('unread_examples')}", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
