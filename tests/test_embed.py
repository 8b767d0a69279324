"""The embed protocol (jeststream.embed): its layering, and the misuse it refuses or names
instead of scoring wrongly without a word."""

from __future__ import annotations

import ast
import importlib
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyDual, make_pair_batches, make_vector_batches, tiny_dual_embed

from jeststream import JESTLoader
from jeststream.embed import Embeddings, check_embeddings

ROOT = Path(__file__).resolve().parents[1]


def _module_imports(path: Path) -> set[str]:
    """jeststream modules imported at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jeststream"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("jeststream")}
    return out


def test_embed_module_is_the_bottom_layer():
    """embed.py imports nothing of the package at import time but the leaf jeststream.device
    (which imports nothing of it), and the scoring <-> reference_cache cycle is gone:
    reference_cache builds on embed, not on scoring."""
    assert _module_imports(ROOT / "jeststream" / "embed.py") == {"jeststream.device"}
    assert not {
        m for m in _module_imports(ROOT / "jeststream" / "device.py") if m.startswith("jeststream")
    }
    assert "jeststream.scoring" not in _module_imports(ROOT / "jeststream" / "reference_cache.py")
    src = (ROOT / "jeststream" / "reference_cache.py").read_text()
    assert "jeststream.scoring" not in src
    # and importing it alone pulls no adapter (and no transformers)
    code = (
        "import sys, jeststream.embed; "
        "bad = [m for m in sys.modules if m.startswith('jeststream.')"
        " and m not in ('jeststream.embed', 'jeststream.device')"
        " or m == 'transformers']; print(bad); assert not bad"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_public_import_paths_still_work():
    from jeststream.losses import Embeddings as E1
    from jeststream.scoring import EmbedFn, check_embeddings, default_embed, freeze_reference
    from jeststream.snapshot import unwrap_model

    emb = importlib.import_module("jeststream.embed")
    assert E1 is emb.Embeddings
    assert default_embed is emb.default_embed and check_embeddings is emb.check_embeddings
    assert freeze_reference is emb.freeze_reference and unwrap_model is emb.unwrap_model
    assert EmbedFn is emb.EmbedFn


def _unit(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


# -- unit norm ---------------------------------------------------------------------------------


def test_features_that_are_not_unit_norm_are_refused():
    e = Embeddings(_unit(4) * 7, _unit(4, seed=1), torch.tensor(10.0), None)
    with pytest.raises(ValueError, match=r"learner's image embeddings are not unit-norm.*7\b.*normalize"):
        check_embeddings(e, "learner", 4)
    e = Embeddings(_unit(4), _unit(4, seed=1) * 7, torch.tensor(10.0), None)
    with pytest.raises(ValueError, match="reference's text embeddings are not unit-norm"):
        check_embeddings(e, "reference", 4)
    # bf16 rounding of normalised features is within the tolerance; NaN rows are left to
    # on_bad_scores
    e = Embeddings(_unit(64, 768).bfloat16(), _unit(64, 768, seed=1).half(), torch.tensor(10.0), None)
    check_embeddings(e, "learner", 64)
    img = _unit(4)
    img[1] = math.nan
    check_embeddings(Embeddings(img, _unit(4, seed=1), torch.tensor(10.0), None), "learner", 4)


def test_loader_refuses_unnormalised_features(no_thread_leak):
    def embed(model, batch):
        e = tiny_dual_embed(model, batch)
        return e._replace(image=e.image * 7)

    ld = JESTLoader(make_vector_batches(4, 4), TinyDual(seed=0), TinyDual(seed=1), 0.5, n_chunks=2,
                    embed=embed, loss="softmax")
    with pytest.raises(ValueError, match="not unit-norm: a row has L2 norm 7"):
        next(iter(ld))
    ld.close()


# -- loss against bias -------------------------------------------------------------------------


def test_loss_bias_mismatch_raises_naming_both_fixes(tiny_clip, no_thread_leak):
    batches = make_pair_batches(4, 4)
    # a CLIP embed (no bias) under the sigmoid loss
    ld = JESTLoader(batches, tiny_clip(0), tiny_clip(1), 0.5, n_chunks=2, loss="sigmoid")
    with pytest.raises(ValueError, match=r"loss='sigmoid'.*logit_bias=None.*loss='softmax'.*SigLIP"):
        next(iter(ld))
    ld.close()
    # a SigLIP embed (bias) under the softmax loss
    ld = JESTLoader(batches, tiny_clip(0, siglip=True), tiny_clip(1, siglip=True), 0.5,
                    n_chunks=2, loss="softmax")
    with pytest.raises(ValueError, match=r"loss='softmax'.*logit_bias.*loss='sigmoid'.*CLIP"):
        next(iter(ld))
    ld.close()


def test_loss_default_follows_the_model(tiny_clip, no_thread_leak):
    batches = make_pair_batches(4, 4)
    clip = JESTLoader(batches, tiny_clip(0), tiny_clip(1), 0.5, n_chunks=2)
    siglip = JESTLoader(batches, tiny_clip(0, siglip=True), tiny_clip(1, siglip=True), 0.5,
                        n_chunks=2)
    assert clip.loss == "softmax" and siglip.loss == "sigmoid"
    for ld in (clip, siglip):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a matching loss runs without a word
            assert len(list(ld)) == 2
        ld.close()


def test_unknown_model_falls_back_to_sigmoid_and_says_so(no_thread_leak):
    ld = JESTLoader(make_vector_batches(4, 4), TinyDual(seed=0), TinyDual(seed=1), 0.5, n_chunks=2,
                    embed=tiny_dual_embed)
    assert ld.loss == "sigmoid"
    with pytest.warns(UserWarning, match="loss was not given.*loss='softmax'") as rec:
        list(ld)
    # once per model, not per super-batch
    assert len([w for w in rec if "loss was not given" in str(w.message)]) == 2
    ld.close()


def test_a_reference_of_another_family_is_warned_about(tiny_clip, no_thread_leak):
    ld = JESTLoader(make_pair_batches(4, 4), tiny_clip(0, siglip=True), tiny_clip(1), 0.5,
                    n_chunks=2)
    assert ld.loss == "sigmoid"  # the learner's
    with pytest.warns(UserWarning, match="reference's embeddings have logit_bias=None"):
        assert len(list(ld)) == 2
    ld.close()


# -- logit_scale --------------------------------------------------------------------------------


def test_log_logit_scale_is_warned_about_once(no_thread_leak):
    def embed(model, batch):  # forgot .exp()
        e = tiny_dual_embed(model, batch)
        return e._replace(logit_scale=model.logit_scale)

    ld = JESTLoader(make_vector_batches(6, 4), TinyDual(seed=0), TinyDual(seed=1), 0.5, n_chunks=2,
                    embed=embed, loss="softmax")
    with pytest.warns(UserWarning, match=r"logit_scale is 2.303.*exp\(\)") as rec:
        assert len(list(ld)) == 3
    scale_warnings = [w for w in rec if "logit_scale is" in str(w.message)]
    assert len(scale_warnings) == 2  # once for the learner, once for the reference
    ld.close()


def test_float_logit_scale_is_accepted():
    e = Embeddings(_unit(4), _unit(4, seed=1), 10.0, -10.0)
    out = check_embeddings(e, "learner", 4, loss="sigmoid")
    assert out.logit_scale.dtype == torch.float32 and float(out.logit_scale) == 10.0
    assert float(out.logit_bias) == -10.0
    with pytest.raises(TypeError, match="logit_scale is a str"):
        check_embeddings(Embeddings(_unit(4), _unit(4), "10", None), "learner", 4)


# -- a model the default embed does not know ----------------------------------------------------


def test_model_without_encoders_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"learner, a TinyDual.*encode_image.*embed="):
        JESTLoader(make_vector_batches(4, 4), TinyDual(seed=0), TinyDual(seed=1), 0.5)
    # the reference too, when the learner is fine
    import conftest

    with pytest.raises(TypeError, match=r"reference, a TinyDual"):
        JESTLoader(make_pair_batches(4, 4), conftest.make_tiny_clip(0), TinyDual(seed=1), 0.5)
    # with embed= anything goes
    JESTLoader(make_vector_batches(4, 4), TinyDual(seed=0), TinyDual(seed=1), 0.5,
               embed=tiny_dual_embed).close()
