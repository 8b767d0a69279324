"""Repeatable and durable runs: deterministic asynchronous scoring, exact resume while the learner
trains, a selection log a checkpoint covers, and the loader's failure modes (issue: reproducible
and durable). Every learner here trains between batches, as in a real run."""

from __future__ import annotations

import copy
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import ResumableList, TinyDual, make_vector_batches, tiny_dual_embed

from jeststream import JESTLoader
from jeststream.snapshot import LearnerSnapshot, scheduled_step

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stateful_base(n: int = 96, b: int = 4):
    """A shuffling StatefulDataLoader whose order is a function of the epoch, as under torchrun
    (a generator-shuffled one reshuffles the epoch after a mid-epoch restore differently)."""
    from torch.utils.data.distributed import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 12, generator=g), torch.randn(n, 12, generator=g))
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=7)
    return StatefulDataLoader(ds, batch_size=b, sampler=sampler)


def _train(learner: torch.nn.Module, batch) -> None:
    """A deterministic 'optimizer step' that depends on the batch trained on."""
    with torch.no_grad():
        learner.img[0].weight.add_(0.3 * batch[0].mean())
        learner.txt[0].weight.sub_(0.3 * batch[1].mean())
        learner.logit_scale.add_(0.05)


def _jittery_embed(seed: int):
    """tiny_dual_embed with random sleeps: thread timing differs from run to run."""
    rng = random.Random(seed)

    def embed(model, batch):
        time.sleep(rng.random() * 0.004)
        return tiny_dual_embed(model, batch)

    return embed


def _run(ld, learner, steps=None):
    out = []
    for i, (batch, info) in enumerate(ld):
        out.append((info.step, info.indices.clone(), info.staleness))
        _train(learner, batch)
        if steps is not None and i + 1 == steps:
            break
    return out


# -- deterministic scoring ------------------------------------------------------------------


@pytest.mark.parametrize("refresh_every", [0, 1, 3])
def test_deterministic_async_repeats_whatever_the_thread_timing(refresh_every, no_thread_leak):
    runs = []
    for async_scoring, jitter in ((True, 1), (True, 2), (False, 3)):
        learner = TinyDual(seed=0)
        with JESTLoader(
            make_vector_batches(40, 8), learner, TinyDual(seed=1), 0.25, n_chunks=2,
            embed=_jittery_embed(jitter), async_scoring=async_scoring, deterministic=True,
            refresh_every=refresh_every, prefetch=2, seed=5, return_info=True,
        ) as ld:
            runs.append(_run(ld, learner))
            assert ld._snapshot.copies <= 3  # prefetch + 1 copies at most
    assert len(runs[0]) == 10
    for other in runs[1:]:
        for (s0, i0, st0), (s1, i1, st1) in zip(runs[0], other):
            assert s0 == s1 and st0 == st1 and torch.equal(i0, i1), s0
    # staleness is the schedule's, exactly: super-batch t scored after step scheduled_step(t)
    for step, _, staleness in runs[0]:
        s = scheduled_step(step, start=0, lag=2, refresh_every=refresh_every)
        assert staleness == step - s


def test_deterministic_selection_depends_on_the_trained_weights(no_thread_leak):
    """Not a constant schedule in disguise: a learner that trains differently selects
    differently (the snapshot is the learner's, lagged)."""

    def run(scale):
        learner = TinyDual(seed=0)
        with JESTLoader(
            make_vector_batches(24, 8), learner, TinyDual(seed=1), 0.25, n_chunks=2,
            embed=tiny_dual_embed, deterministic=True, seed=5, return_info=True,
        ) as ld:
            out = []
            for _, info in ld:
                out.append(info.indices.clone())
                with torch.no_grad():
                    for p in learner.parameters():
                        p.mul_(scale)
            return out

    a, b = run(1.0), run(-1.0)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))  # lag 2: same start weights
    assert any(not torch.equal(x, y) for x, y in zip(a[2:], b[2:]))


