"""ReferenceCache: the frozen reference's embeddings on disk, looked up by sample key.

Library level (caches written with ``write_shard``), then ``jeststream precompute-reference`` on
real webdataset and MDS shards (round trip, resume), then selection from a cache against the
live reference, then ``jeststream openclip-train --jest-reference-cache``.
"""

from __future__ import annotations

import json

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
def models():
    return make_tiny_clip(seed=0), make_tiny_clip(seed=1)


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
    assert float(e.logit_scale) == pytest.approx(float(reference.logit_scale.exp()))
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
    with pytest.raises(FileNotFoundError, match="precompute-reference"):
        ReferenceCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a jeststream-reference-cache"):
        ReferenceCache(tmp_path)
    with pytest.raises(ValueError, match="on_missing"):
        ReferenceCache(tmp_path, on_missing="skip")
    with pytest.raises(TypeError, match="ReferenceCache"):
        JESTLoader([], learner, "cache-dir")
