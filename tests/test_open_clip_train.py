"""`jeststream openclip-train`: flag splitting, version gate, and end-to-end runs on a tiny model.

The end-to-end runs write real webdataset shards (PNG bytes + captions, sizes.json), register a
tiny open_clip config, and run open_clip_train in-process on CPU (no downloads): stage 1 trains a
reference on curated shards (this is also the parity run against plain open_clip_train), stage 2
trains with JEST on noisy shards, with --siglip and without, then resumes from epoch 1.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from pathlib import Path

import open_clip_train.main  # noqa: F401 -- dev extra: a missing one must fail, not skip
import pytest
import webdataset  # noqa: F401 -- dev extra: a missing one must fail, not skip
from helpers import (
    TINY,
    TINY_CFG,
    log_of,
    openclip_train_argv,
    register_tiny,
    run_openclip_train,
    write_colour_shards,
)

from jeststream.adapters import open_clip_train as oct_
from jeststream.selection_log import read_selection_log


def train_lines(log: str, epoch: int) -> list[str]:
    return [ln for ln in log.splitlines() if f"Train Epoch: {epoch} [" in ln]


def first_loss(log: str) -> float:
    m = re.search(r"Train Epoch: 0 \[.*? Loss: ([0-9.eE+-]+)", log)
    assert m, log[-2000:]
    return float(m.group(1))


# -- fast tests --------------------------------------------------------------------------------------


def test_split_jest_argv_separates_flags_and_values():
    jest, rest = oct_.split_jest_argv(
        ["--model", "X", "--jest-ratio", "0.2", "--siglip", "--jest-reference=ref.pt",
         "--batch-size", "8", "--jest-n-chunks", "4"]
    )
    assert jest == ["--jest-ratio", "0.2", "--jest-reference=ref.pt", "--jest-n-chunks", "4"]
    assert rest == ["--model", "X", "--siglip", "--batch-size", "8"]
    assert oct_.split_jest_argv(["--model", "X"]) == ([], ["--model", "X"])


@pytest.mark.parametrize("argv", [["--jest-ratoi", "0.2"], ["--jest-ratio"]])
def test_bad_jest_flags_are_rejected(argv, capsys):
    assert oct_.main(argv) == 2
    assert "--jest-ratio" in capsys.readouterr().err


def test_without_the_training_extras_the_command_names_the_extra(monkeypatch, capsys):
    # only the `openclip` extra: open_clip_train's imports (pandas...) fail
    monkeypatch.setitem(__import__("sys").modules, "open_clip_train.main", None)
    assert oct_.main(["--jest-ratio", "0.2", "--train-data", "x.tar"]) == 2
    err = capsys.readouterr().err
    assert "cannot import open_clip_train" in err and "jeststream[openclip-train]" in err


def test_installed_version_is_supported():
    assert oct_.check_open_clip_version() == oct_._installed_open_clip_version()


@pytest.mark.parametrize("version", ["2.32.0", "3.2.1", "3.4.0", "4.0.0", "1.3.0"])
def test_unsupported_version_fails_loudly(monkeypatch, version):
    monkeypatch.setattr(oct_, "_installed_open_clip_version", lambda: version)
    with pytest.raises(RuntimeError, match=rf"supports open_clip_torch >=.*found {re.escape(version)}"):
        oct_.check_open_clip_version()

def test_command_refuses_unsupported_version_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(oct_, "_installed_open_clip_version", lambda: "2.20.0")
    argv = ["--jest-ratio", "0.25", "--jest-reference", "x", "--train-data", "x",
            "--logs", str(tmp_path)]
    assert oct_.main(argv) == 2
    assert "found 2.20.0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_help_lists_jest_flags_then_open_clip_train_flags(capsys):
    assert oct_.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--jest-reference-pretrained" in out and "--train-num-samples" in out


@pytest.mark.parametrize("version", ["3.3.0", "3.3.9"])
def test_supported_versions_pass(monkeypatch, version):
    monkeypatch.setattr(oct_, "_installed_open_clip_version", lambda: version)
    assert oct_.check_open_clip_version() == version


def test_unsupported_version_can_be_allowed_explicitly(monkeypatch, caplog):
    monkeypatch.setattr(oct_, "_installed_open_clip_version", lambda: "3.5.0")
    monkeypatch.setenv(oct_.ALLOW_ENV, "1")
    with caplog.at_level(logging.WARNING):
        assert oct_.check_open_clip_version() == "3.5.0"
    assert "found 3.5.0" in caplog.text


def test_changed_open_clip_train_structure_fails_loudly(monkeypatch):
    import open_clip_train.main as ocm

    monkeypatch.delattr(ocm, "get_data")
    with pytest.raises(RuntimeError, match="cannot replace its training loader"):
        oct_.check_open_clip_version()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--jest-reference", "r.pt"], "--jest-ratio is required"),
        (["--jest-ratio", "0.25"], "needs a reference model"),
        (["--jest-ratio", "0.25", "--jest-reference", "r.pt", "--jest-n-chunks", "16"],
         "exceeds --batch-size 4"),
        (["--jest-ratio", "0.25", "--jest-reference", "r.pt", "--jest-score-dtype", "int8"],
         "int8"),
        (["--jest-ratio", "0.25", "--jest-reference", "r.pt", "--jest-prefilter", "0"],
         "--jest-prefilter must be a share q with 0 < q <= 1"),
        (["--jest-ratio", "0.25", "--jest-reference", "r.pt", "--jest-prefilter", "1.5"],
         "--jest-prefilter must be a share q with 0 < q <= 1"),
        (["--jest-ratio", "0.25", "--jest-reference", "r.pt", "--jest-prefilter", "nan"],
         "--jest-prefilter must be a share q with 0 < q <= 1"),
        (["--jest-ratio", "0.25", "--jest-criterion", "hard_learner", "--jest-prefilter",
          "0.5"], "--jest-prefilter ranks super-batches by the reference's score"),
    ],
)
def test_flag_validation(tmp_path, capsys, extra, message):
    argv = ["--train-data", "x.tar", "--batch-size", "4", "--logs", str(tmp_path)] + extra
    assert oct_.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Shards, the tiny model, and stage 1 (the reference) trained by `jeststream openclip-train`
    without --jest-* flags and, for parity, by plain open_clip_train."""
    tmp = tmp_path_factory.mktemp("openclip_e2e")
    register_tiny(tmp / "configs")
    # curated: one batch of 16 per epoch, so the first batch is the whole (shuffled) set
    curated = write_colour_shards(tmp / "curated", 1, 16, noise=0.0, seed=1)
    noisy = write_colour_shards(tmp / "noisy", 2, 32, noise=0.5, seed=2)
    stage1 = openclip_train_argv(tmp, "stage1", curated, batch=16, samples=16, epochs=2) + ["--siglip"]
    assert run_openclip_train(stage1) == 0
    plain = openclip_train_argv(tmp, "stage1-plain", curated, batch=16, samples=16, epochs=2) + ["--siglip"]
    assert run_openclip_train(plain, plain=True) == 0
    ckpt = tmp / "logs" / "stage1" / "checkpoints" / "epoch_2.pt"
    assert ckpt.is_file()
    return {"tmp": tmp, "noisy": noisy, "reference": str(ckpt)}


