from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pytest
import torch
from conftest import TinyDual, make_vector_batches, tiny_dual_embed

from jeststream.loader import JESTLoader, SelectionInfo
from jeststream.losses import Embeddings

pytestmark = pytest.mark.timeout(120)


def _producer_threads():
    return [t for t in threading.enumerate() if t.name.startswith("jeststream")]


def _dual_loader(batches, *, seed=0, ratio=0.25, **kw):
    kw.setdefault("n_chunks", 2)
    if "async_scoring" not in kw and "deterministic" not in kw:
        # these tests were written for the background producer (the default before
        # scoring="auto" made the CPU score inline): keep them on it
        kw.setdefault("scoring", "latest")
    learner = TinyDual(seed=seed)
    reference = TinyDual(seed=seed + 100)
    return JESTLoader(batches, learner, reference, ratio, embed=tiny_dual_embed, **kw)


class _Lengthy:
    """An iterable base loader with len/batch_size/dataset/sampler/set_epoch, like DataLoader."""

    def __init__(self, batches, batch_size=None):
        self.batches = batches
        self.batch_size = batch_size
        self.dataset = object()
        self.sampler = object()
        self.epochs = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, e):
        self.epochs.append(e)


# -- drop-in shape, structure and length ---------------------------------------------------------


@pytest.mark.parametrize("async_scoring", [True, False])
def test_open_clip_default_embed_yields_base_structure(tiny_clip, pair_batches, async_scoring):
    batches = pair_batches(n_batches=8, b=8, keys=True)
    learner, reference = tiny_clip(0), tiny_clip(1)
    with JESTLoader(
        batches, learner, reference, 0.25, n_chunks=4, async_scoring=async_scoring
    ) as loader:
        out = list(loader)
    assert len(out) == 2 == len(loader)
    all_keys = {k for b in batches[:4] for k in b[2]}
    for images, tokens, keys in out[:1]:
        assert images.shape == (8, 3, 32, 32) and tokens.shape == (8, 16)
        assert isinstance(keys, list) and len(set(keys)) == 8 and set(keys) <= all_keys
        # the rows travel together: each selected image is the one stored with its key
        lookup = {k: (img, tok) for b in batches for img, tok, k in zip(*b)}
        for img, tok, k in zip(images, tokens, keys):
            assert torch.equal(img, lookup[k][0]) and torch.equal(tok, lookup[k][1])


def test_siglip_variant_with_logit_bias(tiny_clip, pair_batches):
    learner, reference = tiny_clip(0, siglip=True), tiny_clip(1, siglip=True)
    assert learner.logit_bias is not None
    with JESTLoader(pair_batches(4, 8), learner, reference, 0.5, n_chunks=2, return_info=True) as ld:
        (batch, info), *_ = list(ld)
    assert batch[0].shape[0] == 8 and math.isfinite(info.super_batch_mean)


def test_sync_equals_async_same_seed(tiny_clip, pair_batches):
    batches = pair_batches(n_batches=12, b=8)
    results = {}
    for mode in (True, False):
        learner, reference = tiny_clip(0), tiny_clip(1)
        with JESTLoader(
            batches, learner, reference, 0.25, n_chunks=4, async_scoring=mode, seed=3,
            return_info=True,
        ) as ld:
            results[mode] = list(ld)
    assert len(results[True]) == len(results[False]) == 3
    for (ba, ia), (bs, is_) in zip(results[True], results[False]):
        assert torch.equal(ia.indices, is_.indices)
        assert torch.equal(ba[0], bs[0]) and torch.equal(ba[1], bs[1])
        assert torch.allclose(ia.scores, is_.scores)
    # and the seed matters
    with _dual_loader(make_vector_batches(12, 8), seed=0, return_info=True) as ld:
        a = [i.indices for _, i in ld]
    with JESTLoader(
        make_vector_batches(12, 8), TinyDual(seed=0), TinyDual(seed=100), 0.25, n_chunks=2,
        embed=tiny_dual_embed, seed=1, return_info=True,
    ) as ld:
        b = [i.indices for _, i in ld]
    assert any(not torch.equal(x, y) for x, y in zip(a, b))


def test_dict_nested_numpy_structures():
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(4):
        x, y = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
        batches.append(
            {
                "image": x,
                "text": y,
                "__key__": [f"k{i}{j}" for j in range(6)],
                "extra": {"np": np.arange(6) + 6 * i, "ids": torch.arange(6) + 6 * i},
            }
        )

    def embed(model, batch):
        return tiny_dual_embed(model, (batch["image"], batch["text"]))

    with JESTLoader(
        batches, TinyDual(), TinyDual(seed=1), 0.5, n_chunks=2, embed=embed, return_info=True
    ) as ld:
        out = list(ld)
    assert len(out) == 2
    batch, info = out[0]
    assert set(batch) == {"image", "text", "__key__", "extra"}
    assert isinstance(batch["extra"]["np"], np.ndarray)
    assert batch["extra"]["np"].tolist() == info.indices.tolist()
    assert batch["extra"]["ids"].tolist() == info.indices.tolist()
    assert batch["__key__"] == [f"k{i // 6}{i % 6}" for i in info.indices.tolist()]


