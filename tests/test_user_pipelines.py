"""Users' own webdataset pipelines as JESTLoader's base loader, on real shards written by
webdataset.ShardWriter, with a tiny open_clip model and open_clip's own eval preprocessing.

What is supported and what is not (docs/install.md, "Your own webdataset pipeline"):
- tuple batches (``to_tuple("jpg;png", "txt", "__key__")``): images and tokens at positions 0
  and 1, keys at 2 -- into the selection log;
- dict batches: ``image`` / ``text`` fields for the default embed (``rename`` them), or
  ``.map(normalize_batch)`` to turn any dict batch into ``(images, texts, keys)``;
- ``wds.WebLoader`` with workers (``batch_size=None``: the pipeline batches);
- no ``len`` unless ``with_length``; no resume (``load_state_dict`` raises); ``batched(b)`` is
  ``partial=True`` by default, and a super-batch holding a short base batch yields
  ``round(size / n)`` examples instead of b -- ``partial=False`` keeps every batch at b;
- :func:`checked_tarfile_to_samples` in a ``wds.DataPipeline`` in place of the tar reader, or
  the fluid :func:`checked_webdataset`: damaged shards are reported (a
  :class:`ShardErrorCounter` counts them across workers), where ``wds.WebDataset``'s tarfile
  reading ends such a shard silently.

Runs under webdataset 0.2.x (``make test``) and 1.0.x (``make test-wds1``).
"""

from __future__ import annotations

import random
import tarfile
import warnings

import open_clip
import pytest
import torch
import webdataset as wds
from conftest import TINY_CONTEXT, TINY_IMAGE_SIZE, toy_tokenize
from helpers import N_SHARDS, PER_SHARD, jest_loader, write_wds_shards
from torch.utils.data import default_collate

from jeststream.adapters.webdataset import (
    BadShardError,
    ShardErrorCounter,
    checked_tarfile_to_samples,
    checked_webdataset,
    normalize_batch,
)
from jeststream.selection_log import read_selection_log

B = 4
ALL = N_SHARDS * PER_SHARD

# open_clip's eval preprocessing (resize, center crop, to tensor, normalize), as a user has it
preprocess = open_clip.image_transform(TINY_IMAGE_SIZE, is_train=False)


def tokenize(text: str) -> torch.Tensor:
    """One caption -> [ctx] (open_clip's pipeline does ``tokenizer(text)[0]``)."""
    return toy_tokenize([text])[0]


