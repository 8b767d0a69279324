"""Exact text trimming: trimmed forwards equal open_clip's untrimmed encode_text."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CLIP_CFG, TINY_CONTEXT, TINY_VOCAB, make_tiny_clip

from jeststream.text_trim import encode_text_trimmed, needed_lengths, trimmable_tower

EOT = TINY_VOCAB - 1  # open_clip tokenizers: the end-of-text token has the largest id


def _captions(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), TINY_CONTEXT, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0] = EOT - 1  # start-of-text
        out[i, 1 : n - 1] = torch.randint(1, EOT - 1, (n - 2,), generator=g)
        out[i, n - 1] = EOT
    return out


@pytest.mark.parametrize("siglip", [False, True])
def test_trimmed_equals_untrimmed_clip(siglip):
    model = make_tiny_clip(seed=3, siglip=siglip).eval()
    text = _captions([3, 16, 5, 9, 4, 12, 7, 3])
    assert needed_lengths(model, text).tolist() == [3, 16, 5, 9, 4, 12, 7, 3]
    with torch.no_grad():
        want = model.encode_text(text, normalize=True)
        got = encode_text_trimmed(model, text, bucket=4)
    assert got is not None and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_trimmed_equals_untrimmed_custom_text_clip():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(**TINY_CLIP_CFG).eval()
    text = _captions([4, 6, 16, 2])
    with torch.no_grad():
        want = model.encode_text(text, normalize=True)
        got = encode_text_trimmed(model, text, bucket=1)
    assert got is not None and torch.allclose(got, want, atol=1e-5, rtol=0)


def test_towers_where_trimming_is_not_exact_are_left_alone():
    import open_clip

    cfg = {**TINY_CLIP_CFG, "text_cfg": {**TINY_CLIP_CFG["text_cfg"], "no_causal_mask": True,
                                         "pool_type": "last"}}
    non_causal = open_clip.model.CLIP(**cfg)
    assert trimmable_tower(non_causal) is None
    assert encode_text_trimmed(non_causal, _captions([3, 4])) is None
    assert encode_text_trimmed(torch.nn.Linear(2, 2), _captions([3])) is None
    seq_first = make_tiny_clip()  # older open_clip fed its transformer [seq, batch, width]
    seq_first.transformer.batch_first = False
    assert trimmable_tower(seq_first) is None
    with pytest.raises(ValueError, match="bucket"):
        encode_text_trimmed(make_tiny_clip(), _captions([3]), bucket=0)


def test_trimming_runs_short_forwards():
    """Each bucket runs at its own length: the transformer never sees the full context."""
    model = make_tiny_clip(seed=1).eval()
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            encode_text_trimmed(model, _captions([3, 4, 5, 6]), bucket=4)
    finally:
        hook.remove()
    assert sorted(seen) == [4, 8]


def test_default_embed_scores_trimmed_captions():
    """JESTLoader's default embed trims exactly: the same text embeddings as open_clip's
    forward, from forwards shorter than the context."""
    from jeststream.scoring import default_embed

    model = make_tiny_clip(seed=2).eval()
    text = _captions([3, 5, 4, 6])
    images = torch.randn(4, 3, 32, 32)
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            got = default_embed(model, (images, text))
    finally:
        hook.remove()
    assert max(seen) == 8 < TINY_CONTEXT
    with torch.no_grad():
        want = model.encode_text(text, normalize=True)
    assert torch.allclose(got.text, want, atol=1e-5, rtol=0)