def test_refresh_never_waits_for_a_forward():
    """A forward holds one copy; the refresh writes the other (it would time out if it waited)."""
    live = TinyDual(seed=0)
    snap = LearnerSnapshot(live, max_copies=2, timeout=5.0)
    holding, release = threading.Event(), threading.Event()
    seen = []

    def forward():
        with snap.use() as (module, version):
            holding.set()
            release.wait(10)
            seen.append((version, module.img[0].weight.clone()))

    t = threading.Thread(target=forward)
    t.start()
    assert holding.wait(10)
    with torch.no_grad():
        live.img[0].weight.add_(1.0)
    assert snap.refresh(1) == 1  # returns while the forward still holds version 0
    assert torch.equal(snap.module.img[0].weight, live.img[0].weight)
    release.set()
    t.join(10)
    assert seen[0][0] == 0 and not torch.equal(seen[0][1], live.img[0].weight)


def test_scheduled_snapshot_waits_until_taken_and_times_out():
    snap = LearnerSnapshot(TinyDual(), max_copies=3, timeout=0.3)
    with pytest.raises(TimeoutError, match="snapshot of step 2"):
        with snap.use(2):
            pass
    snap.refresh(2)
    with snap.use(2) as (_, version):
        assert version == 1


# -- exact resume while the learner trains -----------------------------------------------------

_MODES = [
    pytest.param(False, False, id="sync"),
    pytest.param(False, True, id="sync-deterministic"),
    pytest.param(True, True, id="async-deterministic"),
]


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-boundary"])
@pytest.mark.parametrize("refresh_every", [0, 1, 3])
@pytest.mark.parametrize("async_scoring,deterministic", _MODES)
def test_resume_while_the_learner_trains_is_exact(
    async_scoring, deterministic, refresh_every, where, no_thread_leak
):
    def make(learner):
        return JESTLoader(
            _stateful_base(), learner, TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed,
            async_scoring=async_scoring, deterministic=deterministic, refresh_every=refresh_every,
            prefetch=2, seed=3, return_info=True,
        )

    def epochs(ld, learner, first_epoch, stop_after=None, last_epoch=1):
        out = []
        for epoch in range(first_epoch, last_epoch + 1):
            ld.set_epoch(epoch)
            for batch, info in ld:
                out.append((info.step, info.indices.clone(), batch[0].clone()))
                _train(learner, batch)
                if stop_after is not None and len(out) == stop_after:
                    return out
        return out

    learner = TinyDual(seed=0)
    with make(learner) as ld:
        full = epochs(ld, learner, 0)
    assert len(full) == 12  # 96 examples / (4 * 4) per super-batch, 2 epochs

    learner = TinyDual(seed=0)
    ld = make(learner)
    if where == "mid-epoch":
        done = epochs(ld, learner, 0, stop_after=4)
    else:
        done = epochs(ld, learner, 0, last_epoch=0)  # the pass ran out: the state is its end
    state = copy.deepcopy(ld.state_dict(include_snapshot=True))
    weights = copy.deepcopy(learner.state_dict())
    ld.close()

    learner = TinyDual(seed=0)
    learner.load_state_dict(weights)
    with make(learner) as resumed:
        resumed.load_state_dict(state)
        if where == "mid-epoch":
            rest = []
            for batch, info in resumed:  # the rest of epoch 0, then epoch 1
                rest.append((info.step, info.indices.clone(), batch[0].clone()))
                _train(learner, batch)
            rest += epochs(resumed, learner, 1)
        else:
            rest = epochs(resumed, learner, 1)
    assert [s for s, _, _ in done + rest] == list(range(12))
    for (s0, i0, x0), (s1, i1, x1) in zip(full, done + rest):
        assert s0 == s1 and torch.equal(i0, i1) and torch.equal(x0, x1), f"step {s0}"


