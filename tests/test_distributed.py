"""JESTLoader under real torch.distributed (gloo, 2 CPU processes), as torchrun would run it:
webdataset shards split by node, a DDP-wrapped learner trained by the consumer while the
producer scores with the unwrapped snapshot -- no collectives inside the loader."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_adapters_webdataset import CTX, N_SHARDS, PER_SHARD, B, tokenize, write_shards

WORLD = 2


def _rank_main(
    rank: int, init_file: str, urls: list[str], out_dir: str, num_samples: int | None = None
) -> None:
    from conftest import make_tiny_clip
    from open_clip.loss import SigLipLoss

    from jeststream.adapters.webdataset import webdataset_loader
    from jeststream.loader import JESTLoader

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        learner = make_tiny_clip(seed=0, siglip=True)  # same init on every rank, as DDP expects
        ddp = torch.nn.parallel.DistributedDataParallel(learner)
        reference = make_tiny_clip(seed=1, siglip=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        loss_fn = SigLipLoss()  # world_size 1: the consumer's loss; DDP all-reduces the grads
        # split_by_node reads the rank
        base = webdataset_loader(urls, B, tokenizer=tokenize, num_samples=num_samples)
        seen, losses = [], []
        with JESTLoader(base, ddp, reference, ratio=0.5, n_chunks=2, loss="sigmoid") as jest:
            for images, texts, keys in jest:
                assert images.shape[0] == B and texts.shape == (B, CTX)
                image_features, text_features, logit_scale, logit_bias = ddp(images, texts)
                loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
                opt.zero_grad()
                loss.backward()  # a gloo all-reduce per step: a collective in the loader would hang
                opt.step()
                seen.extend(keys)
                losses.append(float(loss))
        # DDP kept the replicas identical: the loader never touched the live weights
        flat = torch.cat([p.detach().reshape(-1) for p in learner.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        same = all(torch.equal(gathered[0], g) for g in gathered)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"keys": seen, "losses": losses, "replicas_equal": same}, f)
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_split_by_node_with_ddp_learner(tmp_path):
    urls, keys_by_shard = write_shards(tmp_path / "shards")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.start_processes(
        _rank_main, args=(str(tmp_path / "init"), urls, str(out_dir)), nprocs=WORLD,
        join=True, start_method="spawn",
    )
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    per_rank = [set(r["keys"]) for r in results]
    for r, res in enumerate(results):
        assert len(res["keys"]) == len(per_rank[r]), "a key was yielded twice on one rank"
        # each rank reads its own node's shards (webdataset's split_by_node: shard i -> rank i % 2)
        own = {k for i, u in enumerate(urls) if i % WORLD == r for k in keys_by_shard[u]}
        assert per_rank[r] <= own
        # 2 shards x 12 samples per rank, super-batches of 2 x 4, one batch of 4 kept from each
        assert len(res["keys"]) == (N_SHARDS // WORLD) * PER_SHARD // 2
        assert all(torch.isfinite(torch.tensor(res["losses"])))
        assert res["replicas_equal"]
    assert not per_rank[0] & per_rank[1]


def test_uneven_shards_with_num_samples_end_the_epoch_together(tmp_path):
    """5 shards over 2 ranks (36 vs 24 examples): one pass would give rank 0 a 5th DDP step that
    rank 1 never takes (a hang in the all-reduce); num_samples= makes both take the same."""
    urls, keys_by_shard = write_shards(tmp_path / "shards", n_shards=5)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    num_samples = 80  # 10 batches of 4 per rank, 5 super-batches of 2 x 4
    mp.start_processes(
        _rank_main, args=(str(tmp_path / "init"), urls, str(out_dir), num_samples),
        nprocs=WORLD, join=True, start_method="spawn",
    )
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert len(res["losses"]) == num_samples // (2 * B * WORLD)  # same steps on every rank
        own = {k for i, u in enumerate(urls) if i % WORLD == r for k in keys_by_shard[u]}
        assert set(res["keys"]) <= own
        assert res["replicas_equal"]
