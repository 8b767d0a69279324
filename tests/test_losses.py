"""jeststream.losses against the real open_clip loss classes."""

from __future__ import annotations

import itertools

import open_clip.loss as open_clip_loss
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jeststream.losses import (
    CRITERIA,
    Embeddings,
    SoftmaxGain,
    clip_example_losses,
    criterion_weights,
    sigmoid_pair_loss_cols,
    sigmoid_pair_loss_diagonal,
    sigmoid_pair_loss_rows,
    sigmoid_pair_losses,
)


def make_embeddings(
    n: int,
    d: int = 8,
    *,
    seed: int = 0,
    scale: float = 10.0,
    bias: float | None = -5.0,
    dtype: torch.dtype = torch.float64,
) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    # Texts correlated with their images, so positives and negatives differ like in a real model.
    text = F.normalize(image + 0.7 * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return Embeddings(
        image,
        text,
        torch.tensor(scale, dtype=dtype),
        None if bias is None else torch.tensor(bias, dtype=dtype),
    )


def sub(e: Embeddings, idx: list[int] | torch.Tensor) -> Embeddings:
    idx = torch.as_tensor(idx, dtype=torch.long)
    return e._replace(image=e.image[idx], text=e.text[idx])


def siglip(e: Embeddings) -> torch.Tensor:
    return open_clip_loss.SigLipLoss()(e.image, e.text, e.logit_scale, e.logit_bias)


def clip_sum(e: Embeddings, idx) -> float:
    """|A|·ClipLoss(A), brute force with the real class (0 for the empty set)."""
    idx = list(idx)
    if not idx:
        return 0.0
    a = sub(e, idx)
    return len(idx) * float(open_clip_loss.ClipLoss()(a.image, a.text, a.logit_scale))


# ---------------------------------------------------------------------------------------------
# sigmoid
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 24),
    bias=st.one_of(st.none(), st.floats(-12, 2)),
    scale=st.floats(1, 100),
    data=st.data(),
)
def test_sigmoid_subset_sum_matches_open_clip_siglip(seed, n, bias, scale, data):
    e = make_embeddings(n, seed=seed, scale=scale, bias=bias)
    pair = sigmoid_pair_losses(e)
    subset = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    a = torch.tensor(subset)
    ours = pair[a][:, a].sum() / len(subset)
    torch.testing.assert_close(ours, siglip(sub(e, subset)), rtol=1e-10, atol=1e-10)


def test_sigmoid_whole_batch_float32_and_float_scalars():
    e = make_embeddings(32, 16, dtype=torch.float32)
    ref = siglip(e)
    torch.testing.assert_close(sigmoid_pair_losses(e).sum() / 32, ref)
    # Plain Python floats for scale and bias work too.
    e2 = e._replace(logit_scale=10.0, logit_bias=-5.0)
    torch.testing.assert_close(sigmoid_pair_losses(e2).sum() / 32, ref)


def test_sigmoid_bf16_computed_in_float32():
    e = make_embeddings(16, dtype=torch.float32)
    e16 = e._replace(image=e.image.bfloat16(), text=e.text.bfloat16())
    out = sigmoid_pair_losses(e16)
    assert out.dtype == torch.float32
    up = e._replace(image=e16.image.float(), text=e16.text.float())
    torch.testing.assert_close(out, sigmoid_pair_losses(up))


def test_sigmoid_blocks_match_full_matrix():
    e = make_embeddings(20, seed=3)
    full = sigmoid_pair_losses(e)
    idx = torch.tensor([7, 0, 19, 4])
    torch.testing.assert_close(sigmoid_pair_loss_rows(e, idx), full[idx])
    torch.testing.assert_close(sigmoid_pair_loss_cols(e, idx), full[:, idx])
    torch.testing.assert_close(sigmoid_pair_loss_diagonal(e), full.diagonal())
    # Without the positive-pair fix-up only the (r, r) entries differ: they hold softplus(+l_rr).
    rows = sigmoid_pair_loss_rows(e, idx, exact_diagonal=False)
    off = torch.ones_like(rows, dtype=torch.bool)
    off[torch.arange(4), idx] = False
    torch.testing.assert_close(rows[off], full[idx][off])
    cols = sigmoid_pair_loss_cols(e, idx.tolist(), exact_diagonal=False)
    torch.testing.assert_close(cols.T[off], full[:, idx].T[off])


