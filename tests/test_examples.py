"""The examples run as a user runs them: a fresh interpreter, data they write themselves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import EXAMPLES, run_example


@pytest.mark.slow
def test_webdataset_example_trains_two_epochs_and_inspects_its_log(tmp_path):
    log = tmp_path / "selection.jsonl"
    out = run_example("webdataset_jest.py", "--log", str(log))
    # 4 shards x 64 samples, b=16, ratio 1/4: 16 base batches -> 4 JEST batches per epoch
    # 16 base batches an epoch, none dropped (4 super-batches of 4 use them all)
    assert (
        "epoch 0 done: {'batches': 4, 'fallbacks': 0, 'base_batches': 16, 'dropped_examples': 0, "
        "'replaced_examples': 0, 'bad_shards': 0}" in out
    )
    assert (
        "epoch 1 done: {'batches': 8, 'fallbacks': 0, 'base_batches': 32, 'dropped_examples': 0, "
        "'replaced_examples': 0, 'bad_shards': 0}" in out
    )
    assert "examples seen" in out and log.is_file()


@pytest.mark.slow
def test_mosaic_example_checkpoints_and_resumes():
    out = run_example("mosaic_jest.py")
    assert "checkpoint after 2 steps" in out
    assert "resumed and finished the epoch: 2 + 2 steps of 16" in out


@pytest.mark.slow
def test_ddp_example_under_torchrun_selects_globally():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "ddp_jest.py")],
        capture_output=True, text=True, timeout=240, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    # 4 shards x 64 over 2 ranks, b = 8, ratio 1/4: 128 examples = 4 super-batches per rank
    for rank in (0, 1):
        assert f"rank {rank} epoch 0 done: 4 batches, selection global over 2 ranks" in proc.stdout
    assert "step 3: loss" in proc.stdout
