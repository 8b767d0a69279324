from __future__ import annotations

import pytest
import torch
from conftest import TinyDual, tiny_dual_embed
from torch import nn

from jeststream.losses import Embeddings
from jeststream.scoring import Scorer, check_embeddings, default_embed, freeze_reference
from jeststream.snapshot import LearnerSnapshot


def test_default_embed_open_clip(tiny_clip, pair_batches):
    model = tiny_clip(0).eval()
    images, tokens = pair_batches(1, 4)[0]
    e = default_embed(model, (images, tokens))
    assert isinstance(e, Embeddings)
    assert e.image.shape == e.text.shape == (4, 32)
    assert torch.allclose(e.image.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(e.logit_scale, model.logit_scale.exp())
    assert e.logit_bias is None
    d = default_embed(model, {"image": images, "text": tokens, "other": 1})
    assert torch.allclose(d.image, e.image, atol=1e-6)


def test_default_embed_siglip_bias(tiny_clip, pair_batches):
    model = tiny_clip(0, siglip=True).eval()
    e = default_embed(model, pair_batches(1, 4)[0])
    assert e.logit_bias is not None and float(e.logit_bias.detach()) == pytest.approx(-10.0)


def test_default_embed_errors(tiny_clip):
    model = tiny_clip(0)
    with pytest.raises(TypeError, match="pass embed="):
        default_embed(model, torch.zeros(4, 3, 32, 32))
    with pytest.raises(TypeError, match=r"missing \['text'\]"):
        default_embed(model, {"image": torch.zeros(2, 3, 32, 32)})
    with pytest.raises(TypeError, match="tokenize"):
        default_embed(model, (torch.zeros(2, 3, 32, 32), ["a cat", "a dog"]))
    with pytest.raises(TypeError, match="encode_image"):
        default_embed(nn.Linear(2, 2), (torch.zeros(2, 2), torch.zeros(2, 2)))


def test_freeze_reference_does_and_checks():
    ref = TinyDual().train()
    out = freeze_reference(ref)
    assert out is ref and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())

    class Stubborn(TinyDual):
        def train(self, mode=True):  # refuses eval()
            return super().train(True)

    with pytest.raises(ValueError, match="not frozen"):
        freeze_reference(Stubborn())


def test_check_embeddings():
    unit = nn.functional.normalize(torch.randn(4, 3), dim=-1)
    e = Embeddings(unit.to(torch.bfloat16), unit, torch.tensor(20.0), 1.0)
    out = check_embeddings(e, "learner", 4)
    assert out.image.dtype == torch.float32 and out.logit_bias.shape == ()
    with pytest.raises(TypeError, match="must return"):
        check_embeddings((1, 2), "learner", 4)
    with pytest.raises(ValueError, match="can't be compared"):
        check_embeddings(Embeddings(torch.randn(4, 3), torch.randn(4, 5), torch.tensor(1.0), None), "x", 4)
    with pytest.raises(ValueError, match="3 embeddings"):
        check_embeddings(Embeddings(torch.randn(3, 2), torch.randn(3, 2), torch.tensor(1.0), None), "x", 4)
    with pytest.raises(ValueError, match="scalar"):
        check_embeddings(Embeddings(torch.randn(4, 2), torch.randn(4, 2), torch.ones(2), None), "x", 4)


def test_scorer_runs_both_models_and_score_transform(vector_batches):
    learner, ref = TinyDual(seed=0), TinyDual(seed=1)
    seen = []

    def transform(batch):
        seen.append(batch[0].shape)
        return (batch[0] * 0.0, batch[1])

    def embed(model, batch):
        assert torch.is_inference_mode_enabled()
        assert not model.training
        return tiny_dual_embed(model, batch)

    scorer = Scorer(LearnerSnapshot(learner), ref, embed=embed, score_transform=transform)
    x, y = vector_batches(1, 6)[0]
    res = scorer((x, y), 6)
    assert seen == [(6, 12)]
    assert res.version == 0 and res.seconds > 0
    assert res.learner.image.shape == res.reference.image.shape == (6, 8)
    # the transform reached the models: images were zeroed, so every image embedding is equal
    assert torch.allclose(res.learner.image, res.learner.image[:1].expand(6, -1), atol=1e-5)
    assert not ref.training