@pytest.mark.slow
def test_without_jest_flags_trains_exactly_like_open_clip_train(e2e):
    ours = log_of(e2e["tmp"], "stage1")
    plain = log_of(e2e["tmp"], "stage1-plain")
    assert "JEST" not in ours
    assert first_loss(ours) == pytest.approx(first_loss(plain), rel=1e-4)
    assert len(train_lines(ours, 0)) == len(train_lines(plain, 0)) == 1
    # the whole run, not only the first forward: same LR schedule, same losses after updates
    # (each epoch is one batch of all 16 samples, so open_clip's shuffle cannot change a loss)
    def losses_and_lrs(log):
        return [x for lr, loss in
                re.findall(r"Train Epoch: \d+ \[.*? LR: (\S+) .*? Loss: ([0-9.eE+-]+)", log)
                for x in (float(loss), float(lr))]
    ours_steps, plain_steps = losses_and_lrs(ours), losses_and_lrs(plain)
    assert len(ours_steps) == len(plain_steps) == 2 * 2
    assert ours_steps == pytest.approx(plain_steps, rel=1e-4)


def _stage2(e2e, name: str, *extra: str, epochs: int = 2) -> tuple[list[str], str]:
    tmp = e2e["tmp"]
    # 64 samples / batch 4 = 16 base batches per epoch -> 4 JEST super-batches of 16
    argv = openclip_train_argv(tmp, name, e2e["noisy"], batch=4, samples=64, epochs=epochs) + [
        "--jest-ratio", "0.25", "--jest-reference", e2e["reference"],
        "--jest-reference-model", TINY, "--jest-n-chunks", "2", *extra,
    ]
    assert run_openclip_train(argv) == 0
    return argv, log_of(tmp, name)


