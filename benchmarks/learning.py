"""Learning-efficiency benchmark: the demo's full comparison (every method, three seeds).

    python benchmarks/learning.py [benchmarks/demo_harness.py options...]

Same as ``python benchmarks/demo_harness.py --full``: trains the same tiny open_clip SigLIP model with uniform
sampling, JEST, independent learnability / hard-learner / easy-reference sampling, static
filtering and the clean-only oracle on the embedded noisy digits set; prints the table, then
the headline figures as JSON (steps and FLOPs ratios to reach uniform's final held-out accuracy,
uniform's plateau check, final retrieval recall@1/@5 both ways, the batch learnability of the
selected sub-batches against independent and uniform draws from the same super-batches, and the
selected-example composition). Writes runs/learning/results.json and
runs/learning/learning_curves.png (its third panel: batch learnability over training, the
paper's Fig. 2 on this run). Where joint selection beats independent selection (filtering
ratio, loss, the fine-grained pairs task) is the sweep's job: benchmarks/selection_sweep.py. Measured on 2 CPU cores with the default --jobs 2: 18.5 min
for every method over 3 seeds at 2,000 steps (21 runs). A JEST-type run (jest, independent,
hard_learner) took ~2.0-2.5 min and easy_reference ~1.5 min, two at a time: each decodes
1/ratio = 5 base batches per step and scores them; a uniform, static or oracle run took
~1 min. Pass --methods, --seeds or --scale to shorten.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_harness import build_parser, main  # noqa: E402


def run(argv: list[str]) -> int:
    args = list(argv)
    if "--quick" not in args and "--full" not in args:
        args.insert(0, "--full")
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", "runs/learning"]
    code = main(args)
    out = Path(build_parser().parse_args(args).out)
    results = json.loads((out / "results.json").read_text())
    summary = {
        "headline": results["headline"],
        "final_accuracy": {m: v["final_accuracy"] for m, v in results["methods"].items()},
        "steps_ratio_vs_uniform_budget": {
            m: v["steps_ratio_vs_uniform_budget"] for m, v in results["methods"].items()
        },
        "flops_ratio_vs_uniform": {
            m: v["flops_ratio_vs_uniform"] for m, v in results["methods"].items()
        },
        "final_retrieval": {m: v["final_retrieval"] for m, v in results["methods"].items()},
        "batch_learnability": {
            m: {d: s["mean_over_steps"] for d, s in v["batch_learnability"].items()}
            for m, v in results["methods"].items()
            if "batch_learnability" in v
        },
        "composition": {
            m: {t: s["mean"] for t, s in v["composition"].items()}
            for m, v in results["methods"].items()
        },
        "wall_s": results["wall_s"],
    }
    print(json.dumps(summary, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
