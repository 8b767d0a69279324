"""Hugging Face transformers models through the default embed (jeststream.adapters.transformers):
no embed to write, the loss following the model, exact text trimming for CLIP, low-resolution
scoring with the models' own position-embedding interpolation. Tiny random configs only."""

from __future__ import annotations

import copy

import hf_tiny
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from jeststream import JESTLoader  # noqa: E402
from jeststream.adapters import transformers as hf  # noqa: E402
from jeststream.embed import default_embed, default_loss, model_family  # noqa: E402
from jeststream.scoring import Scorer  # noqa: E402
from jeststream.snapshot import LearnerSnapshot  # noqa: E402

FAMILIES = {
    "clip": (hf_tiny.clip, "softmax"),
    "siglip": (hf_tiny.siglip, "sigmoid"),
    "siglip2": (hf_tiny.siglip2, "sigmoid"),
    "dual_encoder": (hf_tiny.dual_encoder, "softmax"),
}


def _batch(name: str, b: int = 8, seed: int = 0) -> dict:
    return hf_tiny.processor_batches(1, b, seed=seed, siglip2=name == "siglip2")[0]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_default_embed_equals_the_hand_written_embed(name):
    build, loss = FAMILIES[name]
    model = build(0)
    assert model_family(model) == "transformers" and default_loss(model) == loss
    batch = _batch(name)
    with torch.inference_mode():
        got, want = default_embed(model, batch), hf_tiny.readme_embed(model, batch)
    torch.testing.assert_close(got.image, want.image, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.text, want.text, atol=1e-5, rtol=0)
    assert float(got.logit_scale) == pytest.approx(float(model.logit_scale.detach().exp()))
    assert (got.logit_bias is None) == (loss == "softmax")
    # tuples and extra entries (keys, return_loss) work too
    if name != "siglip2":
        with torch.inference_mode():
            t = default_embed(model, (batch["pixel_values"], batch["input_ids"],
                                      batch["attention_mask"], ["k"] * 8))
            d = default_embed(model, {**batch, "return_loss": True, "__key__": ["k"] * 8})
        torch.testing.assert_close(t.text, got.text)
        torch.testing.assert_close(d.image, got.image)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_selection_equals_the_hand_written_embed(name, no_thread_leak):
    """JESTLoader(base, learner, reference) with no embed= selects what the README's
    hand-written embed selected, with the loss the model trains with."""
    build, loss = FAMILIES[name]
    batches = hf_tiny.processor_batches(12, 8, seed=3, keys=True)
    runs = []
    for embed in (None, hf_tiny.readme_embed):
        ld = JESTLoader(batches, build(0), build(1), 0.25, n_chunks=2, embed=embed,
                        async_scoring=False, return_info=True, seed=5)
        assert ld.loss == loss
        runs.append([(b["__key__"], info.indices.tolist()) for b, info in ld])
        ld.close()
    assert len(runs[0]) == 3 and runs[0] == runs[1]


def test_loss_mismatch_is_refused(no_thread_leak):
    batches = hf_tiny.processor_batches(4, 4)
    ld = JESTLoader(batches, hf_tiny.clip(0), hf_tiny.clip(1), 0.5, n_chunks=2, loss="sigmoid")
    with pytest.raises(ValueError, match="loss='sigmoid'.*logit_bias=None.*loss='softmax'"):
        next(iter(ld))
    ld.close()
    ld = JESTLoader(batches, hf_tiny.siglip(0), hf_tiny.siglip(1), 0.5, n_chunks=2,
                    loss="softmax")
    with pytest.raises(ValueError, match="loss='softmax'.*carry a logit_bias"):
        next(iter(ld))
    ld.close()


def test_unsupported_transformers_model_is_refused_at_construction():
    from transformers import CLIPTextConfig, CLIPTextModel

    text_only = CLIPTextModel(CLIPTextConfig(**hf_tiny._TEXT))
    assert model_family(text_only) is None
    with pytest.raises(TypeError, match="CLIPTextModel.*get_image_features.*embed="):
        JESTLoader(hf_tiny.processor_batches(4, 4), text_only, copy.deepcopy(text_only), 0.5)
    with pytest.raises(TypeError, match="needs \\['input_ids'\\]"):
        default_embed(hf_tiny.clip(0), {"pixel_values": torch.zeros(2, 3, 32, 32)})