def _check_jest_run(log: str, epochs: int = 2, start: int = 0) -> None:
    assert "JEST: ratio 1/4, 16 base batches -> 4 selected batches per epoch (16 samples)" in log
    for epoch in range(start, epochs):
        steps = train_lines(log, epoch)
        assert len(steps) == 4, steps  # optimizer steps per epoch == the JEST num_batches
        assert "[16/16 (100%)]" in steps[-1]  # open_clip's sample counter agrees with num_samples
        jest = [ln for ln in log.splitlines() if f"JEST Epoch: {epoch} [" in ln]
        assert len(jest) == 4, jest
        m = re.search(r"Selected learnability: (\S+) Super-batch learnability: (\S+) "
                      r"Scoring share: (\S+) Wait share: (\S+) Staleness: \d+ Fallbacks: 0", jest[-1])
        assert m, jest[-1]
        assert all(map(lambda v: v == v, map(float, m.groups())))  # no NaN
    assert "Traceback" not in log


@pytest.mark.slow
@pytest.mark.parametrize("siglip", [True, False], ids=["siglip", "clip"])
def test_jest_two_epochs_and_resume(e2e, siglip, tmp_path):
    flags = ["--siglip"] if siglip else []
    name = "jest-siglip" if siglip else "jest-clip"
    sel_log = tmp_path / "selection.jsonl"
    argv, log = _stage2(e2e, name, *flags, "--jest-selection-log", str(sel_log))
    _check_jest_run(log)
    cols = read_selection_log(sel_log)
    assert len(cols["step"]) == 2 * 4 * 16  # 2 epochs x 4 super-batches of 16
    assert int(cols["selected"].sum()) == 2 * 4 * 4
    # every record names its sample: open_clip's pipeline was made to carry __key__
    assert set(cols["key"]) <= shard_keys(e2e["noisy"])
    epoch0 = [k for k, e in zip(cols["key"], cols["epoch"]) if e == 0]
    assert len(epoch0) == len(set(epoch0)) == 64  # each of the 64 samples seen once per epoch
    ckpt_dir = e2e["tmp"] / "logs" / name / "checkpoints"
    assert (ckpt_dir / "epoch_1.pt").is_file() and (ckpt_dir / "epoch_2.pt").is_file()
    if not siglip:
        return
    # resume from the epoch-1 checkpoint for a third epoch, under a new name, same selection log
    resume = [*_replace(argv, "--name", f"{name}-resumed"), "--resume",
              str(ckpt_dir / "epoch_1.pt")]
    resume = _replace(resume, "--epochs", "3")
    assert run_openclip_train(resume) == 0
    # the log is continued, not overwritten: epoch 0 kept, epoch 1 rewritten, epoch 2 added,
    # on open_clip's step axis
    cols = read_selection_log(sel_log)
    assert cols["step"].tolist() == [s for s in range(3 * 4) for _ in range(16)]
    assert cols["epoch"].tolist() == [e for e in range(3) for _ in range(4 * 16)]
    log = log_of(e2e["tmp"], f"{name}-resumed")
    assert "resuming checkpoint" in log and "(epoch 1)" in log
    assert not train_lines(log, 0)
    _check_jest_run(log, epochs=3, start=1)
    assert (e2e["tmp"] / "logs" / f"{name}-resumed" / "checkpoints" / "epoch_3.pt").is_file()


