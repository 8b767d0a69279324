"""The embedded demo: data set properties, CLI knobs, and a --quick end-to-end smoke run.

``jeststream demo`` (jeststream.demo) has the user's knobs; the research knobs are
benchmarks/demo_harness.py's (``harness``), which runs through the library's Comparison.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import benchmark_module

from jeststream.demo import build_parser, config_from_args, main
from jeststream.demo.data import (
    NOISE_TYPES,
    DataConfig,
    WordTokenizer,
    build_splits,
)

harness = benchmark_module("demo_harness")


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
    user = ("--ratio", "--steps", "--ref-steps", "--seeds", "--out", "--quick", "--methods",
            "--jobs", "--details", "--no-progress")
    for knob in user:
        assert knob in text
    with pytest.raises(SystemExit) as exc:
        harness.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for knob in (*user,
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
    cfg = harness.config_from_args(harness.build_parser().parse_args(["--full"]))
    assert len(cfg.seeds) == 3 and "static" in cfg.methods and "independent" in cfg.methods


def test_cached_reference_embeddings_match_the_reference_on_loader_batches(tmp_path):
    """The demo serves the frozen reference's embeddings from one pass over the pool, written as
    a library ReferenceCache; on the batches JESTLoader actually sees they must equal running
    the reference on them."""

    from jeststream import ReferenceCache
    from jeststream.demo.data import prepare_shards
    from jeststream.demo.model import ModelConfig, build_model
    from jeststream.demo.reference import reference_embeddings, write_reference_cache
    from jeststream.demo.runs import RunConfig
    from jeststream.demo.shards import StreamLoader, load_split, model_input
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
    from jeststream.demo.model import RETRIEVAL

    assert main(["--quick", "--details", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the comparison at the run's own scale, not a verdict on a target the README does not state
    assert "at this scale (12 steps" in out and "steps to uniform's final accuracy" in out
    assert "MET" not in out and "target" not in out
    for label in ("i→t R@1", "i→t R@5", "t→i R@1", "t→i R@5", "batch learnability"):
        assert label in out
    # the short table closes the output; no line is a wall of text
    tail = out[out.rindex("method "):]
    for column in ("final accuracy", "steps to uniform's final", "FLOPs to it",
                   "+ reference training", "wall"):
        assert column in tail.splitlines()[0]
    assert "Not counted" not in out  # the reference's training is its own column
    # --details: the steadier measures' table
    assert "F→80%" in out and "acc@0.5F +ref" in out
    assert max(map(len, out.splitlines())) <= 160
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    # the JEST run's selection log and its HTML report, whose path the demo prints
    report_path = tmp_path / "selection_report.html"
    assert results["selection_report"] == str(report_path) and str(report_path) in out
    page = report_path.read_text()
    assert "data:image/" in page and "clean" in page  # thumbnails, the per-noise-type table
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
        for k in RETRIEVAL:
            assert 0.0 <= run["curve"][-1][k] <= 1.0
        # recall@5 finds at least what recall@1 finds
        last = run["curve"][-1]
        assert last["i2t_recall_at_5"] >= last["i2t_recall_at_1"]
        assert last["t2i_recall_at_5"] >= last["t2i_recall_at_1"]
        # measured for the learnability criterion only, on every step
        measured = run["method"] in ("jest", "independent")
        assert ("batch_learnability" in run) == measured, run["method"]
        if measured:
            bl = run["batch_learnability"]
            assert bl["steps"] == steps and bl["windows"]["end_step"][-1] == steps
            assert bl["selected_minus_independent"]["mean"] == pytest.approx(
                bl["selected"]["mean"] - bl["independent"]["mean"]
            )
    assert set(methods["jest"]["final_retrieval"]) == set(RETRIEVAL)
    assert "batch_learnability" in methods["jest"] and "batch_learnability" not in methods["oracle"]
    # Selection methods pay for their scoring forwards.
    by = {r["method"]: r for r in results["runs"]}
    assert by["jest"]["flops_per_step"] > by["uniform"]["flops_per_step"]
    assert "uniform_plateau_ok" in results["headline"]
    # easy_reference runs no learner forward, and reads the cached reference: its scoring is the
    # one pass over the pool, paid up front.
    assert by["easy_reference"]["flops_per_step"] == by["uniform"]["flops_per_step"]
    assert by["easy_reference"]["upfront_flops"] > 0
    # Every FLOP counted: the reference's training on top, for the methods that use it only.
    ref = results["reference"]["0"]
    assert ref["train_flops"] == results["config"]["ref_steps"] * results["flops"]["train_step"]
    assert ref["pool_forward_flops"] == by["easy_reference"]["upfront_flops"]
    for name, m in methods.items():
        plain = m["flops_ratio_vs_uniform"]["per_seed"]["0"]
        counted = m["flops_ratio_vs_uniform_with_reference"]["per_seed"]["0"]
        if plain is None:
            assert counted is None, name
            continue
        extra = ref["train_flops"] / by["uniform"]["curve"][-1]["flops"]
        uses = name not in ("uniform", "oracle", "hard_learner")
        assert by[name]["uses_reference"] == uses
        assert counted == pytest.approx(plain + (extra if uses else 0.0)), name
        for key in ("flops_ratio_to_accuracy", "accuracy_at_uniform_flops"):
            assert set(m[key]) and all("per_seed" in st for st in m[key].values()), name


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
        with pytest.raises(ValueError, match="at least 1"):
            harness.config_from_args(harness.build_parser().parse_args(bad))
    for bad in (["--steps", "0"], ["--ref-steps", "0"]):
        with pytest.raises(ValueError, match=f"{bad[0]} must be at least 1, got 0"):
            config_from_args(build_parser().parse_args(bad))
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(ValueError, match=f"--ratio must be a share in .* got {bad}"):
            config_from_args(build_parser().parse_args(["--ratio", bad]))
    parse = harness.build_parser().parse_args
    with pytest.raises(ValueError, match="--width must be an even number >= 8.*got 7"):
        harness.config_from_args(parse(["--width", "7"]))
    model = harness.config_from_args(parse(["--width", "32"])).model
    assert model.width == model.embed_dim == 32 and model.text_width == 16
    model = harness.config_from_args(parse(["--width", "32", "--text-width", "24"])).model
    assert model.width == 32 and model.text_width == 24
    with pytest.raises(ValueError, match="--text-width must be an even number >= 8.*got 6"):
        harness.config_from_args(parse(["--text-width", "6"]))
    assert config_from_args(build_parser().parse_args(["--quick"])).jobs == 1


@pytest.mark.slow
def test_a_failing_parallel_run_raises_and_leaves_no_worker(tmp_path):
    """A run that fails in a worker process surfaces its error in the parent, and the other
    workers are stopped instead of being waited for or left running."""
    import multiprocessing as mp
    import threading
    from multiprocessing.connection import wait as wait_for_exit

    from jeststream.demo import run_comparison

    args = [
        "--pool-size", "600", "--curated-size", "64", "--steps", "3", "--ref-steps", "2",
        "--eval-every", "1", "--batch-size", "64", "--methods", "uniform,jest",
        "--n-chunks", "1000", "--jobs", "2",
    ]
    cfg = harness.config_from_args(harness.build_parser().parse_args(args))
    # Children another test left winding down (a DataLoader's workers awaiting collection)
    # are not this run's: only what the comparison itself started must be gone.
    before = {p.pid for p in mp.active_children()}
    threads_before = set(threading.enumerate())
    with pytest.raises(ValueError, match="n_chunks=1000 exceeds the batch size b=64"):
        run_comparison(cfg, tmp_path, progress=False)
    # A worker is left if it still runs: its sentinel (closed when it exits) is not ready.
    left = [
        (p.name, p.pid)
        for p in mp.active_children()
        if p.pid not in before and not wait_for_exit([p.sentinel], timeout=0)
    ]
    assert left == []
    # ...nor a thread of the runner's
    assert [t.name for t in threading.enumerate() if t not in threads_before] == []


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
        harness.config_from_args(harness.build_parser().parse_args(["--patch-size", "4", "--score-resolution", "6"]))


def test_flexi_training_runs_and_counts_its_cheaper_steps(tmp_path):
    """--train-low-res-share: the learner-scoring methods train part of each batch at the
    scoring resolution and are charged the mixed step's counted FLOPs; the others are not."""
    assert harness.main([
        "--quick", "--out", str(tmp_path), "--methods", "uniform,jest,easy_reference",
        "--score-resolution", "8", "--train-low-res-share", "0.5", "--no-progress",
    ]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    flops = results["flops"]
    assert results["config"]["train_low_res_share"] == 0.5
    assert flops["train_step_mixed"] < flops["train_step"]
    by = {r["method"]: r for r in results["runs"]}
    assert by["uniform"]["flops_per_step"] == flops["train_step"]
    assert by["easy_reference"]["flops_per_step"] == flops["train_step"]
    assert by["jest"]["flops_per_step"] == (
        flops["train_step_mixed"] + flops["learner_forward_super_batch"]
    )
    with pytest.raises(ValueError, match="give --score-resolution too"):
        harness.config_from_args(harness.build_parser().parse_args(["--train-low-res-share", "0.5"]))
    with pytest.raises(ValueError, match="--train-low-res-share must be a fraction"):
        harness.config_from_args(harness.build_parser().parse_args(
            ["--score-resolution", "8", "--train-low-res-share", "2"]))


def test_scoring_schedules_map_onto_the_loader_options():
    """--scoring sync (default): inline with the current learner; lagged: background thread,
    deterministic, lag = --prefetch; latest: background thread, newest snapshot."""
    want = {"sync": (False, False), "lagged": (True, True), "latest": (True, False)}
    for name, (async_scoring, deterministic) in want.items():
        argv = [] if name == "sync" else ["--scoring", name]
        cfg = harness.config_from_args(harness.build_parser().parse_args([*argv, "--prefetch", "1"]))
        assert (cfg.async_scoring, cfg.deterministic, cfg.prefetch) == (
            async_scoring, deterministic, 1
        ), name
    with pytest.raises(ValueError, match="--prefetch must be at least 1, got 0"):
        harness.config_from_args(harness.build_parser().parse_args(["--prefetch", "0"]))


def test_demo_model_has_clips_cost_structure():
    """The image tower is at least 70 % of a forward pass in counted FLOPs (ViT-B/16: ~80 % at
    its full context), on the full context and on the demo's own captions trimmed as the
    library scores them; the CLI's defaults build that model."""
    from torch.utils.flop_counter import FlopCounterMode

    from jeststream.demo.data import caption
    from jeststream.demo.model import ModelConfig, build_model
    from jeststream.scoring import default_embed

    cfg = ModelConfig()
    assert config_from_args(build_parser().parse_args([])).model == cfg
    tok = WordTokenizer(cfg.context_length)
    texts = tok([caption(i % 10, i % 3) for i in range(16)])
    images = torch.zeros(16, 3, cfg.image_size, cfg.image_size)
    model = build_model(cfg, tok.vocab_size, seed=0).eval()

    def counted(fn) -> int:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    image = counted(lambda: model.encode_image(images, normalize=True))
    text = counted(lambda: model.encode_text(texts, normalize=True))
    both = counted(lambda: default_embed(model, (images, texts)))
    assert image / (image + text) >= 0.7
    assert image / both >= 0.7 and both < image + text  # trimmed captions cost less


def _curve(points, upfront=0.0, per_step=1.0):
    return [{"step": s, "accuracy": a, "flops": upfront + s * per_step} for s, a in points]


def _run(method, seed, points, upfront=0.0, per_step=1.0, uses=None):
    return {
        "method": method, "seed": seed, "curve": _curve(points, upfront, per_step),
        "composition": dict.fromkeys(NOISE_TYPES, 0.2), "wall_s": 1.0,
        "uses_reference": method != "uniform" if uses is None else uses,
    }


def test_steadier_measures_and_flops_both_ways():
    """FLOPs to a fixed accuracy and accuracy at shares of uniform's FLOPs, per seed, each also
    with the reference's training counted; a budget the up-front cost alone exceeds gives none.
    (The curves are written out so that every figure can be worked by hand.)"""
    from jeststream.demo import report
    from jeststream.demo.runs import RunConfig

    cfg = RunConfig(steps=100, seeds=(0, 1), methods=("uniform", "jest"))
    # uniform: 1 FLOP a step, 100 in all; smoothing = mean of the last 3 evaluations
    uni = [(0, 0.1), (25, 0.7), (50, 0.7), (75, 0.72), (100, 0.9)]
    jest = [(0, 0.1), (25, 0.8), (50, 0.8), (75, 0.9), (100, 0.9)]  # 2 FLOPs a step, 10 up front
    runs = [
        _run("uniform", 0, uni), _run("jest", 0, jest, upfront=10.0, per_step=2.0),
        _run("uniform", 1, uni), _run("jest", 1, jest, upfront=10.0, per_step=2.0),
    ]
    refs = {0: {"train_flops": 30.0}, 1: {"train_flops": 60.0}}
    m = report.summarise(cfg, runs, refs, {"train_step": 1.0})["methods"]
    j = m["jest"]
    # uniform's final (0.7+0.72+0.9)/3 = 0.773; JEST's smoothed curve reaches it at step 75
    # ((0.8+0.8+0.9)/3 = 0.833), at 10 + 150 = 160 FLOPs: 1.6 x uniform's 100
    assert j["flops_ratio_vs_uniform"]["per_seed"] == {"0": pytest.approx(1.6), "1": pytest.approx(1.6)}
    assert j["flops_ratio_vs_uniform_with_reference"]["per_seed"] == {
        "0": pytest.approx(1.9), "1": pytest.approx(2.2)}
    assert m["uniform"]["flops_ratio_vs_uniform_with_reference"]["mean"] == pytest.approx(1.0)
    # 70 %: JEST's smoothed accuracy first reaches it at step 75 ((0.8+0.8+0.9)/3; at 50 it is
    # (0.1+0.8+0.8)/3 = 0.567); uniform's at 75 ((0.7+0.7+0.72)/3 = 0.707)
    assert j["flops_ratio_to_accuracy"]["70%"]["mean"] == pytest.approx(1.6)
    assert m["uniform"]["flops_ratio_to_accuracy"]["70%"]["mean"] == pytest.approx(0.75)
    assert j["flops_ratio_to_accuracy_with_reference"]["80%"]["per_seed"]["1"] == pytest.approx(2.2)
    # accuracy at 0.5 x uniform's FLOPs (50): JEST's last evaluation within it is step 0 (10),
    # step 25 costs 60; with the reference counted even step 0 is over it in seed 1 (70)
    assert j["accuracy_at_uniform_flops"]["0.5"]["per_seed"] == {
        "0": pytest.approx(0.1), "1": pytest.approx(0.1)}
    assert j["accuracy_at_uniform_flops_with_reference"]["0.5"]["per_seed"] == {
        "0": pytest.approx(0.1), "1": None}
    assert m["uniform"]["accuracy_at_uniform_flops"]["0.25"]["mean"] == pytest.approx(0.4)
    assert m["uniform"]["final_accuracy"]["per_seed"]["1"] == pytest.approx(0.7733, abs=1e-4)


def test_default_digits_config_keeps_its_fingerprint_fields():
    """Fields added for the pairs task and the softmax learner stay out of the digits
    fingerprints at their defaults, so shards and reference caches written before are found."""
    from jeststream.demo.model import ModelConfig

    assert "task" not in DataConfig().identity() and "heldout_size" not in DataConfig().identity()
    assert "loss" not in ModelConfig().identity()
    # the rebalanced model (issue 30) is a new fingerprint: its caches are its own
    identity = ModelConfig().identity()
    assert identity["patch_size"] == 4 and identity["text_width"] == 32
    assert ModelConfig(patch_size=8, text_width=64).identity() != identity
    assert DataConfig(task="pairs").identity()["task"] == "pairs"
    assert ModelConfig(loss="softmax").identity()["loss"] == "softmax"
    with pytest.raises(ValueError, match="task='letters'"):
        DataConfig(task="letters")


def test_pairs_task_labels_captions_and_scans_agree():
    from jeststream.demo.data import (
        DIGIT_WORDS,
        JUNK_CAPTIONS,
        PAIR_TEMPLATES,
        _load_scans,
        caption,
        class_captions,
        n_classes,
    )

    cfg = DataConfig(task="pairs", pool_size=1200, curated_size=300, heldout_size=400,
                     duplicate_sources=4)
    splits = build_splits(cfg)
    _, targets = _load_scans()
    assert n_classes("pairs") == 100 and len(class_captions("pairs")) == 100 * len(PAIR_TEMPLATES)
    assert caption(38, 0, "pairs") == "a handwritten three eight"
    assert caption(38, 1, "pairs") == "the number 3 8"
    words = {w: i for i, w in enumerate(DIGIT_WORDS)}

    def named_class(text: str) -> int:
        """The class a caption names: its two digit words, or its two digit tokens."""
        toks = text.split()
        digits = [words[t] for t in toks if t in words] or [int(t) for t in toks if t.isdigit()]
        assert len(digits) == 2, text
        return 10 * digits[0] + digits[1]

    scans = {}
    for name, split in splits.items():
        n = len(split["caption"])
        assert split["image"].shape == (n, 16, 16) and split["scan"].shape == (n, 2)
        scans[name] = set(split["scan"].flatten().tolist())
        for i in range(n):
            noise, label, text = split["noise"][i], int(split["label"][i]), split["caption"][i]
            if noise == "mismatched":
                assert text in JUNK_CAPTIONS
            elif noise == "garbage":
                assert label == -1
            else:
                named = named_class(text)
                assert (named == label) == (noise != "wrong_class"), (noise, text, label)
            if noise != "garbage":  # the left scan shows the tens digit, the right one the units
                left, right = split["scan"][i].tolist()
                assert (int(targets[left]), int(targets[right])) == divmod(label, 10)
    assert not scans["curated"] & scans["pool"] and not scans["pool"] & scans["heldout"]
    assert not scans["curated"] & scans["heldout"]
    held = splits["heldout"]["label"]
    assert torch.bincount(held, minlength=100).tolist() == [4] * 100  # balanced
    assert set(splits["heldout"]["noise"]) == {"clean"}
    # the left and right halves are the two scans: swapping the classes changes the image
    img = splits["heldout"]["image"].float()
    assert (img[:, :, :8] - img[:, :, 8:]).abs().mean() > 5
    tok = WordTokenizer(cfg.context_length, "pairs")
    ids = tok(class_captions("pairs"))
    assert (ids == tok.UNK).sum() == 0  # the pairs vocabulary covers every caption


def test_class_level_recall_both_ways():
    from jeststream.demo.model import _class_recall

    labels = torch.tensor([0, 1, 1, 2])
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.2],  # image 0 (class 0): nearest caption 0 -> hit
            [0.1, 0.0, 0.2, 0.9],  # image 1 (class 1): nearest caption 3 (class 2), then 2
            [0.8, 0.1, 0.3, 0.0],  # image 2 (class 1): nearest caption 0, then 2 (class 1)
            [0.0, 0.9, 0.8, 0.1],  # image 3 (class 2): nearest 1 and 2 (both class 1), then 3
        ]
    )
    assert _class_recall(sim, labels, labels, 1) == pytest.approx(0.25)
    assert _class_recall(sim, labels, labels, 2) == pytest.approx(0.75)
    assert _class_recall(sim, labels, labels, 5) == pytest.approx(1.0)  # k > N: everything
    # text -> image reads the columns: only caption 0 finds its class first (captions 1 and 2
    # find image 3, caption 3 finds image 1)
    assert _class_recall(sim.T, labels, labels, 1) == pytest.approx(0.25)