def test_lengths_and_drop_last():
    batches = make_vector_batches(10, 8)
    ld = _dual_loader(_Lengthy(batches, batch_size=8), ratio=0.25)
    assert (ld.n, ld.batch_size, ld.super_batch_size) == (4, 8, 32)
    assert len(ld) == 2 and ld.num_batches == 2 and ld.num_samples == 16
    assert ld.ratio == 0.25
    out = list(ld)
    assert [b[0].shape[0] for b in out] == [8, 8]
    ld.close()

    ld = _dual_loader(_Lengthy(batches, batch_size=8), ratio=0.25, drop_last=False)
    assert len(ld) == 3
    out = list(ld)
    # trailing 2 base batches (16 examples) selected with the same ratio: 4
    assert [b[0].shape[0] for b in out] == [8, 8, 4]
    ld.close()


def test_unequal_base_batch_sizes():
    batches = make_vector_batches(3, 8) + make_vector_batches(1, 5, seed=1)
    with _dual_loader(batches, ratio=0.25, return_info=True) as ld:
        (batch, info), = list(ld)
    assert info.super_batch_size == 29
    assert batch[0].shape[0] == 7 == round(29 / 4)
    assert ld.batch_size == 8  # from the first base batch


@pytest.mark.parametrize("async_scoring", [True, False])
def test_base_batch_larger_than_b_raises_naming_sizes(async_scoring, no_thread_leak):
    """Base batches of 8, 8, 10, 12: it yielded 10 and 12 while batch_size reported 8."""
    sizes = [8, 8, 8, 8, 10, 10, 12, 12]
    batches = [make_vector_batches(1, b, seed=i)[0] for i, b in enumerate(sizes)]
    with _dual_loader(batches, ratio=0.25, async_scoring=async_scoring) as ld:
        got = []
        with pytest.raises(ValueError) as ei:
            for batch in ld:
                got.append(batch[0].shape[0])
        assert got == [8] and ld.batch_size == 8
    msg = str(ei.value)
    assert "base batch 1 of 4 for step 1 has 10 examples, more than the batch size b=8" in msg
    assert "(from the first base batch)" in msg and "DataLoader(batch_size=b)" in msg
    declared = _Lengthy(batches, batch_size=8)
    with _dual_loader(declared, ratio=0.25, async_scoring=async_scoring) as ld:
        with pytest.raises(ValueError, match=r"b=8 \(from base_loader\.batch_size\)"):
            list(ld)


def test_short_base_batch_in_the_middle_of_a_pass_warns_once(recwarn):
    sizes = [8, 8, 5, 8, 8, 8, 3, 8, 8, 8, 8, 8]
    batches = [make_vector_batches(1, b, seed=i)[0] for i, b in enumerate(sizes)]
    with _dual_loader(batches, ratio=0.25) as ld:
        with pytest.warns(UserWarning, match="base batch size changed in the middle") as rec:
            out = [b[0].shape[0] for b in ld]
    assert out == [7, 7, 8]  # round(29 / 4), round(27 / 4), 8
    msgs = [str(w.message) for w in rec if "middle of a pass" in str(w.message)]
    assert len(msgs) == 1 and "base batch 3 of 4 for step 0 (5 examples)" in msgs[0]
    assert "partial=False" in msgs[0]


def test_short_last_base_batch_is_legitimate(recwarn):
    """A short final base batch (a DataLoader with drop_last=False): no warning, no error."""
    batches = make_vector_batches(7, 8) + make_vector_batches(1, 3, seed=1)
    for drop_last in (True, False):
        # loss given (TinyDual's embed has no bias): the fallback's warning is not the subject
        with _dual_loader(_Lengthy(batches, batch_size=8), ratio=0.25, drop_last=drop_last,
                          loss="softmax") as ld:
            assert [b[0].shape[0] for b in ld] == [8, 7]  # round(27 / 4)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_batch_size_one_warns_no_negatives():
    batches = make_vector_batches(8, 1)
    with pytest.warns(UserWarning, match=r"b=1 \(from base_loader\.batch_size\).*no negatives"):
        ld = _dual_loader(_Lengthy(batches, batch_size=1), ratio=0.25, n_chunks=1)
    ld.close()
    with pytest.warns(UserWarning, match=r"b=1 \(from the first base batch\)"):
        with _dual_loader(batches, ratio=0.25, n_chunks=1) as ld:
            assert len(list(ld)) == 2


def test_tiny_trailing_super_batch_clamps_k_and_chunks():
    batches = make_vector_batches(4, 8) + make_vector_batches(1, 2, seed=3)
    with _dual_loader(batches, ratio=0.25, n_chunks=4, drop_last=False, return_info=True) as ld:
        out = list(ld)
    assert [b[0].shape[0] for b, _ in out] == [8, 1]  # 2 examples / n=4 -> at least 1
    assert out[1][1].super_batch_size == 2


def test_passthrough_attributes_and_set_epoch():
    base = _Lengthy(make_vector_batches(4, 8), batch_size=8)
    with _dual_loader(base) as ld:
        assert ld.dataset is base.dataset and ld.sampler is base.sampler
        ld.set_epoch(3)
        assert base.epochs == [3] and ld.epoch == 3
        _, info = next(iter(_dual_loader(base, return_info=True)))
        assert info.epoch == 0
        ld.return_info = True
        _, info = next(iter(ld))
        assert info.epoch == 3


def test_len_without_base_len():
    ld = _dual_loader(iter(make_vector_batches(4, 8)))
    with pytest.raises(TypeError, match="no length"):
        len(ld)
    ld.close()


# -- information ---------------------------------------------------------------------------


