"""Benchmark the joint sampler: ours vs the unavoidable work vs the paper's naive pseudocode.

Prints one JSON object. For each super-batch size B (k = 0.2·B, d = 512, n_chunks = 16, float32
on CPU), measured in one run:

  (a) ``joint_sample_from_embeddings`` (learner and reference, sigmoid loss, learnability);
  (b) the lower bound: the matmuls and softplus of exactly the score blocks the sampler needs —
      for both models, the rows and the columns of the k − c_last examples whose chunks feed a
      later chunk (2 models × 2 directions × B×k×d), plus the diagonal — timed alone;
  (c) naive: Algorithm 1 of the paper as printed — two full B×B loss matrices and, per chunk, a
      masked sum over the whole score matrix (skipped above --naive-max, where it needs tens
      of GiB).

Memory: each method runs once in a fresh subprocess, which reports its peak resident memory
above the inputs (the kernel's VmHWM, reset just before the call where /proc allows, else
ru_maxrss minus the RSS before the call). Time: one more subprocess runs the methods
interleaved, round by round, so that the load of a shared machine hits them alike; the best
round counts, as wall time and as process CPU time. ``--quick`` runs everything in-process.
The machines are shared and noisy: compare the ratios, which come from the same run.

    python benchmarks/selection.py            # B = 4096, 16384 (+ 65536 for (a) and (b))
    python benchmarks/selection.py --quick    # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from jeststream.losses import Embeddings, sigmoid_pair_losses
from jeststream.selection import chunk_sizes, gumbel_top_k, joint_sample_from_embeddings

METHODS = ("embeddings", "lower_bound", "naive")


def make_inputs(n: int, d: int, seed: int) -> tuple[Embeddings, Embeddings]:
    """Learner and reference embeddings, built in place so that no temporary spikes the RSS."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        image = torch.empty(n, d).normal_(generator=g)
        image.div_(image.norm(dim=1, keepdim=True))
        text = torch.empty(n, d).normal_(generator=g).mul_(0.8).add_(image)
        text.div_(text.norm(dim=1, keepdim=True))
        out.append(Embeddings(image, text, torch.tensor(10.0), torch.tensor(-10.0)))
    return out[0], out[1]


def run_embeddings(learner, reference, k, n_chunks, seed):
    g = torch.Generator().manual_seed(seed)
    return joint_sample_from_embeddings(learner, reference, k, n_chunks=n_chunks, generator=g)


def run_lower_bound(learner, reference, k, n_chunks, seed):
    """Exactly the blocks the sampler reads — per chunk (the next chunk depends on them, so no
    sampler can batch across chunks), one matmul per model per direction, scale folded into the
    embeddings once, bias folded into the GEMM (addmm), softplus in place — plus the diagonal.
    Which rows are chosen does not change the cost, so they are a random permutation's."""
    n = learner.image.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = chunk_sizes(k, n_chunks)[:-1]  # the last chunk's blocks are never needed
    scaled = [(e.image * e.logit_scale, e.text, e.logit_bias) for e in (learner, reference)]
    for x, y, bias in scaled:
        torch._C._nn.softplus((x * y).sum(1).add_(bias).neg_(), 1, 20)
    start = 0
    for c in sizes:
        piece = order[start : start + c]
        start += c
        for x, y, bias in scaled:
            rows = torch.addmm(bias, x.index_select(0, piece), y.T)
            cols = torch.addmm(bias, x, y.index_select(0, piece).T)
            for block in (rows, cols):
                torch._C._nn.softplus(block, 1, 20, out=block)
    return order[:start]


def run_naive(learner, reference, k, n_chunks, seed):
    """The paper's pseudocode: full loss matrices, a masked sum over B×B per chunk."""
    g = torch.Generator().manual_seed(seed)
    scores = sigmoid_pair_losses(learner)  # learner_loss
    scores -= sigmoid_pair_losses(reference)  # - ref_loss
    diag = scores.diagonal().clone()
    is_sampled = torch.zeros(scores.shape[0])
    drawn = []
    for j, c in enumerate(chunk_sizes(k, n_chunks)):
        logits = diag
        if j:
            logits = (
                diag + (scores * is_sampled[:, None]).sum(0) + (scores * is_sampled[None, :]).sum(1)
            )
        logits = torch.where(is_sampled.bool(), -math.inf, logits)
        new = gumbel_top_k(logits, c, 1.0, g)
        is_sampled[new] = 1.0
        drawn.append(new)
    return torch.cat(drawn)