def test_scored_scalars_survive_a_snapshot_refresh(tiny_clip, pair_batches):
    """default_embed hands back the snapshot's own logit_bias parameter; the scores must not
    change when the next refresh copies the trained learner's bias into it in place, since
    selection reads them after the snapshot is released."""
    learner = tiny_clip(0, siglip=True)
    snapshot = LearnerSnapshot(learner)
    scorer = Scorer(snapshot, None)
    batch = pair_batches(1, 4)[0]
    result = scorer(batch, 4)
    bias, scale = float(result.learner.logit_bias), float(result.learner.logit_scale)
    with torch.no_grad():
        learner.logit_bias.add_(5.0)
        learner.logit_scale.add_(1.0)
    snapshot.refresh(1)
    assert float(result.learner.logit_bias) == bias
    assert float(result.learner.logit_scale) == scale
    assert float(scorer(batch, 4).learner.logit_bias) == pytest.approx(bias + 5.0)


def test_scorer_bfloat16_snapshot_on_cpu(vector_batches):
    scorer = Scorer(LearnerSnapshot(TinyDual(), dtype=torch.bfloat16), TinyDual(seed=1), embed=tiny_dual_embed)
    res = scorer(vector_batches(1, 4)[0], 4)
    assert res.learner.image.dtype == torch.float32  # cast back for the selection maths
    assert torch.isfinite(res.learner.image).all()


def test_scorer_argument_types():
    with pytest.raises(TypeError, match="embed"):
        Scorer(LearnerSnapshot(TinyDual()), None, embed="nope")
    with pytest.raises(TypeError, match="score_transform"):
        Scorer(LearnerSnapshot(TinyDual()), None, score_transform=1)
    with pytest.raises(ValueError, match="score_learner=False needs a reference"):
        Scorer(LearnerSnapshot(TinyDual()), None, score_learner=False)


def test_scorer_without_the_learner(vector_batches):
    """score_learner=False (easy_reference) runs the reference only; the version still says
    which snapshot was current."""
    models = []

    def embed(model, batch):
        models.append(model)
        return tiny_dual_embed(model, batch)

    snapshot = LearnerSnapshot(TinyDual(seed=0))
    scorer = Scorer(snapshot, TinyDual(seed=1), embed=embed, score_learner=False)
    snapshot.refresh(3)
    res = scorer(vector_batches(1, 6)[0], 6)
    assert res.learner is None and res.reference.image.shape == (6, 8)
    assert models == [scorer.reference] and res.version == 1


@pytest.mark.slow
def test_scoring_cost_benchmark_quick_prints_json():
    """benchmarks/scoring_cost.py counts the library's scoring paths: trimming and half
    resolution cut the counted FLOPs, the cache halves the scoring."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scoring_cost.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=240,
        check=True,
    ).stdout
    got = json.loads(out)
    models = got["models"]
    assert set(models) == {"demo", "demo_old_patch8"}
    # the rebalanced demo model has CLIP's cost structure; the old one did not
    assert models["demo"]["jest_step_vs_uniform_step"]["image_share_of_forward"] >= 0.7
    assert models["demo_old_patch8"]["jest_step_vs_uniform_step"]["image_share_of_forward"] < 0.3
    assert "arithmetic" in got["prefilter_note"].lower()
    for m in models.values():
        g, r = m["gflops_per_example"], m["jest_step_vs_uniform_step"]
        assert g["text_forward_captions_trimmed"] < g["text_forward_captions_untrimmed"]
        assert g["image_forward_half_resolution"] < g["image_forward"]
        assert r["cached_scoring_share_of_full_scoring"] == 0.5
        assert r["full_scoring"] > r["cached_reference"] > r["cached_reference_half_resolution_trimmed"] > 1
        # the reference pre-filter (q = 0.5) halves the learner's scoring share of a step
        low = r["cached_reference_half_resolution_trimmed"]
        assert r["cached_reference_half_resolution_trimmed_prefilter0.5"] == pytest.approx(
            1 + (low - 1) / 2
        )
        assert m["wall"]["train_step_s"] > 0