def test_return_info_and_last_info():
    with _dual_loader(make_vector_batches(8, 8), ratio=0.5) as ld:
        assert ld.last_info is None
        for step, batch in enumerate(ld):
            info = ld.last_info
            assert isinstance(info, SelectionInfo)
            assert info.step == step and info.super_batch_size == 16
            assert info.indices.shape == (8,) and len(set(info.indices.tolist())) == 8
            assert info.scores.shape == (8,)
            assert info.selected_mean == pytest.approx(float(info.scores.mean()))
            assert not info.fallback
            assert info.waited_s >= 0 and info.scored_s > 0 and info.selected_s >= 0
            assert batch[0].shape == (8, 12)
        assert ld.stats["batches"] == 4 and ld.stats["fallbacks"] == 0


def test_selection_prefers_learnable_examples():
    """With many more draws than noise, the selected mean score beats the super-batch mean."""
    with _dual_loader(make_vector_batches(40, 8), ratio=0.25, temperature=0.0) as ld:
        diffs = [ld.last_info.selected_mean - ld.last_info.super_batch_mean for _ in ld]
    assert len(diffs) == 10 and np.mean(diffs) > 0


@pytest.mark.parametrize("async_scoring", [False, True])
def test_easy_reference_never_runs_the_learner(async_scoring):
    """easy_reference scores by the reference alone: the learner snapshot's forward is skipped,
    and the selection is what the selection maths gives with the learner's embeddings too."""
    from jeststream.selection import joint_sample_from_embeddings

    batches = make_vector_batches(12, 8)
    calls = []

    def embed(model, batch):
        calls.append("reference" if model is reference else "learner")
        return tiny_dual_embed(model, batch)

    learner, reference = TinyDual(seed=0), TinyDual(seed=100)
    ld = JESTLoader(
        batches, learner, reference, 0.25, n_chunks=2, criterion="easy_reference", embed=embed,
        seed=5, async_scoring=async_scoring, return_info=True,
    )
    got = [info.indices for _, info in ld]
    assert len(got) == 3 and calls == ["reference"] * 3
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for i, idx in enumerate(got):
            xs = torch.cat([b[0] for b in batches[4 * i : 4 * i + 4]])
            ys = torch.cat([b[1] for b in batches[4 * i : 4 * i + 4]])
            ref = tiny_dual_embed(ld._scorer.reference, (xs, ys))
            snap = tiny_dual_embed(ld._snapshot.module, (xs, ys))
            want = joint_sample_from_embeddings(
                snap, ref, 8, criterion="easy_reference", n_chunks=2, generator=gen
            )
            assert torch.equal(idx, want)


# -- snapshot refresh and staleness ------------------------------------------------------


def test_refresh_every_and_staleness_sync():
    with _dual_loader(
        make_vector_batches(14, 4), ratio=0.5, refresh_every=3, async_scoring=False,
        return_info=True,
    ) as ld:
        infos = [i for _, i in ld]
    assert [i.staleness for i in infos] == [0, 1, 2, 0, 1, 2, 0]
    assert [i.snapshot_version for i in infos] == [1, 1, 1, 2, 2, 2, 3]


_DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


@pytest.mark.parametrize("device", _DEVICES)
def test_refresh_tracks_learner_updates(device):
    """On CUDA this exercises the snapshot's events: refresh copies queued on the consumer's
    stream after the "optimizer step", forwards on the producer's stream ordered after them."""
    learner = TinyDual().to(device)
    with JESTLoader(
        make_vector_batches(12, 4), learner, TinyDual(seed=1), 0.5, n_chunks=2,
        embed=tiny_dual_embed, prefetch=1, return_info=True,
    ) as ld:
        versions = []
        for _, info in ld:
            # next() refreshed the snapshot from the learner as it was after the last step (the
            # latest version: a refresh writes a copy no forward holds, so re-read it each step)
            snap = ld._snapshot.module
            assert torch.equal(snap.txt[0].weight, learner.txt[0].weight)
            versions.append(info.snapshot_version)
            assert info.staleness >= 0
            with torch.no_grad():
                learner.txt[0].weight.add_(1.0)  # the "optimizer step"
            assert not torch.equal(snap.txt[0].weight, learner.txt[0].weight)
    assert len(versions) == 6 and versions == sorted(versions) and versions[-1] > 1


# -- the learner is never touched ----------------------------------------------------------


@pytest.mark.parametrize("async_scoring", [True, False])
def test_learner_untouched(async_scoring):
    learner = TinyDual(seed=0)
    learner.train()
    learner.img[3].eval()  # a mixed-mode module: modes must come back exactly as they were
    x, y = make_vector_batches(1, 8)[0]
    e = tiny_dual_embed(learner, (x, y))
    (e.image.sum() + e.text.sum()).backward()  # BN stats move once and grads exist
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    modes = {n: m.training for n, m in learner.named_modules()}
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    with JESTLoader(
        make_vector_batches(12, 8, seed=5), learner, TinyDual(seed=7), 0.25, n_chunks=2,
        embed=tiny_dual_embed, async_scoring=async_scoring,
    ) as ld:
        assert len(list(ld)) == 3
    assert torch.equal(torch.get_rng_state(), rng)
    after = learner.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert "img.1.running_mean" in before and "img.1.num_batches_tracked" in before
    for n, p in learner.named_parameters():
        assert (p.grad is None) == (n not in grads)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n
        assert p.requires_grad
    assert {n: m.training for n, m in learner.named_modules()} == modes


def test_reference_is_frozen_at_construction():
    ref = TinyDual(seed=1).train()
    with _dual_loader(make_vector_batches(2, 8)) as ld:
        pass
    ld = JESTLoader(make_vector_batches(4, 8), TinyDual(), ref, 0.5, n_chunks=2, embed=tiny_dual_embed)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    ld.close()


