"""How much more learnable are joint draws than independent ones, by sampling temperature?

    python benchmarks/temperature_probe.py [--loss sigmoid|softmax] [--steps 150]
        [--at 20 80 150] [--temperatures 1 0.5 0.25 0] [--draws 6] [--out DIR]

Trains the demo's JEST run (digits, ratio 0.2, seed 0) for ``--steps`` steps, keeps the learner's
and the reference's embeddings of the super-batches at the steps ``--at`` (the ones the sampler
got), and then, on each of them, draws sub-batches of b = 128 with the joint sampler (16 chunks)
and with independent sampling at each temperature (``--draws`` generator seeds; one at T = 0,
which is deterministic) and prints their batch learnability (``jeststream.diagnostics``:
learner − reference loss of the sub-batch as a whole, sum form, pairwise terms included) as
JSON, with the spread of each chunk's sampling logits.

What it showed (seed 0, draws at steps 20, 80 and 150; README "Performance"): with the sigmoid
loss the joint draw is +0.5 to +8 more learnable than independent draws at T = 1 and +38 at
T = 0 (greedy against top-k), while every chunk's logits spread about 3 (std) at every step, so
at T = 1 both samplers pick broadly among the better candidates and the pairwise terms decide
little; with the softmax loss the joint draw is 8 to 14 *less* learnable at T = 1 (more so with
more chunks) and level or ahead only at T <= 0.25.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_harness


def capture(loss: str, steps: int, at: list[int], out: Path, quick: bool = False) -> dict[int, dict]:
    """Embeddings the loader's sampler got at the steps ``at`` (1-based) of a demo JEST run,
    through the loader's public hook (:func:`jeststream.loader.register_selection_hook`)."""
    from demo_harness import main as demo_main

    from jeststream.loader import register_selection_hook

    kept: dict[int, dict] = {}
    seen = {"n": 0}

    def hook(step, learner, reference, selected):  # step: 0-based, one pass from 0
        seen["n"] = max(seen["n"], step + 1)
        if step + 1 in at:
            kept[step + 1] = {
                "learner": tuple(learner),
                "reference": tuple(reference),
                "k": int(selected.numel()),
            }

    with register_selection_hook(hook):
        argv = ["--methods", "jest", "--loss", loss, "--steps", str(steps), "--jobs", "1",
                "--seeds", "0", "--no-progress", "--out", str(out)] + (["--quick"] if quick else [])
        with contextlib.redirect_stdout(sys.stderr):  # stdout is this script's JSON
            code = demo_main(argv)
        if code != 0:
            raise RuntimeError("the demo run failed")
    missing = sorted(set(at) - set(kept))
    if missing:
        raise ValueError(f"--at {missing}: the run had only {seen['n']} super-batches")
    return kept


def chunk_logit_spread(learner, reference, k: int, loss: str, n_chunks: int = 16) -> list[float]:
    """The std of each chunk's sampling logits (the candidates still unselected) in one joint
    draw at T = 1, stepping the sampler's public chunk loop (``selection.embedding_block``)."""
    import torch

    from jeststream.selection import embedding_block

    block = embedding_block(
        learner, reference, k, loss=loss, n_chunks=n_chunks,
        generator=torch.Generator().manual_seed(0),
    )
    spreads = []
    for j in range(n_chunks):
        live = block.logits.masked_fill(block.selected, -math.inf)
        spreads.append(float(live[torch.isfinite(live)].std()))
        new = block.draw(j)
        if j + 1 < n_chunks:
            block.fold([block.payload(new)], 0)
    return spreads


def probe(kept: dict, loss: str, temperatures: list[float], draws: int) -> list[dict]:
    import torch

    import jeststream.selection as selection
    from jeststream.diagnostics import sub_batch_score
    from jeststream.losses import Embeddings

    rows = []
    for step, got in sorted(kept.items()):
        learner, reference, k = Embeddings(*got["learner"]), Embeddings(*got["reference"]), got["k"]

        def score(idx, learner=learner, reference=reference):
            return sub_batch_score(learner, reference, idx, loss=loss)

        spreads = chunk_logit_spread(learner, reference, k, loss)
        row = {"step": step, "k": k, "chunk_logit_std": [round(s, 3) for s in spreads],
               "by_temperature": []}
        for t in temperatures:
            n = 1 if t == 0 else draws
            joint, indep = [], []
            for s in range(n):
                joint.append(score(selection.joint_sample_from_embeddings(
                    learner, reference, k, loss=loss, n_chunks=16, temperature=t,
                    generator=torch.Generator().manual_seed(s))))
                indep.append(score(selection.independent_sample(
                    learner, reference, k, loss=loss, temperature=t,
                    generator=torch.Generator().manual_seed(s))))
            row["by_temperature"].append({
                "temperature": t, "draws": n,
                "joint": statistics.fmean(joint), "independent": statistics.fmean(indep),
                "joint_minus_independent": statistics.fmean(joint) - statistics.fmean(indep),
            })
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", choices=("sigmoid", "softmax"), default="sigmoid")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--at", type=int, nargs="+", default=[20, 80, 150])
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.0])
    p.add_argument("--draws", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="the demo run's directory (temp)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: the demo's --quick pool (1,500 examples, b = 32)")
    args = p.parse_args(argv)
    if any(a < 1 or a > args.steps for a in args.at):
        p.error(f"--at {args.at}: steps must lie in 1..--steps ({args.steps})")
    if any(t < 0 for t in args.temperatures) or args.draws < 1:
        p.error("--temperatures must be >= 0 and --draws >= 1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        kept = capture(args.loss, args.steps, args.at, args.out or Path(tmp), args.quick)
        rows = probe(kept, args.loss, args.temperatures, args.draws)
    print(json.dumps({"loss": args.loss, "steps": args.steps, "quick": args.quick,
                      "task": "digits", "ratio": 0.2,
                      "seed": 0, "n_chunks": 16, "results": rows,
                      "wall_s": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
