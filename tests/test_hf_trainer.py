"""JESTTrainer (jeststream.adapters.transformers_trainer) end to end through the example script
examples/hf_clip_jest.py: it trains a tiny CLIPModel with transformers' Trainer on Parquet
shards it writes, checkpoints, resumes exactly (the selection log and the weights of an
interrupted-and-resumed run equal the uninterrupted run's), and runs under torchrun on gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from jeststream.selection_log import read_run_config, read_selection_log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "hf_clip_jest.py"


def _run(*args: str, torchrun: bool = False) -> dict:
    cmd = [sys.executable, str(SCRIPT), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _selected(log: Path) -> dict[int, list[str]]:
    cols = read_selection_log(log)
    out: dict[int, list[str]] = {}
    for key, step, chosen in zip(cols["key"], cols["step"], cols["selected"]):
        if chosen:
            out.setdefault(int(step), []).append(key)
    return {s: sorted(v) for s, v in out.items()}


@pytest.mark.slow
def test_example_trains_checkpoints_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = _run("--out", str(whole))
    # 96 examples, b = 8, ratio 0.25: 12 base batches, so 3 selected batches per epoch
    assert done["global_step"] == 6 and done["epoch"] == 2.0 and done["loss"] == "softmax"
    stopped = _run("--out", str(broken), "--stop-after", "4")
    assert stopped["global_step"] == 4
    assert (broken / "run" / "checkpoint-4" / "jest_loader_rank0.pt").is_file()
    resumed = _run("--out", str(broken), "--resume")
    assert resumed["global_step"] == 6 and resumed["epoch"] == 2.0
    a = _selected(whole / "run" / "selection-rank0.jsonl")
    b = _selected(broken / "run" / "selection-rank0.jsonl")
    assert sorted(a) == list(range(6)) and all(len(v) == 8 for v in a.values())
    assert a == b  # the same keys selected at every step, across the resume
    # ... and the same training: bit-identical weights and logged losses/epochs
    wa = load_file(whole / "run" / "checkpoint-6" / "model.safetensors")
    wb = load_file(broken / "run" / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    hist = [json.loads((d / "run" / "checkpoint-6" / "trainer_state.json").read_text())
            ["log_history"] for d in (whole, broken)]
    logged = [[(h["step"], h["epoch"], h["loss"]) for h in x if "loss" in h] for x in hist]
    assert logged[0] == logged[1] and [e for _, e, _ in logged[0]][2] == 1.0


@pytest.mark.slow
def test_example_under_torchrun_selects_globally(tmp_path):
    out = tmp_path / "ddp"
    done = _run("--out", str(out), "--max-steps", "3", "--save-steps", "3", torchrun=True)
    assert done["global_step"] == 3
    run = out / "run"
    for rank in (0, 1):
        cfg = read_run_config(run / f"selection-rank{rank}.jsonl")
        assert cfg["distributed"] == "global" and cfg["world_size"] == 2 and cfg["rank"] == rank
        assert (run / "checkpoint-3" / f"jest_loader_rank{rank}.pt").is_file()
    logs = [_selected(run / f"selection-rank{r}.jsonl") for r in (0, 1)]
    assert sorted(logs[0]) == sorted(logs[1]) == [0, 1, 2]
    for step in range(3):  # each rank yields b of its own examples
        assert len(logs[0][step]) == len(logs[1][step]) == 8
        assert not set(logs[0][step]) & set(logs[1][step])
