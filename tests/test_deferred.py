"""Deferred decoding (issue 28): score cheap views, materialise the selected examples only.

Real JPEG webdataset shards written here, open_clip's own training transform (random crops),
the tiny open_clip CLIP, the real JESTLoader: the deferred pipeline must yield bit-identical
training tensors to the eager one for every selected example, with the same structure and
dtypes; a bad record is replaced (batch still b) and counted; a Deferred field without a
materialise function is refused naming the field; resume is unchanged.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_CONTEXT, make_tiny_clip, toy_tokenize

from jeststream import JESTLoader
from jeststream.adapters.deferred_images import (
    ImageRecord,
    MaterialiseImage,
    collate_deferred,
    deferred_mode,
    deferred_sample,
    pil_decode,
)
from jeststream.adapters.webdataset import webdataset_loader
from jeststream.batch import batch_size, concat_batches, index_batch
from jeststream.deferred import (
    Deferred,
    DeferredRecordError,
    Materializer,
    SeededTransform,
    example_seed,
    materialise_batch,
    no_random_draws,
    scoring_views,
)

B = 8
SIDE = 48  # stored images; the training transform crops to 32 (the tiny CLIP's size)
N_SHARDS, PER_SHARD = 3, 32


def _jpeg(i: int, side: int = SIDE) -> bytes:
    from PIL import Image

    r = np.random.default_rng(i)
    small = r.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((side, side), Image.BICUBIC), np.float32)
    pixels = np.clip(smooth + r.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _write(directory, bad: set[int] = frozenset()) -> list[str]:
    import webdataset as wds

    urls = []
    for s in range(N_SHARDS):
        url = str(directory / f"shard-{s:02d}.tar")
        with wds.TarWriter(url) as sink:
            for j in range(PER_SHARD):
                i = s * PER_SHARD + j
                data = _jpeg(i, side=SIDE - 8 if i in bad else SIDE)
                sink.write({"__key__": f"s{i:05d}", "jpg": data, "txt": f"a photo {i}"})
        urls.append(url)
    return urls


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("deferred"))


@pytest.fixture(scope="module")
def train_transform():
    import open_clip

    return open_clip.transform.image_transform(32, is_train=True)


@pytest.fixture(scope="module")
def models():
    return make_tiny_clip(seed=0), make_tiny_clip(seed=1)


def _jest(base, models, **kw):
    learner, reference = models
    kw.setdefault("seed", 5)
    return JESTLoader(base, learner, reference, ratio=0.25, n_chunks=2, **kw)


def test_seeded_transform_is_the_seeded_eager_transform_in_any_thread(train_transform):
    """SeededTransform(t)(image, seed) equals t(image) under torch's generator seeded with
    seed, and is the same from many threads at once (the draws are locked per example)."""
    import concurrent.futures

    images = [pil_decode(_jpeg(i), "jpg") for i in range(16)]
    st = SeededTransform(train_transform)
    assert st._kinds[0] == "rrc"
    seeds = [example_seed(1, 2, f"k{i}") for i in range(16)]
    want = []
    for im, s in zip(images, seeds):
        torch.set_rng_state(torch.Generator().manual_seed(s).get_state())
        want.append(train_transform(im))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda a: st(*a), zip(images, seeds)))
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    assert not torch.equal(st(images[0], seeds[0]), st(images[0], seeds[1]))  # it is random
    # any other transform runs wholly under the lock with torch, random and numpy seeded
    import random

    def noisy(im):
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))])

    other = SeededTransform(noisy)
    assert torch.equal(other(None, 3), other(None, 3))
    assert not torch.equal(other(None, 3), other(None, 4))
    assert example_seed(1, 2, "k") == example_seed(1, 2, "k") != example_seed(1, 3, "k")


def test_a_transform_marked_no_random_draws_runs_without_touching_the_generators(monkeypatch):
    """A marked plain function runs as it is: no lock, no state swap of torch's, Python's or
    numpy's generators (the swap is what a JEST base loader would pay 1/ratio times per trained
    example); an unmarked one still gets them all seeded. Bad marks are refused."""
    import random

    def to_array(im):
        return np.asarray(im, dtype=np.uint8)

    assert no_random_draws(to_array) is to_array
    st = SeededTransform(to_array)
    assert st._kinds == ["free"] and not st._draws
    swaps = []
    for name, mod in (("getstate", random), ("get_state", np.random)):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name: swaps.append(_n) or _r(*a))
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(st(image, 123), image)
    assert swaps == []

    def unmarked(im):
        return np.asarray(im, dtype=np.uint8)

    assert np.array_equal(SeededTransform(unmarked)(image, 123), image)
    assert swaps  # the unmarked one swaps every stream in and out
    with pytest.raises(TypeError, match="callable"):
        no_random_draws(3)
    with pytest.raises(TypeError, match="wrap it in a function"):
        no_random_draws(len)


def _deferred(n: int, offset: int = 0):
    materialise = MaterialiseImage(lambda im: None, pil_decode)
    views = torch.arange(offset, offset + n, dtype=torch.float32).view(n, 1).expand(n, 4)
    return Deferred(views.clone(), [f"r{offset + i}" for i in range(n)], materialise)


def test_batch_module_concatenates_and_indexes_deferred_fields():
    a = (_deferred(4), [f"t{i}" for i in range(4)], [f"k{i}" for i in range(4)])
    b = (_deferred(4, 4), [f"t{i}" for i in range(4, 8)], [f"k{i}" for i in range(4, 8)])
    assert batch_size(a) == 4
    sb = concat_batches([a, b])
    assert isinstance(sb[0], Deferred) and len(sb[0]) == 8 and sb[0].view.shape == (8, 4)
    assert sb[0].records == [f"r{i}" for i in range(8)]
    sub = index_batch(sb, torch.tensor([6, 1]))
    assert sub[0].records == ["r6", "r1"] and sub[0].view[:, 0].tolist() == [6.0, 1.0]
    assert sub[1] == ["t6", "t1"] and sub[2] == ["k6", "k1"]
    # the scorer sees the view in the field's place; a dict batch works the same
    views = scoring_views({"image": sb[0], "text": sb[1]})
    assert torch.equal(views["image"], sb[0].view) and views["text"] is sb[1]
    with pytest.raises(ValueError, match="disagree"):
        batch_size((_deferred(4), ["a", "b", "c"]))


def test_materializer_replaces_a_failed_record_by_the_next_candidate():
    def materialise(record):
        if record == "bad":
            raise ValueError("corrupt")
        return torch.tensor([float(record)])

    skipped = []
    field = Deferred(
        torch.zeros(6, 2), ["0", "bad", "2", "bad", "4", "5"], materialise,
        on_error=lambda rec, exc: skipped.append((rec, str(exc))),
    )
    with Materializer(2) as m:
        out = m.gather((field, list("abcdef")), torch.tensor([1, 0, 3]), torch.tensor([5, 3, 4]))
    # 1 -> 5 (the best candidate), 3 -> 4 (3 was already selected, then failed)
    assert out.indices.tolist() == [5, 0, 4] and out.replaced == ((1, 5), (3, 4))
    assert out.batch[0].tolist() == [[5.0], [0.0], [4.0]] and out.batch[1] == ["f", "a", "e"]
    assert skipped == [("bad", "corrupt"), ("bad", "corrupt")]
    strict = Deferred(field.view, field.records, materialise)  # no on_error: raise, named
    with pytest.raises(DeferredRecordError, match=r"batch\[0\].*example 1.*corrupt"):
        Materializer(0).gather((strict, list("abcdef")), torch.tensor([1]))
    with pytest.raises(DeferredRecordError, match="no candidate left"):
        Materializer(0).gather((field, list("abcdef")), torch.tensor([0, 1, 2, 3, 4, 5]))


def _float_views(views, normalise):
    """The float scorer input as collate_deferred made it per base batch before views stayed
    uint8 (the reference the uint8 views must reproduce bit for bit)."""
    pixels = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2)
    arr = torch.empty(pixels.shape, dtype=torch.float32)
    arr.copy_(pixels)
    if normalise is None:
        return arr.mul_(1.0 / 255.0)
    mean = torch.tensor(normalise[0], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(normalise[1], dtype=torch.float32).view(1, -1, 1, 1)
    return arr.mul_(1.0 / (255.0 * std)).add_(-mean / std)


@pytest.mark.parametrize("normalise", [None, "transform", ((0.5, 0.4, 0.3), (0.2, 0.3, 0.7))])
def test_uint8_views_give_the_scorer_the_float_views_bit_for_bit(train_transform, normalise):
    """Views stay uint8 through collation, concatenation, indexing, pickling and device moves;
    the scorer's float input, made once per super-batch, equals per-base-batch conversion."""
    import pickle

    from jeststream.adapters.deferred_images import NormaliseView, normalisation

    norm = normalisation(train_transform) if normalise == "transform" else normalise
    rng = np.random.default_rng(0)
    batches, views_all = [], []
    for j in range(4):
        views = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(B)]
        records = [ImageRecord(b"x", "jpg", None, f"k{j}-{i}", "u", i) for i in range(B)]
        kw = {"transform": train_transform} if normalise == "transform" else {"normalise": norm}
        field = collate_deferred(views, records, **kw)
        field.materialise = MaterialiseImage(train_transform, pil_decode)  # as the adapters do
        assert field.view.dtype == torch.uint8 and isinstance(field.view_transform, NormaliseView)
        batches.append((field, [f"t{j}-{i}" for i in range(B)]))
        views_all.append(views)
    expected = torch.cat([_float_views(v, norm) for v in views_all])
    sb = concat_batches(batches)
    assert sb[0].view.dtype == torch.uint8 and sb[0].view.shape == (4 * B, 16, 16, 3)
    assert torch.equal(scoring_views(sb)[0], expected)  # bit-identical, not merely close
    moved = pickle.loads(pickle.dumps(sb[0]))  # crosses DataLoader workers
    assert moved.view_transform.normalise == (None if norm is None else tuple(map(tuple, norm)))
    assert torch.equal(moved.scored_view(), expected)
    # a device move (here: a copy) and indexing keep the conversion
    copied = sb[0].map_tensors(lambda t: t.clone())
    assert torch.equal(copied.scored_view(), expected)
    idx = torch.tensor([5, 0, 31])
    assert torch.equal(index_batch(sb, idx)[0].scored_view(), expected[idx])
    assert sb[0].index(idx).view.dtype == torch.uint8
    # a float view without a conversion (a user's own Deferred) is scored as it is
    plain = Deferred(expected, sb[0].records, sb[0].materialise)
    assert scoring_views((plain,))[0] is expected
    with pytest.raises(ValueError, match="uint8 views"):
        NormaliseView(norm)(expected)
    with pytest.raises(ValueError, match="non-zero std"):
        NormaliseView(((0.5,), (0.0,)))
    with pytest.raises(TypeError, match="view_transform must be callable"):
        Deferred(expected, sb[0].records, view_transform=3)