def test_pairs_and_softmax_options():
    cfg = harness.config_from_args(harness.build_parser().parse_args(["--task", "pairs", "--loss", "softmax"]))
    assert cfg.data.task == "pairs" and cfg.model.loss == "softmax"
    assert cfg.model.width == 128 and cfg.model.layers == cfg.model.text_layers == 2
    assert cfg.steps == 2000 and cfg.data.n_heldout == 2000
    cfg = harness.config_from_args(harness.build_parser().parse_args(["--task", "pairs", "--width", "64"]))
    assert cfg.model.width == 64
    digits = harness.config_from_args(harness.build_parser().parse_args([]))
    assert digits.model.width == 64 and digits.model.layers == 1 and digits.steps == 2000
    assert digits.methods == ("uniform", "jest", "independent")
    assert digits.preset == "default" and digits.batch_learnability
    with pytest.raises(ValueError, match="--layers must be at least 1"):
        harness.config_from_args(harness.build_parser().parse_args(["--layers", "0"]))
    for bad in ("-1", "nan"):
        with pytest.raises(ValueError, match=f"--temperature must be .* got {bad}"):
            harness.config_from_args(harness.build_parser().parse_args(["--temperature", bad]))
    assert harness.config_from_args(harness.build_parser().parse_args(["--temperature", "0.25"])).temperature == 0.25


