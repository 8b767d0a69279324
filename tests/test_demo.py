"""The embedded demo: data set properties, CLI knobs, and a --quick end-to-end smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from jeststream.demo import build_parser, config_from_args, main
from jeststream.demo.data import (
    NOISE_TYPES,
    DataConfig,
    WordTokenizer,
    build_splits,
)


@pytest.fixture(scope="module")
def small_splits():
    return build_splits(DataConfig(pool_size=1000, curated_size=200, duplicate_sources=4))


def test_splits_come_from_disjoint_scans(small_splits):
    scans = {name: set(split["scan"].tolist()) for name, split in small_splits.items()}
    assert not scans["curated"] & scans["pool"]
    assert not scans["curated"] & scans["heldout"]
    assert not scans["pool"] & scans["heldout"]


def test_pool_noise_shares_and_labels(small_splits):
    cfg = DataConfig()
    pool = small_splits["pool"]
    counts = {t: pool["noise"].count(t) for t in NOISE_TYPES}
    assert counts["mismatched"] == round(cfg.mismatched * 1000)
    assert counts["garbage"] == round(cfg.garbage * 1000)
    assert sum(counts.values()) == 1000
    assert pool["image"].dtype.is_floating_point is False
    for i, noise in enumerate(pool["noise"]):
        assert (pool["label"][i] == -1) == (noise == "garbage")
    assert set(small_splits["heldout"]["noise"]) == {"clean"}
    assert set(small_splits["curated"]["noise"]) == {"clean"}


def test_bad_noise_shares_are_rejected():
    with pytest.raises(ValueError, match="noise shares"):
        DataConfig(mismatched=0.5, wrong_class=0.5)


def test_tokenizer_end_token_is_the_largest_id():
    tok = WordTokenizer(16)
    ids = tok(["a handwritten seven", "something never seen before at all"])
    assert ids.shape == (2, 16)
    assert int(ids.max()) == tok.EOT == tok.vocab_size - 1
    assert (ids.argmax(1) == (ids != 0).sum(1) - 1).all()  # argmax pooling finds the EOT


def test_tokenizer_cache_gives_the_uncached_rows():
    tok = WordTokenizer(6)
    texts = ["a handwritten seven", "a scan of the number seven written long", "a handwritten seven"]
    first = tok(texts)
    again = tok(list(reversed(texts)))  # rows now come from the cache
    assert first.tolist() == [
        [tok.SOT, tok.vocab["a"], tok.vocab["handwritten"], tok.vocab["seven"], tok.EOT, 0],
        [tok.SOT, tok.vocab["a"], tok.vocab["scan"], tok.vocab["of"], tok.vocab["the"], tok.EOT],
        [tok.SOT, tok.vocab["a"], tok.vocab["handwritten"], tok.vocab["seven"], tok.EOT, 0],
    ]
    assert torch.equal(again, first.flip(0))
    first[0, 0] = 99  # a returned batch is the caller's own: the cache is not aliased
    assert tok(["a handwritten seven"])[0, 0] == tok.SOT
    assert tok([]).shape == (0, 6)


def test_help_documents_the_knobs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for knob in (
        "--mismatched",
        "--wrong-class",
        "--garbage",
        "--duplicate",
        "--ratio",
        "--steps",
        "--seeds",
        "--out",
        "--quick",
        "--full",
        "--methods",
        "--scale",
        "--no-reference-cache",
        "--jobs",
        "--width",
    ):
        assert knob in text


def test_unknown_method_is_an_error():
    args = build_parser().parse_args(["--methods", "uniform,nope"])
    with pytest.raises(ValueError, match="nope"):
        config_from_args(args)


def test_full_preset_runs_every_method_over_three_seeds():
    cfg = config_from_args(build_parser().parse_args(["--full"]))
    assert len(cfg.seeds) == 3 and "static" in cfg.methods and "independent" in cfg.methods


def test_cached_reference_embeddings_match_the_reference_on_loader_batches(tmp_path):
    """The demo serves the frozen reference's embeddings from one pass over the pool, written as
    a library ReferenceCache; on the batches JESTLoader actually sees they must equal running
    the reference on them."""

    from jeststream import ReferenceCache
    from jeststream.demo.data import prepare_shards
    from jeststream.demo.model import ModelConfig, build_model
    from jeststream.demo.runs import (
        RunConfig,
        StreamLoader,
        load_split,
        model_input,
        reference_embeddings,
        write_reference_cache,
    )
    from jeststream.scoring import default_embed

    data = DataConfig(pool_size=600, curated_size=64, duplicate_sources=4)
    shards = prepare_shards(data, tmp_path)
    tokenizer = WordTokenizer(data.context_length)
    pool = load_split(shards["pool"], tokenizer, data.image_size)
    reference = build_model(ModelConfig(), tokenizer.vocab_size, seed=3).eval().requires_grad_(False)
    directory = write_reference_cache(
        reference, reference_embeddings(reference, pool), pool["key"], tmp_path / "refcache",
        RunConfig(data=data),
    )
    cache = ReferenceCache(directory, reference=reference)  # the fingerprint matches
    assert len(cache) == 600
    raw = next(iter(StreamLoader(shards["pool"], 32, 1, tokenizer, seed=0)))
    assert raw[0].dtype == torch.uint8 and raw[0].shape == (32, data.image_size, data.image_size)
    batch = model_input(raw)  # what the training step and JESTLoader's score_transform see
    rows = torch.tensor([pool["key"].index(k) for k in batch[2]])
    torch.testing.assert_close(batch[0], pool["image"][rows])  # same input as the in-memory split
    with torch.inference_mode():
        got, want = cache.lookup(list(batch[2])), default_embed(reference, batch)
    torch.testing.assert_close(got.image, want.image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.text, want.text, atol=1e-5, rtol=1e-4)
    assert float(got.logit_scale) == pytest.approx(float(want.logit_scale))
    assert float(got.logit_bias) == pytest.approx(float(want.logit_bias))


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "JEST reaches" in out and "jest" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    methods = results["methods"]
    assert set(methods) == set(results["config"]["methods"])
    for name, m in methods.items():
        shares = sum(s["mean"] for s in m["composition"].values())
        assert shares == pytest.approx(1.0), name
    assert methods["oracle"]["composition"]["clean"]["mean"] == 1.0
    steps = results["config"]["steps"]
    for run in results["runs"]:
        assert run["curve"][-1]["step"] == steps
        assert run["curve"][-1]["flops"] > 0
    # Selection methods pay for their scoring forwards.
    by = {r["method"]: r for r in results["runs"]}
    assert by["jest"]["flops_per_step"] > by["uniform"]["flops_per_step"]
    assert "uniform_plateau_ok" in results["headline"]
    # easy_reference runs no learner forward, and reads the cached reference: its scoring is the
    # one pass over the pool, paid up front.
    assert by["easy_reference"]["flops_per_step"] == by["uniform"]["flops_per_step"]
    assert by["easy_reference"]["upfront_flops"] > 0


@pytest.mark.slow
def test_parallel_jobs_give_the_same_runs(tmp_path):
    """--jobs 2 runs the references and the methods in worker processes; every run is seeded
    on its own and scored deterministically (asynchronously, the default), so the curves and
    compositions equal those of the in-process run although thread timing differs with the
    load."""
    common = ["--quick", "--methods", "uniform,jest,easy_reference,static", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "one"), "--jobs", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "two"), "--jobs", "2", "--seeds", "0", "1"]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["complete"] and two["config"]["jobs"] == 2
    assert [(r["seed"], r["method"]) for r in two["runs"]] == [
        (s, m) for s in (0, 1) for m in ("uniform", "jest", "easy_reference", "static")
    ]
    got = {(r["method"]): r for r in two["runs"] if r["seed"] == 0}
    for want in one["runs"]:
        run = got[want["method"]]
        assert [c["accuracy"] for c in run["curve"]] == [c["accuracy"] for c in want["curve"]]
        assert run["composition"] == want["composition"]
    assert set(two["reference"]) == {"0", "1"}


def test_jobs_and_threads_must_be_positive():
    for bad in (["--jobs", "0"], ["--threads", "0"]):
        with pytest.raises(ValueError, match="at least 1"):
            config_from_args(build_parser().parse_args(bad))
    with pytest.raises(ValueError, match="--width must be an even number >= 8.*got 7"):
        config_from_args(build_parser().parse_args(["--width", "7"]))
    model = config_from_args(build_parser().parse_args(["--width", "32"])).model
    assert model.width == model.text_width == model.embed_dim == 32
    assert config_from_args(build_parser().parse_args(["--quick"])).jobs == 1


@pytest.mark.slow
def test_a_failing_parallel_run_raises_and_leaves_no_worker(tmp_path):
    """A run that fails in a worker process surfaces its error in the parent, and the other
    workers are stopped instead of being waited for or left running."""
    import multiprocessing as mp

    args = [
        "--pool-size", "600", "--curated-size", "64", "--steps", "3", "--ref-steps", "2",
        "--eval-every", "1", "--batch-size", "64", "--methods", "uniform,jest",
        "--n-chunks", "1000", "--jobs", "2", "--no-progress", "--out", str(tmp_path),
    ]
    with pytest.raises(ValueError, match="n_chunks=1000 exceeds the batch size b=64"):
        main(args)
    assert mp.active_children() == []


def test_flops_count_the_library_scoring_path():
    """The demo counts what its runs compute: trimmed captions, and the learner's forward at
    --score-resolution (fewer patches) while the reference's stays at full size."""
    from dataclasses import replace

    from jeststream.demo.data import WordTokenizer, caption
    from jeststream.demo.model import ModelConfig, build_model
    from jeststream.demo.runs import RunConfig, measure_flops

    cfg = RunConfig(batch_size=8, model=ModelConfig(patch_size=4))
    tok = WordTokenizer(cfg.model.context_length)
    texts = tok([caption(i % 10, 0) for i in range(40)])
    model = build_model(cfg.model, tok.vocab_size, seed=0)
    full = measure_flops(model, cfg, tok, texts)
    low = measure_flops(model, replace(cfg, score_resolution=8), tok, texts)
    assert full["learner_forward_super_batch"] == full["reference_forward_super_batch"]
    assert low["learner_forward_super_batch"] < 0.8 * full["learner_forward_super_batch"]
    assert low["reference_forward_super_batch"] == full["reference_forward_super_batch"]
    untrimmable = texts.clone()  # end-of-text in the last position: nothing to trim
    untrimmable[untrimmable == tok.EOT] = 3
    untrimmable[:, -1] = tok.EOT
    padded = measure_flops(model, cfg, tok, untrimmable)
    assert full["reference_forward_super_batch"] < padded["reference_forward_super_batch"]
    with pytest.raises(ValueError, match="--score-resolution 6"):
        config_from_args(build_parser().parse_args(["--patch-size", "4", "--score-resolution", "6"]))