def test_snapshot_in_the_state_is_opt_in_and_restores_the_scheduled_versions():
    learner = TinyDual(seed=0)
    ld = JESTLoader(
        _stateful_base(), learner, TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed,
        deterministic=True, prefetch=2, return_info=True,
    )
    it = iter(ld)
    for _ in range(4):
        batch, _ = next(it)
        _train(learner, batch)
    assert "snapshot" not in ld.state_dict()
    snap = ld.state_dict(include_snapshot=True)["snapshot"]
    # super-batches 4 and 5 are scheduled for the snapshots after steps 2 and 3
    assert [v["step"] for v in snap["versions"]] == [2, 3]
    ld.close()


# -- the selection log survives a kill ---------------------------------------------------------


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import ResumableList, TinyDual, make_vector_batches, tiny_dual_embed
    from jeststream import JESTLoader

    ld = JESTLoader(ResumableList(make_vector_batches(40, 8)), TinyDual(), TinyDual(seed=1), 0.25,
                    n_chunks=2, embed=tiny_dual_embed, selection_log={log!r}, seed=1)
    for step, batch in enumerate(ld):
        if step == 3:
            torch.save(ld.state_dict(), {ckpt!r})
        if step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_kill_after_a_checkpoint_loses_nothing_it_covered(tmp_path, suffix):
    from jeststream.selection_log import read_selection_log

    log, ckpt = str(tmp_path / f"sel{suffix}"), str(tmp_path / "ckpt.pt")
    code = _CHILD.format(tests=os.path.join(_ROOT, "tests"), log=log, ckpt=ckpt)
    proc = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    cols = read_selection_log(log)
    steps = sorted(set(cols["step"].tolist()))
    assert steps[:4] == [0, 1, 2, 3]  # everything the checkpoint (after step 3) covered
    assert len(cols["step"]) == 32 * len(steps)

    # resume from the checkpoint: the log grows, nothing is rewritten, every step once
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 4

    with JESTLoader(
        ResumableList(make_vector_batches(40, 8)), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2,
        embed=tiny_dual_embed, selection_log=log, seed=1,
    ) as ld:
        ld.load_state_dict(state)
        assert len(list(ld)) == 6
    cols = read_selection_log(log)
    assert sorted(set(cols["step"].tolist())) == list(range(10))
    assert len(cols["step"]) == 320


# -- failure modes -------------------------------------------------------------------------


def test_a_failing_next_keeps_the_state_and_stops_the_threads(tmp_path, no_thread_leak):
    calls = []

    def key_fn(batch):
        calls.append(1)
        n = len(batch[0])
        return [f"k{len(calls)}_{i}" for i in range(n - (1 if len(calls) == 3 else 0))]

    ld = JESTLoader(
        make_vector_batches(24, 8), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2,
        embed=tiny_dual_embed, selection_log=tmp_path / "log.jsonl", key_fn=key_fn,
    )
    got = 0
    with pytest.raises(ValueError, match="31|keys"):
        for _ in ld:
            got += 1
    assert got == 2
    assert ld.state_dict()["step"] == 2 and ld.stats["batches"] == 2
    ld.close()


def test_a_failing_log_write_does_not_advance_the_state(tmp_path, monkeypatch, no_thread_leak):
    from jeststream import selection_log

    real = selection_log.SelectionLog.write

    def write(self, **kw):
        if kw["step"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, **kw)

    monkeypatch.setattr(selection_log.SelectionLog, "write", write)
    ld = JESTLoader(
        make_vector_batches(24, 8), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2,
        embed=tiny_dual_embed, selection_log=tmp_path / "log.jsonl",
    )
    it = iter(ld)
    next(it), next(it)
    with pytest.raises(OSError, match="No space"):
        next(it)
    assert ld.state_dict()["step"] == 2
    ld.close()