def _sweep_module():
    return benchmark_module("selection_sweep")


def test_sweep_plan_and_filters():
    sweep = _sweep_module()
    runs = sweep.plan([0, 1, 2], 0.2, "sigmoid")
    ids = {r.id for r in runs}
    assert len(ids) == len(runs) == 3 * (1 + 6 + 4 + 1 + 2 + 5 + 2)
    assert "digits-sigmoid-r0.1-jest-seed2" in ids and "digits-softmax-r0.2-independent-seed0" in ids
    assert "digits-sigmoid-r0.2-t0.25-jest-seed1" in ids  # temperature 1 stays out of the ids
    assert "digits-sigmoid-r0.1-t0.25-independent-seed0" in ids
    assert "pairs-sigmoid-r0.2-t0.25-independent-seed2" in ids
    assert "pairs-sigmoid-oracle-seed1" in ids and "pairs-sigmoid-r0.2-easy_reference-seed1" in ids
    f = sweep.parse_filters(["ratio=0.2", "task=digits", "loss=sigmoid"])
    kept = {r.id for r in runs if r.matches(f)}
    # uniform serves every ratio; the other ratios' runs are left out
    assert kept == {f"digits-sigmoid{m}-seed{s}" for s in range(3)
                    for m in ("-uniform", "-r0.2-jest", "-r0.2-independent", "-r0.2-t0.25-jest",
                              "-r0.2-t0.25-independent")}
    f = sweep.parse_filters(["temperature=1", "task=digits", "loss=sigmoid", "seed=0"])
    assert {r.id for r in runs if r.matches(f)} == {
        "digits-sigmoid-uniform-seed0",
        *(f"digits-sigmoid-r{r}-{m}-seed0" for r in (0.5, 0.2, 0.1)
          for m in ("jest", "independent")),
    }
    # JEST ÷ independent steps: exact, or bounded when seeds never got to uniform's final
    st = lambda mean, n: {"mean": mean, "n": n, "of": 3}  # noqa: E731
    assert sweep.steps_ratio(st(0.4, 3), st(0.5, 3)) == (pytest.approx(0.8), "=")
    # independent missed a seed: counted at the whole budget, (2 x 0.5 + 1) / 3 = 2/3
    assert sweep.steps_ratio(st(0.4, 3), st(0.5, 2)) == (pytest.approx(0.6), "<=")
    assert sweep.steps_ratio(st(0.5, 2), st(0.4, 3)) == (pytest.approx(5 / 3), ">=")
    assert sweep.steps_ratio(st(0.5, 2), st(None, 0)) == (None, "")
    with pytest.raises(ValueError, match="KEY=V"):
        sweep.parse_filters(["ratio"])
    with pytest.raises(ValueError, match="KEY one of"):
        sweep.parse_filters(["colour=red"])