def test_wrapped_learner_is_unwrapped():
    learner = TinyDual()
    wrapped = torch.nn.DataParallel(learner)
    with JESTLoader(
        make_vector_batches(4, 8), wrapped, TinyDual(seed=1), 0.5, n_chunks=2, embed=tiny_dual_embed
    ) as ld:
        assert ld._snapshot.live is learner
        assert len(list(ld)) == 2


# -- bad scores and invalid arguments -----------------------------------------------------


def _nan_embed(bad_step, n_bad):
    calls = {"learner": 0}

    def learner_embed(model, batch):
        e = tiny_dual_embed(model, batch)
        if getattr(model, "tag", None) == "learner":
            step = calls["learner"]
            calls["learner"] += 1
            if step == bad_step:
                image = e.image.clone()
                image[:n_bad] = math.nan
                return Embeddings(image, e.text, e.logit_scale, e.logit_bias)
        return e

    return learner_embed


@pytest.mark.parametrize("async_scoring", [True, False])
def test_nan_scores_raise_names_step_and_count(async_scoring, no_thread_leak):
    learner = TinyDual()
    learner.tag = "learner"
    ld = JESTLoader(
        make_vector_batches(12, 8), learner, TinyDual(seed=1), 0.25, n_chunks=2,
        embed=_nan_embed(1, 3), async_scoring=async_scoring,
    )
    it = iter(ld)
    next(it)
    with pytest.raises(ValueError, match=r"step 1 have 3 non-finite") as ei:
        next(it)
    if async_scoring:
        assert isinstance(ei.value.__cause__, ValueError)
    with pytest.raises(StopIteration):
        next(it)
    ld.close()


def test_nan_scores_uniform_fallback():
    learner = TinyDual()
    learner.tag = "learner"
    with JESTLoader(
        make_vector_batches(12, 8), learner, TinyDual(seed=1), 0.25, n_chunks=2,
        embed=_nan_embed(1, 3), on_bad_scores="uniform", return_info=True,
    ) as ld:
        out = list(ld)
    assert [i.fallback for _, i in out] == [False, True, False]
    assert out[1][0][0].shape == (8, 12)
    assert len(set(out[1][1].indices.tolist())) == 8
    assert ld.stats["fallbacks"] == 1


def test_non_finite_reference_scale_falls_back_for_whole_super_batch():
    def embed(model, batch):
        e = tiny_dual_embed(model, batch)
        if getattr(model, "tag", None) == "reference":
            return Embeddings(e.image, e.text, torch.tensor(math.inf), None)
        return e

    ref = TinyDual(seed=1)
    ref.tag = "reference"
    with JESTLoader(
        make_vector_batches(4, 8), TinyDual(), ref, 0.5, n_chunks=2, embed=embed,
        on_bad_scores="uniform", return_info=True,
    ) as ld:
        out = list(ld)
    assert all(info.fallback for _, info in out) and ld.stats["fallbacks"] == 2
    assert all(math.isnan(info.super_batch_mean) for _, info in out)

    with JESTLoader(
        make_vector_batches(4, 8), TinyDual(), ref, 0.5, n_chunks=2, embed=embed,
    ) as ld:
        with pytest.raises(ValueError, match="step 0 have 16 non-finite"):
            next(iter(ld))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": 0.9}, "n=round"),
        ({"ratio": "0.2"}, "ratio"),
        ({"n_chunks": 0}, "n_chunks"),
        ({"n_chunks": 9}, "n_chunks=9 exceeds the batch size b=8"),
        ({"loss": "hinge"}, "loss"),
        ({"criterion": "easiest"}, "criterion"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"refresh_every": -1}, "refresh_every"),
        ({"prefetch": 0}, "prefetch"),
        ({"on_bad_scores": "ignore"}, "on_bad_scores"),
        ({"reference": None}, "hard_learner"),
        ({"snapshot_dtype": torch.int8}, "snapshot_dtype"),
    ],
)
def test_invalid_arguments_at_construction(kwargs, match):
    args = {"ratio": 0.25, "reference": TinyDual(seed=1), "n_chunks": 2}
    args.update(kwargs)
    base = _Lengthy(make_vector_batches(4, 8), batch_size=8)
    with pytest.raises(ValueError, match=match):
        JESTLoader(base, TinyDual(), args.pop("reference"), args.pop("ratio"), embed=tiny_dual_embed, **args)


def test_reference_must_not_be_the_learner():
    learner = TinyDual()
    with pytest.raises(ValueError, match="reference is the learner"):
        JESTLoader([], learner, torch.nn.DataParallel(learner), 0.5, embed=tiny_dual_embed)
    assert learner.training and all(p.requires_grad for p in learner.parameters())

    # a reference that shares a tower with the learner: freezing it would freeze the learner
    reference = TinyDual(seed=1)
    reference.txt = learner.txt
    with pytest.raises(ValueError, match=r"shares 4 parameter\(s\).*txt\.0\.weight"):
        JESTLoader([], learner, reference, 0.5, embed=tiny_dual_embed)
    assert learner.training and all(p.requires_grad for p in learner.parameters())


def test_invalid_types():
    with pytest.raises(TypeError, match="learner"):
        JESTLoader([], object(), TinyDual(), 0.5)
    with pytest.raises(TypeError, match="embed"):
        JESTLoader([], TinyDual(), TinyDual(), 0.5, embed=3)