def test_sigmoid_diagonal_is_positive_pair_loss():
    e = make_embeddings(5, seed=1)
    logit = e.logit_scale * (e.image * e.text).sum(1) + e.logit_bias
    torch.testing.assert_close(sigmoid_pair_loss_diagonal(e), -F.logsigmoid(logit))


# ---------------------------------------------------------------------------------------------
# softmax (CLIP)
# ---------------------------------------------------------------------------------------------


def test_clip_example_losses_mean_is_open_clip_cliploss():
    e = make_embeddings(40, 16, seed=2, bias=None)
    ours = clip_example_losses(e)
    assert ours.shape == (40,)
    torch.testing.assert_close(
        ours.mean(), open_clip_loss.ClipLoss()(e.image, e.text, e.logit_scale)
    )


def test_clip_example_losses_never_builds_a_full_matrix(monkeypatch):
    """The softmax first pass works in row tiles of at most B/16 rows, whatever B."""

    widest = []
    real = torch.Tensor.logsumexp

    def spy(self, *args, **kwargs):
        if self.dim() == 2:
            widest.append(self.shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "logsumexp", spy)
    clip_example_losses(make_embeddings(160, seed=5))
    monkeypatch.undo()
    assert widest and max(widest) <= 160 // 16


def test_clip_example_losses_tiled(monkeypatch):
    import jeststream.losses as losses

    e = make_embeddings(23, seed=4)
    whole = clip_example_losses(e)
    monkeypatch.setattr(losses, "_TILE_ELEMENTS", 50)  # 2 rows per tile, ragged last tile
    torch.testing.assert_close(clip_example_losses(e), whole)


@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_conditional_gain_brute_force(seed):
    """For every non-empty A ⊂ [6] (added in one or two chunks) and every m ∉ A:
    gain(m | A) == |A∪m|·ClipLoss(A∪m) − |A|·ClipLoss(A) with the real ClipLoss."""
    n = 6
    e = make_embeddings(n, seed=seed, scale=7.0)
    checked = 0
    for size in range(0, n):
        for subset in itertools.combinations(range(n), size):
            gain = SoftmaxGain(e)
            if size:
                half = max(1, size // 2)
                gain.add(list(subset[:half]))
                if subset[half:]:
                    gain.add(torch.tensor(subset[half:]))
            assert gain.selected.tolist() == list(subset)
            g = gain.gains()
            base = clip_sum(e, subset)
            for m in set(range(n)) - set(subset):
                expected = clip_sum(e, subset + (m,)) - base
                assert g[m].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
                checked += 1
    assert checked == sum(n - len(c) for i in range(n) for c in itertools.combinations(range(n), i))


def test_softmax_gain_of_empty_set_is_zero():
    e = make_embeddings(5, seed=9)
    torch.testing.assert_close(SoftmaxGain(e).gains(), torch.zeros(5, dtype=torch.float64))


def test_softmax_gain_ignores_bias():
    e = make_embeddings(6, seed=5, bias=-3.0)
    a, b = SoftmaxGain(e), SoftmaxGain(e._replace(logit_bias=None))
    a.add([1, 4])
    b.add([1, 4])
    torch.testing.assert_close(a.gains(), b.gains())


# ---------------------------------------------------------------------------------------------
# criteria
# ---------------------------------------------------------------------------------------------


def test_criteria_weights():
    assert CRITERIA == ("learnability", "hard_learner", "easy_reference")
    assert criterion_weights("learnability") == (1.0, -1.0)
    assert criterion_weights("hard_learner") == (1.0, 0.0)
    assert criterion_weights("easy_reference") == (0.0, -1.0)
    with pytest.raises(ValueError, match="'bogus'"):
        criterion_weights("bogus")


def test_criteria_scores_from_losses():
    from jeststream.selection import example_scores

    learner, reference = make_embeddings(10, seed=1), make_embeddings(10, seed=2)
    for loss, per_example in (
        ("sigmoid", sigmoid_pair_loss_diagonal),
        ("softmax", clip_example_losses),
    ):
        ll, rl = per_example(learner), per_example(reference)
        expected = {"learnability": ll - rl, "hard_learner": ll, "easy_reference": -rl}
        for criterion in CRITERIA:
            got = example_scores(learner, reference, loss=loss, criterion=criterion)
            torch.testing.assert_close(got, expected[criterion])
