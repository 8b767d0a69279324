"""Low-resolution learner scoring: resized inputs, resampled positional embeddings, the live
learner bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CLIP_CFG, make_pair_batches, make_tiny_clip

from jeststream import JESTLoader
from jeststream.low_res import encode_image_resampled, resample_pos_embed, resize_images
from jeststream.scoring import default_embed


def test_resampled_forward_equals_a_model_built_at_the_low_resolution():
    """The resampled forward is exactly open_clip's forward of the same weights with the
    positional embeddings resampled to the new grid (a 16 px model: 2x2 patches of 8)."""
    import open_clip

    model = make_tiny_clip(seed=4).eval()
    cfg = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "image_size": 16}}
    small = open_clip.model.CLIP(**cfg).eval()
    state = model.state_dict()
    state["visual.positional_embedding"] = resample_pos_embed(
        state["visual.positional_embedding"], (2, 2), (4, 4)
    )
    small.load_state_dict(state)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        got = encode_image_resampled(model, images)
        want = small.encode_image(images, normalize=True)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    # at the native size it is open_clip's own forward
    full = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encode_image_resampled(model, full), model.encode_image(full, normalize=True))


def test_resize_keeps_dtype_and_rejects_bad_shapes():
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert resize_images(u8, 16).dtype == torch.uint8 and resize_images(u8, 16).shape[-1] == 16
    with pytest.raises(ValueError, match=r"\[n, c, h, w\]"):
        resize_images(torch.zeros(3, 32, 32), 16)


@pytest.mark.parametrize("async_scoring", [True, False])
def test_score_resolution_scores_the_learner_on_resized_images(async_scoring, no_thread_leak):
    learner, reference = make_tiny_clip(seed=0), make_tiny_clip(seed=1)
    before = copy.deepcopy(learner.state_dict())
    sizes: dict[str, set] = {"learner": set(), "reference": set()}

    def embed(model, batch):
        sizes["reference" if model is reference else "learner"].add(tuple(batch[0].shape[-2:]))
        return default_embed(model, batch)

    batches = make_pair_batches(8, 8)
    with JESTLoader(
        batches, learner, reference, 0.25, n_chunks=2, embed=embed, score_resolution=16,
        async_scoring=async_scoring, return_info=True,
    ) as ld:
        out = list(ld)
    assert len(out) == 2
    assert sizes == {"learner": {(16, 16)}, "reference": {(32, 32)}}
    assert all(b[0].shape[-2:] == (32, 32) for b, _ in out)  # the yielded batch is untouched
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k  # the live learner is bit-identical
    with pytest.raises(ValueError, match="score_resolution"):
        JESTLoader(batches, learner, reference, 0.25, score_resolution=0)


def test_score_resolution_changes_the_learner_scores_only():
    """Full and low resolution select from the same super-batch with different learner
    scores and the same reference scores."""
    learner, reference = make_tiny_clip(seed=0), make_tiny_clip(seed=1)
    batches = make_pair_batches(4, 8)
    infos = {}
    for r in (None, 16):
        with JESTLoader(batches, learner, reference, 0.25, n_chunks=2, score_resolution=r,
                        async_scoring=False, return_info=True) as ld:
            infos[r] = [i for _, i in ld]
    assert not torch.equal(infos[None][0].scores, infos[16][0].scores)


def test_mixed_resolution_training_rows_and_gradients():
    """encode_image_mixed: round(share * n) rows, drawn by the generator, are the resampled
    low-resolution forward of their image and the rest the native forward; the gradients of the
    low-resolution rows reach the native positional embeddings through the resampling."""
    from jeststream.low_res import encode_image_mixed

    model = make_tiny_clip(seed=2).eval()  # eval: no dropout, so rows compare exactly
    images = torch.randn(10, 3, 32, 32)
    with torch.no_grad():
        native = model.encode_image(images, normalize=True)
        low = encode_image_resampled(model, resize_images(images, 16))
        got = encode_image_mixed(model, images, resolution=16, share=0.3,
                                 generator=torch.Generator().manual_seed(5))
        again = encode_image_mixed(model, images, resolution=16, share=0.3,
                                   generator=torch.Generator().manual_seed(5))
        other = encode_image_mixed(model, images, resolution=16, share=0.3,
                                   generator=torch.Generator().manual_seed(6))
    assert got.shape == native.shape and torch.equal(got, again)  # seeded: it repeats

    def low_rows(features):
        is_low = [torch.allclose(features[i], low[i], atol=1e-6) for i in range(10)]
        is_native = [torch.allclose(features[i], native[i], atol=1e-6) for i in range(10)]
        assert all(a != b for a, b in zip(is_low, is_native))  # each row is exactly one of them
        return {i for i in range(10) if is_low[i]}

    assert len(low_rows(got)) == 3
    assert low_rows(got) != low_rows(other)  # the rows are drawn, not a fixed slice
    with torch.no_grad():
        assert torch.equal(encode_image_mixed(model, images, resolution=16, share=0.0), native)
        assert torch.allclose(encode_image_mixed(model, images, resolution=16, share=1.0), low,
                              atol=1e-6)

    # Gradients: a loss on the low-resolution rows alone reaches the positional embeddings
    # (every row of them: the bicubic resampling mixes the whole grid) and the patch projection.
    model.train()
    model.zero_grad(set_to_none=True)
    feats = encode_image_mixed(model, images, resolution=16, share=1.0)
    feats.sum().backward()
    pos_grad = model.visual.positional_embedding.grad
    assert pos_grad is not None and bool((pos_grad[1:].abs().sum(-1) > 0).all())
    assert model.visual.conv1.weight.grad.abs().sum() > 0


def test_mixed_resolution_and_resampled_forward_reject_bad_input():
    from jeststream.low_res import encode_image_mixed

    model = make_tiny_clip(seed=0)
    images = torch.randn(4, 3, 32, 32)
    for share in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="share must be a fraction"):
            encode_image_mixed(model, images, resolution=16, share=share)
    for resolution in (0, 16.0, None):
        with pytest.raises(ValueError, match="resolution must be an image side"):
            encode_image_mixed(model, images, resolution=resolution, share=0.5)
    # a side that does not tile into the patches would lose pixels in the patch convolution
    with pytest.raises(ValueError, match=r"20x20 image does not tile.*multiple of 8"):
        encode_image_resampled(model, torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="does not tile"):
        encode_image_mixed(model, images, resolution=12, share=0.5)