def test_n_chunks_checked_at_first_batch_without_batch_size(no_thread_leak):
    ld = _dual_loader(make_vector_batches(4, 8), n_chunks=9, ratio=0.5)
    with pytest.raises(ValueError, match="n_chunks=9"):
        next(iter(ld))
    ld.close()


def test_batch_without_images_or_texts(tiny_clip, no_thread_leak):
    batches = [{"image": torch.randn(4, 3, 32, 32)} for _ in range(4)]
    ld = JESTLoader(batches, tiny_clip(0), tiny_clip(1), 0.5, n_chunks=2)
    with pytest.raises(TypeError, match="embed="):
        next(iter(ld))
    ld.close()
    ld = JESTLoader([torch.randn(4, 3) for _ in range(4)], tiny_clip(0), tiny_clip(1), 0.5, n_chunks=2)
    with pytest.raises(TypeError, match="pass embed="):
        next(iter(ld))
    ld.close()
    # a plain model through the default embed: refused at construction (test_embed.py)
    with pytest.raises(TypeError, match="TinyDual.*encode_image.*embed="):
        JESTLoader(make_vector_batches(4, 4), TinyDual(), TinyDual(), 0.5, n_chunks=2)


def test_incomparable_embeddings(no_thread_leak):
    def embed(model, batch):
        e = tiny_dual_embed(model, batch)
        return Embeddings(e.image, e.text[:, :4], e.logit_scale, None)

    ld = JESTLoader(make_vector_batches(4, 4), TinyDual(), TinyDual(), 0.5, n_chunks=2, embed=embed)
    with pytest.raises(ValueError, match="can't be compared"):
        next(iter(ld))
    ld.close()

    def short(model, batch):
        e = tiny_dual_embed(model, batch)
        return Embeddings(e.image[:-1], e.text[:-1], e.logit_scale, None)

    ld = JESTLoader(make_vector_batches(4, 4), TinyDual(), TinyDual(), 0.5, n_chunks=2, embed=short)
    with pytest.raises(ValueError, match="7 embeddings for a super-batch of 8"):
        next(iter(ld))
    ld.close()


# -- failures re-raise chained; threads never outlive the loader ----------------------------


class _Boom(Exception):
    pass


def _failing_base(n_ok):
    def gen():
        yield from make_vector_batches(n_ok, 8)
        raise _Boom("disk on fire")

    class Base:
        def __iter__(self):
            return gen()

    return Base()


@pytest.mark.parametrize("async_scoring", [True, False])
def test_base_loader_error_reraises(async_scoring, no_thread_leak):
    ld = _dual_loader(_failing_base(5), ratio=0.5, async_scoring=async_scoring)
    got = []
    with pytest.raises(_Boom, match="disk on fire") as ei:
        for batch in ld:
            got.append(batch)
    assert len(got) == 2
    if async_scoring:
        assert isinstance(ei.value.__cause__, _Boom) and "producer thread" in "".join(
            ei.value.__notes__
        )
    ld.close()


def test_embed_error_reraises_chained(no_thread_leak):
    def embed(model, batch):
        raise KeyError("no such field")

    ld = JESTLoader(make_vector_batches(4, 4), TinyDual(), TinyDual(), 0.5, n_chunks=2, embed=embed,
                    scoring="latest")  # raised on the producer thread, re-raised chained
    with pytest.raises(KeyError) as ei:
        next(iter(ld))
    assert isinstance(ei.value.__cause__, KeyError)
    assert "embed" in "".join(
        str(f.name) for f in __import__("traceback").extract_tb(ei.value.__cause__.__traceback__)
    )
    ld.close()


@pytest.mark.parametrize("async_scoring", [True, False])
def test_stop_iteration_from_embed_is_an_error(async_scoring, no_thread_leak):
    def embed(model, batch):
        raise StopIteration

    ld = JESTLoader(
        make_vector_batches(4, 4), TinyDual(), TinyDual(), 0.5, n_chunks=2, embed=embed,
        async_scoring=async_scoring,
    )
    with pytest.raises(RuntimeError, match="StopIteration"):
        list(ld)
    ld.close()


