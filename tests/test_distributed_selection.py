"""global_joint_sample across real processes (torch.multiprocessing spawn, gloo on CPU): on
every rank it equals the single-process blocked_joint_sample of the same inputs, for 2 and 3
ranks, sigmoid and softmax, every criterion, uneven super-batches and quotas; bad input on one
rank makes every rank raise, naming it."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import init_gloo, run_ranks

from jeststream.losses import CRITERIA, Embeddings


def embeddings(n: int, d: int, seed: int, dtype=torch.float64, bias: float | None = -4.0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    b = None if bias is None else torch.tensor(bias, dtype=dtype)
    return Embeddings(image, text, torch.tensor(10.0, dtype=dtype), b)


def blocks_of(sizes: list[int], d: int, seed: int, dtype) -> tuple[list, list]:
    """The same global super-batch on every rank, split into per-rank blocks."""
    out = []
    for s in (seed, seed + 1):
        e = embeddings(sum(sizes), d, s, dtype)
        at, parts = 0, []
        for n in sizes:
            parts.append(e._replace(image=e.image[at : at + n], text=e.text[at : at + n]))
            at += n
        out.append(parts)
    return out[0], out[1]


def make_cases(world: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    cases = []
    for loss, criterion in [(lo, c) for lo in ("sigmoid", "softmax") for c in CRITERIA]:
        for _ in range(3):
            sizes = [rnd.randint(1, 40) for _ in range(world)]
            ks = [rnd.randint(1, n) for n in sizes]
            cases.append(dict(
                sizes=sizes, ks=ks, n_chunks=rnd.randint(1, min(min(ks), 16)), loss=loss,
                criterion=criterion, temperature=rnd.choice([0.0, 0.5, 1.0]),
                dtype=rnd.choice(["float32", "float64"]), d=rnd.choice([8, 16]),
                seed=rnd.randint(0, 2**30),
            ))
    # the loader's sizes: float32, b = B/5, 16 chunks, uneven B_r
    big = [300 + 20 * r for r in range(world)]
    cases.append(dict(sizes=big, ks=[n // 5 for n in big], n_chunks=16, loss="sigmoid",
                      criterion="learnability", temperature=1.0, dtype="float32", d=32, seed=7))
    cases.append(dict(sizes=big, ks=[n // 5 for n in big], n_chunks=16, loss="softmax",
                      criterion="learnability", temperature=1.0, dtype="float32", d=32, seed=8))
    return cases


def _equality_rank(rank: int, world: int, init_file: str, cases: list[dict], out: str) -> None:
    from jeststream.distributed import global_joint_sample
    from jeststream.selection import blocked_joint_sample, chunk_sizes

    init_gloo(rank, world, init_file)
    report: dict = {"equal": [], "gathers_ok": [], "errors": {}}
    try:
        for case in cases:
            dtype = getattr(torch, case["dtype"])
            learners, references = blocks_of(case["sizes"], case["d"], case["seed"], dtype)
            kw = dict(loss=case["loss"], criterion=case["criterion"],
                      n_chunks=case["n_chunks"], temperature=case["temperature"])
            gens = [torch.Generator().manual_seed(case["seed"] + r) for r in range(world)]
            want = blocked_joint_sample(learners, references, case["ks"], generators=gens, **kw)
            stats: dict = {}
            got = global_joint_sample(
                learners[rank], references[rank], case["ks"][rank],
                generator=torch.Generator().manual_seed(case["seed"] + rank), stats=stats, **kw,
            )
            report["equal"].append(torch.equal(got, want[rank]))
            n_models = 1 if case["criterion"] != "learnability" else 2
            width = 2 * case["d"] * n_models
            sizes = [chunk_sizes(k, case["n_chunks"]) for k in case["ks"]]
            expect = sum(max(s[j] for s in sizes) for j in range(case["n_chunks"] - 1))
            report["gathers_ok"].append(
                stats.get("gathers", 0) == case["n_chunks"] - 1
                and stats.get("payload_bytes", 0) == expect * width * dtype.itemsize
            )
        # hard_learner without any reference
        learners, _ = blocks_of([5] * world, 8, 3, torch.float64)
        want = blocked_joint_sample(learners, None, [2] * world, criterion="hard_learner",
                                    n_chunks=2,
                                    generators=[torch.Generator() for _ in range(world)])
        got = global_joint_sample(learners[rank], None, 2, criterion="hard_learner", n_chunks=2,
                                  generator=torch.Generator())
        report["equal"].append(torch.equal(got, want[rank]))
        # bad input on the last rank: every rank raises, naming it
        learners, references = blocks_of([6] * world, 8, 4, torch.float64)
        k = 9 if rank == world - 1 else 2
        try:
            global_joint_sample(learners[rank], references[rank], k, n_chunks=2)
        except ValueError as exc:
            report["errors"]["bad_k"] = str(exc)
        # settings that differ across ranks
        try:
            global_joint_sample(learners[rank], references[rank], 2, n_chunks=2,
                                temperature=1.0 + (rank == 0))
        except ValueError as exc:
            report["errors"]["temperature"] = str(exc)
        # and the group still works afterwards
        gens = [torch.Generator().manual_seed(r) for r in range(world)]
        want = blocked_joint_sample(learners, references, [3] * world, n_chunks=3,
                                    generators=gens)
        got = global_joint_sample(learners[rank], references[rank], 3, n_chunks=3,
                                  generator=torch.Generator().manual_seed(rank))
        report["equal"].append(torch.equal(got, want[rank]))
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


def _check_equality(tmp_path, world: int) -> None:
    cases = make_cases(world, seed=world)
    codes = run_ranks(_equality_rank, world, str(tmp_path / "init"), cases, str(tmp_path))
    assert codes == [0] * world
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(report["equal"]) == len(cases) + 2
        bad = [c for c, ok in zip(cases, report["equal"]) if not ok]
        assert all(report["equal"]), f"rank {rank} differs from blocked_joint_sample: {bad[:3]}"
        assert all(report["gathers_ok"]), "all-gathers or their sizes are not as documented"
        err = report["errors"]
        last = world - 1
        if rank == last:
            assert "k=9" in err["bad_k"]
        else:
            assert f"rank {last} (invalid input" in err["bad_k"] and "k=9" in err["bad_k"]
        assert "same temperature" in err["temperature"]


def test_global_equals_blocked_two_ranks(tmp_path):
    _check_equality(tmp_path, 2)


def test_global_equals_blocked_three_ranks(tmp_path):
    _check_equality(tmp_path, 3)


@pytest.mark.slow
def test_benchmark_quick_smoke():
    """benchmarks/distributed.py --quick runs its 2 ranks and prints sane JSON (no timing
    assertions: speed is the benchmark's business)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--rounds", "1"],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)["results"]
    assert row["W"] == 2 and row["all_gathers_per_super_batch"] == 16
    assert row["payload_bytes_as_documented"]
    assert row["bytes_sent_per_rank"] == row["payload_bytes_per_rank"] + 1024
    assert all(v > 0 for v in row["best_s"].values())
