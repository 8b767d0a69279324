"""ReferenceCache: the frozen reference's embeddings on disk, looked up by sample key.

Library level (caches written with ``write_shard``), then ``jeststream precompute-reference`` on
real webdataset and MDS shards (round trip, resume), then selection from a cache against the
live reference, then ``jeststream openclip-train --jest-reference-cache``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import make_pair_batches, make_tiny_clip

from jeststream.loader import JESTLoader
from jeststream.reference_cache import (
    ReferenceCache,
    init_cache,
    read_manifest,
    reference_fingerprint,
    shard_problem,
    write_shard,
)
from jeststream.scoring import default_embed


def _header(reference, dtype="float32"):
    return {
        "reference": {"architecture": "tiny", "fingerprint": reference_fingerprint(reference)},
        "preprocessing": {"note": "synthetic tensors"},
        "embed_dim": 32,
        "dtype": dtype,
        "logit_scale": float(reference.logit_scale.detach().exp()),
        "logit_bias": None,
    }


def build_cache(directory, reference, batches, per_shard=2, dtype="float32", skip=()):
    """A cache of ``reference``'s embeddings of keyed (images, tokens, keys) batches: one shard
    per ``per_shard`` batches, each batch embedded as it is (the loader's batch size)."""
    init_cache(directory, _header(reference, dtype))
    for s in range(0, len(batches), per_shard):
        keys, image, text = [], [], []
        for images, tokens, batch_keys in batches[s : s + per_shard]:
            with torch.inference_mode():
                e = default_embed(reference, (images, tokens))
            keep = [i for i, k in enumerate(batch_keys) if k not in skip]
            keys += [batch_keys[i] for i in keep]
            image.append(e.image[keep].numpy())
            text.append(e.text[keep].numpy())
        write_shard(directory, f"part-{s:03d}", keys, np.concatenate(image), np.concatenate(text))
    return directory


@pytest.fixture(scope="module")
def keyed():
    return make_pair_batches(n_batches=8, b=8, keys=True)


def _indices(base, learner, reference, **kw):
    kw = {"ratio": 0.25, "n_chunks": 2, "seed": 3, "async_scoring": False, "return_info": True,
          **kw}
    with JESTLoader(base, learner, reference, **kw) as jest:
        return [info.indices.tolist() for _, info in jest]


def test_lookup_round_trip_and_manifest(models, keyed, tmp_path):
    _, reference = models
    cache = ReferenceCache(build_cache(tmp_path / "c", reference, keyed))
    assert len(cache) == 64 and "s003_05" in cache and "nope" not in cache
    images, tokens, keys = keyed[3]
    e = cache.lookup(list(reversed(keys)))
    with torch.inference_mode():
        live = default_embed(reference, (images, tokens))
    assert torch.equal(e.image, live.image.flip(0)) and torch.equal(e.text, live.text.flip(0))
    assert e.image.dtype == torch.float32 and e.logit_bias is None
    assert float(e.logit_scale) == pytest.approx(float(reference.logit_scale.detach().exp()))
    manifest = read_manifest(tmp_path / "c")
    assert sorted(manifest["shards"]) == ["part-000", "part-002", "part-004", "part-006"]
    assert manifest["shards"]["part-000"]["examples"] == 16
    # arrays are memory-mapped, not read into memory
    assert isinstance(cache._arrays[0][0], np.memmap)


def test_selection_from_cache_equals_live_reference(models, keyed, tmp_path):
    learner, reference = models
    cache = ReferenceCache(build_cache(tmp_path / "c", reference, keyed), reference=reference)
    live = _indices(keyed, learner, reference)
    cached = _indices(keyed, learner, cache)
    assert len(live) == 2 and cached == live
    # criterion semantics are kept: easy_reference scores by the reference alone
    assert _indices(keyed, learner, cache, criterion="easy_reference") == _indices(
        keyed, learner, reference, criterion="easy_reference"
    )


def test_cache_runs_no_reference_forward(models, keyed, tmp_path):
    learner, reference = models
    cache = ReferenceCache(build_cache(tmp_path / "c", reference, keyed))
    calls = []

    def embed(model, batch):
        calls.append(model)
        return default_embed(model, batch)

    _indices(keyed, learner, cache, embed=embed, async_scoring=True)
    assert calls and all(m is not reference for m in calls)
    assert cache.stats["lookups"] == 2 and cache.stats["computed"] == 0


def test_fingerprint_mismatch_names_both(models, keyed, tmp_path):
    learner, reference = models
    build_cache(tmp_path / "c", reference, keyed[:2])
    with pytest.raises(ValueError, match="does not match the reference cache") as err:
        ReferenceCache(tmp_path / "c", reference=learner)
    assert reference_fingerprint(learner) in str(err.value)
    assert reference_fingerprint(reference) in str(err.value)
    # the fingerprint sees dtype and every parameter; it is the same for an identical copy
    assert reference_fingerprint(make_tiny_clip(seed=1)) == reference_fingerprint(reference)
    assert reference_fingerprint(make_tiny_clip(seed=1).half()) != reference_fingerprint(reference)


def test_missing_key_raises_naming_key_dir_and_fix(models, keyed, tmp_path):
    learner, reference = models
    build_cache(tmp_path / "c", reference, keyed, skip={"s005_02"})
    cache = ReferenceCache(tmp_path / "c")
    with pytest.raises(KeyError, match=r"s005_02.*precompute-reference") as err:
        cache.lookup(keyed[5][2])
    assert str(tmp_path / "c") in str(err.value)
    with pytest.raises(KeyError, match="s005_02"):
        _indices(keyed, learner, cache)


def test_on_missing_compute_computes_and_counts(models, keyed, tmp_path):
    learner, reference = models
    build_cache(tmp_path / "c", reference, keyed, skip={"s005_02", "s006_07"})
    with pytest.raises(ValueError, match="needs the reference model"):
        ReferenceCache(tmp_path / "c", on_missing="compute")
    cache = ReferenceCache(tmp_path / "c", on_missing="compute", reference=reference)
    assert _indices(keyed, learner, cache) == _indices(keyed, learner, reference)
    assert cache.stats["computed"] == 2
    _indices(keyed, learner, cache)  # computed once, then kept
    assert cache.stats["computed"] == 2 and "s005_02" in cache


def test_batch_without_keys_raises_at_first_super_batch(models, tmp_path):
    learner, reference = models
    keyed = make_pair_batches(n_batches=4, b=8, keys=True)
    cache = ReferenceCache(build_cache(tmp_path / "c", reference, keyed))
    unkeyed = [b[:2] for b in keyed]
    with pytest.raises(ValueError, match=r"no per-example keys.*key_fn="):
        _indices(unkeyed, learner, cache)
    # key_fn supplies them
    keys = iter(b[2] for b in keyed)

    def key_fn(batch):  # the super-batch's keys: those of its 4 base batches, in order
        return [k for _ in range(batch[0].shape[0] // 8) for k in next(keys)]

    assert _indices(unkeyed, learner, cache, key_fn=key_fn) == _indices(keyed, learner, reference)


def test_duplicate_keys_across_shards_are_refused(models, tmp_path):
    _, reference = models
    batches = make_pair_batches(n_batches=2, b=4, keys=True)
    batches[1] = (batches[1][0], batches[1][1], batches[0][2])
    build_cache(tmp_path / "c", reference, batches, per_shard=1)
    with pytest.raises(ValueError, match="unique sample keys"):
        len(ReferenceCache(tmp_path / "c"))


def test_not_a_cache_and_bad_arguments(tmp_path, models):
    learner, _ = models
    import jeststream

    assert jeststream.ReferenceCache is ReferenceCache
    with pytest.raises(FileNotFoundError, match="precompute-reference"):
        ReferenceCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a jeststream-reference-cache"):
        ReferenceCache(tmp_path)
    with pytest.raises(ValueError, match="on_missing"):
        ReferenceCache(tmp_path, on_missing="skip")
    with pytest.raises(TypeError, match="ReferenceCache"):
        JESTLoader([], learner, "cache-dir")


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(
    "file, damage, raw, cheap",
    [
        ("part-002.image.npy", lambda p: _cut(p, -100), "mmap length is greater than file size",
         True),
        ("part-002.text.npy", lambda p: _cut(p, 40), "EOFError|ValueError", True),
        ("part-002.keys.json", lambda p: _cut(p, 30), "JSONDecodeError", True),
        ("part-002.keys.json", lambda p: p.write_bytes(b'["k0", "k1" garbled'), "JSONDecodeError",
         True),
        # a well-formed list of the wrong length: only reading it tells
        ("part-002.keys.json", lambda p: p.write_text('["only", "two"]'), "2 keys", False),
        ("part-002.image.npy", lambda p: p.unlink(), "FileNotFoundError", True),
    ],
)
def test_damaged_shard_file_names_file_shard_and_fix(models, file, damage, raw, cheap, tmp_path):
    """A truncated or garbled shard file: one error naming the file, its shard and the fix
    (today: a bare numpy / json error naming nothing)."""
    _, reference = models
    batches = make_pair_batches(n_batches=6, b=4, keys=True)
    cache_dir = build_cache(tmp_path / "c", reference, batches, per_shard=2)
    manifest = read_manifest(cache_dir)
    assert all(shard_problem(cache_dir, name, manifest) is None for name in manifest["shards"])
    damage(cache_dir / file)
    with pytest.raises(ValueError) as ei:
        ReferenceCache(cache_dir).lookup(batches[0][2])
    msg = str(ei.value)
    assert f"{file} of shard part-002 is damaged or truncated" in msg
    assert str(cache_dir) in msg
    assert "run `jeststream precompute-reference` again for that shard" in msg
    assert re.search(raw, msg)
    # the cheap check (precompute-reference's, which then redoes the shard) finds it too
    problem = shard_problem(cache_dir, "part-002", manifest)
    assert (problem is not None and problem.startswith(file)) if cheap else problem is None
    assert shard_problem(cache_dir, "part-000", manifest) is None


def test_damaged_manifest_names_it_and_the_fix(models, tmp_path):
    _, reference = models
    cache_dir = build_cache(tmp_path / "c", reference, make_pair_batches(2, b=4, keys=True))
    _cut(cache_dir / "manifest.json", 50)
    with pytest.raises(ValueError, match=r"manifest\.json is damaged .*precompute-reference"):
        ReferenceCache(cache_dir)


# -- jeststream precompute-reference on real shards ----------------------------------------------

TINY_JSON_NAME = "jeststream-tiny-cache"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    """A tiny open_clip architecture (a JSON config, as --reference-model takes it), two
    checkpoint files of it (reference, other), and the reference's eval preprocessing."""
    import open_clip

    from jeststream.adapters.precompute_reference import load_reference_and_preprocessing

    tmp = tmp_path_factory.mktemp("tiny_ref")
    config = tmp / f"{TINY_JSON_NAME}.json"
    config.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(config)
    paths = {}
    for name, seed in (("reference", 1), ("other", 2)):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = open_clip.create_model(TINY_JSON_NAME)
        paths[name] = tmp / f"{name}.pt"
        torch.save(model.state_dict(), paths[name])
    ref, transform, tokenizer, _ = load_reference_and_preprocessing(
        str(paths["reference"]), model=str(config)
    )
    return {"config": str(config), "reference": str(paths["reference"]),
            "other": str(paths["other"]), "model": ref, "transform": transform,
            "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory):
    from helpers import write_wds_shards

    root = tmp_path_factory.mktemp("wds")
    urls, keys = write_wds_shards(root, n_shards=3, per_shard=16)
    return str(root / "shard-{0000..0002}.tar"), urls, keys


def precompute(tiny_ref, out, *source, reference=None, extra=()):
    from jeststream.cli import main

    argv = ["precompute-reference", *source, "--reference", reference or tiny_ref["reference"],
            "--reference-model", tiny_ref["config"], "--out", str(out), "--batch-size", "8",
            "--num-workers", "0", "--device", "cpu", "--quiet", *extra]
    return main(argv)


def _live(tiny_ref, images, tokens):
    with torch.inference_mode():
        return default_embed(tiny_ref["model"], (images, tokens))


def test_precompute_webdataset_round_trip(tiny_ref, wds_shards, tmp_path, capsys):
    import io
    import tarfile

    from jeststream.adapters.webdataset import webdataset_loader

    spec, urls, keys = wds_shards
    # one more shard, with a sample whose image does not decode
    bad = tmp_path / "bad-0000.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("b0.png", b"not a png"), ("b0.txt", b"broken"),
                           ("b1.png", _png(1)), ("b1.txt", b"ok")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "cache"
    assert precompute(tiny_ref, out, "--shards", f"{spec}::{bad}",
                      extra=["--num-workers", "2"]) == 0
    summary = capsys.readouterr().out
    assert "49 examples, 1 bad samples, 4 shards written" in summary
    manifest = read_manifest(out)
    assert manifest["dtype"] == "float16" and manifest["embed_dim"] == 32
    assert manifest["reference"]["architecture"] == TINY_JSON_NAME
    assert manifest["reference"]["fingerprint"] == reference_fingerprint(tiny_ref["model"])
    assert manifest["preprocessing"]["size"] == [32, 32]
    assert manifest["preprocessing"]["tokenizer"]["context_length"] == 16
    assert manifest["shards"]["bad-0000"]["bad_samples"] == 1
    cache = ReferenceCache(out, reference=tiny_ref["model"])
    assert len(cache) == 49 and "b1" in cache and "b0" not in cache
    # the base loader with the same preprocessing: same keys, the same embeddings (float16)
    base = webdataset_loader(spec, 8, transform=tiny_ref["transform"],
                             tokenizer=tiny_ref["tokenizer"])
    seen = 0
    for images, tokens, batch_keys in base:
        e, live = cache.lookup(batch_keys), _live(tiny_ref, images, tokens)
        torch.testing.assert_close(e.image, live.image, atol=2e-3, rtol=0)
        torch.testing.assert_close(e.text, live.text, atol=2e-3, rtol=0)
        seen += len(batch_keys)
    assert seen == 48
    # another reference cannot write into this cache
    assert precompute(tiny_ref, out, "--shards", spec, reference=tiny_ref["other"]) == 2
    assert "different reference" in capsys.readouterr().err


def _png(i):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def test_precompute_mds_round_trip(tiny_ref, tmp_path, capsys):
    import gc

    from streaming import MDSWriter
    from streaming.base.util import clean_stale_shared_memory

    from jeststream.adapters.streaming import streaming_loader

    local = tmp_path / "mds"
    columns = {"key": "str", "image": "png", "text": "str"}
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(local), columns=columns, size_limit=20_000) as writer:
        for i in range(24):
            from PIL import Image

            img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            writer.write({"key": f"m{i:04d}", "image": img, "text": f"caption {i}"})
    n_shards = len(list(local.glob("shard.*.mds")))
    assert n_shards >= 2
    out = tmp_path / "cache"
    assert precompute(tiny_ref, out, "--mds", str(local), extra=["--dtype", "float32"]) == 0
    assert f"24 examples, 0 bad samples, {n_shards} shards written" in capsys.readouterr().out
    cache = ReferenceCache(out)
    gc.collect()
    clean_stale_shared_memory()
    base = streaming_loader(str(local), 8, transform=tiny_ref["transform"],
                            tokenizer=tiny_ref["tokenizer"])
    try:
        seen = 0
        for batch in base:
            e = cache.lookup(batch["__key__"])
            live = _live(tiny_ref, batch["image"], batch["text"])
            torch.testing.assert_close(e.image, live.image, atol=1e-5, rtol=0)
            torch.testing.assert_close(e.text, live.text, atol=1e-5, rtol=0)
            seen += len(batch["__key__"])
        assert seen == 24
    finally:
        del base
        gc.collect()
        clean_stale_shared_memory()


def _shard_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.name != "manifest.json" and not p.name.startswith(".")}


def test_interrupted_precompute_resumes_and_writes_identical_files(
    tiny_ref, wds_shards, tmp_path, capsys
):
    spec = wds_shards[0]
    whole = tmp_path / "whole"
    assert precompute(tiny_ref, whole, "--shards", spec) == 0
    capsys.readouterr()
    part = tmp_path / "part"
    assert precompute(tiny_ref, part, "--shards", spec, extra=["--max-shards", "1"]) == 0
    assert "1 shards written (0 already complete, 2 left" in capsys.readouterr().out
    assert sorted(read_manifest(part)["shards"]) == ["shard-0000"]
    # a run killed while writing the second shard: a renamed-over file with no manifest record
    # and a temporary file are left behind; neither counts, both are replaced
    (part / "shard-0001.image.npy").write_bytes(b"half written")
    (part / ".shard-0001.text.npy.x.tmp").write_bytes(b"junk")
    with pytest.raises(KeyError, match="s00016"):
        ReferenceCache(part).lookup(["s00016"])
    mtime = (part / "shard-0000.image.npy").stat().st_mtime_ns
    assert precompute(tiny_ref, part, "--shards", spec) == 0
    assert "2 shards written (1 already complete, 0 left" in capsys.readouterr().out
    assert (part / "shard-0000.image.npy").stat().st_mtime_ns == mtime  # skipped, not redone
    files = _shard_files(part)
    files.pop(".shard-0001.text.npy.x.tmp", None)
    assert files == _shard_files(whole)
    assert read_manifest(part)["shards"].keys() == read_manifest(whole)["shards"].keys()
    # a recorded shard damaged since (a cut copy): the same command redoes it, and only it
    (part / "shard-0001.text.npy").write_bytes((part / "shard-0001.text.npy").read_bytes()[:-64])
    with pytest.raises(ValueError, match="shard-0001.text.npy of shard shard-0001"):
        len(ReferenceCache(part))
    assert precompute(tiny_ref, part, "--shards", spec) == 0
    assert "1 shards written (2 already complete, 0 left" in capsys.readouterr().out
    assert (part / "shard-0000.image.npy").stat().st_mtime_ns == mtime
    files = _shard_files(part)
    files.pop(".shard-0001.text.npy.x.tmp", None)
    assert files == _shard_files(whole)


def test_ranks_split_the_precompute(tiny_ref, wds_shards, tmp_path, capsys):
    spec = wds_shards[0]
    out = tmp_path / "cache"
    for rank in (0, 1):
        assert precompute(tiny_ref, out, "--shards", spec,
                          extra=["--rank", str(rank), "--world-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 shards written" in lines[0] and "1 shards written" in lines[1]
    assert len(ReferenceCache(out)) == 48


def test_selection_from_precomputed_cache_equals_live_reference(tiny_ref, wds_shards, tmp_path):
    """--dtype float32, synchronous scoring, same seed and preprocessing: the same indices."""
    import open_clip

    from jeststream.adapters.webdataset import webdataset_loader

    spec = wds_shards[0]
    out = tmp_path / "cache"
    assert precompute(tiny_ref, out, "--shards", spec, extra=["--dtype", "float32"]) == 0
    with torch.random.fork_rng():
        torch.manual_seed(7)
        learner = open_clip.create_model(TINY_JSON_NAME)

    def base():
        return webdataset_loader(spec, 4, transform=tiny_ref["transform"],
                                 tokenizer=tiny_ref["tokenizer"])

    kw = {"ratio": 0.25, "n_chunks": 2, "loss": "softmax"}
    live = _indices(base(), learner, tiny_ref["model"], **kw)
    cache = ReferenceCache(out, reference=tiny_ref["model"])
    cached = _indices(base(), learner, cache, **kw)
    assert len(live) == 3 and cached == live
    assert cache.stats["lookups"] == 3 and cache.stats["computed"] == 0


# -- jeststream openclip-train --jest-reference-cache ----------------------------------------------


def test_openclip_train_with_reference_cache(tmp_path, monkeypatch, capsys):
    """Precompute with the tiny open_clip_train model, then train one JEST epoch on the cache:
    no reference is loaded at all, and the selection log names every sample."""
    from helpers import (
        log_of,
        openclip_train_argv,
        register_tiny,
        run_openclip_train,
        write_colour_shards,
    )

    from jeststream.adapters import open_clip as oc
    from jeststream.selection_log import read_selection_log

    arch = register_tiny(tmp_path / "configs")
    noisy = write_colour_shards(tmp_path / "noisy", 2, 32, noise=0.5, seed=2)
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.save(open_clip.create_model(arch).state_dict(), tmp_path / "ref.pt")
    from jeststream.cli import main

    cache = tmp_path / "cache"
    assert main(["precompute-reference", "--shards", noisy, "--reference", str(tmp_path / "ref.pt"),
                 "--reference-model", arch, "--out", str(cache), "--num-workers", "0",
                 "--quiet"]) == 0
    assert "64 examples, 0 bad samples, 2 shards written" in capsys.readouterr().out

    def no_reference(*a, **k):
        raise AssertionError("the reference must not be loaded")

    monkeypatch.setattr(oc, "load_reference", no_reference)
    sel = tmp_path / "sel.jsonl"
    argv = openclip_train_argv(tmp_path, "cached", noisy, batch=4, samples=64, epochs=1) + [
        "--siglip", "--jest-ratio", "0.25", "--jest-reference-cache", str(cache),
        "--jest-n-chunks", "2", "--jest-selection-log", str(sel),
    ]
    assert run_openclip_train(argv) == 0
    log = log_of(tmp_path, "cached")
    assert "JEST: ratio 1/4, 16 base batches -> 4 selected batches per epoch (16 samples)" in log
    assert len([ln for ln in log.splitlines() if "JEST Epoch: 0 [" in ln]) == 4
    assert "Traceback" not in log
    cols = read_selection_log(sel)
    assert len(cols["key"]) == 64 and set(cols["key"]) == set(ReferenceCache(cache)._load())


def test_openclip_train_reference_cache_flag_checks(tmp_path, capsys):
    from jeststream.adapters import open_clip_train as oct_

    argv = ["--train-data", "x.tar", "--batch-size", "4", "--logs", str(tmp_path),
            "--jest-ratio", "0.25", "--jest-reference-cache", str(tmp_path / "nope")]
    assert oct_.main(argv) == 2
    assert "precompute-reference" in capsys.readouterr().err