# -- text trimming -----------------------------------------------------------------------------


@pytest.mark.parametrize("eos_pad", [False, True])
def test_clip_text_trimming_is_exact_and_shorter(eos_pad):
    model = hf_tiny.clip(0)
    g = torch.Generator().manual_seed(1)
    ids, mask = hf_tiny.token_batch(32, g, eos_pad=eos_pad)
    lengths = hf.needed_lengths(model, ids)
    assert lengths.tolist() == mask.sum(1).tolist()  # pooled at each caption's end-of-text
    seen = []
    hook = model.text_model.embeddings.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(out.shape[1]), with_kwargs=True
    )
    with torch.inference_mode():
        trimmed = hf.encode_text_trimmed(model, {"input_ids": ids, "attention_mask": mask})
        seen_trimmed = list(seen)
        full = model.get_text_features(input_ids=ids, attention_mask=mask)
    hook.remove()
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)
    assert max(seen_trimmed) <= hf_tiny.CONTEXT and min(seen_trimmed) < hf_tiny.CONTEXT
    # SigLIP's text tower (not causal, pooled at the last position) and BERT's are not trimmed
    assert hf.trimmable_text_tower(hf_tiny.dual_encoder(0)) is None
    assert hf.trimmable_text_tower(hf_tiny.siglip(0)) is None
    assert hf.encode_text_trimmed(hf_tiny.siglip(0), {"input_ids": ids}) is None


def test_trimming_counts_fewer_token_positions():
    """The forward actually runs on fewer positions: summed over the trimmed groups, well
    below rows x context for short captions."""
    model = hf_tiny.clip(0)
    g = torch.Generator().manual_seed(2)
    ids, mask = hf_tiny.token_batch(64, g)
    positions = []
    hook = model.text_model.embeddings.register_forward_hook(
        lambda m, args, kwargs, out: positions.append(out.shape[0] * out.shape[1]),
        with_kwargs=True,
    )
    with torch.inference_mode():
        hf.encode_text_trimmed(model, {"input_ids": ids, "attention_mask": mask}, bucket=1)
    hook.remove()
    assert sum(positions) == int(mask.sum()) < ids.numel()


# -- low resolution -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_low_resolution_scoring_uses_interpolated_position_embeddings(name):
    """The learner snapshot scores 16x16 images with the model's own interpolation; that is the
    model run at that size (a copy built for 16x16 whose position table is the interpolated
    one gives the same features); the reference and the live learner are untouched."""
    build, _ = FAMILIES[name]
    learner, reference = build(0), build(1)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    batch = _batch(name, b=6)
    snapshot = LearnerSnapshot(learner)
    scorer = Scorer(snapshot, reference, score_resolution=16)
    res = scorer(batch, 6)
    small = F.interpolate(batch["pixel_values"], size=(16, 16), mode="bilinear",
                          antialias=True, align_corners=False)
    with torch.inference_mode():
        want = F.normalize(learner.get_image_features(pixel_values=small,
                                                      interpolate_pos_encoding=True), dim=-1)
        ref_full = F.normalize(reference.get_image_features(pixel_values=batch["pixel_values"]),
                               dim=-1)
    torch.testing.assert_close(res.learner.image, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.reference.image, ref_full, atol=1e-5, rtol=0)
    # the model built at 16x16 with the interpolated table: the same features
    vm = learner.vision_model
    small_cfg = copy.deepcopy(vm.config)
    small_cfg.image_size = 16
    small_vm = type(vm)(small_cfg).eval()
    state = {k: v for k, v in vm.state_dict().items() if "position" not in k}
    small_vm.load_state_dict(state, strict=False)
    with torch.inference_mode():
        patches = vm.embeddings.patch_embedding(small).flatten(2).transpose(1, 2)
        if name == "clip":
            cls = vm.embeddings.class_embedding.expand(6, 1, -1)
            tokens = torch.cat([cls, patches], dim=1)
        else:
            tokens = patches
        table = vm.embeddings.interpolate_pos_encoding(tokens, 16, 16)  # [1, n, w]
        small_vm.embeddings.position_embedding.weight.copy_(table[0])
        pooled = small_vm(pixel_values=small).pooler_output
        proj = learner.visual_projection(pooled) if name == "clip" else pooled
    torch.testing.assert_close(res.learner.image, F.normalize(proj, dim=-1), atol=1e-5, rtol=0)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert learner.config.vision_config.image_size == hf_tiny.IMAGE