def test_state_dict_is_torch_saveable(tmp_path):
    with JESTLoader(
        _stateful_base(), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed
    ) as ld:
        it = iter(ld)
        next(it)
        torch.save(ld.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    assert state["step"] == 1 and state["base"] is not None


def test_selection_error_reraises_chained(monkeypatch, no_thread_leak):
    import jeststream.superbatch as loader_mod  # the super-batch step

    def bad_select(*a, **k):
        raise RuntimeError("selection exploded")

    monkeypatch.setattr(loader_mod, "joint_sample_from_embeddings", bad_select)
    with _dual_loader(make_vector_batches(4, 8)) as ld:
        with pytest.raises(RuntimeError, match="selection exploded") as ei:
            list(ld)
    assert "selection exploded" in str(ei.value.__cause__)


def test_break_stops_producer(no_thread_leak):
    ld = _dual_loader(make_vector_batches(40, 4), ratio=0.5, prefetch=2)
    for _ in ld:
        assert len(_producer_threads()) == 2  # draw+score, select
        break
    # the for loop dropped its iterator: CPython collects it and the producer stops
    assert _producer_threads() == [] or all(not t.is_alive() for t in _producer_threads())
    ld.close()


def test_close_and_with_and_gc_stop_producer(no_thread_leak):
    ld = _dual_loader(make_vector_batches(40, 4), ratio=0.5)
    it = iter(ld)
    next(it)
    ld.close()
    assert _producer_threads() == []
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(RuntimeError, match="closed"):
        iter(ld)

    with _dual_loader(make_vector_batches(40, 4), ratio=0.5) as ld2:
        it = iter(ld2)
        next(it)
        assert len(_producer_threads()) == 2  # draw+score, select
    assert _producer_threads() == []

    ld3 = _dual_loader(make_vector_batches(40, 4), ratio=0.5)
    it = iter(ld3)
    next(it)
    del it, ld3
    gc.collect()
    assert _producer_threads() == []


def test_new_pass_replaces_old_producer(no_thread_leak):
    with _dual_loader(make_vector_batches(40, 4), ratio=0.5) as ld:
        it1 = iter(ld)
        next(it1)
        it2 = iter(ld)
        next(it2)
        assert len(_producer_threads()) == 2  # draw+score, select
        # the superseded pass is not silently ended: its next() says what happened
        with pytest.raises(RuntimeError, match=r"superseded by a new iter\(loader\)"):
            next(it1)
        with pytest.raises(RuntimeError, match="superseded"):  # and keeps saying it
            next(it1)
        next(it2)  # the new pass goes on


@pytest.mark.parametrize("async_scoring", [True, False])
def test_zip_of_two_passes_raises_instead_of_yielding_nothing(async_scoring, no_thread_leak):
    """zip(loader, loader) gave 0 pairs: the second iter() silently ended the first pass."""
    with _dual_loader(make_vector_batches(16, 4), ratio=0.5, async_scoring=async_scoring) as ld:
        with pytest.raises(RuntimeError) as ei:
            list(zip(ld, ld))
        msg = str(ei.value)
        assert "one pass at a time" in msg and "build a second JESTLoader" in msg
        assert "Finish, break out of or close()" in msg
        assert len(list(ld)) == 8  # the loader is still usable: a full new pass
    assert _producer_threads() == []


@pytest.mark.parametrize("async_scoring", [True, False])
def test_break_then_new_loop_is_a_full_new_pass(async_scoring, no_thread_leak):
    batches = make_vector_batches(16, 4)
    with _dual_loader(batches, ratio=0.5, async_scoring=async_scoring) as ld:
        for i, _ in enumerate(ld):
            if i == 2:
                break
        assert len(list(ld)) == 8  # dropped by the for loop: nothing to supersede
        it = iter(ld)  # a pass left early but still referenced
        next(it)
        assert sum(1 for _ in ld) == 8
        with pytest.raises(RuntimeError, match="superseded"):
            next(it)
        # a finished pass keeps ending normally; one closed by its owner ends quietly
        done = iter(ld)
        assert sum(1 for _ in done) == 8
        closed = iter(ld)  # supersedes nothing: `done` had finished
        with pytest.raises(StopIteration):
            next(done)
        next(closed)
        closed.close()
        iter(ld).close()
        with pytest.raises(StopIteration):
            next(closed)


def test_load_state_dict_supersedes_a_live_pass(no_thread_leak):
    from conftest import ResumableList

    with _dual_loader(ResumableList(make_vector_batches(16, 4)), ratio=0.5) as ld:
        it = iter(ld)
        next(it)
        ld.load_state_dict(ld.state_dict())
        with pytest.raises(RuntimeError, match=r"superseded by load_state_dict\(\)"):
            next(it)
        assert len(list(ld)) == 7


def test_keyboard_interrupt_in_training_loop_does_not_hang(no_thread_leak):
    with pytest.raises(KeyboardInterrupt):
        with _dual_loader(make_vector_batches(40, 4), ratio=0.5) as ld:
            for _ in ld:
                raise KeyboardInterrupt
    assert _producer_threads() == []

    ld = _dual_loader(make_vector_batches(40, 4), ratio=0.5)
    with pytest.raises(KeyboardInterrupt):
        for _ in ld:
            raise KeyboardInterrupt
    ld.close()  # the iterator may still be referenced by the traceback; close() still stops it
    assert _producer_threads() == []


# -- resume ----------------------------------------------------------------------------------


def _stateful_base(seed=0, shuffle=True):
    from torchdata.stateful_dataloader import StatefulDataLoader

    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(96, 12, generator=g), torch.randn(96, 12, generator=g))
    return StatefulDataLoader(
        ds, batch_size=4, shuffle=shuffle, generator=torch.Generator().manual_seed(7)
    )


@pytest.mark.parametrize("async_scoring", [True, False])
def test_resume_matches_uninterrupted_run(async_scoring, no_thread_leak):
    def make():
        return JESTLoader(
            _stateful_base(), TinyDual(seed=0), TinyDual(seed=1), 0.25, n_chunks=2,
            embed=tiny_dual_embed, async_scoring=async_scoring, prefetch=3, seed=11,
            return_info=True,
        )

    with make() as ld:
        full = list(ld)
    assert len(full) == 6

    ld = make()
    it = iter(ld)
    for _ in range(2):
        next(it)
    state = ld.state_dict()
    assert state["step"] == 2
    ld.close()

    with make() as resumed:
        resumed.load_state_dict(state)
        rest = list(resumed)
    assert len(rest) == 4
    for (b_full, i_full), (b_res, i_res) in zip(full[2:], rest):
        assert i_full.step == i_res.step
        assert torch.equal(i_full.indices, i_res.indices)
        assert torch.equal(b_full[0], b_res[0]) and torch.equal(b_full[1], b_res[1])