def shard_keys(spec: str) -> set[str]:
    """Every sample key in the shards of a brace spec written by ``write_shards``."""
    import braceexpand

    keys = set()
    for path in braceexpand.braceexpand(spec):
        with tarfile.open(path) as tar:
            keys.update(m.name.split(".", 1)[0] for m in tar.getmembers())
    return keys


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


# -- selection statistics through open_clip's logging ----------------------------------------------


class _FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def close(self):
        pass


class _FakeLoader:
    def __init__(self, num_batches, epoch):
        import types

        self.num_batches, self.epoch, self.stats = num_batches, epoch, {"fallbacks": 1}
        self.last_info = types.SimpleNamespace(
            selected_mean=2.0, super_batch_mean=1.0, scored_s=0.0, waited_s=0.0, staleness=1
        )


def test_reporter_logs_at_open_clip_cadence_to_log_tensorboard_and_wandb(monkeypatch, caplog):
    import argparse
    import sys
    import types

    logged = []
    fake_wandb = types.SimpleNamespace(log=lambda data, step, commit: logged.append((data, step,
                                                                                     commit)))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    args = argparse.Namespace(accum_freq=1, log_every_n_steps=2, tensorboard=True,
                              tensorboard_path="unused", wandb=True, rank=0, local_rank=0)
    reporter = oct_._SelectionReporter(args, "learnability")
    reporter.writer = _FakeWriter()
    loader = _FakeLoader(num_batches=5, epoch=1)
    with caplog.at_level(logging.INFO, logger=oct_.__name__):
        for i in range(5):
            reporter(i, loader)
    # open_clip logs steps 0, 2, 4 (every 2, and the last), at step = 5 * epoch + i
    steps = sorted({s for _, _, s in reporter.writer.scalars})
    assert steps == [5, 7, 9]
    names = {n for n, _, _ in reporter.writer.scalars}
    assert {"jest/selected_mean", "jest/super_batch_mean", "jest/scoring_share",
            "jest/fallbacks"} <= names
    assert [s for _, s, _ in logged] == [5, 7, 9] and all(c is False for _, _, c in logged)
    lines = [r.getMessage() for r in caplog.records if "JEST Epoch: 1" in r.getMessage()]
    assert len(lines) == 3 and "Selected learnability: 2" in lines[0] and "Fallbacks: 1" in lines[0]
    # other ranks stay quiet
    args.rank = 1
    reporter.writer = _FakeWriter()
    reporter(0, loader)
    assert not reporter.writer.scalars


@pytest.mark.slow
def test_two_stage_example_script(tmp_path):
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "examples" / "openclip_two_stage.sh"
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, EPOCHS="1",
               STAGE1_EPOCHS="1", CURATED_PER_SHARD="16", NOISY_PER_SHARD="32",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "out" / "logs" / "stage2" / "out.log").read_text()
    assert "JEST: ratio 1/4, 8 base batches -> 2 selected batches per epoch (32 samples)" in log
    assert len(train_lines(log, 0)) == 2 and "JEST Epoch: 0 [2/2]" in log
    assert (tmp_path / "out" / "logs" / "stage2" / "checkpoints" / "epoch_1.pt").is_file()


@pytest.mark.slow
def test_jest_score_resolution_and_deterministic_flags(e2e):
    """--jest-score-resolution scores the learner on half-size images (its ViT's positional
    embeddings resampled) and --jest-deterministic 1 runs the deterministic schedule, inside a
    real open_clip_train run."""
    _, log = _stage2(
        e2e, "jest-lowres", "--siglip", "--jest-score-resolution", "16",
        "--jest-deterministic", "1", epochs=1,
    )
    _check_jest_run(log, epochs=1)
    # on webdataset data the scorer sees 16-px views; open_clip's transform runs after selection
    assert "JEST: deferred decoding (encoded records): 16-px scoring views" in log


