"""MosaicML streaming adapter on real MDS shards written by streaming.MDSWriter, read through
JESTLoader with a tiny open_clip model; exact mid-epoch resume through state_dict."""

from __future__ import annotations

import gc
import io
from collections import Counter

import numpy as np
import open_clip  # noqa: F401 -- dev extra: a missing one must fail, not skip
import pytest
from conftest import toy_tokenize
from helpers import jest_loader
from PIL import Image
from streaming import MDSWriter
from streaming.base.util import clean_stale_shared_memory

from jeststream.adapters.streaming import streaming_loader
from jeststream.selection_log import read_selection_log

B = 4
N = 48
CTX = 16
SEED = 5  # the JESTLoader's


tokenize = toy_tokenize


@pytest.fixture(autouse=True)
def _clean_shm():
    # streaming keeps per-dataset shared memory; stale blocks from an earlier test would be
    # picked up by the next dataset (resume state, epoch counter)
    gc.collect()
    clean_stale_shared_memory()
    yield
    gc.collect()
    clean_stale_shared_memory()


@pytest.fixture
def mds(tmp_path):
    """A fresh MDS directory per test (unique `local`): PNG and JPEG columns, 3 shards."""
    out = tmp_path / "mds"
    columns = {"key": "str", "image": "png", "jpeg_image": "jpeg", "text": "str"}
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns=columns, size_limit=40_000) as writer:
        for i in range(N):
            img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            writer.write(
                {"key": f"m{i:04d}", "image": img, "jpeg_image": img, "text": f"caption {i}"}
            )
    assert len(list(out.glob("shard.*.mds"))) >= 2
    return str(out), {f"m{i:04d}" for i in range(N)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_jest_over_mds_shards(mds, models, tmp_path, num_workers):
    local, all_keys = mds
    base = streaming_loader(
        local, B, tokenizer=tokenize, num_workers=num_workers, image_field="jpeg_image"
    )
    log = tmp_path / "sel.jsonl"
    seen = []
    with jest_loader(base, models, seed=SEED, selection_log=log) as jest:
        assert jest.batch_size == B
        for batch in jest:
            assert batch["image"].shape == (B, 3, 32, 32)
            assert batch["text"].shape == (B, CTX)
            assert len(batch["__key__"]) == B
            seen.extend(batch["__key__"])
        steps = jest.stats["batches"]
    assert steps == N // (2 * B)
    assert set(seen) <= all_keys and len(seen) == len(set(seen)), Counter(seen).most_common(2)
    cols = read_selection_log(log)
    assert len(cols["key"]) == N and set(cols["key"]) == all_keys
    assert int(cols["selected"].sum()) == len(seen)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_in_a_new_process_state(mds, models, num_workers):
    local, _ = mds

    def make():
        return jest_loader(
            streaming_loader(
                local, B, tokenizer=tokenize, num_workers=num_workers, shuffle=True
            ),
            models,
            seed=SEED,
        )

    with make() as jest:
        full = [list(b["__key__"]) for b in jest]
    assert len(full) == N // (2 * B)
    del jest
    gc.collect()
    clean_stale_shared_memory()

    with make() as jest:
        it = iter(jest)
        head = [list(next(it)["__key__"]) for _ in range(2)]
        state = jest.state_dict()
        del it
    assert state["base"]["sample_in_epoch"] == 2 * 2 * B
    del jest
    gc.collect()
    clean_stale_shared_memory()

    with make() as jest:  # a fresh loader, as after a restart
        jest.load_state_dict(state)
        tail = [list(b["__key__"]) for b in jest]
    assert head + tail == full


def test_resume_into_already_iterated_loader_is_not_stale(mds, models):
    """streaming issues #437/#880: a state loaded into a dataset that has already started an
    epoch is 'stale' and silently ignored; the adapter rewinds the epoch counter."""
    local, _ = mds
    base = streaming_loader(local, B, tokenizer=tokenize)
    with jest_loader(base, models, seed=SEED) as jest:
        [b for b in jest]  # epoch 0
        it = iter(jest)  # epoch 1
        next(it)
        next(it)
        state = jest.state_dict()
        rest = [list(b["__key__"]) for b in it]  # the dataset's epoch counter moves past it
        [b for b in jest]  # and another epoch begins and ends
        jest.load_state_dict(state)
        tail = [list(b["__key__"]) for b in jest]
    assert state["base"]["epoch"] == 1
    assert len(rest) == N // (2 * B) - 2
    assert tail == rest


def test_state_between_epochs_resumes_the_coming_epoch(mds):
    local, _ = mds
    base = streaming_loader(local, B, shuffle=True)
    assert base.state_dict()["epoch"] == 0 and base.state_dict()["sample_in_epoch"] == 0
    epoch0 = [k for b in base for k in b["__key__"]]
    iter(base)  # the next pass is created but has not started
    state = base.state_dict()
    assert (state["epoch"], state["sample_in_epoch"]) == (1, 0)
    epoch1 = [k for b in base for k in b["__key__"]]
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    del base
    gc.collect()
    clean_stale_shared_memory()

    fresh = streaming_loader(local, B, shuffle=True)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state  # loaded, not yet consumed
    assert [k for b in fresh for k in b["__key__"]] == epoch1


def test_remote_is_cached_into_local(mds, tmp_path, models):
    remote, all_keys = mds  # a "remote" on the filesystem: streaming copies shards to `local`
    cache = tmp_path / "cache"
    base = streaming_loader(str(cache), B, remote=remote, tokenizer=tokenize, as_tuple=True)
    with jest_loader(base, models, seed=SEED) as jest:
        keys = [k for _, _, ks in jest for k in ks]
    assert len(keys) == N // 2 and set(keys) <= all_keys
    assert list(cache.glob("shard.*.mds"))


def test_bad_field_names_are_explained(mds):
    local, _ = mds
    base = streaming_loader(local, B, image_field="img")
    with pytest.raises(KeyError, match="set image_field"):
        next(iter(base))


def test_corrupt_image_bytes_name_the_sample(tmp_path, models):
    out = tmp_path / "mds"
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns={"key": "str", "image": "bytes", "text": "str"}) as w:
        for i in range(2 * B):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            data = buf.getvalue() if i != 5 else b"\x89PNG not really"
            w.write({"key": f"c{i}", "image": data, "text": f"caption {i}"})
    base = streaming_loader(str(out), B, tokenizer=tokenize)
    with jest_loader(base, models, seed=SEED) as jest, pytest.raises(ValueError) as err:
        next(iter(jest))
    text = "".join(str(e) for e in (err.value, err.value.__cause__))
    assert "MDS sample 5 (key 'c5')" in text and "re-encode or remove" in text