RUNNERS = {"embeddings": run_embeddings, "lower_bound": run_lower_bound, "naive": run_naive}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _warm_up(runner, learner, reference, n_chunks, seed) -> None:
    """Kernels, thread pools and allocator paths on a small slice, not the big buffers."""
    m = min(learner.image.shape[0], 256)
    small = [e._replace(image=e.image[:m], text=e.text[:m]) for e in (learner, reference)]
    runner(*small, max(n_chunks, m // 5), n_chunks, seed)


def _timed(runner, *args) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = runner(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def measure_memory(method: str, n: int, d: int, k: int, n_chunks: int, seed: int) -> dict:
    """One call of ``method``: its peak RSS above the inputs (and its time, as one more sample)."""
    runner = RUNNERS[method]
    learner, reference = make_inputs(n, d, seed)
    _warm_up(runner, learner, reference, n_chunks, seed)
    before = _rss_bytes()
    use_hwm = _reset_hwm()
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wall, cpu, out = _timed(runner, learner, reference, k, n_chunks, seed)
    if use_hwm:
        peak = _hwm_bytes() - before
    else:  # ru_maxrss cannot be reset: only growth beyond the earlier high-water mark counts
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(before, ru_before)
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "peak_mib": max(peak, 0) / 2**20,
        "memory_probe": "VmHWM" if use_hwm else "ru_maxrss",
        "indices_head": out[:8].tolist(),
    }


def measure_times(
    methods: list[str], n: int, d: int, k: int, n_chunks: int, rounds: int, seed: int
) -> dict:
    """Wall and process-CPU time of each method, interleaved round by round so that the load of
    a shared machine hits all of them alike; the best round of each counts."""
    learner, reference = make_inputs(n, d, seed)
    for method in methods:
        _warm_up(RUNNERS[method], learner, reference, n_chunks, seed)
    out = {m: {"wall": [], "cpu": []} for m in methods}
    for _ in range(rounds):
        for method in methods:
            wall, cpu, _ = _timed(RUNNERS[method], learner, reference, k, n_chunks, seed)
            out[method]["wall"].append(wall)
            out[method]["cpu"].append(cpu)
    return out


def in_subprocess(*args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr else [proc.returncode]
        raise RuntimeError(f"benchmark worker {args} failed: {tail}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, in-process: a smoke test")
    p.add_argument("--sizes", type=int, nargs="+", help="super-batch sizes B")
    p.add_argument(
        "--embeddings-only",
        type=int,
        nargs="*",
        default=None,
        help="extra sizes for (a) and (b) only (default 65536)",
    )
    p.add_argument("--d", type=int, default=None, help="embedding width (default 512)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--n-chunks", type=int, default=16)
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    p.add_argument("--naive-max", type=int, default=16384, help="largest B for the naive run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        if kind == "memory":
            method, *nums = rest
            print(json.dumps(measure_memory(method, *map(int, nums))))
        else:
            methods, *nums = rest
            print(json.dumps(measure_times(methods.split(","), *map(int, nums))))
        return 0

    if args.quick:
        sizes, extra, d = args.sizes or [256, 512], args.embeddings_only or [], args.d or 64
    else:
        sizes = args.sizes or [4096, 16384]
        extra = [65536] if args.embeddings_only is None else args.embeddings_only
        d = args.d or 512
    rows = []
    for n in sizes + extra:
        k = max(args.n_chunks, round(args.ratio * n))
        rounds = args.rounds or (1 if args.quick else 3 if n <= 4096 else 2 if n <= 16384 else 1)
        methods = ["embeddings", "lower_bound"]
        if n in sizes and n <= args.naive_max:
            methods.append("naive")
        row = {"B": n, "k": k, "d": d, "n_chunks": args.n_chunks, "rounds": rounds}
        common = (n, d, k, args.n_chunks)
        if args.quick:
            memory = {m: measure_memory(m, *common, args.seed) for m in methods}
            times = measure_times(methods, *common, rounds, args.seed)
        else:
            memory = {m: in_subprocess("memory", m, *common, args.seed) for m in methods}
            times = in_subprocess("times", ",".join(methods), *common, rounds, args.seed)
        for m in methods:
            row[m] = {
                "seconds": min(times[m]["wall"]),
                "cpu_seconds": min(times[m]["cpu"]),
                "seconds_all": [round(t, 3) for t in times[m]["wall"]],
                "peak_mib": round(memory[m]["peak_mib"], 1),
                "seconds_in_memory_run": round(memory[m]["seconds"], 3),
            }
        a, b = row["embeddings"], row["lower_bound"]
        row["a_over_b_time"] = a["seconds"] / b["seconds"]
        row["a_over_b_cpu_time"] = a["cpu_seconds"] / b["cpu_seconds"]
        if "naive" in row:
            c = row["naive"]
            row["c_over_a_time"] = c["seconds"] / a["seconds"]
            row["c_over_a_cpu_time"] = c["cpu_seconds"] / a["cpu_seconds"]
            row["c_over_a_memory"] = c["peak_mib"] / max(a["peak_mib"], 0.1)
            same = memory["embeddings"]["indices_head"] == memory["naive"]["indices_head"]
            row["a_and_c_same_first_indices"] = same
        rows.append(row)

    target = next((r for r in rows if r["B"] == 16384 and "c_over_a_time" in r), None)
    report = {
        "benchmark": "joint example selection, sigmoid, learnability, float32 CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_avg_1m": os.getloadavg()[0],
        "results": rows,
        "targets": {
            "a_over_b_time <=": 1.25,
            "c_over_a_time(B=16384) >=": 3,
            "c_over_a_memory >=": 5,
        },
        "targets_met": None
        if target is None
        else {
            "a_over_b_time": all(r.get("a_over_b_time", math.inf) <= 1.25 for r in rows),
            "c_over_a_time": target["c_over_a_time"] >= 3,
            "c_over_a_memory": target["c_over_a_memory"] >= 5,
        },
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