@pytest.mark.parametrize("async_scoring", [True, False])
def test_resume_saved_between_set_epoch_and_the_next_pass(async_scoring, no_thread_leak):
    """A checkpoint written after set_epoch(e) but before epoch e's first batch resumes with
    epoch e's draws, as the uninterrupted run makes them. (Unshuffled base: a StatefulDataLoader
    restored from an end-of-epoch state reshuffles its next epoch differently from an
    uninterrupted one -- torchdata's behaviour, not the sampler's.)"""
    def make():
        return JESTLoader(
            _stateful_base(shuffle=False), TinyDual(seed=0), TinyDual(seed=1), 0.25, n_chunks=2,
            embed=tiny_dual_embed, async_scoring=async_scoring, seed=11, return_info=True,
        )

    with make() as ld:
        ld.set_epoch(0)
        list(ld)
        ld.set_epoch(1)
        state = ld.state_dict()
        expected = list(ld)

    with make() as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(1)
        got = list(resumed)
    assert [i.epoch for _, i in got] == [1] * len(expected) and len(got) == 6
    for (_, i_exp), (_, i_got) in zip(expected, got):
        assert i_exp.step == i_got.step
        assert torch.equal(i_exp.indices, i_got.indices)


def test_state_dict_before_and_after_iteration():
    with JESTLoader(
        _stateful_base(), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed
    ) as ld:
        s0 = ld.state_dict()
        assert s0["step"] == 0 and s0["base"] is not None
        list(ld)
        s1 = ld.state_dict()
        assert s1["step"] == 6 and not torch.equal(s1["generator"], s0["generator"])


def test_base_without_state_dict():
    with _dual_loader(make_vector_batches(8, 8)) as ld:
        next(iter(ld))
        state = ld.state_dict()
        assert state["base"] is None and state["step"] == 1
        with pytest.raises(TypeError, match="no load_state_dict"):
            ld.load_state_dict(state)


def test_load_state_dict_rejects_garbage():
    with JESTLoader(
        _stateful_base(), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed
    ) as ld:
        with pytest.raises(ValueError, match="not a JESTLoader state_dict"):
            ld.load_state_dict({"foo": 1})


# -- selection log -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_selection_log_records_yielded_super_batches(tmp_path, suffix):
    from jeststream.selection_log import read_selection_log

    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g), [f"k{i}_{j}" for j in range(4)])
        for i in range(8)
    ]
    path = tmp_path / f"sel{suffix}"
    with JESTLoader(
        batches, TinyDual(), TinyDual(seed=1), 0.5, n_chunks=2, embed=tiny_dual_embed,
        selection_log=path, return_info=True,
    ) as ld:
        out = list(ld)
    cols = read_selection_log(path)
    assert len(cols["key"]) == 4 * 8  # 4 super-batches of 8
    assert sorted(set(cols["step"].tolist())) == [0, 1, 2, 3]
    logged = [k for k, s in zip(cols["key"], cols["selected"]) if s]
    yielded = [k for b, _ in out for k in b[2]]
    assert sorted(logged) == sorted(yielded)
    first = cols["step"] == 0
    assert np.isclose(cols["score"][first].mean(), out[0][1].super_batch_mean, atol=1e-5)


def test_selection_log_with_key_fn(tmp_path):
    from jeststream.selection_log import read_selection_log

    batches = make_vector_batches(4, 4)
    counter = iter(range(10**6))

    def key_fn(batch):
        return [f"id{next(counter)}" for _ in range(batch[0].shape[0])]

    path = tmp_path / "sel.jsonl"
    with JESTLoader(
        batches, TinyDual(), TinyDual(seed=1), 0.5, n_chunks=2, embed=tiny_dual_embed,
        selection_log=path, key_fn=key_fn,
    ) as ld:
        list(ld)
    cols = read_selection_log(path)
    assert cols["key"] == [f"id{i}" for i in range(16)]


def test_score_transform_applies_to_scoring_only():
    batches = make_vector_batches(4, 8)
    seen = []

    def transform(batch):
        seen.append(batch[0].shape[0])
        return (batch[0] * 0.0, batch[1])

    with _dual_loader(batches, ratio=0.5, score_transform=transform, return_info=True) as ld:
        out = list(ld)
    assert seen == [16, 16]
    originals = torch.cat([b[0] for b in batches[:2]])
    batch, info = out[0]
    assert torch.equal(batch[0], originals[info.indices])  # untransformed rows


def test_set_epoch_reseeds_selection_but_keeps_a_restored_generator(no_thread_leak):
    batches = make_vector_batches(8, 4)  # the same data every pass

    def run(history_epochs, epoch):
        with JESTLoader(
            batches, TinyDual(seed=0), TinyDual(seed=1), 0.25, n_chunks=2,
            embed=tiny_dual_embed, seed=5, return_info=True,
        ) as ld:
            for e in history_epochs:  # earlier passes advance the generator
                ld.set_epoch(e)
                list(ld)
            ld.set_epoch(epoch)
            return [info.indices for _, info in ld]

    # epoch 2's selections do not depend on what ran before (open_clip resumes from epoch
    # checkpoints that hold no loader state) ...
    fresh, after_history = run([], 2), run([0, 1], 2)
    assert all(torch.equal(a, b) for a, b in zip(fresh, after_history))
    # ... and differ from another epoch's
    assert not all(torch.equal(a, b) for a, b in zip(fresh, run([], 3)))

    # set_epoch(same epoch) right after a mid-epoch restore keeps the restored generator
    def make():
        return JESTLoader(
            _stateful_base(), TinyDual(seed=0), TinyDual(seed=1), 0.25, n_chunks=2,
            embed=tiny_dual_embed, seed=5, return_info=True,
        )

    with make() as ld:
        ld.set_epoch(4)
        full = [info.indices for _, info in ld]
    with make() as ld:
        ld.set_epoch(4)
        it = iter(ld)
        next(it), next(it)
        state = ld.state_dict()
    with make() as ld:
        ld.load_state_dict(state)
        ld.set_epoch(4)
        rest = [info.indices for _, info in ld]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], rest))