def test_a_deferred_field_without_materialise_is_refused_naming_the_field(models):
    base = [
        {"image": Deferred(torch.rand(B, 3, 32, 32), list(range(B))),
         "text": toy_tokenize([f"c{i}" for i in range(B)])}
        for _ in range(8)
    ]
    with _jest(base, models) as jest, pytest.raises(ValueError, match=r"batch\['image'\].*materialise"):
        next(iter(jest))


@pytest.mark.parametrize("mode", ["encoded", "decoded"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_deferred_pipeline_yields_the_eager_pipelines_tensors(
    shards, models, train_transform, mode, num_workers
):
    """Same selection inputs -> bit-identical training tensors for every selected example, the
    same structure and dtypes, whatever the selection (eager and deferred score different
    views, so the selected keys may differ: every yielded key is checked against the eager
    pipeline's tensor of that key)."""
    kw = dict(tokenizer=toy_tokenize, transform=train_transform, seed=11, shuffle_shards=True)
    eager_base = webdataset_loader(shards, B, **kw)
    eager_base.set_epoch(1)
    by_key = {}
    for images, texts, keys in eager_base:  # every example's eager tensor, epoch 1
        by_key.update({k: (images[i], texts[i]) for i, k in enumerate(keys)})
    with _jest(webdataset_loader(shards, B, **kw), models) as eager:
        eager.set_epoch(1)
        eager_batches = list(eager)
    resolution = 16 if mode == "encoded" else 32
    assert deferred_mode(True, resolution, train_transform) == mode
    base = webdataset_loader(
        shards, B, num_workers=num_workers, deferred=True, score_resolution=resolution, **kw
    )
    with _jest(base, models, score_resolution=resolution) as jest:
        jest.set_epoch(1)
        got, replaced = [], []
        for batch in jest:
            got.append(batch)
            replaced.extend(jest.last_info.replaced)
    assert replaced == []  # no bad record here: nothing was replaced
    assert len(got) == len(eager_batches) == N_SHARDS * PER_SHARD // (4 * B)
    for (images, texts, keys), (e_images, e_texts, _) in zip(got, eager_batches):
        assert type(images) is type(e_images) and images.dtype == e_images.dtype
        assert images.shape == e_images.shape == (B, 3, 32, 32)
        assert texts.dtype == e_texts.dtype and texts.shape == (B, TINY_CONTEXT)
        assert isinstance(keys, list) and len(keys) == B
        for i, k in enumerate(keys):
            assert torch.equal(images[i], by_key[k][0]), k
            assert torch.equal(texts[i], by_key[k][1]), k


def test_scoring_views_are_decoded_at_reduced_scale(train_transform):
    data = _jpeg(3, side=128)
    view, record = deferred_sample("encoded", 32, seed=1, epoch=0)((data, "jpg", "k", "u"))
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    assert record.data is data and record.seed == example_seed(1, 0, "k")
    view2, rec2 = deferred_sample("decoded", 32)((data, "jpg", "k", "u"))
    assert rec2.data.shape == (128, 128, 3) and rec2.mode == "RGB"
    assert np.abs(view.astype(int) - view2.astype(int)).mean() < 8  # draft ~ full decode
    field = collate_deferred([view, view2], [record, rec2], transform=train_transform)
    assert field.view.shape == (2, 32, 32, 3) and field.view.dtype == torch.uint8  # held small
    scored = field.scored_view()
    assert scored.shape == (2, 3, 32, 32) and scored.dtype == torch.float32
    assert scored.mean().abs() < 3  # normalised like the training transform
    out = materialise_batch((field, ["a", "b"]))
    assert out[0].shape == (2, 3, 32, 32) and out[1] == ["a", "b"]


def _pil(record_data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(record_data))
    im.load()
    return im


@pytest.mark.parametrize(
    "steps",
    ["open_clip", "no_normalise", "scalar_mean", "no_to_tensor"],
)
def test_materialised_rows_stay_uint8_and_become_the_transforms_floats_per_batch(steps):
    """A transform ending in ToTensor(/Normalize) stops at uint8 per example; collate makes the
    floats once per batch -- bit-identical to the seeded transform run per example. Other
    transforms run whole; a float image (to_tensor does not divide it by 255) runs whole
    inside a uint8 batch; pickling keeps the split."""
    import pickle

    import open_clip
    from PIL import Image
    from torchvision import transforms as T

    full = open_clip.transform.image_transform(32, is_train=True)
    transform = {
        "open_clip": full,
        "no_normalise": T.Compose([T.RandomResizedCrop(32, scale=(0.5, 1.0)), T.ToTensor()]),
        "scalar_mean": T.Compose([T.CenterCrop(32), T.ToTensor(), T.Normalize(0.5, 0.25)]),
        "no_to_tensor": T.Compose([T.RandomResizedCrop(32), T.PILToTensor()]),
    }[steps]
    datas = [_jpeg(i) for i in range(5)]
    records = [ImageRecord(d, "jpg", None, f"k{i}", "u", 100 + i) for i, d in enumerate(datas)]
    m = MaterialiseImage(transform, pil_decode)
    rows = [m(r) for r in records]
    expected = torch.stack(
        [SeededTransform(transform)(_pil(d), 100 + i) for i, d in enumerate(datas)]
    )
    if steps != "no_to_tensor":
        assert all(r.dtype == torch.uint8 and r.shape == (3, 32, 32) for r in rows)
    got = m.collate(rows, torch.device("cpu"))
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    again = pickle.loads(pickle.dumps(m))
    assert torch.equal(again.collate([again(r) for r in records], "cpu"), expected)
    if steps != "no_to_tensor":  # an accelerator's path (the CUDA test runs it there): the
        # uint8 batch moved, then converted as one [B, C, H, W] tensor
        batched = m._normalise(torch.stack(rows).float(), *m._factors(torch.device("cpu"), 4))
        assert torch.equal(batched, expected)
    if steps == "open_clip":  # through the Materializer, as JESTLoader gathers
        field = Deferred(torch.zeros(5, 2), records, m)
        out = Materializer(2).gather((field,), torch.tensor([3, 0]))
        assert torch.equal(out.batch[0], expected[[3, 0]])
    if steps == "scalar_mean":  # the views' normalisation reads a scalar mean too
        from jeststream.adapters.deferred_images import normalisation

        assert normalisation(transform) == ((0.5,), (0.25,))
    if steps == "scalar_mean":  # a float ("F") grey image beside 8-bit ones
        grey = Image.fromarray((np.arange(48 * 48).reshape(48, 48) / 2304).astype(np.float32))
        buf = io.BytesIO()
        grey.save(buf, "TIFF")
        odd = ImageRecord(buf.getvalue(), "tif", None, "kf", "u", 7)
        row = m(odd)
        assert row.dtype == torch.float32
        alone = SeededTransform(transform)(_pil(odd.data), 7)
        assert alone.shape == (1, 32, 32)
        mixed = m.collate([rows[0][:1], row], "cpu")  # one channel, to stack with the grey
        assert torch.equal(mixed[1], alone)
        assert torch.equal(mixed[0], expected[0][:1])
        with pytest.raises(ValueError, match="different shapes"):  # never broadcast silently
            m.collate([rows[0], row], "cpu")
    if steps == "open_clip":  # an RGBA image where open_clip converts: fine; where Normalize
        # would fail on it (a transform without the conversion), it fails per record
        rgba = Image.fromarray(np.zeros((48, 48, 4), np.uint8), "RGBA")
        buf = io.BytesIO()
        rgba.save(buf, "PNG")
        rec = ImageRecord(buf.getvalue(), "png", None, "ka", "u", 3)
        assert m(rec).shape == (3, 32, 32)
        bare = MaterialiseImage(T.Compose(full.transforms[:1] + full.transforms[2:]), pil_decode)
        with pytest.raises(ValueError, match="4 channels and the transform's Normalize 3"):
            bare(rec)
        with pytest.raises((RuntimeError, ValueError)):  # as the eager transform does
            SeededTransform(bare.transform)(_pil(rec.data), 3)


def test_views_are_made_at_the_decoded_scale_and_resized_in_one_batch():
    """deferred_sample keeps the draft-decoded centre square; collate_deferred resizes the
    batch's views to the record's view_resolution (one resize per size: PIL's bilinear within
    rounding); views that cannot be told apart in size, or ask for two sides, are refused."""
    from PIL import Image

    from jeststream.adapters.deferred_images import centre_square, resize_views, scoring_view

    make = deferred_sample("encoded", 32, seed=1)
    wide = Image.fromarray(np.asarray(_pil(_jpeg(4, side=96)).resize((120, 96))))
    buf = io.BytesIO()
    wide.save(buf, "JPEG", quality=90)
    items = [(_jpeg(1, side=96), "jpg", "a", "u"), (buf.getvalue(), "jpg", "b", "u"),
             (_jpeg(2, side=32), "jpg", "c", "u"), (_jpeg(3, side=300), "jpg", "d", "u")]
    made = [make(it) for it in items]
    # 96 px: draft 1/2 -> 48; 120x96: centre square of the 60x48 draft; 32: as is;
    # 300 px: draft 1/8 -> 38 (under 2 x 32: resized in the batch)
    assert [v.shape for v, _ in made] == [(48, 48, 3), (48, 48, 3), (32, 32, 3), (38, 38, 3)]
    assert all(r.view_resolution == 32 for _, r in made)
    field = collate_deferred([v for v, _ in made], [r for _, r in made])
    assert field.view.shape == (4, 32, 32, 3) and field.view.dtype == torch.uint8
    for (v, _), got in zip(made, field.view):
        pil = np.asarray(Image.fromarray(v).resize((32, 32), Image.BILINEAR), np.int16)
        assert np.abs(got.numpy().astype(np.int16) - pil).max() <= 2
    assert torch.equal(field.view[2], torch.from_numpy(np.array(made[2][0])))  # no resize at 32
    big = Image.fromarray(np.zeros((200, 150, 3), np.uint8))
    assert centre_square(big, 32).shape == (32, 32, 3)  # over 2 x 32: brought to 32 at once
    assert scoring_view(big, 32).shape == (32, 32, 3)
    mixed = [made[0][1], made[1][1]._replace(view_resolution=16)]
    with pytest.raises(ValueError, match="different sides"):
        collate_deferred([made[0][0], made[1][0]], mixed)
    final = [r._replace(view_resolution=None) for _, r in made[:3]]
    with pytest.raises(ValueError, match="different shapes"):
        collate_deferred([v for v, _ in made[:3]], final)
    with pytest.raises(ValueError, match="square"):
        resize_views([np.zeros((4, 5, 3), np.uint8)], 2)


class _RefuseSize:
    """A training-transform step that refuses images of one size: the scoring view of such an
    image is made (no transform), its training tensor fails after selection."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image):
        if image.size == (self.side, self.side):
            raise ValueError(f"a {self.side}-px image is not allowed")
        return image


def test_a_bad_record_after_selection_is_replaced_counted_and_the_batch_stays_b(
    tmp_path, models, train_transform, no_thread_leak
):
    from torchvision import transforms

    bad = set(range(0, N_SHARDS * PER_SHARD, 5))
    urls = _write(tmp_path, bad)
    strict = transforms.Compose([_RefuseSize(SIDE - 8), *train_transform.transforms])
    base = webdataset_loader(
        urls, B, tokenizer=toy_tokenize, transform=strict, deferred="encoded",
        score_resolution=16,
    )
    replaced, yielded = [], []
    log = tmp_path / "s.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _jest(base, models, score_resolution=16, selection_log=log) as jest:
            for images, _, keys in jest:
                yielded.extend(keys)
                assert images.shape == (B, 3, 32, 32) and len(keys) == B == len(set(keys))
                info = jest.last_info
                assert int(info.indices.numel()) == B
                then = dict(info.replaced)  # a replacement that fails is replaced in turn
                for pos, new in info.replaced:
                    while new in then:
                        new = then[new]
                    assert pos not in info.indices.tolist() and new in info.indices.tolist()
                    replaced.append(pos)
                assert not {int(k[1:]) for k in keys} & bad  # no bad example is yielded
            stats = jest.stats
    assert replaced, "the fixture should select some bad records"
    assert base.stats["bad_samples"] == stats["replaced_examples"] == len(replaced)
    # the materialising threads ran (B > 1 records each step) and were joined by close()
    assert sum("skipping sample" in str(w.message) for w in caught) == len(replaced)
    from jeststream.selection_log import read_selection_log

    cols = read_selection_log(log)  # the log marks the replacements as the selected examples
    assert sorted(k for k, sel in zip(cols["key"], cols["selected"]) if sel) == sorted(yielded)


def test_resume_with_deferred_fields_is_unchanged(shards, models, train_transform):
    def make():
        base = webdataset_loader(
            shards, B, tokenizer=toy_tokenize, transform=train_transform, seed=2,
            shuffle_shards=True, deferred=True, score_resolution=16,
        )
        return _jest(base, models, score_resolution=16)

    with make() as jest:
        full = [(imgs, keys) for imgs, _, keys in jest]
    with make() as jest:
        it = iter(jest)
        next(it)
        state = jest.state_dict()
    with make() as jest:
        jest.load_state_dict(state)
        rest = [(imgs, keys) for imgs, _, keys in jest]
    assert len(rest) == len(full) - 1
    for (a, ka), (b, kb) in zip(full[1:], rest):
        assert ka == kb and torch.equal(a, b)


def test_deferred_needs_a_score_resolution(shards, train_transform):
    with pytest.raises(ValueError, match="score_resolution"):
        webdataset_loader(shards, B, transform=train_transform, deferred=True)
    with pytest.raises(ValueError, match="deferred must be"):
        webdataset_loader(shards, B, deferred="lazy", score_resolution=16)
    assert ImageRecord._fields[0] == "data"


def test_input_pipeline_benchmark_quick_runs_and_reports_every_figure():
    """benchmarks/input_pipeline.py --quick --repeats 3 (no timing assertions: figures exist
    and agree)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "input_pipeline.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--workers", "0", "--ratios", "0.5",
         "--repeats", "3"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    result = json.loads(out)
    row = result["runs"]["workers=0 ratio=0.5"]
    assert result["config"]["repeats"] == 3
    assert set(result["code"]) == {"commit", "code_uncommitted_changes"}  # where figures came from
    for r in row.values():  # each figure: the median of the interleaved runs, kept beside it
        runs = r["cpu_s_per_batch_runs"]
        assert len(runs) == 3 and r["cpu_s_per_batch"] == sorted(runs)[1]
    assert set(row) == {"uniform", "eager", "deferred_16", "deferred_32"}
    for r in row.values():
        assert r["cpu_s_per_batch"] > 0 and r["wall_s_per_batch"] > 0 and r["n"] == 2
        # the multiples: medians of per-repeat ratios against the run beside them
        paired = [a / e for a, e in zip(r["cpu_s_per_batch_runs"],
                                        row["eager"]["cpu_s_per_batch_runs"])]
        assert r["x_eager"] == sorted(paired)[1]
        paired = [a / u for a, u in zip(r["cpu_s_per_batch_runs"],
                                        row["uniform"]["cpu_s_per_batch_runs"])]
        assert r["x_uniform"] == sorted(paired)[1]
        assert r["x_eager_of_medians"] == r["cpu_s_per_batch"] / row["eager"]["cpu_s_per_batch"]
    held = result["super_batch_bytes"]["0.5"]
    assert held["deferred_16"] < held["eager"]  # encoded bytes + small views < float tensors
    agree = result["selection_agreement"]["0.5"]
    for criterion in ("learnability", "hard_learner"):
        for a in agree[criterion].values():
            assert 0.0 <= a["differ_share"] <= 1.0 and a["steps"] >= 2
    assert "deferred_224_le_eager" in result["targets_met"]["workers=0 ratio=0.5"]


@pytest.mark.parametrize("column", ["raw", "jpeg_image"])
def test_streaming_loader_deferred_yields_the_eager_tensors(tmp_path, models, train_transform, column):
    """streaming_loader(deferred=True): a bytes column gives draft-decoded views and encoded
    records, a jpeg column (decoded by streaming) uint8 records; every yielded example's
    training tensor equals the eager loader's, in the same dict structure."""
    import gc

    from PIL import Image
    from streaming import MDSWriter
    from streaming.base.util import clean_stale_shared_memory

    from jeststream.adapters.streaming import streaming_loader

    gc.collect()
    clean_stale_shared_memory()
    out = tmp_path / "mds"
    columns = {"key": "str", "raw": "bytes", "jpeg_image": "jpeg", "text": "str"}
    with MDSWriter(out=str(out), columns=columns, size_limit=40_000) as writer:
        for i in range(32):
            data = _jpeg(i)
            writer.write({"key": f"m{i:04d}", "raw": data, "jpeg_image": Image.open(io.BytesIO(data)),
                          "text": f"caption {i}"})

    try:
        eager = streaming_loader(str(out), B, tokenizer=toy_tokenize, transform=train_transform,
                                 image_field=column)
        by_key = {}
        for batch in eager:
            by_key.update({k: batch["image"][i] for i, k in enumerate(batch["__key__"])})
        del eager
        gc.collect()
        clean_stale_shared_memory()
        def deferred():
            gc.collect()
            clean_stale_shared_memory()  # a new dataset starts at epoch 0, as the eager one did
            return streaming_loader(str(out), B, tokenizer=toy_tokenize, transform=train_transform,
                                    image_field=column, deferred=True, score_resolution=16)

        first = next(iter(deferred()))
        assert isinstance(first["image"], Deferred) and first["image"].view.shape == (B, 16, 16, 3)
        assert first["image"].scored_view().shape == (B, 3, 16, 16)
        kind = type(first["image"].records[0].data)
        assert kind is (bytes if column == "raw" else torch.Tensor)  # decoded: shared uint8
        del first
        base = deferred()
        with _jest(base, models, score_resolution=16) as jest:
            n = 0
            for batch in jest:
                assert set(batch) == {"image", "text", "__key__"}
                assert batch["image"].shape == (B, 3, 32, 32) and batch["text"].dtype == torch.long
                for i, k in enumerate(batch["__key__"]):
                    assert torch.equal(batch["image"][i], by_key[k]), k
                n += 1
        assert n == 32 // (4 * B)
    finally:
        gc.collect()
        clean_stale_shared_memory()


def test_jestify_deferred_applies_open_clips_transform_after_selection(shards, models, train_transform):
    """jestify(deferred=True) rewrites an open_clip_train-shaped wds pipeline (decode("pilrgb"),
    rename, map_dict(image=preprocess, text=...), to_tuple, batched): the scorer sees views and
    every yielded image is open_clip's transform of that sample, seeded by (seed, epoch, key)."""
    import webdataset as wds
    from open_clip_train.data import DataInfo, SharedEpoch

    from jeststream.adapters.deferred_images import pil_decode_rgb
    from jeststream.adapters.open_clip import jestify

    epoch = SharedEpoch(epoch=3)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards), wds.tarfile_to_samples(),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=train_transform, text=lambda t: toy_tokenize([t])[0]),
        wds.to_tuple("image", "text", "__key__"),
        wds.batched(B, partial=False),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=0)
    loader.num_batches, loader.num_samples = N_SHARDS * PER_SHARD // B, N_SHARDS * PER_SHARD
    info = DataInfo(dataloader=loader, shared_epoch=epoch)
    learner, reference = models
    data = {f"s{i:05d}": _jpeg(i) for i in range(N_SHARDS * PER_SHARD)}
    seeded = SeededTransform(train_transform)
    wrapped = jestify(info, learner, reference, 0.25, deferred=True, score_resolution=16, seed=9,
                      n_chunks=2)
    n = 0
    for images, texts, keys in wrapped.dataloader:
        assert images.shape == (B, 3, 32, 32) and images.dtype == torch.float32
        assert texts.shape == (B, TINY_CONTEXT)
        for i, k in enumerate(keys):
            want = seeded(pil_decode_rgb(data[k], "jpg"), example_seed(9, 3, k))
            assert torch.equal(images[i], want), k
        n += 1
    wrapped.dataloader.close()
    assert n == N_SHARDS * PER_SHARD // (4 * B)
    with pytest.raises(ValueError, match="score_resolution"):
        jestify(info, learner, reference, 0.25, deferred=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deferred_on_an_accelerator_yields_the_eager_tensors_on_its_device(
    shards, models, train_transform
):
    """Views go to the scoring device (pinned), materialised tensors follow them: the yielded
    images are where the eager pipeline puts them, with the same pixels (background scoring)."""
    kw = dict(tokenizer=toy_tokenize, transform=train_transform, seed=4)
    by_key = {}
    for images, _, keys in webdataset_loader(shards, B, **kw):
        by_key.update({k: images[i] for i, k in enumerate(keys)})
    learner, reference = (m.to("cuda") for m in models)
    base = webdataset_loader(shards, B, deferred=True, score_resolution=16, **kw)
    with JESTLoader(base, learner, reference, ratio=0.25, n_chunks=2, score_resolution=16,
                    device="cuda") as jest:
        for images, texts, keys in jest:
            assert images.device.type == "cuda" and texts.device.type == "cuda"
            for i, k in enumerate(keys):
                assert torch.equal(images[i].cpu(), by_key[k]), k
    for m in models:
        m.to("cpu")
