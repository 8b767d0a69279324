"""Property tests for the joint example selection sampler (jeststream.selection)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import scipy.stats as scipy_stats
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jeststream.losses import CRITERIA, Embeddings, criterion_weights, sigmoid_pair_losses
from jeststream.selection import (
    chunk_sizes,
    example_scores,
    independent_sample,
    joint_sample,
    joint_sample_from_embeddings,
    topk_sample,
)

# False-alarm rate of every chi-square test in this file.
ALPHA = 1e-3

FAST = settings(max_examples=25, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_scores(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, n, generator=gen(seed), dtype=dtype)


def make_embeddings(
    n: int, d: int = 8, *, seed: int = 0, bias: float | None = -4.0, dtype=torch.float64
) -> Embeddings:
    g = gen(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    scale = torch.tensor(10.0, dtype=dtype)
    return Embeddings(image, text, scale, None if bias is None else torch.tensor(bias, dtype=dtype))


def score_matrix(learner: Embeddings, reference: Embeddings, criterion: str) -> torch.Tensor:
    w_l, w_r = criterion_weights(criterion)
    return w_l * sigmoid_pair_losses(learner) + w_r * sigmoid_pair_losses(reference)


@st.composite
def problems(draw, max_n: int = 40):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, n))
    n_chunks = draw(st.integers(1, k))
    return n, k, n_chunks


def chunk_probability(
    scores: torch.Tensor, draw_order: tuple[int, ...], n_chunks: int, temperature: float
) -> float:
    """Exact probability that the chunked sampler returns ``draw_order`` (enumeration oracle)."""
    s = scores.double()
    n = s.shape[0]
    chosen: list[int] = []
    p = 1.0
    pos = 0
    for c in chunk_sizes(len(draw_order), n_chunks):
        a = torch.tensor(chosen, dtype=torch.long)
        logits = s.diagonal() + s[a, :].sum(0) + s[:, a].sum(1)
        remaining = [m for m in range(n) if m not in chosen]
        for m in draw_order[pos : pos + c]:
            w = {r: math.exp(logits[r].item() / temperature) for r in remaining}
            p *= w[m] / sum(w.values())
            remaining.remove(m)
        chosen.extend(draw_order[pos : pos + c])
        pos += c
    return p


def chi_square_pvalue(counts: Counter, probs: dict, n_samples: int) -> float:
    """Pearson chi-square p-value, pooling outcomes with expected count < 5 into one bin."""
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for outcome, p in probs.items():
        if p * n_samples >= 5:
            observed.append(counts.get(outcome, 0))
            expected.append(p * n_samples)
        else:
            pool_o += counts.get(outcome, 0)
            pool_e += p * n_samples
    assert sum(counts.values()) == n_samples
    assert set(counts) <= set(probs), "sampler produced an impossible outcome"
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    scale = sum(observed) / sum(expected)  # absorb float rounding of the probabilities
    return scipy_stats.chisquare(observed, [e * scale for e in expected]).pvalue


# ---------------------------------------------------------------------------------------------
# Basic properties
# ---------------------------------------------------------------------------------------------


def test_chunk_sizes_even_larger_first():
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert chunk_sizes(16, 16) == [1] * 16
    assert chunk_sizes(819, 16) == [52, 52, 52] + [51] * 13
    assert sum(chunk_sizes(819, 16)) == 819


@FAST
@given(problem=problems(), seed=st.integers(0, 2**31), temperature=st.sampled_from([0.0, 0.5, 1]))
def test_exactly_k_unique_indices(problem, seed, temperature):
    n, k, n_chunks = problem
    idx = joint_sample(
        random_scores(n, seed), k, n_chunks=n_chunks, temperature=temperature, generator=gen(seed)
    )
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert len(set(idx.tolist())) == k
    assert 0 <= int(idx.min()) and int(idx.max()) < n


@FAST
@given(problem=problems(), seed=st.integers(0, 2**31))
def test_same_seed_same_indices(problem, seed):
    n, k, n_chunks = problem
    s = random_scores(n, seed + 1)
    a = joint_sample(s, k, n_chunks=n_chunks, generator=gen(seed))
    b = joint_sample(s, k, n_chunks=n_chunks, generator=gen(seed))
    assert torch.equal(a, b)


@FAST
@given(
    problem=problems(),
    seed=st.integers(0, 2**31),
    shift=st.integers(-1000, 1000),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 4.0]),
)
def test_shift_invariance(problem, seed, shift, temperature):
    """Adding C to every S_ij adds C·(1 + 2|A|) to every candidate's logit within a chunk, which
    leaves each chunk's (Gumbel-perturbed) ranking unchanged. Scores are multiples of 1/8 so the
    shifted logits are exact in float64."""
    n, k, n_chunks = problem
    s = torch.randint(-40, 40, (n, n), generator=gen(seed)).double() / 8
    kw = dict(n_chunks=n_chunks, temperature=temperature)
    a = joint_sample(s, k, generator=gen(seed), **kw)
    b = joint_sample(s + shift, k, generator=gen(seed), **kw)
    assert torch.equal(a, b)


@FAST
@given(problem=problems(), seed=st.integers(0, 2**31))
def test_permutation_equivariance_greedy(problem, seed):
    n, k, n_chunks = problem
    s = random_scores(n, seed)
    perm = torch.randperm(n, generator=gen(seed + 7))
    permuted = s[perm][:, perm]  # example a of the permuted batch is example perm[a]
    a = joint_sample(s, k, n_chunks=n_chunks, temperature=0)
    b = joint_sample(permuted, k, n_chunks=n_chunks, temperature=0)
    assert torch.equal(perm[b], a)


def test_greedy_ties_go_to_lower_index():
    s = torch.zeros(6, 6)
    assert joint_sample(s, 3, n_chunks=1, temperature=0).tolist() == [0, 1, 2]
    assert joint_sample(s, 4, n_chunks=2, temperature=0).tolist() == [0, 1, 2, 3]


@FAST
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31), data=st.data())
def test_greedy_one_per_chunk_is_brute_force_greedy(n, seed, data):
    """n_chunks = k, temperature = 0: each draw maximises Σ_{i,j∈A∪{m}} S_ij."""
    k = data.draw(st.integers(1, n))
    s = random_scores(n, seed)
    chosen: list[int] = []
    for _ in range(k):
        total = {
            m: s[torch.tensor(chosen + [m])][:, torch.tensor(chosen + [m])].sum().item()
            for m in range(n)
            if m not in chosen
        }
        chosen.append(max(total, key=lambda m: (total[m], -m)))
    assert joint_sample(s, k, n_chunks=k, temperature=0).tolist() == chosen


def test_temperature_to_zero_approaches_greedy():
    s = random_scores(30, 3)
    greedy = joint_sample(s, 8, n_chunks=4, temperature=0)
    cold = joint_sample(s, 8, n_chunks=4, temperature=1e-9, generator=gen(0))
    assert torch.equal(cold, greedy)


# ---------------------------------------------------------------------------------------------
# Distribution
# ---------------------------------------------------------------------------------------------


def test_all_zero_scores_uniform_over_subsets():
    n, k, samples = 6, 3, 6000
    g = gen(1234)
    s = torch.zeros(n, n)
    counts = Counter(
        tuple(sorted(joint_sample(s, k, n_chunks=2, generator=g).tolist())) for _ in range(samples)
    )
    subsets = list(itertools.combinations(range(n), k))
    probs = {subset: 1 / len(subsets) for subset in subsets}
    assert chi_square_pvalue(counts, probs, samples) > ALPHA


@pytest.mark.parametrize(
    ("n", "k", "n_chunks", "temperature", "seed"),
    [(5, 3, 2, 1.0, 0), (6, 3, 3, 0.7, 1), (4, 4, 2, 2.0, 2), (6, 4, 2, 1.0, 3)],
)
def test_exact_chunked_distribution_by_enumeration(n, k, n_chunks, temperature, seed):
    samples = 8000
    s = random_scores(n, seed) * 0.7
    probs = {
        order: chunk_probability(s, order, n_chunks, temperature)
        for order in itertools.permutations(range(n), k)
    }
    assert sum(probs.values()) == pytest.approx(1.0)
    g = gen(10_000 + seed)
    counts = Counter(
        tuple(joint_sample(s, k, n_chunks=n_chunks, temperature=temperature, generator=g).tolist())
        for _ in range(samples)
    )
    assert chi_square_pvalue(counts, probs, samples) > ALPHA


# ---------------------------------------------------------------------------------------------
# From embeddings
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    problem=problems(max_n=48),
    seed=st.integers(0, 2**31),
    criterion=st.sampled_from(CRITERIA),
    temperature=st.sampled_from([0.0, 0.1, 1.0]),
    bias=st.sampled_from([None, -6.0]),
)
def test_sigmoid_embeddings_path_equals_matrix_path(problem, seed, criterion, temperature, bias):
    n, k, n_chunks = problem
    learner = make_embeddings(n, seed=seed, bias=bias)
    reference = make_embeddings(n, seed=seed + 1, bias=bias)
    kw = dict(n_chunks=n_chunks, temperature=temperature)
    expected = joint_sample(
        score_matrix(learner, reference, criterion), k, generator=gen(seed), **kw
    )
    got = joint_sample_from_embeddings(
        learner, reference, k, loss="sigmoid", criterion=criterion, generator=gen(seed), **kw
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("seed", range(3))
def test_sigmoid_embeddings_path_equals_matrix_path_float32(seed):
    learner = make_embeddings(300, 32, seed=seed, dtype=torch.float32)
    reference = make_embeddings(300, 32, seed=seed + 100, dtype=torch.float32)
    s = score_matrix(learner, reference, "learnability")
    expected = joint_sample(s, 60, generator=gen(seed))
    got = joint_sample_from_embeddings(learner, reference, 60, generator=gen(seed))
    assert torch.equal(got, expected)


@FAST
@given(
    problem=problems(max_n=40),
    seed=st.integers(0, 2**31),
    loss=st.sampled_from(["sigmoid", "softmax"]),
    criterion=st.sampled_from(CRITERIA),
)
def test_own_scores_are_the_first_chunk_logits(problem, seed, loss, criterion):
    """Passing example_scores() back in (as JESTLoader does) changes nothing but the work."""
    n, k, n_chunks = problem
    learner = make_embeddings(n, seed=seed, dtype=torch.float32)
    reference = make_embeddings(n, seed=seed + 1, dtype=torch.float32)
    kw = dict(loss=loss, criterion=criterion, n_chunks=n_chunks)
    own = example_scores(learner, reference, loss=loss, criterion=criterion)
    expected = joint_sample_from_embeddings(learner, reference, k, generator=gen(seed), **kw)
    got = joint_sample_from_embeddings(
        learner, reference, k, generator=gen(seed), own_scores=own, **kw
    )
    assert torch.equal(got, expected)


def test_own_scores_are_checked():
    e = make_embeddings(10, seed=2)
    with pytest.raises(ValueError, match=r"own_scores must be a \[B=10\] tensor"):
        joint_sample_from_embeddings(e, e, 4, n_chunks=2, own_scores=torch.zeros(9))
    with pytest.raises(ValueError, match="own_scores contain 1 NaN/inf"):
        bad = torch.zeros(10)
        bad[3] = math.nan
        joint_sample_from_embeddings(e, e, 4, n_chunks=2, own_scores=bad)


def test_hard_learner_needs_no_reference():
    learner = make_embeddings(20, seed=4)
    got = joint_sample_from_embeddings(
        learner, None, 5, criterion="hard_learner", n_chunks=5, generator=gen(0)
    )
    expected = joint_sample(sigmoid_pair_losses(learner), 5, n_chunks=5, generator=gen(0))
    assert torch.equal(got, expected)


def test_bf16_embeddings_and_tensor_scalars():
    learner = make_embeddings(64, 16, seed=1, dtype=torch.float32)
    reference = make_embeddings(64, 16, seed=2, dtype=torch.float32)
    half = [
        e._replace(image=e.image.bfloat16(), text=e.text.bfloat16()) for e in (learner, reference)
    ]
    idx = joint_sample_from_embeddings(*half, 16, n_chunks=4, generator=gen(0))
    assert len(set(idx.tolist())) == 16
    up = [e._replace(image=e.image.float(), text=e.text.float()) for e in half]
    assert torch.equal(idx, joint_sample_from_embeddings(*up, 16, n_chunks=4, generator=gen(0)))
    assert example_scores(*half).dtype == torch.float32


def brute_clip_sum(e: Embeddings, a: list[int]) -> float:
    """|A|·CLIP loss of sub-batch A, straight from the definition."""
    if not a:
        return 0.0
    idx = torch.tensor(a)
    logits = e.logit_scale * e.image[idx] @ e.text[idx].T
    target = torch.arange(len(a))
    return (
        F.cross_entropy(logits, target, reduction="sum")
        + F.cross_entropy(logits.T, target, reduction="sum")
    ).item() / 2


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_greedy_matches_brute_force_conditional_gains(criterion, seed):
    n, k = 9, 5
    learner, reference = make_embeddings(n, seed=seed), make_embeddings(n, seed=seed + 50)
    w_l, w_r = criterion_weights(criterion)
    first = example_scores(learner, reference, loss="softmax", criterion=criterion)
    chosen = [int(torch.sort(first, descending=True, stable=True).indices[0])]
    while len(chosen) < k:
        gain = {
            m: w_l * (brute_clip_sum(learner, chosen + [m]) - brute_clip_sum(learner, chosen))
            + w_r * (brute_clip_sum(reference, chosen + [m]) - brute_clip_sum(reference, chosen))
            for m in range(n)
            if m not in chosen
        }
        chosen.append(max(gain, key=lambda m: (round(gain[m], 9), -m)))
    got = joint_sample_from_embeddings(
        learner, reference, k, loss="softmax", criterion=criterion, n_chunks=k, temperature=0
    )
    assert got.tolist() == chosen


@FAST
@given(
    problem=problems(max_n=30), seed=st.integers(0, 2**31), temperature=st.sampled_from([0.0, 1.0])
)
def test_softmax_embeddings_path_valid_sample(problem, seed, temperature):
    n, k, n_chunks = problem
    learner, reference = make_embeddings(n, seed=seed), make_embeddings(n, seed=seed + 1)
    kw = dict(loss="softmax", n_chunks=n_chunks, temperature=temperature)
    idx = joint_sample_from_embeddings(learner, reference, k, generator=gen(seed), **kw)
    assert idx.shape == (k,) and len(set(idx.tolist())) == k and int(idx.max()) < n
    again = joint_sample_from_embeddings(learner, reference, k, generator=gen(seed), **kw)
    assert torch.equal(idx, again)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_learner_equals_reference_gives_zero_learnability(loss):
    e = make_embeddings(16, seed=8)
    scores = example_scores(e, e, loss=loss)
    assert torch.equal(scores, torch.zeros_like(scores))
    if loss == "sigmoid":
        s = score_matrix(e, e, "learnability")
        assert torch.equal(s, torch.zeros_like(s))
    # Zero scores: greedy picks the lowest indices.
    got = joint_sample_from_embeddings(e, e, 4, loss=loss, n_chunks=2, temperature=0)
    assert got.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def test_independent_sample_is_one_chunk_of_the_diagonal():
    learner, reference = make_embeddings(40, seed=1), make_embeddings(40, seed=2)
    s = score_matrix(learner, reference, "learnability")
    for temperature in (0.0, 0.5):
        got = independent_sample(learner, reference, 10, temperature=temperature, generator=gen(3))
        expected = joint_sample(s, 10, n_chunks=1, temperature=temperature, generator=gen(3))
        assert torch.equal(got, expected)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_topk_sample(loss):
    learner, reference = make_embeddings(25, seed=5), make_embeddings(25, seed=6)
    scores = example_scores(learner, reference, loss=loss)
    got = topk_sample(learner, reference, 7, loss=loss)
    assert got.tolist() == torch.argsort(scores, descending=True)[:7].tolist()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_nan_and_inf_scores_are_counted():
    s = torch.randn(5, 5)
    s[0, 1] = s[2, 2] = float("nan")
    s[4, 0] = float("inf")
    with pytest.raises(ValueError, match="3 NaN/inf entries"):
        joint_sample(s, 2, n_chunks=1)
    s = torch.randn(5, 5)
    s[1, 1] = -float("inf")
    with pytest.raises(ValueError, match="1 NaN/inf entry"):
        joint_sample(s, 2, n_chunks=1)


def test_nan_embeddings_are_counted():
    e = make_embeddings(6)
    bad = e._replace(image=e.image.clone())
    bad.image[0, :2] = float("nan")
    with pytest.raises(ValueError, match=r"learner\.image contain 2 NaN/inf"):
        joint_sample_from_embeddings(bad, e, 2)
    with pytest.raises(ValueError, match=r"reference\.logit_scale contain 1 NaN/inf"):
        example_scores(e, e._replace(logit_scale=torch.tensor(float("inf"))))


@pytest.mark.parametrize(
    ("k", "n_chunks", "match"),
    [(0, 1, "k=0"), (-2, 1, "k=-2"), (7, 1, "k=7"), (3, 0, "n_chunks=0"), (3, 4, "n_chunks=4")],
)
def test_bad_k_and_n_chunks(k, n_chunks, match):
    s = torch.randn(6, 6)
    with pytest.raises(ValueError, match=match):
        joint_sample(s, k, n_chunks=n_chunks)
    e = make_embeddings(6)
    with pytest.raises(ValueError, match=match):
        joint_sample_from_embeddings(e, e, k, n_chunks=n_chunks)


def test_bad_k_in_baselines():
    e = make_embeddings(6)
    with pytest.raises(ValueError, match="k=9"):
        independent_sample(e, e, 9)
    with pytest.raises(ValueError, match="k=0"):
        topk_sample(e, e, 0)
    with pytest.raises(TypeError, match="k=2.5"):
        joint_sample(torch.zeros(4, 4), 2.5)


@pytest.mark.parametrize("temperature", [-0.1, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=f"temperature={temperature}"):
        joint_sample(torch.zeros(4, 4), 2, n_chunks=1, temperature=temperature)
    e = make_embeddings(4)
    with pytest.raises(ValueError, match="temperature="):
        independent_sample(e, e, 2, temperature=temperature)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        joint_sample(torch.zeros(4, 5), 2)
    with pytest.raises(ValueError, match=r"\(16,\)"):
        joint_sample(torch.zeros(16), 2)
    learner, reference = make_embeddings(6), make_embeddings(7)
    with pytest.raises(ValueError, match="B=6.*B=7"):
        joint_sample_from_embeddings(learner, reference, 2)
    lopsided = learner._replace(text=learner.text[:5])
    with pytest.raises(ValueError, match=r"\(6, 8\).*\(5, 8\)"):
        example_scores(lopsided, None, criterion="hard_learner")
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        example_scores(learner._replace(logit_scale=torch.ones(2)), None, criterion="hard_learner")


def test_bad_names_and_missing_reference():
    e = make_embeddings(6)
    with pytest.raises(ValueError, match="'hinge'"):
        joint_sample_from_embeddings(e, e, 2, loss="hinge")
    with pytest.raises(ValueError, match="'easiest'"):
        example_scores(e, e, criterion="easiest")
    for criterion in ("learnability", "easy_reference"):
        with pytest.raises(ValueError, match="needs a reference"):
            joint_sample_from_embeddings(e, None, 2, criterion=criterion)
    with pytest.raises(TypeError, match="Embeddings"):
        example_scores((e.image,), None, criterion="hard_learner")
    for criterion in ("learnability", "hard_learner"):
        with pytest.raises(ValueError, match="needs the learner"):
            joint_sample_from_embeddings(None, e, 2, criterion=criterion)


def test_easy_reference_needs_no_learner_embeddings():
    learner, reference = make_embeddings(64, seed=1), make_embeddings(64, seed=2)
    for loss in ("sigmoid", "softmax"):
        want = joint_sample_from_embeddings(
            learner, reference, 16, loss=loss, criterion="easy_reference", generator=gen(3)
        )
        got = joint_sample_from_embeddings(
            None, reference, 16, loss=loss, criterion="easy_reference", generator=gen(3)
        )
        assert torch.equal(got, want)
        torch.testing.assert_close(
            example_scores(None, reference, loss=loss, criterion="easy_reference"),
            example_scores(learner, reference, loss=loss, criterion="easy_reference"),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_greedy_and_cpu_generator():
    learner, reference = make_embeddings(200, 16, seed=1), make_embeddings(200, 16, seed=2)
    on_gpu = [
        e._replace(
            image=e.image.cuda(),
            text=e.text.cuda(),
            logit_scale=e.logit_scale.cuda(),
            logit_bias=e.logit_bias.cuda(),
        )
        for e in (learner, reference)
    ]
    for loss in ("sigmoid", "softmax"):
        cpu = joint_sample_from_embeddings(learner, reference, 40, loss=loss, temperature=0)
        gpu = joint_sample_from_embeddings(*on_gpu, 40, loss=loss, temperature=0)
        assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
        # A CPU generator drives GPU selection identically to CPU selection.
        cpu = joint_sample_from_embeddings(learner, reference, 40, loss=loss, generator=gen(1))
        gpu = joint_sample_from_embeddings(*on_gpu, 40, loss=loss, generator=gen(1))
        assert torch.equal(gpu.cpu(), cpu)


def test_benchmark_quick_smoke(capsys):
    """benchmarks/selection.py --quick runs and prints its JSON (no timing assertions)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "selection.py"
    spec = importlib.util.spec_from_file_location("bench_selection", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--sizes", "128", "256", "--d", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["B"] for row in report["results"]] == [128, 256]
    for row in report["results"]:
        assert row["a_and_c_same_first_indices"]
        assert {"a_over_b_time", "c_over_a_time", "c_over_a_memory"} <= set(row)


# ---------------------------------------------------------------------------------------------
# Blocked (per-rank) selection with global context
# ---------------------------------------------------------------------------------------------


def cat_embeddings(blocks: list[Embeddings]) -> Embeddings:
    return blocks[0]._replace(
        image=torch.cat([e.image for e in blocks]), text=torch.cat([e.text for e in blocks])
    )


def split_embeddings(e: Embeddings, sizes: list[int]) -> list[Embeddings]:
    out, at = [], 0
    for n in sizes:
        out.append(e._replace(image=e.image[at : at + n], text=e.text[at : at + n]))
        at += n
    return out


def global_logits(learners, references, loss, criterion, chosen):
    """The definition: every block's conditional logits against A (global indices into the
    concatenated super-batch), straight from the loss definitions. Chunk 1 (A empty) uses each
    example's own score, for softmax against its own block."""
    w_l, w_r = criterion_weights(criterion)
    sizes = [e.image.shape[0] for e in learners]
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    if not chosen:
        return [example_scores(lb, rb, loss=loss, criterion=criterion).double()
                for lb, rb in zip(learners, references)]
    lcat, rcat = cat_embeddings(learners), cat_embeddings(references)
    out = []
    if loss == "sigmoid":
        s = score_matrix(lcat, rcat, criterion).double()
        a = torch.tensor(chosen)
        full = s.diagonal() + s[a, :].sum(0) + s[:, a].sum(1)
    else:
        base_l, base_r = brute_clip_sum(lcat, chosen), brute_clip_sum(rcat, chosen)
        full = torch.tensor([
            w_l * (brute_clip_sum(lcat, chosen + [m]) - base_l)
            + w_r * (brute_clip_sum(rcat, chosen + [m]) - base_r)
            if m not in chosen else 0.0
            for m in range(sum(sizes))
        ], dtype=torch.float64)
    for off, n in zip(offsets, sizes):
        out.append(full[off : off + n])
    return out


def blocked_reference(learners, references, ks, *, loss, criterion, n_chunks, temperature,
                      seeds):
    """Per-chunk product definition, drawn with the same Gumbel noise as the sampler (one
    torch.rand([B_r]) per chunk from block r's generator)."""
    gens = [gen(s) for s in seeds]
    sizes = [e.image.shape[0] for e in learners]
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    drawn = [[] for _ in ks]
    chunks = [chunk_sizes(k, n_chunks) for k in ks]
    chosen: list[int] = []
    for j in range(n_chunks):
        logits = global_logits(learners, references, loss, criterion, chosen)
        new_global = []
        for r, lg in enumerate(logits):
            lg = lg.clone()
            lg[torch.tensor(drawn[r], dtype=torch.long)] = -math.inf
            c = chunks[r][j]
            if temperature == 0:
                idx = torch.sort(lg, descending=True, stable=True).indices[:c]
            else:
                u = torch.rand(lg.shape[0], generator=gens[r], dtype=lg.dtype)
                u = u.clamp_(min=torch.finfo(lg.dtype).tiny)
                idx = torch.topk(lg + temperature * -torch.log(-torch.log(u)), c).indices
            drawn[r].extend(idx.tolist())
            new_global.extend((idx + offsets[r]).tolist())
        chosen.extend(new_global)
    return drawn


def random_blocks(sizes: list[int], seed: int, d: int = 8):
    n = sum(sizes)
    learner = make_embeddings(n, d, seed=seed)
    reference = make_embeddings(n, d, seed=seed + 1)
    return split_embeddings(learner, sizes), split_embeddings(reference, sizes)


@st.composite
def block_problems(draw, max_w: int = 3, max_n: int = 7):
    w = draw(st.integers(1, max_w))
    sizes = [draw(st.integers(1, max_n)) for _ in range(w)]
    ks = [draw(st.integers(1, n)) for n in sizes]
    n_chunks = draw(st.integers(1, min(ks)))
    return sizes, ks, n_chunks


@FAST
@given(
    problem=block_problems(),
    seed=st.integers(0, 2**31),
    loss=st.sampled_from(["sigmoid", "softmax"]),
    criterion=st.sampled_from(CRITERIA),
    temperature=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_blocked_sample_is_the_per_chunk_definition(problem, seed, loss, criterion, temperature):
    """Same noise, same draws: blocked_joint_sample computes the global-context definition
    (sigmoid: the concatenated S; softmax: brute-force CLIP gains over the union A)."""
    from jeststream.selection import blocked_joint_sample

    sizes, ks, n_chunks = problem
    learners, references = random_blocks(sizes, seed)
    kw = dict(loss=loss, criterion=criterion, n_chunks=n_chunks, temperature=temperature)
    seeds = [seed + r for r in range(len(sizes))]
    got = blocked_joint_sample(learners, references, ks, generators=[gen(s) for s in seeds], **kw)
    want = blocked_reference(learners, references, ks, seeds=seeds, **kw)
    assert [g.tolist() for g in got] == want


@FAST
@given(
    problem=problems(max_n=48),
    seed=st.integers(0, 2**31),
    loss=st.sampled_from(["sigmoid", "softmax"]),
    criterion=st.sampled_from(CRITERIA),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_one_block_is_joint_sample_from_embeddings(problem, seed, loss, criterion, dtype):
    from jeststream.selection import blocked_joint_sample

    n, k, n_chunks = problem
    learner = make_embeddings(n, seed=seed, dtype=dtype)
    reference = make_embeddings(n, seed=seed + 1, dtype=dtype)
    kw = dict(loss=loss, criterion=criterion, n_chunks=n_chunks)
    want = joint_sample_from_embeddings(learner, reference, k, generator=gen(seed), **kw)
    (got,) = blocked_joint_sample([learner], [reference], [k], generators=[gen(seed)], **kw)
    assert torch.equal(got, want)


def blocked_probability(
    learners, references, orders, *, loss, criterion, n_chunks, temperature, cache
):
    """Exact probability that the blocked sampler returns ``orders`` (one draw order per block):
    the product over chunks and blocks of sequential draws without replacement."""
    sizes = [e.image.shape[0] for e in learners]
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    chunks = [chunk_sizes(len(o), n_chunks) for o in orders]
    pos = [0] * len(orders)
    chosen: list[int] = []
    p = 1.0
    for j in range(n_chunks):
        key = frozenset(chosen)  # the logits depend on the set A only
        if key not in cache:
            cache[key] = global_logits(learners, references, loss, criterion, sorted(chosen))
        logits = cache[key]
        new = []
        for r, order in enumerate(orders):
            remaining = [m for m in range(sizes[r]) if m not in order[: pos[r]]]
            for m in order[pos[r] : pos[r] + chunks[r][j]]:
                w = {x: math.exp(logits[r][x].item() / temperature) for x in remaining}
                p *= w[m] / sum(w.values())
                remaining.remove(m)
                new.append(m + offsets[r])
            pos[r] += chunks[r][j]
        chosen.extend(new)
    return p


@pytest.mark.parametrize(
    ("loss", "sizes", "ks", "n_chunks", "seed", "samples"),
    [("sigmoid", [3, 4], [2, 3], 2, 1, 3000), ("softmax", [2, 3], [2, 2], 2, 2, 1500),
     ("sigmoid", [2, 2, 3], [2, 2, 2], 2, 3, 2000)],
)
def test_blocked_distribution_by_enumeration(loss, sizes, ks, n_chunks, seed, samples):
    from jeststream.selection import blocked_joint_sample

    learners, references = random_blocks(sizes, seed)
    # milder scale so that no outcome is vanishingly rare
    learners = [e._replace(logit_scale=torch.tensor(3.0, dtype=torch.float64)) for e in learners]
    references = [e._replace(logit_scale=torch.tensor(2.0, dtype=torch.float64))
                  for e in references]
    kw = dict(loss=loss, criterion="learnability", n_chunks=n_chunks, temperature=1.0)
    per_block = [list(itertools.permutations(range(n), k)) for n, k in zip(sizes, ks)]
    cache: dict = {}
    probs = {
        outcome: blocked_probability(learners, references, outcome, cache=cache, **kw)
        for outcome in itertools.product(*per_block)
    }
    assert sum(probs.values()) == pytest.approx(1.0)
    gens = [gen(20_000 + 10 * seed + r) for r in range(len(sizes))]
    counts = Counter(
        tuple(tuple(x.tolist()) for x in blocked_joint_sample(
            learners, references, ks, generators=gens, **kw))
        for _ in range(samples)
    )
    assert chi_square_pvalue(counts, probs, samples) > ALPHA


def test_blocked_sample_bad_input_names_the_block():
    from jeststream.selection import blocked_joint_sample

    learners, references = random_blocks([4, 5], 0)
    with pytest.raises(ValueError, match="block 1: k=6"):
        blocked_joint_sample(learners, references, [2, 6], n_chunks=1)
    with pytest.raises(ValueError, match="block 0: n_chunks=3"):
        blocked_joint_sample(learners, references, [2, 4], n_chunks=3)
    with pytest.raises(ValueError, match="2 entries but there are 3 blocks"):
        blocked_joint_sample(learners, references, [1, 1, 1], n_chunks=1)
    with pytest.raises(TypeError, match="one entry per block"):
        blocked_joint_sample(learners[0], references, [1, 1], n_chunks=1)
    wide = make_embeddings(5, 16, seed=3)
    with pytest.raises(ValueError, match="differ in width or dtype"):
        blocked_joint_sample([learners[0], wide], [references[0], wide], [1, 1], n_chunks=1)