@pytest.mark.parametrize("async_scoring", [True, False])
def test_break_then_a_new_pass_draws_as_a_fresh_boundary(async_scoring, no_thread_leak):
    def passes():
        ld = JESTLoader(
            make_vector_batches(24, 8), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2,
            embed=tiny_dual_embed, async_scoring=async_scoring, prefetch=3, seed=9,
            return_info=True,
        )
        with ld:
            it = iter(ld)
            first = [next(it)[1].indices for _ in range(2)]
            time.sleep(0.2)  # let the producer score (and draw for) super-batches ahead
            del it
            second = [info.indices for _, info in ld]
        return first, second

    ref_first, ref_second = [], []
    ld = JESTLoader(
        make_vector_batches(24, 8), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2,
        embed=tiny_dual_embed, async_scoring=False, seed=9, return_info=True,
    )
    with ld:
        it = iter(ld)
        ref_first = [next(it)[1].indices for _ in range(2)]
        ref_second = [info.indices for _, info in ld]
    first, second = passes()
    assert all(torch.equal(a, b) for a, b in zip(first + second, ref_first + ref_second))


def test_set_epoch_mid_pass_keeps_the_pass_consistent(no_thread_leak):
    ld = JESTLoader(
        _stateful_base(), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed,
        return_info=True, seed=2,
    )
    it = iter(ld)
    next(it)
    boundary = ld.state_dict()
    ld.set_epoch(5)
    _, info = next(it)
    assert info.epoch == 0  # the running pass keeps its epoch
    state = ld.state_dict()
    assert state["epoch"] == 0 and state["pending_epoch"] == 5 and state["step"] == 2
    assert not torch.equal(state["generator"], boundary["generator"])  # the pass's own position
    ld.close()
    restored = JESTLoader(
        _stateful_base(), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed,
        return_info=True, seed=2,
    )
    restored.load_state_dict(state)
    assert restored.epoch == 5
    _, info = next(iter(restored))
    assert info.epoch == 5
    restored.close()


def test_default_n_chunks_fits_small_batches():
    ld = JESTLoader(make_vector_batches(8, 8), TinyDual(), TinyDual(seed=1), 0.25, embed=tiny_dual_embed)
    assert len(list(ld)) == 2 and ld.n_chunks == 8
    with pytest.raises(ValueError, match="n_chunks=16 exceeds the batch size b=8"):
        JESTLoader(
            torch.utils.data.DataLoader(list(range(16)), batch_size=8), TinyDual(), TinyDual(seed=1),
            0.25, n_chunks=16, embed=tiny_dual_embed,
        )
    big = JESTLoader(
        torch.utils.data.DataLoader(list(range(64)), batch_size=32), TinyDual(), TinyDual(seed=1),
        0.25, embed=tiny_dual_embed,
    )
    assert big.n_chunks == 16


def test_empty_or_short_base_warns_and_drop_last_counts(caplog, no_thread_leak):
    for base in ([], make_vector_batches(3, 8)):
        with caplog.at_level(logging.WARNING, logger="jeststream.loader"):
            caplog.clear()
            with JESTLoader(base, TinyDual(), TinyDual(seed=1), 0.25, embed=tiny_dual_embed) as ld:
                assert list(ld) == []
        assert "yielded no batch" in caplog.text and f"gave {len(base)} base batch" in caplog.text
    with JESTLoader(
        make_vector_batches(10, 8), TinyDual(), TinyDual(seed=1), 0.25, embed=tiny_dual_embed
    ) as ld:
        assert len(list(ld)) == 2
        assert ld.stats["dropped_examples"] == 16 and ld.stats["base_batches"] == 10