def test_low_resolution_through_the_loader_leaves_the_batch_full_size(no_thread_leak):
    ld = JESTLoader(hf_tiny.processor_batches(4, 4), hf_tiny.clip(0), hf_tiny.clip(1), 0.5,
                    n_chunks=2, score_resolution=16, async_scoring=False)
    batches = list(ld)
    assert len(batches) == 2 and batches[0]["pixel_values"].shape == (4, 3, 32, 32)
    ld.close()
    # SigLIP 2's patchified pixel_values have no side to resize
    scorer = Scorer(LearnerSnapshot(hf_tiny.siglip2(0)), None, score_resolution=16)
    with pytest.raises(ValueError, match="\\[n, c, h, w\\]"):
        scorer(_batch("siglip2", b=4), 4)


# -- precompute-reference --reference hf:DIR ----------------------------------------------------


def _read_tar(url):
    """(keys, PIL images, captions) of a webdataset shard, read with tarfile."""
    import io
    import tarfile

    from PIL import Image

    samples: dict[str, dict] = {}
    with tarfile.open(url) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys = sorted(samples)
    images = [Image.open(io.BytesIO(samples[k].get("png") or samples[k]["jpg"])) for k in keys]
    return keys, images, [samples[k]["txt"].decode() for k in keys]


def test_precompute_reference_from_a_save_pretrained_folder(tmp_path, capsys, no_thread_leak):
    """`jeststream precompute-reference --reference hf:DIR` embeds the shards with the
    processor saved beside the model (recorded in the manifest, fingerprint over its weights);
    the cache gives the live reference's embeddings and the same selection."""
    import json

    from helpers import write_wds_shards

    from jeststream.adapters.transformers import load_pretrained_reference
    from jeststream.cli import main
    from jeststream.reference_cache import ReferenceCache, reference_fingerprint

    folder = tmp_path / "clip-ref"
    hf_tiny.save_pretrained_clip(folder, seed=1)
    urls, _ = write_wds_shards(tmp_path / "wds", n_shards=2, per_shard=8)
    spec = str(tmp_path / "wds" / "shard-{0000..0001}.tar")
    out = tmp_path / "cache"
    argv = ["precompute-reference", "--shards", spec, "--reference", f"hf:{folder}", "--out",
            str(out), "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--quiet",
            "--dtype", "float32"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "16 examples" in capsys.readouterr().out
    reference, transform, tokenize, _ = load_pretrained_reference(str(folder))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reference"]["fingerprint"] == reference_fingerprint(reference)
    assert manifest["reference"]["source"] == f"hf:{folder}"
    pre = manifest["preprocessing"]
    assert pre["image_processor"]["class"] == "CLIPImageProcessor"
    assert pre["image_processor"]["crop_size"] == {"height": 32, "width": 32}
    assert pre["tokenizer"]["context_length"] == hf_tiny.CONTEXT
    assert manifest["logit_bias"] is None
    cache = ReferenceCache(out, reference=reference)  # the fingerprint matches
    keys, images, captions = _read_tar(urls[0])
    batch = {"pixel_values": torch.stack([transform(im)["pixel_values"] for im in images]),
             **tokenize(captions)}
    with torch.inference_mode():
        live = default_embed(reference, batch)
    got = cache.lookup(keys)
    torch.testing.assert_close(got.image, live.image, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.text, live.text, atol=1e-5, rtol=0)
    # JEST on the cache selects what it selects with the live reference
    base = [{**{k: v[i:i + 4] for k, v in batch.items()}, "__key__": keys[i:i + 4]}
            for i in range(0, 8, 4)]
    runs = []
    for ref in (reference, cache):
        ld = JESTLoader(base, hf_tiny.clip(0), ref, 0.5, n_chunks=2, return_info=True,
                        async_scoring=False)
        assert ld.loss == "softmax"
        runs.append([info.indices.tolist() for _, info in ld])
        ld.close()
    assert runs[0] == runs[1] and len(runs[0]) == 1
    # not a save_pretrained folder: a clear error naming the fix
    assert main([*argv[:4], f"hf:{tmp_path}", *argv[5:]]) == 2
    assert "save_pretrained" in capsys.readouterr().err
