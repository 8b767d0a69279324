"""benchmarks/deferred_learning.py: the demo's JEST over a JPEG copy of its pool, eager vs
deferred decoding. Tiny: a 200-example pool, b = 8, a few steps (no learning asserted)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import benchmark_module

from jeststream.deferred import Deferred, scoring_views
from jeststream.demo.data import DataConfig
from jeststream.demo.runs import RunConfig
from jeststream.demo.shards import StreamLoader, model_input, view_model_input


def _script():
    return benchmark_module("deferred_learning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = RunConfig(
        steps=3, batch_size=8, ref_steps=3, eval_every=3, threads=1, n_chunks=2,
        data=DataConfig(pool_size=200, curated_size=32, heldout_scans=100),
    )
    return _script().Setup(cfg, tmp_path_factory.mktemp("deferred_learning"))


def test_jpeg_copy_of_the_pool(setup):
    """The pool's samples as JPEG: same keys, captions and noise types, pixels close to the
    PGM ones (JPEG is lossy), read back by the demo's load_split."""
    import webdataset as wds

    from jeststream.demo.shards import load_split

    assert all(Path(p).parent.name.startswith("jpeg-q90-") for p in setup.pool_shards)
    first = next(iter(wds.DataPipeline(wds.SimpleShardList(setup.pool_shards),
                                       wds.tarfile_to_samples())))
    assert set(first) >= {"__key__", "jpg", "txt"} and first["jpg"][:2] == b"\xff\xd8"
    pgm = load_split(setup.shards["pool"], setup.tokenizer, 16)
    assert pgm["key"] == setup.pool["key"] and pgm["noise"] == setup.pool["noise"]
    assert torch.equal(pgm["text"], setup.pool["text"])
    diff = (pgm["image"] - setup.pool["image"]).abs()  # model input, [-1, 1]
    assert 0 < diff.mean() < 0.05, diff.mean()


def _first_batch(setup, **kwargs):
    base = StreamLoader(setup.pool_shards, 8, 1, setup.tokenizer, seed=0, **kwargs)
    return next(iter(base))


def test_scoring_views_identical_at_full_resolution_and_close_below(setup):
    """At the full 16 px the deferred view is bit-for-bit the eager model input; at 8 px it is
    a DCT-scaled decode, close to the eager images resized (not equal)."""
    from jeststream.low_res import resize_images

    eager = model_input(_first_batch(setup))
    for res in (16, 8):
        batch = _first_batch(setup, deferred=True, score_resolution=res)
        assert isinstance(batch[0], Deferred) and batch[2] == eager[2]
        view = view_model_input(scoring_views(batch))
        assert view[0].shape == (8, 3, res, res) and torch.equal(view[1], eager[1])
        if res == 16:
            assert torch.equal(view[0], eager[0])
        else:
            resized = resize_images(eager[0], res)
            assert not torch.equal(view[0], resized)
            assert (view[0] - resized).abs().mean() < 0.1


@pytest.mark.parametrize("resolution", [16, 8])
def test_eager_and_deferred_runs(setup, resolution):
    """The script's eager and deferred JEST runs train, log their selections and return the
    same structure; at the full resolution they select exactly the same examples at every step
    (so they train identically), below it they may differ."""
    script = _script()
    setup.cfg = dataclasses.replace(setup.cfg, score_resolution=resolution)
    logs = {v: setup.work / f"{v}-{resolution}.parquet" for v in ("jest-eager", "jest-deferred")}
    out = {v: setup.run(v, 0, log) for v, log in logs.items()}
    eager, deferred = out["jest-eager"], out["jest-deferred"]

    def shape(r):
        return {k: type(v).__name__ for k, v in r.items()}, [sorted(c) for c in r["curve"]]

    assert shape(eager) == shape(deferred)
    assert [c["step"] for c in deferred["curve"]] == [0, 3]
    diff = script.selection_difference(logs["jest-eager"], logs["jest-deferred"])
    assert diff["steps"] == 3 and 0 <= diff["whole_run"] <= 1
    if resolution == 16:
        assert diff["whole_run"] == 0.0
        assert [c["accuracy"] for c in eager["curve"]] == [c["accuracy"] for c in deferred["curve"]]
        assert eager["composition"] == deferred["composition"]
    with pytest.raises(ValueError, match="deferred=True needs a method that selects"):
        from jeststream.demo.runs import run_method

        run_method("uniform", setup.cfg, 0, setup.pool_shards, setup.heldout, setup.noise_of,
                   None, setup.tokenizer, setup.flops, deferred=True)
