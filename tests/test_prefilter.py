"""JESTLoader(prefilter=q): the reference's top ceil(q * B) of each super-batch, and only those,
reach the learner's forward and the joint selection; q = 1 is today's loader; the log and
SelectionInfo record what was dropped; global selection pre-filters per rank."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import TinyDual, make_vector_batches, tiny_dual_embed
from helpers import init_gloo, run_ranks

from jeststream.loader import JESTLoader
from jeststream.selection import example_scores
from jeststream.selection_log import read_selection_log

pytestmark = pytest.mark.timeout(300)


def _embed(model, batch, loss):
    """TinyDual's embed for ``loss``: the sigmoid loss gets an explicit bias of 0 (TinyDual
    trains without one; the loader refuses a sigmoid loss on embeddings with no bias)."""
    e = tiny_dual_embed(model, batch)
    return e._replace(logit_bias=0.0) if loss == "sigmoid" else e


class _Counting:
    """An embed that records the rows of every learner forward (the reference passes through)."""

    def __init__(self, reference: torch.nn.Module, loss: str = "sigmoid") -> None:
        self.reference = reference
        self.loss = loss
        self.learner_batches: list[torch.Tensor] = []

    def __call__(self, model, batch):
        if model is not self.reference:
            self.learner_batches.append(batch[0].clone())
        return _embed(model, batch, self.loss)


def _run(batches, q, *, loss="sigmoid", scoring="sync", log=None, seed=0):
    reference = TinyDual(seed=100)
    embed = _Counting(reference, loss)
    kw = {} if q is None else {"prefilter": q}
    infos = []
    with JESTLoader(batches, TinyDual(seed=0), reference, 0.25, n_chunks=2, loss=loss,
                    embed=embed, scoring=scoring, seed=seed, selection_log=log, **kw) as ld:
        for _ in ld:
            infos.append(ld.last_info)
    return infos, embed, reference


def _reference_top(reference, super_batch, m, loss):
    with torch.inference_mode():
        e = _embed(reference, super_batch, loss)
        scores = example_scores(None, e, loss=loss, criterion="easy_reference")
    return set(torch.topk(scores, m).indices.tolist()), scores


def _rows_of(seen: torch.Tensor, xs: torch.Tensor) -> list[int]:
    """The super-batch positions of the rows ``seen`` (each row matches exactly one)."""
    match = (seen[:, None, :] == xs[None, :, :]).all(dim=2)
    assert bool((match.sum(dim=1) == 1).all())
    return match.float().argmax(dim=1).tolist()


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_q_1_selects_exactly_what_the_loader_without_prefilter_selects(loss, no_thread_leak):
    batches = make_vector_batches(12, 8)
    plain, plain_embed, _ = _run(batches, None, loss=loss)
    for q in (1, 1.0, 0.99):  # ceil(0.99 * 32) = 32: nothing to drop either
        got, embed, _ = _run(batches, q, loss=loss)
        assert [i.indices.tolist() for i in got] == [i.indices.tolist() for i in plain]
        assert [i.scores.tolist() for i in got] == [i.scores.tolist() for i in plain]
        assert all(i.prefiltered == 0 for i in got)
        assert [b.shape[0] for b in embed.learner_batches] == [32, 32, 32]
    assert [b.shape[0] for b in plain_embed.learner_batches] == [32, 32, 32]


@pytest.mark.parametrize("scoring", ["sync", "lagged"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_the_learner_scores_exactly_the_reference_top_share(loss, scoring, tmp_path,
                                                            no_thread_leak):
    batches = make_vector_batches(12, 8)
    q, m = 0.3, math.ceil(0.3 * 32)  # 10 of each super-batch of 32
    log = tmp_path / "sel.jsonl"
    infos, embed, reference = _run(batches, q, loss=loss, scoring=scoring, log=str(log))
    assert len(infos) == 3 and len(embed.learner_batches) == 3
    cols = read_selection_log(log)
    for step, (info, seen) in enumerate(zip(infos, embed.learner_batches)):
        xs = torch.cat([b[0] for b in batches[4 * step: 4 * step + 4]])
        ys = torch.cat([b[1] for b in batches[4 * step: 4 * step + 4]])
        top, _ = _reference_top(reference, (xs, ys), m, loss)
        assert seen.shape[0] == m  # the learner's forward saw the kept examples only
        assert set(_rows_of(seen, xs)) == top
        assert _rows_of(seen, xs) == sorted(top)  # in super-batch order
        assert set(info.indices.tolist()) <= top and info.indices.numel() == 8
        assert info.prefiltered == 32 - m and info.super_batch_size == 32
        assert all(math.isfinite(s) for s in info.scores.tolist())
        rows = cols["step"] == step
        score, selected, pos = cols["score"][rows], cols["selected"][rows], cols["pos"][rows]
        dropped = {int(p) for p, s in zip(pos, score) if math.isnan(s)}
        assert dropped == set(range(32)) - top  # the log records what the pre-filter dropped
        assert {int(p) for p, s in zip(pos, selected) if s} == set(info.indices.tolist())


def test_a_share_below_the_batch_keeps_the_batch(no_thread_leak):
    infos, embed, _ = _run(make_vector_batches(8, 8), 0.1)  # ceil(3.2) = 4 < b = 8
    assert [b.shape[0] for b in embed.learner_batches] == [8, 8]
    assert all(i.indices.numel() == 8 and i.prefiltered == 24 for i in infos)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), "0.5", True,
                                 None])
def test_bad_prefilter_values_are_refused(bad):
    with pytest.raises(ValueError, match=r"prefilter must be a number q with 0 < q <= 1"):
        JESTLoader(make_vector_batches(4, 8), TinyDual(), TinyDual(seed=1), 0.25,
                   embed=tiny_dual_embed, prefilter=bad)


def test_prefilter_needs_a_reference():
    with pytest.raises(ValueError, match="prefilter=0.5 ranks each super-batch by the reference"):
        JESTLoader(make_vector_batches(4, 8), TinyDual(), None, 0.25, embed=tiny_dual_embed,
                   criterion="hard_learner", prefilter=0.5)


def test_prefilter_is_fixed_after_construction():
    with JESTLoader(make_vector_batches(4, 8), TinyDual(), TinyDual(seed=1), 0.25,
                    embed=tiny_dual_embed, prefilter=0.5) as ld:
        assert ld.prefilter == 0.5
        with pytest.raises(AttributeError, match="build a new JESTLoader"):
            ld.prefilter = 1.0


# -- global selection: each rank pre-filters its own super-batch --------------------------------


def _global_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    out: dict = {"steps": []}
    batches = make_vector_batches(8, 8, seed=10 + rank)  # each rank its own data: 2 steps
    reference = TinyDual(seed=100)
    embed = _Counting(reference)
    with JESTLoader(batches, TinyDual(seed=0), reference, 0.25, n_chunks=2, embed=embed,
                    loss="sigmoid", prefilter=0.5, timeout=60, distributed="global") as ld:
        assert ld.stats["distributed"]["world_size"] == world
        for step, _ in enumerate(ld):
            info = ld.last_info
            xs = torch.cat([b[0] for b in batches[4 * step: 4 * step + 4]])
            ys = torch.cat([b[1] for b in batches[4 * step: 4 * step + 4]])
            top, _ = _reference_top(reference, (xs, ys), 16, "sigmoid")
            seen = embed.learner_batches[step]
            out["steps"].append({
                "learner_rows": int(seen.shape[0]),
                "learner_saw_top": set(_rows_of(seen, xs)) == top,
                "selected_in_top": set(info.indices.tolist()) <= top,
                "selected": int(info.indices.numel()),
                "prefiltered": info.prefiltered,
                "fallback": info.fallback,
            })
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
def test_global_selection_prefilters_each_rank_before_the_rounds(tmp_path):
    codes = run_ranks(_global_rank, 2, str(tmp_path / "init"), str(tmp_path))
    assert codes == [0, 0]
    for r in range(2):
        steps = json.loads((tmp_path / f"rank{r}.json").read_text())["steps"]
        assert len(steps) == 2
        for s in steps:
            assert s == {"learner_rows": 16, "learner_saw_top": True, "selected_in_top": True,
                         "selected": 8, "prefiltered": 16, "fallback": False}