def user_tuple_pipeline(urls, b=B, *, partial=False, shuffle=16, seed=0):
    """The pipeline of the README: the user's own, nothing of jeststream in it."""
    return (
        wds.WebDataset(urls, shardshuffle=False)
        .shuffle(shuffle, rng=random.Random(seed))
        .decode("pil")
        .to_tuple("jpg;png", "txt", "__key__")
        .map_tuple(preprocess, tokenize)
        .batched(b, partial=partial)
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_wds_shards(tmp_path_factory.mktemp("user-wds"))


def _all_keys(keys_by_shard):
    return {k for ks in keys_by_shard.values() for k in ks}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_tuple_batches_from_a_web_loader(shards, models, tmp_path, num_workers):
    urls, keys_by_shard = shards
    loader = wds.WebLoader(user_tuple_pipeline(urls), batch_size=None, num_workers=num_workers)
    log = tmp_path / "sel.parquet"
    seen = []
    with jest_loader(loader, models, selection_log=log) as jest:
        for images, texts, keys in jest:
            assert images.shape == (B, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
            assert images.dtype == torch.float32 and images.min() < 0  # normalized by open_clip
            assert texts.shape == (B, TINY_CONTEXT) and texts.dtype == torch.long
            assert len(keys) == B and all(isinstance(k, str) for k in keys)
            seen.extend(keys)
        steps = jest.stats["batches"]
    # 48 examples in batches of 4 (12 per worker of 2: 24 each), super-batches of 8
    assert steps == ALL // (2 * B)
    assert len(seen) == len(set(seen)) == steps * B
    cols = read_selection_log(log)
    assert sorted(cols["key"]) == sorted(_all_keys(keys_by_shard))  # every example logged once
    assert sorted(k for k, s in zip(cols["key"], cols["selected"]) if s) == sorted(seen)


def test_dict_batches(shards, models, tmp_path):
    """Dict samples, collated by torch's default_collate (webdataset 0.2.x's own collation only
    takes tuples): with ``image`` / ``text`` fields the default embed reads them directly and
    ``__key__`` reaches the selection log; with webdataset's field names the default embed says
    what it needs, and ``.map(normalize_batch)`` turns the batch into (images, texts, keys)."""
    urls, keys_by_shard = shards
    named = (
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pil")
        .rename(image="jpg;png", text="txt")
        .map_dict(image=preprocess, text=tokenize)
        .batched(B, collation_fn=default_collate, partial=False)
    )
    log = tmp_path / "sel.parquet"
    with jest_loader(wds.WebLoader(named, batch_size=None), models, selection_log=log) as jest:
        batches = list(jest)
    assert len(batches) == ALL // (2 * B)
    for batch in batches:
        assert isinstance(batch, dict) and batch["image"].shape == (B, 3, 32, 32)
        assert batch["text"].shape == (B, TINY_CONTEXT) and len(batch["__key__"]) == B
        assert len(batch["__url__"]) == B  # per-example fields are selected along
    cols = read_selection_log(log)
    assert sorted(cols["key"]) == sorted(_all_keys(keys_by_shard))

    raw_names = (
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pil")
        .rename(jpg="jpg;png")  # one image field name for every sample
        .map_dict(jpg=preprocess, txt=tokenize)
        .batched(B, collation_fn=default_collate, partial=False)
    )
    with jest_loader(wds.WebLoader(raw_names, batch_size=None), models) as jest:
        with pytest.raises(TypeError, match=r"dict batch needs 'image' and 'text'.*'jpg'"):
            next(iter(jest))
    tuples = wds.WebLoader(raw_names, batch_size=None).map(normalize_batch)
    with jest_loader(tuples, models) as jest:
        got = [keys for _, _, keys in jest]
    assert len(got) == ALL // (2 * B) and len({k for ks in got for k in ks}) == ALL // 2


def test_partial_last_batch_gives_a_smaller_selected_batch(tmp_path, models):
    """22 examples, batched(4): 4,4,4,4,4,2. The third super-batch holds 6 examples and yields
    round(6 / 2) = 3; with partial=False the fifth batch of 4 makes no super-batch of n=2 and
    is dropped, counted in stats['dropped_examples']."""
    urls, _ = write_wds_shards(tmp_path / "s", n_shards=2, per_shard=11)
    partial = wds.WebLoader(user_tuple_pipeline(urls, partial=True), batch_size=None)
    with jest_loader(partial, models) as jest:
        sizes = [len(keys) for _, _, keys in jest]
        assert jest.stats["dropped_examples"] == 0
    assert sizes == [4, 4, 3]
    full = wds.WebLoader(user_tuple_pipeline(urls, partial=False), batch_size=None)
    with jest_loader(full, models) as jest:
        sizes = [len(keys) for _, _, keys in jest]
        assert jest.stats["dropped_examples"] == 4
    assert sizes == [4, 4]


def test_no_len_without_with_length_and_no_resume(shards, models):
    urls, _ = shards
    loader = wds.WebLoader(user_tuple_pipeline(urls), batch_size=None)
    with jest_loader(loader, models) as jest:
        with pytest.raises(TypeError, match="WebLoader.*has no length"):
            len(jest)
        it = iter(jest)
        next(it)
        state = jest.state_dict()
        assert state["base"] is None  # nothing to restore the stream from
        with pytest.raises(TypeError, match="cannot restore.*WebLoader.*load_state_dict"):
            jest.load_state_dict(state)
        del it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset 1.x warns that with_length is only a len
        sized = wds.WebLoader(user_tuple_pipeline(urls), batch_size=None).with_length(ALL // B)
    with jest_loader(sized, models) as jest:
        assert len(jest) == ALL // B // 2
        assert sum(1 for _ in jest) == len(jest)


def _cut_at_member_boundary(path):
    """Truncate a shard right after its third sample: a clean cut between members, which
    Python's tarfile in stream mode takes for the end of the archive."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    third = sorted({m.name.split(".")[0] for m in members})[3]
    cut = min(m.offset for m in members if m.name.startswith(third))
    with open(path, "r+b") as f:
        f.truncate(cut)
    return 3


def _checked_pipeline(urls, handler):
    """The user's pipeline with the checked tar reader in place of webdataset's."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        checked_tarfile_to_samples(handler=handler),
        wds.decode("pil"),
        wds.to_tuple("jpg;png", "txt", "__key__"),
        wds.map_tuple(preprocess, tokenize),
        wds.batched(B, partial=False),
    )


def test_checked_reader_in_a_user_pipeline_reports_a_damaged_shard(tmp_path, models):
    urls, keys_by_shard = write_wds_shards(tmp_path / "s")
    bad = urls[1]
    kept = _cut_at_member_boundary(bad)

    # webdataset's own reading: the cut shard just ends early, nothing says so
    plain = [k for _, _, ks in user_tuple_pipeline(urls, partial=True, shuffle=0) for k in ks]
    assert len(plain) == ALL - (PER_SHARD - kept)

    # the checked reader, default handler: the error names the shard
    with pytest.raises(BadShardError, match=r"shard-0001\.tar.*no end-of-archive block"):
        list(_checked_pipeline(urls, None))

    # the fluid form, with a counter shared by 2 DataLoader workers, read in the training process
    counter = ShardErrorCounter("warn")
    fluid = (
        checked_webdataset(urls, handler=counter)
        .shuffle(16, rng=random.Random(0))
        .decode("pil")
        .to_tuple("jpg;png", "txt", "__key__")
        .map_tuple(preprocess, tokenize)
        .batched(B, partial=False)
    )
    loader = wds.WebLoader(fluid, batch_size=None, num_workers=2)
    with jest_loader(loader, models) as jest:
        seen = [k for _, _, ks in jest for k in ks]
    assert counter.bad_shards == 1 and counter.bad_shard_names == [bad]
    assert set(keys_by_shard[urls[3]]) & set(seen)  # the epoch went on past the bad shard

    # webdataset's own handlers decide as in webdataset
    with pytest.warns(UserWarning, match="shard-0001.tar"):
        cont = [k for _, _, ks in _checked_pipeline(urls, wds.warn_and_continue) for k in ks]
    assert len(cont) == (ALL - (PER_SHARD - kept)) // B * B
    with pytest.warns(UserWarning, match="shard-0001.tar"):
        stop = [k for _, _, ks in _checked_pipeline(urls, wds.warn_and_stop) for k in ks]
    assert len(stop) == (PER_SHARD + kept) // B * B  # shard 0 and the start of shard 1
