"""Benchmark global-context selection across ranks against per-rank (local) selection.

Prints one JSON object. W processes (torch.multiprocessing spawn, gloo on CPU, ``--threads``
intra-op threads each) hold a super-batch of B_r examples each (learner and reference
embeddings, d wide, float32) and select k_r = B_r/5 in n_chunks = 16 chunks (sigmoid,
learnability). Per super-batch, measured in one run, interleaved round by round so that the
load of a shared machine hits them alike:

  (a) local: ``joint_sample_from_embeddings`` on the rank's own super-batch (``distributed=
      "local"``);
  (b) global: ``jeststream.distributed.global_joint_sample`` (one record all-gather, then
      n_chunks − 1 all-gathers of each rank's newest chunk);
  (c) global maths without communication: the same chunk loop and block shapes, the other
      ranks' rows stood in by copies of the own ones (an in-process exchange) -- the compute
      global selection cannot avoid, since every candidate is scored against W·c new members
      per chunk instead of c.

A round's time is the slowest rank's (every rank waits for it). Reported: the best round and
the median, the ratios global/local (target <= 1.5) and global/compute-only (what the
collectives add), and the bytes each rank sends per super-batch: its payload (Σ_j c_max,j rows
of 2·(d_learner + d_reference) float32 values) to each of the W − 1 others, plus its 1 KiB
record to each.

    python benchmarks/distributed.py                  # B_r = 4096, d = 512, W = 2
    python benchmarks/distributed.py --quick          # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# the joint-sampler benchmark's inputs (benchmarks/selection.py, beside this script on sys.path)
from selection import make_inputs

from jeststream.distributed import global_joint_sample
from jeststream.selection import (
    chunk_loop,
    chunk_sizes,
    embedding_block,
    joint_sample_from_embeddings,
)

METHODS = ("local", "global", "compute_only")
_RECORD_BYTES = 1024


def compute_only(learner, reference, k, *, loss, n_chunks, generator, world, rank):
    block = embedding_block(learner, reference, k, loss=loss, n_chunks=n_chunks,
                            generator=generator)

    def exchange(payloads):
        (own,) = payloads
        return [own if r == rank else own.clone() for r in range(world)]

    return chunk_loop([block], [rank], n_chunks, exchange)[0]


def _rank(rank: int, world: int, init_file: str, args: dict, out_file: str) -> None:
    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    n, d, k, n_chunks, loss = args["B"], args["d"], args["k"], args["n_chunks"], args["loss"]
    learner, reference = make_inputs(n, d, seed=args["seed"] + rank)
    times = {m: [] for m in METHODS}
    stats: dict = {}
    with torch.inference_mode():
        for r in range(args["rounds"] + 1):  # round 0 warms up
            for method in METHODS:
                g = torch.Generator().manual_seed(1000 * r + rank)
                dist.barrier()
                t0 = time.perf_counter()
                if method == "local":
                    joint_sample_from_embeddings(learner, reference, k, loss=loss,
                                                 n_chunks=n_chunks, generator=g)
                elif method == "global":
                    s = {} if r == 0 else None
                    global_joint_sample(learner, reference, k, loss=loss, n_chunks=n_chunks,
                                        generator=g, stats=s)
                    if s is not None:
                        stats = s
                else:
                    compute_only(learner, reference, k, loss=loss, n_chunks=n_chunks,
                                 generator=g, world=world, rank=rank)
                elapsed = time.perf_counter() - t0
                if r:
                    times[method].append(elapsed)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"times": times, "stats": stats})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def run(world: int, args: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "out.json")
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "init"), args, out_file),
                           nprocs=world, join=True, start_method="spawn")
        with open(out_file) as f:
            per_rank = json.load(f)
    rounds = args["rounds"]
    # a round takes as long as its slowest rank
    slowest = {m: [max(pr["times"][m][i] for pr in per_rank) for i in range(rounds)]
               for m in METHODS}
    best = {m: min(v) for m, v in slowest.items()}
    median = {m: statistics.median(v) for m, v in slowest.items()}
    sizes = chunk_sizes(args["k"], args["n_chunks"])
    width = 2 * 2 * args["d"]  # image and text, learner and reference
    payload = per_rank[0]["stats"].get("payload_bytes", 0)
    expect = sum(sizes[:-1]) * width * 4  # equal quotas: c_max = c
    return {
        "W": world,
        "B_r": args["B"],
        "k_r": args["k"],
        "d": args["d"],
        "n_chunks": args["n_chunks"],
        "loss": args["loss"],
        "threads_per_rank": args["threads"],
        "rounds": rounds,
        "best_s": best,
        "median_s": median,
        "global_over_local_best": best["global"] / best["local"],
        "global_over_local_median": median["global"] / median["local"],
        "global_over_compute_only_best": best["global"] / best["compute_only"],
        "all_gathers_per_super_batch": 1 + per_rank[0]["stats"].get("gathers", 0),
        "payload_bytes_per_rank": payload,
        "payload_bytes_as_documented": payload == expect,
        "bytes_sent_per_rank": (world - 1) * (payload + _RECORD_BYTES),
        "target_global_over_local": 1.5,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument("--world", type=int, default=2, help="ranks W")
    p.add_argument("--B", type=int, default=None, help="super-batch per rank (default 4096)")
    p.add_argument("--d", type=int, default=None, help="embedding width (default 512)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--n-chunks", type=int, default=16)
    p.add_argument("--loss", default="sigmoid", choices=["sigmoid", "softmax"])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = args.B or (256 if args.quick else 4096)
    d = args.d or (32 if args.quick else 512)
    settings = {
        "B": n, "d": d, "k": max(args.n_chunks, round(n * args.ratio)),
        "n_chunks": args.n_chunks, "loss": args.loss,
        "rounds": args.rounds or (2 if args.quick else 7), "threads": args.threads,
        "seed": args.seed,
    }
    report = {
        "benchmark": "distributed",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "backend": "gloo",
        "results": [run(args.world, settings)],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