@pytest.mark.slow
def test_sweep_writes_each_run_and_resumes(tmp_path, capsys):
    """Each run lands in its own JSON file as it ends; a second invocation skips them, and the
    summary has the per-configuration table and plot."""
    sweep = _sweep_module()
    common = [
        "--results", str(tmp_path / "res"), "--docs", str(tmp_path / "docs"), "--quick",
        "--steps", "2", "--ref-steps", "2", "--jobs", "1", "--seeds", "0",
        "--only", "task=digits", "--only", "loss=sigmoid", "--only", "ratio=0.2",
        "--only", "temperature=0.25", "--only", "method=uniform,independent",
    ]
    assert sweep.main(["run", *common]) == 0
    files = sorted((tmp_path / "res" / "runs").glob("*.json"))
    assert [f.name for f in files] == [
        "digits-sigmoid-r0.2-t0.25-independent-seed0.json",
        "digits-sigmoid-uniform-seed0.json",
    ]
    run = json.loads(files[0].read_text())
    assert run["config"]["ratio"] == 0.2 and run["config"]["steps"] == 2
    assert run["config"]["temperature"] == 0.25 and run["temperature"] == 0.25
    assert run["config"]["methods"] == ["independent"] and run["wall_s"] > 0
    assert run["result"]["batch_learnability"]["steps"] == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    first = capsys.readouterr()
    assert "0 finished (skipped), 2 to run" in first.err

    assert sweep.main(["run", *common]) == 0  # resumes: nothing left to train
    second = capsys.readouterr()
    assert "2 finished (skipped), 0 to run" in second.err and "done " not in second.err
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    summary = json.loads(second.out)
    conf = summary["configurations"]["digits-sigmoid-r0.2-t0.25"]
    assert set(conf["methods"]) == {"uniform", "independent"}
    assert "batch_learnability" in conf["methods"]["independent"]
    md = (tmp_path / "docs" / "selection_sweep.md").read_text()
    assert "## digits, sigmoid loss, ratio 0.2, temperature 0.25" in md
    assert "| independent |" in md
    assert (tmp_path / "docs" / "selection_sweep.png").stat().st_size > 0
    # other settings in the same results directory are refused, not mixed in
    with pytest.raises(SystemExit):
        sweep.main(["run", *[a if a != "2" else "3" for a in common]])
    assert "written with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_temperature_probe_quick_smoke():
    """benchmarks/temperature_probe.py --quick trains a few demo steps, keeps the sampler's
    embeddings and prints, per kept step and temperature, both draws' batch learnability
    (no figures asserted: what they are is the probe's business)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "temperature_probe.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--steps", "4", "--at", "2", "4", "--draws",
         "2", "--temperatures", "1", "0", "--loss", "softmax"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [r["step"] for r in out["results"]] == [2, 4]
    for row in out["results"]:
        assert row["k"] == 32 and len(row["chunk_logit_std"]) == 16
        by_t = {x["temperature"]: x for x in row["by_temperature"]}
        assert set(by_t) == {1.0, 0.0}
        assert by_t[0.0]["draws"] == 1 and by_t[1.0]["draws"] == 2  # T = 0 is deterministic
        for x in by_t.values():
            assert math.isfinite(x["joint"]) and math.isfinite(x["independent"])
            assert x["joint_minus_independent"] == pytest.approx(x["joint"] - x["independent"])
    bad = subprocess.run([sys.executable, str(script), "--steps", "4", "--at", "9"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--at [9]" in bad.stderr


def _pays_module():
    return benchmark_module("pays_for_itself")


def test_reference_width_and_prefilter_options():
    """--ref-width builds (and counts) a narrower reference; --prefilter takes a share in (0, 1]
    and is passed on."""
    from jeststream.demo.data import caption
    from jeststream.demo.model import build_model
    from jeststream.demo.reference import reference_model_config
    from jeststream.demo.runs import measure_flops

    cfg = harness.config_from_args(harness.build_parser().parse_args(["--ref-width", "32", "--batch-size", "8"]))
    ref = reference_model_config(cfg)
    assert (ref.width, ref.embed_dim, ref.text_width) == (32, 32, 16) and cfg.model.width == 64
    tok = WordTokenizer(cfg.model.context_length)
    texts = tok([caption(i % 10, 0) for i in range(40)])
    flops = measure_flops(build_model(cfg.model, tok.vocab_size, seed=0), cfg, tok, texts)
    assert flops["reference_train_step"] < 0.5 * flops["train_step"]
    assert flops["reference_forward_super_batch"] < 0.5 * flops["learner_forward_super_batch"]
    same = harness.config_from_args(harness.build_parser().parse_args([]))
    assert reference_model_config(same) is same.model
    with pytest.raises(ValueError, match="--ref-width must be an even number"):
        harness.config_from_args(harness.build_parser().parse_args(["--ref-width", "7"]))
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(ValueError, match="--prefilter must be a share in"):
            harness.config_from_args(harness.build_parser().parse_args(["--prefilter", bad]))
    assert harness.config_from_args(harness.build_parser().parse_args(["--prefilter", "0.5"])).prefilter == 0.5


def test_pays_for_itself_plan_keeps_the_held_out_seeds_apart():
    pays = _pays_module()
    dev = pays.plan(pays.SEED_SETS["dev"])
    assert {r.seed for r in dev} == {0, 1, 2, 3, 4}
    held = [set(pays.SEED_SETS[k]) for k in ("heldout", "heldout2")]
    assert not {r.seed for r in dev} & (held[0] | held[1]) and not held[0] & held[1]
    ids = [r.id for r in dev]
    assert len(ids) == len(set(ids))
    # the headline comparison first over every seed, then the cheaper baselines, then the rest
    assert [r.method for r in dev[:15]] == ["uniform"] * 5 + ["jest"] * 5 + ["independent"] * 5
    assert {r.method for r in dev[15:25]} == {"easy_reference", "static"}
    assert sum(r.method == "uniform" for r in dev) == 5  # uniform serves every group
    kept = [r for r in dev if pays.matches(r, pays.parse_filters(["group=lowres", "seed=0"]))]
    assert [r.id for r in kept] == ["lowres-jest-seed0", "lowres-independent-seed0"]
    with pytest.raises(ValueError, match="unknown group"):
        pays.parse_filters(["group=nope"])
    with pytest.raises(ValueError, match="KEY one of"):
        pays.parse_filters(["ratio=0.2"])


@pytest.mark.slow
def test_pays_for_itself_writes_each_run_resumes_and_summarises(tmp_path, capsys):
    pays = _pays_module()
    common = ["--results", str(tmp_path), "--quick", "--steps", "4", "--only", "seed=0",
              "--only", "group=base,refw32,prefilter0.4", "--only", "method=uniform,jest"]
    assert pays.main(["run", *common]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    expected = [
        "base-jest-seed0.json",
        "base-uniform-seed0.json",
        "prefilter0.4-jest-seed0.json",
        "refw32-jest-seed0.json",
    ]
    run = json.loads((tmp_path / "runs" / "prefilter0.4-jest-seed0.json").read_text())
    assert run["config"]["prefilter"] == 0.4
    assert names == expected
    run = json.loads((tmp_path / "runs" / "refw32-jest-seed0.json").read_text())
    assert run["config"]["ref_width"] == 32 and run["seed_set"] == "dev"
    assert run["wall_s"] > 0 and "commit" in run and "code_uncommitted_changes" in run
    assert run["reference"]["train_flops"] == 12 * run["flops"]["reference_train_step"]
    assert pays.main(["run", *common]) == 0  # resumes: nothing left to train
    assert f"{len(expected)} finished (skipped)" in capsys.readouterr().err
    assert pays.main(["summarise", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== base" in out and "== refw32" in out and "s0 " in out
    assert "FLOPs to it ÷ uniform's (+ reference training)" in out
    md = (tmp_path / "summary-dev.md").read_text()
    assert "## refw32" in md and "| jest | FLOPs to it ÷ uniform's (+ reference training) |" in md
    summary = json.loads((tmp_path / "summary-dev.json").read_text())
    jest = summary["groups"]["refw32"]["methods"]["jest"]
    assert set(jest["flops_ratio_vs_uniform_with_reference"]["per_seed"]) == {"0"}
    # held-out seeds are summarised on their own: none run here
    assert pays.main(["summarise", "--results", str(tmp_path), "--set", "heldout"]) == 0
    assert json.loads((tmp_path / "summary-heldout.json").read_text())["groups"] == {}