def test_selection_log_overwrites_fresh_runs_and_appends_after_restore(tmp_path, no_thread_leak):
    from jeststream.selection_log import read_selection_log

    path = tmp_path / "sel.jsonl"

    def make():
        return JESTLoader(
            _stateful_base(), TinyDual(seed=0), TinyDual(seed=1), 0.25, n_chunks=2,
            embed=tiny_dual_embed, seed=5, selection_log=path,
        )

    with make() as ld:
        list(ld)
    n_full = len(read_selection_log(path)["step"])
    with make() as ld:  # a fresh run at the same path replaces the old log
        it = iter(ld)
        next(it), next(it)
        state = ld.state_dict()
    assert sorted(set(read_selection_log(path)["step"].tolist())) == [0, 1]
    with make() as ld:  # a restored run continues it
        ld.load_state_dict(state)
        list(ld)
    cols = read_selection_log(path)
    assert sorted(set(cols["step"].tolist())) == list(range(6))
    assert len(cols["step"]) == n_full


def test_selection_log_directory_checked_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises((ValueError, OSError)):
        JESTLoader(
            [], TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed,
            selection_log=blocker / "sub" / "sel.jsonl",
        )


@pytest.mark.parametrize("async_scoring", [True, False])
def test_set_epoch_mid_pass_takes_effect_at_the_next_pass(async_scoring, no_thread_leak):
    """set_epoch() while a pass is running must neither change that pass's selections nor race
    with its producer, which may be drawing from the generator (prefetch) at that moment."""
    batches = make_vector_batches(16, 4)

    def make():
        return _dual_loader(batches, seed=3, async_scoring=async_scoring, return_info=True)

    with make() as ld:
        ld.set_epoch(0)
        epoch0 = [info.indices for _, info in ld]
        ld.set_epoch(1)
        epoch1 = [info.indices for _, info in ld]
    with make() as ld:
        ld.set_epoch(0)
        it = iter(ld)
        got0 = [next(it)[1].indices for _ in range(2)]
        ld.set_epoch(1)  # the running pass (and its prefetching producer) is still alive
        got0 += [info.indices for _, info in it]
        got1 = [info.indices for _, info in ld]
    assert len(epoch0) == len(got0) == 4
    assert all(torch.equal(a, b) for a, b in zip(epoch0, got0))
    assert all(torch.equal(a, b) for a, b in zip(epoch1, got1))


def test_info_tensors_are_ordinary_tensors():
    with _dual_loader(make_vector_batches(4, 8), return_info=True) as ld:
        batch, info = next(iter(ld))
    assert not info.indices.is_inference() and not info.scores.is_inference()
    info.indices.add_(0)  # in-place use in the training loop must work
    assert not batch[0].is_inference()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_async_staleness_is_bounded_by_prefetch(prefetch, no_thread_leak):
    """At most ``prefetch`` super-batches are scored ahead of the consumer, so with a refresh per
    step a yielded batch was scored by a snapshot at most ``prefetch`` steps old."""
    import time

    with _dual_loader(
        make_vector_batches(24, 4), ratio=0.5, prefetch=prefetch, return_info=True
    ) as ld:
        staleness = []
        for _, info in ld:
            time.sleep(0.02)  # a training step: the producer runs as far ahead as it may
            staleness.append(info.staleness)
    assert len(staleness) == 12 and max(staleness) <= prefetch


def test_refresh_failure_stops_the_producer(no_thread_leak):
    """A refresh that fails in next() (the learner's parameter changed shape) closes the pass
    like any other failure: no producer thread keeps running behind the caller's back."""
    learner = TinyDual()
    ld = JESTLoader(
        make_vector_batches(40, 4), learner, TinyDual(seed=1), 0.5, n_chunks=2,
        embed=tiny_dual_embed,
    )
    it = iter(ld)
    next(it)
    learner.txt[0].weight = torch.nn.Parameter(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="shape changed"):
        next(it)
    assert _producer_threads() == []  # `it` is still referenced here
    ld.close()


def test_selection_log_mode_append_and_invalid(tmp_path, no_thread_leak):
    from jeststream.selection_log import read_selection_log

    path = tmp_path / "sel.jsonl"
    batches = make_vector_batches(8, 4)
    for mode, expected_rows in (("w", 32), ("a", 64), ("w", 32)):
        with JESTLoader(
            batches, TinyDual(), TinyDual(seed=1), 0.5, n_chunks=2, embed=tiny_dual_embed,
            selection_log=path, selection_log_mode=mode,
        ) as ld:
            list(ld)
        # "a" appends a second run's records (read without resume de-duplication)
        assert len(read_selection_log(path, dedupe=False)["step"]) == expected_rows
    with pytest.raises(ValueError, match="selection_log_mode='x'"):
        JESTLoader(batches, TinyDual(), TinyDual(seed=1), 0.5, n_chunks=2, embed=tiny_dual_embed,
                   selection_log=path, selection_log_mode="x")
