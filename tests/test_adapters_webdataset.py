"""webdataset adapter on real tar shards written by webdataset.ShardWriter, read through
JESTLoader with a tiny open_clip model."""

from __future__ import annotations

import io
import logging
import tarfile
import warnings
from collections import Counter

import numpy as np
import open_clip  # noqa: F401 -- dev extra: a missing one must fail, not skip
import pytest
import torch
import webdataset as wds
from conftest import toy_tokenize
from helpers import N_SHARDS, PER_SHARD, image_bytes, jest_loader, write_wds_shards
from PIL import Image

from jeststream.adapters.webdataset import (
    BadShardError,
    BadShardWarning,
    ShardErrorCounter,
    TruncatedShardError,
    checked_tarfile_samples,
    checked_tarfile_to_samples,
    checked_webdataset,
    decode_image,
    expand_urls,
    normalize_batch,
    tar_members,
    webdataset_loader,
)
from jeststream.selection_log import read_selection_log

B = 4  # training batch size
CTX = 16


tokenize = toy_tokenize


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_wds_shards(tmp_path_factory.mktemp("wds"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_jest_over_webdataset_shards(shards, models, tmp_path, num_workers):
    urls, keys_by_shard = shards
    all_keys = {k for ks in keys_by_shard.values() for k in ks}
    base = webdataset_loader(urls, B, tokenizer=tokenize, num_workers=num_workers)
    log = tmp_path / "sel.parquet"
    seen = []
    with jest_loader(base, models, selection_log=log) as jest:
        for images, texts, keys in jest:
            assert images.shape == (B, 3, 32, 32) and images.dtype == torch.float32
            assert texts.shape == (B, CTX) and texts.dtype == torch.long
            assert len(keys) == B
            seen.extend(keys)
        steps = jest.stats["batches"]
        assert jest.stats["bad_shards"] == 0
    assert steps == N_SHARDS * PER_SHARD // (2 * B)
    assert set(seen) <= all_keys
    assert len(seen) == len(set(seen)), Counter(seen).most_common(3)
    cols = read_selection_log(log)
    assert len(cols["key"]) == steps * 2 * B  # one record per example that entered a super-batch
    assert set(cols["key"]) == all_keys  # 48 examples, every one seen once
    logged_selected = [k for k, s in zip(cols["key"], cols["selected"]) if s]
    assert sorted(logged_selected) == sorted(seen)


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_replays_exactly(shards, models, tmp_path, num_workers, shuffle_buffer):
    urls, keys_by_shard = shards
    log = tmp_path / "sel.parquet"

    def make(**kw):
        base = webdataset_loader(
            urls,
            B,
            tokenizer=tokenize,
            num_workers=num_workers,
            shuffle_shards=True,
            shuffle_buffer=shuffle_buffer,
            seed=3,
        )
        return jest_loader(base, models, seed=7, **kw)

    with make() as jest:
        jest.set_epoch(1)
        full = [list(k) for _, _, k in jest]
    assert len(full) == 6

    with make(selection_log=log) as jest:
        jest.set_epoch(1)
        it = iter(jest)
        head = [list(next(it)[2]) for _ in range(2)]
        state = jest.state_dict()
        next(it)  # trained one more step after the checkpoint, then "crashed"
        del it
    assert state["base"] == {"epoch": 1, "batches": 4, "seed": 3}
    with make(selection_log=log) as jest:  # the same log: appended, step 2 rewritten
        jest.load_state_dict(state)
        tail = [list(k) for _, _, k in jest]
    assert head + tail == full

    cols = read_selection_log(log)
    assert cols["step"].tolist() == [s for s in range(6) for _ in range(2 * B)]
    assert sorted(cols["key"]) == sorted(k for ks in keys_by_shard.values() for k in ks)
    selected = [k for k, sel in zip(cols["key"], cols["selected"]) if sel]
    assert sorted(selected) == sorted(k for ks in full for k in ks)


def test_truncated_shard_is_reported_not_silent(tmp_path, models):
    urls, keys_by_shard = write_wds_shards(tmp_path / "shards")
    bad = urls[1]
    with open(bad, "r+b") as f:  # cut the shard in the middle of its members
        f.truncate(len(open(bad, "rb").read()) // 2)
    base = webdataset_loader(urls, B, tokenizer=tokenize)
    with pytest.warns(BadShardWarning, match="shard-0001.tar"):
        with jest_loader(base, models) as jest:
            seen = [k for _, _, ks in jest for k in ks]
            assert jest.stats["bad_shards"] == 1
    assert base.stats["bad_shard_names"] == [bad]
    # the epoch went on past the bad shard: the shards after it were read
    assert set(keys_by_shard[urls[3]]) & set(seen)

    raising = webdataset_loader(urls, B, on_bad_shard="raise")
    with pytest.raises(ValueError, match="shard-0001.tar"):
        list(raising)


def _tar_with(path, members, fmt=tarfile.PAX_FORMAT, mode="w"):
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("a/dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a regular file: skipped
    return path


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar", "gz"])
def test_tar_reader_agrees_with_tarfile(tmp_path, fmt):
    """Long names (pax / GNU long-name / ustar prefix), non-ASCII names, empty members, and
    gzip shards: the same members, in order, as Python's tarfile reads."""
    members = [
        ("k0.txt", b"hello"),
        ("k0.png", image_bytes(0, "PNG")),
        ("deep/" * 20 + "k1.txt", b"x" * 512),  # 100+ characters: needs a long-name scheme
        ("k2.txt", b""),
        ("k3.json", b"{}" * 700),
    ]
    if fmt != "ustar":
        members.append(("caf\u00e9/k4.txt", b"non-ascii"))
    tar_format = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}.get(fmt, tarfile.USTAR_FORMAT)
    if fmt == "gz":
        tar_format = tarfile.PAX_FORMAT
    path = _tar_with(tmp_path / f"s.{fmt}.tar", members, tar_format, "w:gz" if fmt == "gz" else "w")
    assert list(tar_members(str(path))) == members


def test_tar_reader_refuses_every_truncation(tmp_path):
    """Cut anywhere before the end-of-archive block, a shard raises; it never ends quietly."""
    members = [(f"k{i}.txt", bytes([65 + i]) * (100 * i + 7)) for i in range(4)]
    full = _tar_with(tmp_path / "full.tar", members).read_bytes()
    # headers and padded data of the members, the directory's header, the end block
    end = sum(512 + -(-len(d) // 512) * 512 for _, d in members) + 512 + 512
    assert full[end - 512 : end] == bytes(512) and full[end - 1024 : end - 512] != bytes(512)
    for cut in range(0, end, 97):
        (tmp_path / "cut.tar").write_bytes(full[:cut])
        with pytest.raises(TruncatedShardError):
            list(tar_members(str(tmp_path / "cut.tar")))
    (tmp_path / "cut.tar").write_bytes(full[:end])  # the end block itself, no record padding
    assert list(tar_members(str(tmp_path / "cut.tar"))) == members
    broken = bytearray(full)
    broken[512 + 600] ^= 0xFF  # inside the second member's header: checksum no longer holds
    (tmp_path / "bad.tar").write_bytes(bytes(broken))
    with pytest.raises(TruncatedShardError, match="bad checksum"):
        list(tar_members(str(tmp_path / "bad.tar")))


def _raw(sample):
    return {k: v for k, v in sample.items() if k != "__local_path__"}


def test_checked_stage_reads_what_webdataset_reads(shards, tmp_path):
    """On good shards the checked stage is a drop-in for webdataset's tarfile_to_samples: the
    same samples, keys, fields and bytes, in order -- metadata members skipped, upper-case
    extensions lowered, select_files / rename_files applied -- also in the fluid form."""
    urls, _ = shards
    extra = _tar_with(
        tmp_path / "extra.tar",
        [
            ("__meta__", b"{}"),  # webdataset metadata: skipped by both
            ("__meta__/f.json", b"{}"),
            ("d/k0.JPG", image_bytes(0, "JPEG")),
            ("d/k0.txt", b"zero"),
            ("d/k0.cls.txt", b"3"),
            ("d/k1.txt", b"one"),
            ("noext", b"skipped"),
            ("a.b/noext", b"skipped"),
            ("a.b/.dotfile", b"skipped"),  # no key before the dot: webdataset's split skips it
            ("a/.hidden.txt", b"key 'a/'"),
            ("v1.2/k2.tar.gz", b"ext 'tar.gz'"),
            ("k3.", b"empty ext"),
            ("__x__.txt", b"not metadata"),
            ("d/k4.txt", b"last"),
        ],
    )
    all_urls = [*urls, str(extra)]
    want = [_raw(s) for s in wds.WebDataset(all_urls, shardshuffle=False)]
    pipe = wds.DataPipeline(wds.SimpleShardList(all_urls), checked_tarfile_to_samples())
    assert [_raw(s) for s in pipe] == want
    assert [_raw(s) for s in checked_webdataset(all_urls)] == want
    keys = [s["__key__"] for s in want[-7:]]
    assert keys == ["d/k0", "d/k1", "a/", "v1.2/k2", "k3", "__x__", "d/k4"]
    assert want[-7] == {
        "__key__": "d/k0", "__url__": str(extra), "jpg": image_bytes(0, "JPEG"), "txt": b"zero",
        "cls.txt": b"3",
    }

    def only_txt(name):
        return name.endswith(".txt")

    def renamed(name):
        return name.replace("d/", "e/")

    kw = {"select_files": only_txt, "rename_files": renamed}
    want = [_raw(s) for s in wds.WebDataset([str(extra)], shardshuffle=False, **kw)]
    got = [_raw(s) for s in checked_webdataset([str(extra)], **kw)]
    assert got == want and [s["__key__"] for s in got] == ["e/k0", "e/k1", "a/", "__x__", "e/k4"]
    # decoding etc. as usual in the fluid form
    fluid = checked_webdataset(urls).decode("torchrgb").to_tuple("jpg;png", "txt").batched(B)
    batch = next(iter(fluid))
    assert batch[0].shape == (B, 3, 32, 32) and list(batch[1]) == [f"a photo {i}" for i in range(B)]


def test_repeated_member_name_in_a_sample_raises_as_in_webdataset(tmp_path):
    """Two ``k1.txt`` in one sample: webdataset's group_by_keys refuses it, so does the checked
    stage (it used to keep the second silently); webdataset_loader reports the shard."""
    path = _tar_with(
        tmp_path / "dup.tar",
        [("k0.txt", b"a"), ("k0.png", image_bytes(0, "PNG")), ("k1.txt", b"b"),
         ("k1.png", image_bytes(1, "PNG")), ("k1.txt", b"again"), ("k2.txt", b"c"),
         ("k2.png", image_bytes(2, "PNG"))],
    )
    with pytest.raises(ValueError, match="duplicate file name"):
        list(wds.WebDataset(str(path), shardshuffle=False))
    with pytest.raises(BadShardError, match=r"dup\.tar is bad \(ValueError: k1\.txt: duplicate"):
        list(checked_webdataset(str(path)))
    with pytest.raises(ValueError, match="dup.tar.*on_bad_shard='warn'"):
        list(webdataset_loader(str(path), 1, on_bad_shard="raise"))
    base = webdataset_loader(str(path), 1)
    with pytest.warns(BadShardWarning, match="duplicate file name"):
        keys = [k for _, _, ks in base for k in ks]
    assert keys == ["k0"] and base.stats["bad_shard_names"] == [str(path)]


def test_checked_stage_handlers(tmp_path):
    """None raises; a webdataset handler decides (continue / stop); a ShardErrorCounter
    counts; a source that is not a URL is refused naming the fix."""
    urls, keys_by_shard = write_wds_shards(tmp_path / "shards")
    (tmp_path / "shards" / "shard-0001.tar").write_bytes(b"not a tar" * 100)
    src = [{"url": u} for u in urls]
    with pytest.raises(BadShardError, match="shard-0001.tar"):
        list(checked_tarfile_samples(src))
    with pytest.warns(UserWarning, match="shard-0001.tar"):
        cont = [s["__key__"] for s in checked_tarfile_samples(src, wds.warn_and_continue)]
    assert cont == keys_by_shard[urls[0]] + keys_by_shard[urls[2]] + keys_by_shard[urls[3]]
    stop = [s["__key__"] for s in checked_tarfile_samples(src, wds.ignore_and_stop)]
    assert stop == keys_by_shard[urls[0]]
    counter = ShardErrorCounter("warn")
    with pytest.warns(BadShardWarning):
        assert len(list(checked_tarfile_samples(urls, counter))) == 3 * PER_SHARD
    assert counter.bad_shards == 1 and counter.bad_shard_names == [urls[1]]
    with pytest.raises(BadShardError, match="pass on_bad_shard='warn'"):
        list(checked_tarfile_samples(urls, ShardErrorCounter("raise")))
    with pytest.raises(TypeError, match="SimpleShardList"):
        list(checked_tarfile_samples([3]))


def test_expand_urls_is_webdatasets(monkeypatch):
    monkeypatch.setenv("WDS_ROOT", "/data")
    assert expand_urls("${ROOT}/a-{0..2}.tar::b.tar") == [  # ${X}: $WDS_X
        "/data/a-0.tar", "/data/a-1.tar", "/data/a-2.tar", "b.tar"
    ]
    assert expand_urls(("x.tar", "y.tar")) == ["x.tar", "y.tar"]
    with pytest.raises(ValueError, match="no shard URLs"):
        expand_urls([])


def test_bad_shards_counted_across_workers(tmp_path):
    urls, keys_by_shard = write_wds_shards(tmp_path / "shards")
    (tmp_path / "shards" / "garbage.tar").write_bytes(b"this is not a tar file" * 100)
    urls = urls + [str(tmp_path / "shards" / "garbage.tar"), str(tmp_path / "missing.tar")]
    base = webdataset_loader(urls, 2, num_workers=2)
    with pytest.warns(BadShardWarning, match="skipped by DataLoader workers"):
        keys = [k for _, _, ks in base for k in ks]
    assert base.stats["bad_shards"] == 2
    assert sorted(keys) == sorted(k for ks in keys_by_shard.values() for k in ks)


def test_bad_sample_is_skipped_and_counted(tmp_path):
    pattern = str(tmp_path / "s-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=100, verbose=0) as sink:
        for i in range(5):
            sample = {"__key__": f"k{i}", "png": image_bytes(i, "PNG"), "txt": "x"}
            if i == 2:
                sample["png"] = b"\x89PNG broken"
            if i == 3:
                del sample["txt"]
            sink.write(sample)
    base = webdataset_loader(pattern % 0, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for _, _, ks in base for k in ks]
    assert keys == ["k0", "k1", "k4"]
    assert base.stats["bad_samples"] == 2 and base.stats["bad_shards"] == 0
    assert any("'k2'" in str(w.message) for w in caught)


def _netpbm(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PPM")  # P5 for grey, P6 for RGB
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 3)], ids=["pgm", "ppm"])
def test_netpbm_fast_path_matches_pil(shape):
    """Binary 8-bit PGM/PPM skip PIL's reader; the image is the one PIL decodes, also when
    the raster starts with whitespace-valued bytes (the header ends at exactly one)."""
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    arr.flat[:3] = (10, 32, 9)  # "\n", " ", "\t"
    data = _netpbm(arr)
    fast = decode_image(data, "pgm")
    with Image.open(io.BytesIO(data)) as slow:
        slow.load()
        assert fast.mode == slow.mode and fast.size == slow.size
        assert np.array_equal(np.asarray(fast), np.asarray(slow))
    assert np.array_equal(np.asarray(fast), arr)
    # other extensions keep PIL's path; the image is the same
    assert np.array_equal(np.asarray(decode_image(data, "png")), arr)


def test_netpbm_other_forms_go_through_pil():
    """A header comment or a maxval other than 255 is left to PIL, which reads them."""
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    commented = b"P5\n# made by hand\n4 3\n255\n" + arr.tobytes()
    assert np.array_equal(np.asarray(decode_image(commented, "pgm")), arr)
    low = b"P5 4 3 15\n" + (arr % 16).tobytes()
    with Image.open(io.BytesIO(low)) as want:
        want.load()
        assert np.array_equal(np.asarray(decode_image(low, "pgm")), np.asarray(want))


def test_truncated_netpbm_is_a_bad_sample(tmp_path):
    """A short raster raises naming the byte counts; in a shard the sample is skipped and
    counted, the others are read with their pixels."""
    arr = np.random.default_rng(1).integers(0, 256, (6, 6), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"truncated L netpbm image: 35 of 6x6x1 = 36"):
        decode_image(_netpbm(arr)[:-1], "pgm")
    pattern = str(tmp_path / "g-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=100, verbose=0) as sink:
        for i in range(4):
            data = _netpbm(arr + i)
            sink.write({"__key__": f"k{i}", "pgm": data[:-10] if i == 1 else data, "txt": "x"})
    base = webdataset_loader(pattern % 0, 1, transform=np.asarray)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(base)
    assert [ks for _, _, ks in batches] == [["k0"], ["k2"], ["k3"]]
    for (images, _, _), i in zip(batches, (0, 2, 3)):
        assert torch.equal(images[0], torch.from_numpy(arr + i))
    assert base.stats["bad_samples"] == 1
    assert any("'k1'" in str(w.message) and "truncated" in str(w.message) for w in caught)


def test_numpy_transform_is_stacked_into_a_tensor(shards):
    """A transform may return numpy arrays (albumentations-style): each batch is one tensor,
    equal to the tensor transform's; arrays of different shapes are a clear error."""
    urls, _ = shards

    def as_array(image):
        return np.asarray(image.convert("L").resize((8, 8)))

    got = next(iter(webdataset_loader(urls, B, transform=as_array)))
    want = next(iter(webdataset_loader(urls, B, transform=lambda im: torch.tensor(as_array(im)))))
    assert isinstance(got[0], torch.Tensor) and got[0].shape == (B, 8, 8)
    assert got[0].dtype == torch.uint8 and torch.equal(got[0], want[0]) and got[2] == want[2]

    sizes = iter([8, 7, 8, 8])
    with pytest.raises(ValueError, match=r"cannot stack images.*ndarray\(7, 8\)"):
        next(iter(webdataset_loader(urls, B, transform=lambda im: as_array(im)[: next(sizes)])))


def test_shard_order_is_seeded_by_epoch(shards):
    urls, _ = shards
    base = webdataset_loader(urls, B, shuffle_shards=True, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        base.set_epoch(epoch)
        orders.append(base.dataset.shard_order())
    assert orders[0] == orders[2] and sorted(orders[0]) == sorted(urls)
    assert any(webdataset_loader(urls, B, shuffle_shards=True, seed=s).dataset.shard_order()
               != urls for s in range(5))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sample_shuffle_buffer_is_seeded_and_loses_nothing(shards, num_workers):
    urls, keys_by_shard = shards
    all_keys = sorted(k for ks in keys_by_shard.values() for k in ks)

    def epoch_keys(epoch, seed=0, shuffle_buffer=16):
        base = webdataset_loader(
            urls, B, num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed
        )
        base.set_epoch(epoch)
        return [k for _, _, keys in base for k in keys]

    plain = epoch_keys(0, shuffle_buffer=0)
    first = epoch_keys(0)
    assert sorted(first) == sorted(plain) == all_keys  # 48 = 12 batches of 4: nothing dropped
    assert first != plain  # samples really move across the stream (and across shards)
    assert any(k not in keys_by_shard[urls[0]] for k in first[:PER_SHARD])
    assert epoch_keys(0) == first  # deterministic: resume replays it
    assert epoch_keys(1) != first and sorted(epoch_keys(1)) == all_keys
    assert epoch_keys(0, seed=1) != first


def test_bad_shuffle_buffer_is_refused(shards):
    with pytest.raises(ValueError, match="shuffle_buffer must be an int >= 0.*-1"):
        webdataset_loader(shards[0], B, shuffle_buffer=-1)


def test_normalize_batch_across_collations(shards):
    urls, _ = shards
    # webdataset's own pipeline and collation (0.2.x: a list of fields; 1.0.x: a tuple)
    ds = (
        wds.WebDataset(urls[:1], shardshuffle=False)
        .decode("torchrgb")
        .to_tuple("jpg;png", "txt", "__key__")
        .batched(B)
    )
    batch = next(iter(ds))
    images, texts, keys = normalize_batch(batch)
    assert images.shape == (B, 3, 32, 32)
    assert texts == ["a photo 0", "a photo 1", "a photo 2", "a photo 3"]
    assert keys == ["s00000", "s00001", "s00002", "s00003"]
    # tuple collation, lists of tensors, dict batches
    imgs = [torch.zeros(3, 4, 4)] * 2
    for b in (
        (imgs, ("a", "b"), ("k1", "k2")),
        [torch.stack(imgs), ["a", "b"], ["k1", "k2"]],
        {"jpg": imgs, "txt": ["a", "b"], "__key__": ["k1", "k2"]},
    ):
        im, tx, ks = normalize_batch(b)
        assert im.shape == (2, 3, 4, 4) and tx == ["a", "b"] and ks == ["k1", "k2"]
    assert normalize_batch({"image": imgs, "text": ["a", "b"]})[2] is None
    with pytest.raises(ValueError, match="image field"):
        normalize_batch({"foo": 1})
    with pytest.raises(TypeError, match="to_tuple"):
        normalize_batch(torch.zeros(2))


def test_open_clip_train_tar_reader_on_pinned_webdataset(shards):
    """open_clip issue #935: newer webdataset tar expanders break open_clip_train's
    group_by_keys_nothrow (KeyError 'fname'). Guard the version the dev extra pins."""
    if int(wds.__version__.split(".")[0]) >= 1:
        pytest.skip(
            f"open_clip_train needs webdataset<=0.2.86 (open_clip #935); this environment tests "
            f"webdataset {wds.__version__} (make test-wds1), where openclip-train is not installed"
        )
    import open_clip_train.data as data
    urls, keys_by_shard = shards
    samples = list(data.tarfile_to_samples_nothrow(iter([{"url": urls[0]}])))
    assert [s["__key__"] for s in samples] == keys_by_shard[urls[0]]


def test_lengths_only_when_num_samples_is_given(shards, models):
    urls, _ = shards
    base = webdataset_loader(urls, B)
    assert getattr(base, "num_batches", None) is None
    with pytest.raises(TypeError, match="num_samples"):
        len(base)
    sized = webdataset_loader(urls, B, num_samples=48)
    assert len(sized) == sized.num_batches == 12 and sized.num_samples == 48
    with jest_loader(sized, models) as jest:
        assert len(jest) == 6 and jest.num_samples == 24


def test_resume_from_end_of_epoch_then_next_epoch_is_whole(shards):
    """A checkpoint taken after the last batch of epoch 0 must not skip batches of epoch 1."""
    urls, keys_by_shard = shards
    base = webdataset_loader(urls, B)
    base.set_epoch(0)
    n = sum(1 for _ in base)
    state = base.state_dict()
    assert state["batches"] == n

    resumed = webdataset_loader(urls, B)
    resumed.load_state_dict(state)
    assert list(resumed) == []  # epoch 0 was finished
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the training loop moves on to the next epoch
    keys = [k for _, _, ks in resumed for k in ks]
    assert sorted(keys) == sorted(k for ks in keys_by_shard.values() for k in ks)


def test_persistent_workers_is_refused_with_the_reason(shards):
    urls, _ = shards
    with pytest.raises(TypeError, match="persistent_workers=True is not supported"):
        webdataset_loader(urls, B, num_workers=1, persistent_workers=True)
    assert webdataset_loader(urls, B, persistent_workers=False).loader.num_workers == 0


def test_num_batches_is_per_rank(shards, monkeypatch):
    urls, _ = shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    base = webdataset_loader(urls, B, num_samples=48)  # 48 examples over 2 ranks
    assert base.num_batches == len(base) == 6 and base.num_samples == 24
    assert sum(1 for _ in base) == 6  # rank 1 reads shards 1 and 3: 24 examples


# -- num_samples: the same number of full batches on every rank (no DDP hang) -----------------

UNEVEN = 5  # shards: rank 0 reads 0, 2, 4 (36 examples), rank 1 reads 1, 3 (24)


def _rank_epoch(urls, monkeypatch, rank, num_workers=2, **kw):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    base = webdataset_loader(urls, B, num_workers=num_workers, shuffle_shards=True, seed=1, **kw)
    base.set_epoch(1)
    return base, [list(ks) for _, _, ks in base]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return write_wds_shards(tmp_path_factory.mktemp("uneven"), n_shards=UNEVEN)


def test_uneven_shards_without_num_samples_differ_per_rank(uneven, monkeypatch, caplog):
    """The failure mode num_samples= fixes: one pass per epoch, ranks disagree on its length
    -- so building such a loader under several ranks warns, naming the fix."""
    urls, _ = uneven
    with caplog.at_level(logging.WARNING, logger="jeststream.adapters.webdataset"):
        counts = [len(_rank_epoch(urls, monkeypatch, r)[1]) for r in (0, 1)]
    assert counts == [6 + 3, 3 + 3]  # rank 0: workers with 2 shards and 1; rank 1: 1 and 1
    warned = [r.getMessage() for r in caplog.records if "without num_samples=" in r.getMessage()]
    assert len(warned) == 2 and "under 2 ranks" in warned[0] and "pass num_samples=" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jeststream.adapters.webdataset"):
        _rank_epoch(urls, monkeypatch, 0, num_samples=80)
    assert not [r for r in caplog.records if "without num_samples=" in r.getMessage()]


def test_num_samples_gives_every_rank_the_same_full_batches(uneven, monkeypatch):
    urls, keys_by_shard = uneven
    per_rank = []
    for rank in (0, 1):
        base, batches = _rank_epoch(urls, monkeypatch, rank, num_samples=80)
        assert len(batches) == base.num_batches == len(base) == 80 // (B * 2)
        assert all(len(ks) == B for ks in batches)
        own = {k for u in base.dataset.shard_order()[rank::2] for k in keys_by_shard[u]}
        keys = [k for ks in batches for k in ks]
        assert set(keys) <= own
        shares = [base.dataset.worker_batches(w, 2) for w in (0, 1)]
        assert shares == [5, 5] and sum(shares) == base.num_batches
        per_rank.append(keys)
        # deterministic: the same epoch again (a new DataLoader pass) yields the same keys
        assert [list(ks) for _, _, ks in base] == batches
    # rank 0 has 36 examples and rank 1 24 for 40 each: both read shards again (cycling)
    for rank, keys in enumerate(per_rank):
        assert Counter(keys).most_common(1)[0][1] == 2, rank
    assert len(set(per_rank[1])) == 24  # rank 1 read every one of its examples
    # uneven shares: the first worker takes the extra batch, the total stays exact
    odd = webdataset_loader(urls, B, num_samples=72)  # still 2 ranks: 9 batches per rank
    assert [odd.dataset.worker_batches(w, 4) for w in range(4)] == [3, 2, 2, 2]


def test_num_samples_cycling_reshuffles_each_pass(uneven):
    urls, _ = uneven
    base = webdataset_loader(urls[:3], B, shuffle_shards=True, seed=1)
    orders = {tuple(base.dataset._pass_order(urls[:3], p)) for p in range(1, 8)}
    assert len(orders) > 1 and all(sorted(o) == sorted(urls[:3]) for o in orders)
    assert base.dataset._pass_order(urls[:3], 0) == urls[:3]  # pass 0: the epoch's own order
    plain = webdataset_loader(urls[:3], B)
    assert plain.dataset._pass_order(urls[:3], 5) == urls[:3]


def test_num_samples_resume_mid_epoch_after_cycling_is_exact(uneven, monkeypatch):
    urls, _ = uneven
    _, full = _rank_epoch(urls, monkeypatch, 1, num_samples=80)  # sets RANK=1 of 2
    first = webdataset_loader(urls, B, num_workers=2, shuffle_shards=True, seed=1, num_samples=80)
    first.set_epoch(1)
    it = iter(first)
    head = [list(next(it)[2]) for _ in range(8)]  # past both workers' first pass (3 batches)
    state = first.state_dict()
    del it
    assert state == {"epoch": 1, "batches": 8, "seed": 1}
    resumed = webdataset_loader(
        urls, B, num_workers=2, shuffle_shards=True, seed=1, num_samples=80
    )
    resumed.load_state_dict(state)
    tail = [list(ks) for _, _, ks in resumed]
    assert head + tail == full and len(tail) == resumed.num_batches - 8


def test_num_samples_with_a_bad_shard_on_one_rank(tmp_path, monkeypatch):
    urls, _ = write_wds_shards(tmp_path / "shards", n_shards=UNEVEN)
    with open(urls[4], "r+b") as f:  # rank 0, worker 0 (with shard 0): cut in half
        f.truncate(len(open(urls[4], "rb").read()) // 2)
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        base = webdataset_loader(urls, B, num_samples=120)  # 15 per rank: 2-3 passes each
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = [ks for _, _, ks in base]
        counts.append(len(batches))
        assert all(len(ks) == B for ks in batches)
        bad = [w for w in caught if issubclass(w.category, BadShardWarning)]
        # read in every pass, reported once per epoch (warning + counter)
        assert (len(bad), base.stats["bad_shards"]) == ((1, 1) if rank == 0 else (0, 0))
    assert counts == [15, 15]


def test_num_samples_worker_without_shard_or_batch_raises(tmp_path, monkeypatch):
    urls, _ = write_wds_shards(tmp_path / "shards", n_shards=3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # rank 1 has shard 1 only: its second worker has none but must yield half the batches
    base = webdataset_loader(urls, B, num_workers=2, num_samples=48)
    with pytest.raises(ValueError, match=r"worker 1 has no shard \(3 shards for 2 ranks x 2"):
        list(base)
    # ... unless its share is 0: 1 batch per rank, all from worker 0
    assert len(list(webdataset_loader(urls, B, num_workers=2, num_samples=8))) == 1
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "shards" / "shard-0000.tar").write_bytes(b"not a tar" * 100)
    broken = webdataset_loader(urls[:1], B, num_samples=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadShardWarning)
        with pytest.raises(ValueError, match="gave no batch of 4"):
            list(broken)