@pytest.mark.slow
def test_jest_prefilter_flag(e2e, tmp_path):
    """--jest-prefilter 0.5 inside a real open_clip_train run: each super-batch of 16 is cut to
    its top 8 by the reference's score before the learner scores it; the log records the
    other 8 as dropped (NaN score, not selected)."""
    import numpy as np

    from jeststream.selection_log import read_selection_log

    sel_log = tmp_path / "selection.jsonl"
    _, log = _stage2(
        e2e, "jest-prefilter", "--siglip", "--jest-prefilter", "0.5",
        "--jest-selection-log", str(sel_log), epochs=1,
    )
    _check_jest_run(log, epochs=1)
    cols = read_selection_log(sel_log)
    assert len(cols["step"]) == 4 * 16
    for step in range(4):
        rows = cols["step"] == step
        dropped = np.isnan(cols["score"][rows])
        assert dropped.sum() == 8 and not cols["selected"][rows][dropped].any()
        assert cols["selected"][rows].sum() == 4


def test_small_batch_without_n_chunks_passes_validation():
    """--batch-size 8 --jest-ratio 0.25 without --jest-n-chunks: the loader's default
    min(16, b) applies, nothing to refuse (an explicit --jest-n-chunks 16 still is)."""
    rest = ["--train-data", "x.tar", "--batch-size", "8"]
    jest = oct_._jest_parser().parse_args(["--jest-ratio", "0.25", "--jest-reference", "r.pt"])
    assert jest.n_chunks is None
    oct_._validate(jest, rest)
    jest.n_chunks = 16
    with pytest.raises(ValueError, match="exceeds --batch-size 8"):
        oct_._validate(jest, rest)


_TORCHRUN_LAUNCHER = '''"""`jeststream openclip-train` as a torchrun script; first registers the tiny model config
(the test's, as register_tiny does in-process)."""
import sys

import open_clip

open_clip.add_model_config(sys.argv[1])
from jeststream.cli import main  # noqa: E402

rest = sys.argv[2:]
sys.exit(main(["openclip-train", *(rest[1:] if rest[:1] == ["--"] else rest)]))
'''


@pytest.mark.slow
def test_openclip_train_under_torchrun_two_ranks_gloo_global_selection(tmp_path):
    """torchrun --nproc_per_node 2 on CPU with --dist-backend gloo: open_clip_train's DDP trains
    on JEST batches selected globally across both ranks (hard_learner: no reference needed)."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "configs" / f"{TINY}.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(TINY_CFG))
    noisy = write_colour_shards(tmp_path / "noisy", 2, 32, noise=0.5, seed=2)  # one shard per rank
    launcher = tmp_path / "launch_openclip_train.py"
    launcher.write_text(_TORCHRUN_LAUNCHER)
    argv = openclip_train_argv(tmp_path, "ddp", noisy, batch=4, samples=64, epochs=1) + [
        "--dist-backend", "gloo", "--siglip", "--jest-ratio", "0.25",
        "--jest-criterion", "hard_learner", "--jest-n-chunks", "2",
    ]
    # "--" keeps torchrun's own parser off open_clip's flags (--logs would match --logs-specs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(launcher), str(cfg), "--", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = log_of(tmp_path, "ddp")
    assert "JEST: global selection over 2 ranks (this is rank 0)" in log
    # 64 samples over 2 ranks x batch 4 = 8 base batches per rank -> 2 JEST steps
    assert "JEST: ratio 1/4, 8 base batches -> 2 selected batches per epoch (16 samples)" in log
    steps = train_lines(log, 0)
    assert len(steps) == 2 and "[16/16 (100%)]" in steps[-1]
    assert len([ln for ln in log.splitlines() if "JEST Epoch: 0 [" in ln]) == 2
    assert "Traceback" not in log and "Traceback" not in proc.stderr
    assert (tmp_path / "logs" / "ddp" / "checkpoints" / "epoch_1.pt").is_file()
