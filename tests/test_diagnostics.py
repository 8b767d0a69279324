"""Batch learnability (jeststream.diagnostics): the sub-batch losses against open_clip's own loss
classes, the draws it compares, and its wiring into JESTLoader and the selection log."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONTEXT, TINY_IMAGE_SIZE, make_pair_batches, make_tiny_clip

from jeststream.batch import concat_batches
from jeststream.diagnostics import (
    BatchLearnability,
    draw_seed,
    measure_draws,
    sub_batch_loss,
    sub_batch_score,
)
from jeststream.loader import JESTLoader
from jeststream.losses import Embeddings
from jeststream.scoring import default_embed
from jeststream.selection import independent_sample


def _model_embeddings(model, n: int, seed: int) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
    tokens = torch.randint(1, 60, (n, TINY_CONTEXT), generator=g)
    with torch.inference_mode():
        return default_embed(model.eval(), (images, tokens))


@pytest.fixture(scope="module")
def siglip_pair():
    learner, reference = make_tiny_clip(0, siglip=True), make_tiny_clip(1, siglip=True)
    return _model_embeddings(learner, 48, 0), _model_embeddings(reference, 48, 0)


def test_sub_batch_losses_equal_open_clip_losses_times_size(siglip_pair):
    from open_clip.loss import ClipLoss, SigLipLoss

    e, _ = siglip_pair
    idx = torch.tensor([3, 17, 0, 41, 29, 8, 12])
    img, txt = e.image[idx], e.text[idx]
    siglip = SigLipLoss()(img, txt, e.logit_scale, e.logit_bias)
    clip = ClipLoss()(img, txt, e.logit_scale)
    got_sig = sub_batch_loss(e, idx, loss="sigmoid")
    got_clip = sub_batch_loss(e, idx.tolist(), loss="softmax")
    torch.testing.assert_close(got_sig.float(), len(idx) * siglip, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_clip.float(), len(idx) * clip, rtol=1e-5, atol=1e-5)
    # the row tiling sums the same terms as one block
    import jeststream.diagnostics as diag

    old, diag._ROW_TILE = diag._ROW_TILE, 3
    try:
        torch.testing.assert_close(sub_batch_loss(e, idx), got_sig)
    finally:
        diag._ROW_TILE = old
    with pytest.raises(ValueError, match="loss='hinge'"):
        sub_batch_loss(e, idx, loss="hinge")
    with pytest.raises(ValueError, match="empty"):
        sub_batch_loss(e, [])


def test_scores_follow_the_criterion(siglip_pair):
    learner, reference = siglip_pair
    idx = torch.arange(10)
    ll, lr = float(sub_batch_loss(learner, idx)), float(sub_batch_loss(reference, idx))
    assert sub_batch_score(learner, reference, idx) == pytest.approx(ll - lr)
    assert sub_batch_score(learner, None, idx, criterion="hard_learner") == pytest.approx(ll)
    assert sub_batch_score(None, reference, idx, criterion="easy_reference") == pytest.approx(-lr)
    with pytest.raises(ValueError, match="needs the reference"):
        sub_batch_score(learner, None, idx)


def test_measure_draws_uses_its_own_generator(siglip_pair):
    learner, reference = siglip_pair
    selected = torch.arange(0, 48, 4)  # 12 of 48
    m = measure_draws(learner, reference, selected, seed=(0, 1, 7))
    assert isinstance(m, BatchLearnability)
    assert m.selected == pytest.approx(sub_batch_score(learner, reference, selected))
    assert m == measure_draws(learner, reference, selected, seed=(0, 1, 7))  # reproducible
    assert m != measure_draws(learner, reference, selected, seed=(0, 1, 8))
    # the independent draw is independent_sample's with a generator seeded from the parts
    gen = torch.Generator().manual_seed(draw_seed(0, 1, 7))
    ind = independent_sample(learner, reference, 12, generator=gen)
    assert m.independent == pytest.approx(sub_batch_score(learner, reference, ind))
    uni = torch.randperm(48, generator=gen)[:12]
    assert m.uniform == pytest.approx(sub_batch_score(learner, reference, uni))
    assert m.overlap == pytest.approx(len(set(ind.tolist()) & set(selected.tolist())) / 12)
    # greedy: the independent draw is the top-k, so measuring the top-k finds full overlap
    top = independent_sample(learner, reference, 12, temperature=0.0)
    g = measure_draws(learner, reference, top, temperature=0.0, loss="sigmoid", seed=3)
    assert g.overlap == 1.0 and g.independent == pytest.approx(g.selected)
    soft = measure_draws(learner, reference, selected, loss="softmax", seed=3)
    assert soft.selected == pytest.approx(
        sub_batch_score(learner, reference, selected, loss="softmax")
    )
    with pytest.raises(ValueError, match="49 indices for a super-batch of B=48"):
        measure_draws(learner, reference, torch.arange(49) % 48)


def _loader(batches, **kw):
    learner, reference = make_tiny_clip(0, siglip=True), make_tiny_clip(1, siglip=True)
    return JESTLoader(
        batches, learner, reference, 0.25, n_chunks=4, seed=3, return_info=True,
        deterministic=True, **kw,
    )


@pytest.mark.parametrize("async_scoring", [False, True])
def test_flag_leaves_the_selection_unchanged(async_scoring):
    batches = make_pair_batches(12, 8)
    with _loader(batches, async_scoring=async_scoring) as ld:
        plain = [info for _, info in ld]
    with _loader(batches, async_scoring=async_scoring, batch_learnability=True) as ld:
        measured = [info for _, info in ld]
    assert len(plain) == len(measured) == 3
    for a, b in zip(plain, measured):
        assert torch.equal(a.indices, b.indices)
        assert a.batch_learnability is None
        assert isinstance(b.batch_learnability, BatchLearnability)
        assert 0.0 <= b.batch_learnability.overlap <= 1.0


def test_values_are_the_sub_batch_learnability_and_reach_the_log(tmp_path, capsys):
    """The loader never trains here, so its snapshot is the learner: recomputing both models'
    embeddings of each super-batch gives the logged values."""
    from jeststream.selection_log import inspect_main, read_selection_log

    batches = make_pair_batches(8, 8, keys=True)
    log = tmp_path / "sel.jsonl"
    ld = _loader(batches, batch_learnability=True, selection_log=log, async_scoring=False)
    with ld:
        infos = [info for _, info in ld]
    learner, reference = make_tiny_clip(0, siglip=True), make_tiny_clip(1, siglip=True)
    for step, info in enumerate(infos):
        sb = concat_batches(batches[4 * step : 4 * step + 4])
        with torch.inference_mode():
            el, er = default_embed(learner.eval(), sb), default_embed(reference.eval(), sb)
        want = measure_draws(el, er, info.indices, seed=(3, 0, step))
        assert info.batch_learnability.selected == pytest.approx(want.selected, rel=1e-4)
        assert info.batch_learnability.independent == pytest.approx(want.independent, rel=1e-4)
        assert info.batch_learnability.uniform == pytest.approx(want.uniform, rel=1e-4)
    cols = read_selection_log(log)
    for step, info in enumerate(infos):
        rows = cols["step"] == step
        assert cols["batch_learnability"][rows] == pytest.approx(
            info.batch_learnability.selected, rel=1e-6
        )
        assert cols["batch_learnability_uniform"][rows][0] == pytest.approx(
            info.batch_learnability.uniform, rel=1e-6
        )
    assert inspect_main([str(log), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["batch_learnability"]
    assert summary["super_batches"] == 2
    assert summary["selected"]["mean"] == pytest.approx(
        sum(i.batch_learnability.selected for i in infos) / 2, rel=1e-5
    )