class _Hanging:
    """A base loader whose second batch never comes (until released)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __iter__(self):
        for i, b in enumerate(make_vector_batches(8, 8)):
            if i == 5:
                self.release.wait(30)
                return
            yield b


@pytest.mark.parametrize("async_scoring", [True, False])
def test_timeout_names_the_stuck_stage(async_scoring, no_thread_leak):
    """Also with synchronous scoring, where timeout= was ignored: a hung base blocked for ever."""
    base = _Hanging()
    ld = JESTLoader(base, TinyDual(), TinyDual(seed=1), 0.25, embed=tiny_dual_embed, timeout=0.5,
                    scoring="latest" if async_scoring else "sync")
    it = iter(ld)
    next(it)
    with pytest.raises(TimeoutError, match=r"timeout=0.5s.*next\(\) on the base loader"):
        next(it)
    base.release.set()  # a thread stuck in user code can only stop once that code returns
    ld.close()
    with pytest.raises(ValueError, match="timeout"):
        JESTLoader([], TinyDual(), TinyDual(seed=1), 0.25, embed=tiny_dual_embed, timeout=0)


@pytest.mark.parametrize("async_scoring", [True, False])
def test_timeout_names_a_hung_scoring_forward(async_scoring, no_thread_leak):
    release = threading.Event()
    calls = []

    def embed(model, batch):
        calls.append(1)
        if len(calls) > 2:  # the second super-batch's forward hangs
            release.wait(30)
        return tiny_dual_embed(model, batch)

    ld = JESTLoader(
        make_vector_batches(16, 8), TinyDual(), TinyDual(seed=1), 0.25, embed=embed,
        timeout=0.5, prefetch=1, scoring="latest" if async_scoring else "sync",
    )
    it = iter(ld)
    next(it)
    with pytest.raises(TimeoutError, match="stuck in: scoring step 1"):
        next(it)
    release.set()
    ld.close()


class _Slow:
    """A base loader whose next() sleeps ``delay`` seconds before batch ``at``."""

    def __init__(self, delay: float, at: int) -> None:
        self.delay, self.at = delay, at

    def __iter__(self):
        for i, b in enumerate(make_vector_batches(8, 8)):
            if i == self.at:
                time.sleep(self.delay)
            yield b


def test_sync_timeout_raises_on_a_slow_base_and_leaves_no_thread(no_thread_leak):
    ld = JESTLoader(_Slow(1.5, at=5), TinyDual(), TinyDual(seed=1), 0.25, embed=tiny_dual_embed,
                    timeout=0.3, async_scoring=False)
    it = iter(ld)
    next(it)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        next(it)
    assert time.monotonic() - t0 < 1.4  # the deadline, not the sleep
    assert "timeout=0.3s" in str(ei.value)
    assert "stuck in: next() on the base loader (base batch 2 of 4 for step 1)" in str(ei.value)
    with pytest.raises(StopIteration):  # the pass is over (its iterator closed)
        next(it)
    ld.close()  # the sleeping worker ends with its sleep (no_thread_leak waits for it)


def test_sync_timeout_changes_nothing_when_in_time(no_thread_leak):
    """A step within the deadline: the same batches as without a timeout, no thread after."""
    def run(**kw):
        with JESTLoader(_Slow(0.05, at=5), TinyDual(), TinyDual(seed=1), 0.25,
                        embed=tiny_dual_embed, async_scoring=False, return_info=True,
                        **kw) as ld:
            out = [info.indices.tolist() for _, info in ld]
            assert not [t for t in threading.enumerate() if t.name.startswith("jeststream")]
            return out

    assert run(timeout=5.0) == run() and len(run()) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_first_forward_waits_on_the_consumer_stream_cuda():
    """Weights written on the consumer's stream just before the pass (a checkpoint load) are
    what the first scoring forward reads."""
    learner = TinyDual(seed=0).cuda()
    ld = JESTLoader(
        [tuple(t.cuda() for t in b) for b in make_vector_batches(8, 8)], learner,
        TinyDual(seed=1).cuda(), 0.25, embed=tiny_dual_embed, return_info=True,
    )
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        learner.img[0].weight.fill_(0.25)
    _, info = next(iter(ld))
    assert torch.all(ld._snapshot.module.img[0].weight == 0.25)
    ld.close()


@pytest.mark.soak
@pytest.mark.parametrize("trial", range(20))
def test_soak_random_interruptions_resume_exactly(trial, no_thread_leak):
    """Deterministic async runs over 3 epochs, checkpointed and restored at random steps
    (several times per run, with jittery scoring), equal the uninterrupted run step for step."""
    rng = random.Random(trial)
    refresh_every = rng.choice([0, 1, 2, 3])
    prefetch = rng.choice([1, 2, 3])

    def make(learner, jitter):
        return JESTLoader(
            _stateful_base(), learner, TinyDual(seed=1), 0.25, n_chunks=2,
            embed=_jittery_embed(jitter), deterministic=True, refresh_every=refresh_every,
            prefetch=prefetch, seed=trial, return_info=True,
        )

    learner = TinyDual(seed=0)
    full = []
    with make(learner, -1) as ld:
        for epoch in range(3):
            ld.set_epoch(epoch)
            for batch, info in ld:
                full.append(info.indices.clone())
                _train(learner, batch)
    # checkpoints in the middle of passes (at a pass end the state is the next pass's start)
    cuts = sorted(rng.sample([c for c in range(1, 18) if c % 6], 3)) + [18]
    got, state, weights = [], None, None
    for jitter, stop in enumerate(cuts):
        learner = TinyDual(seed=0)
        if weights is not None:
            learner.load_state_dict(weights)
        ld = make(learner, jitter)
        if state is not None:
            ld.load_state_dict(state)
        while len(got) < stop:
            ld.set_epoch(len(got) // 6)  # 6 super-batches an epoch; as a training loop does
            for batch, info in ld:
                got.append(info.indices.clone())
                _train(learner, batch)
                if len(got) == stop:
                    break
        state = copy.deepcopy(ld.state_dict(include_snapshot=True))
        weights = copy.deepcopy(learner.state_dict())
        ld.close()
    assert len(got) == len(full) == 18
    bad = [i for i, (a, b) in enumerate(zip(full, got)) if not torch.equal(a, b)]
    assert not bad, (refresh_every, prefetch, cuts, bad)


@pytest.mark.parametrize("async_scoring", [True, False])
def test_restore_an_earlier_state_into_a_loader_that_ran_past_it(async_scoring, no_thread_leak):
    """The snapshot copies of the later steps belong to the abandoned timeline: the restore
    does not wait for them (it would time out)."""
    ld = JESTLoader(
        _stateful_base(), TinyDual(), TinyDual(seed=1), 0.25, n_chunks=2, embed=tiny_dual_embed,
        async_scoring=async_scoring, timeout=5.0, return_info=True,
    )
    with ld:
        it = iter(ld)
        for _ in range(2):
            next(it)
        state = ld.state_dict()
        rest = [info.indices for _, info in it]
        ld.set_epoch(1)
        assert len(list(ld)) == 6
        ld.load_state_dict(state)
        ld.set_epoch(0)  # as a training loop does after a restore (the sampler is at epoch 1)
        again = [info.indices for _, info in ld]
    assert len(again) == 4 and all(torch.equal(a, b) for a, b in zip(rest, again))


# -- restores in awkward places (found in review) ---------------------------------------------


def test_restore_without_weights_scores_with_the_restored_learner_not_the_initial_one():
    """reset_steps forgets every old version, so the restored learner (copied at the restore)
    stands in for the older scheduled snapshots, never the construction-time weights."""
    live = TinyDual(seed=0)
    snap = LearnerSnapshot(live, max_copies=3)
    with torch.no_grad():  # the checkpoint loaded into the model after the loader was built
        for p in live.parameters():
            p.add_(100.0)
    snap.reset_steps(10)
    snap.release_before(10)
    snap.refresh(10)
    scheduled = scheduled_step(10, start=0, lag=2, refresh_every=4)
    snap.release_before(scheduled)
    with snap.use(scheduled) as (module, _):
        assert torch.equal(module.img[0].weight, live.img[0].weight)


def test_emergency_checkpoint_after_a_failed_next_resumes_without_waiting(no_thread_leak):
    """next() at a refresh step fails after the refresh: the saved state holds the snapshot of
    that very step, and the resumed loader re-takes it instead of waiting for a free copy."""
    reference, calls = TinyDual(seed=1), []

    def flaky(model, batch):
        if model is not reference:
            calls.append(1)
            if len(calls) == 6:
                raise RuntimeError("transient failure")
        return tiny_dual_embed(model, batch)

    def make(embed, ref):
        return JESTLoader(
            ResumableList(make_vector_batches(40, 8)), TinyDual(seed=0), ref, 0.25, n_chunks=2,
            embed=embed, deterministic=True, prefetch=2, seed=5, timeout=5.0,
        )

    ld = make(flaky, reference)
    with pytest.raises(RuntimeError, match="transient"):
        for _ in ld:
            pass
    state = ld.state_dict(include_snapshot=True)
    ld.close()
    assert [v["step"] for v in state["snapshot"]["versions"]] == [3, 4, 5]
    with make(tiny_dual_embed, TinyDual(seed=1)) as resumed:
        resumed.load_state_dict(state)
        assert len(list(resumed)) == 5


def test_iterating_twice_after_a_restore_draws_as_once(no_thread_leak):
    """An iterator dropped before its first batch (a timeout, a peek) drew base batches and
    generator draws; the next iter() starts again from the restored boundary."""

    def make():
        return JESTLoader(
            ResumableList(make_vector_batches(40, 8)), TinyDual(seed=0), TinyDual(seed=1), 0.25,
            n_chunks=2, embed=tiny_dual_embed, deterministic=True, prefetch=2, seed=5,
            return_info=True,
        )

    ld = make()
    it = iter(ld)
    for _ in range(3):
        next(it)
    state = copy.deepcopy(ld.state_dict(include_snapshot=True))
    ld.close()

    def rest(double):
        with make() as ld2:
            ld2.load_state_dict(copy.deepcopy(state))
            if double:
                first = iter(ld2)
                time.sleep(0.3)  # its producer scores ahead
                first.close()
            return [info.indices for _, info in ld2]

    once, twice = rest(False), rest(True)
    assert len(once) == len(twice) == 7
    assert all(torch.equal(a, b) for a, b in zip(once, twice))


class _EpochList(ResumableList):
    def __iter__(self):
        yield from super().__iter__()
        self.pos = 0  # the next pass is a new epoch


def test_a_restored_pass_with_nothing_left_ends_it_and_the_next_epoch_starts_afresh(no_thread_leak):
    """A checkpoint after an epoch's last batch (before StopIteration) is mid-pass; after the
    restore that pass yields nothing, and the next epoch must be a new pass, as uninterrupted."""

    def make(learner):
        return JESTLoader(
            _EpochList(make_vector_batches(16, 8)), learner, TinyDual(seed=1), 0.25, n_chunks=2,
            embed=tiny_dual_embed, deterministic=True, prefetch=2, seed=5, return_info=True,
            async_scoring=False,
        )

    learner, full, ck = TinyDual(seed=0), {}, None
    ld = make(learner)
    for epoch in range(2):
        ld.set_epoch(epoch)
        for i, (batch, info) in enumerate(ld):
            full[info.step] = (info.staleness, info.indices)
            _train(learner, batch)
            if epoch == 0 and i == 3:
                ck = (copy.deepcopy(ld.state_dict(include_snapshot=True)),
                      copy.deepcopy(learner.state_dict()))
    ld.close()
    learner = TinyDual(seed=0)
    learner.load_state_dict(ck[1])
    got = {}
    with make(learner) as resumed:
        resumed.load_state_dict(ck[0])
        for epoch in (0, 1):
            resumed.set_epoch(epoch)
            for batch, info in resumed:
                got[info.step] = (info.staleness, info.indices)
                _train(learner, batch)
    assert sorted(got) == [4, 5, 6, 7]
    for step, (staleness, idx) in got.items():
        assert staleness == full[step][0] and torch.equal(idx, full[step][1]), step


def test_a_failed_snapshot_restore_leaves_the_pool_usable():
    snap = LearnerSnapshot(TinyDual(seed=0), max_copies=2)
    bad = {"versions": [{"version": 1, "step": 0, "tensors": {"p:nope": torch.zeros(1)}}]}
    with pytest.raises(ValueError, match="does not match"):
        snap.load_state_dict(bad)
    with snap.use() as (_, version):  # still published: it would wait for ever otherwise
        assert version == 0
