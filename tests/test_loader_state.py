"""The loader's state has one owner (the consumer's thread), its producer-read configuration is
fixed after construction, and its public hooks (set_step, register_selection_hook)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TinyDual, make_vector_batches, tiny_dual_embed
from torchdata.stateful_dataloader import StatefulDataLoader

from jeststream.loader import JESTLoader, register_selection_hook
from jeststream.superbatch import SelectionSpec

pytestmark = pytest.mark.timeout(120)


def _loader(batches, **kw):
    kw.setdefault("n_chunks", 2)
    return JESTLoader(batches, TinyDual(), TinyDual(seed=100), 0.25, embed=tiny_dual_embed, **kw)


@pytest.mark.parametrize(
    "name, value",
    [("loss", "softmax"), ("n_chunks", 4), ("temperature", 0.5), ("criterion", "hard_learner"),
     ("ratio", 0.5), ("n", 2), ("drop_last", False), ("seed", 3), ("key_fn", None),
     ("prefetch", 3), ("scoring", "sync"), ("timeout", 5.0), ("base_loader", []), ("epoch", 2)],
)
def test_producer_configuration_refuses_to_change(name, value, no_thread_leak):
    with _loader(make_vector_batches(8, 8)) as ld:
        before = getattr(ld, name)
        with pytest.raises(AttributeError, match=rf"JESTLoader\.{name} .*build a new JESTLoader"):
            setattr(ld, name, value)
        assert getattr(ld, name) == before or name == "base_loader"


def test_consumer_side_attributes_stay_settable(no_thread_leak):
    with _loader(make_vector_batches(8, 8)) as ld:
        ld.return_info = True
        batch, info = next(iter(ld))
        assert info.step == 0
        ld.last_info = None
        assert ld.last_info is None


def test_scored_ahead_batches_are_not_committed_until_yielded(no_thread_leak):
    """The producer scores ahead (prefetch=2) but the counters and b move only when a batch is
    yielded, on the consumer's thread; b from the first base batch arrives with it."""
    base = iter(make_vector_batches(16, 8))  # no batch_size: b comes from the first batch
    with _loader(base, scoring="latest", prefetch=2) as ld:
        assert ld.batch_size is None and ld.n_chunks == 2
        it = iter(ld)
        next(it)
        assert ld.batch_size == 8
        assert ld.stats["base_batches"] == 4 and ld.stats["batches"] == 1
        assert ld.state_dict()["step"] == 1
        rest = list(it)
        assert len(rest) == 3 and ld.stats["base_batches"] == 16


def test_drop_last_counts_arrive_with_the_end_of_the_pass(no_thread_leak):
    with _loader(make_vector_batches(10, 8), scoring="latest") as ld:
        assert len(list(ld)) == 2
        assert ld.stats["base_batches"] == 10 and ld.stats["dropped_examples"] == 16


def test_set_step_numbers_the_next_batch_and_respects_a_restore(no_thread_leak):
    base = StatefulDataLoader(
        [x for b in make_vector_batches(8, 4) for x in zip(*b)], batch_size=4
    )
    with _loader(base) as ld:
        ld.set_step(40)
        next(iter(ld))
        assert ld.last_info.step == 40 and ld.stats["batches"] == 41
        state = ld.state_dict()
        ld.load_state_dict(state)
        assert ld.restore_pending
        with pytest.raises(RuntimeError, match="restored state's step"):
            ld.set_step(0)
        next(iter(ld))
        assert ld.last_info.step == 41 and not ld.restore_pending
        for bad in (-1, 1.5, True, "3"):
            with pytest.raises(ValueError, match="step must be an int"):
                ld.set_step(bad)


def test_selection_hook_sees_what_the_sampler_got(no_thread_leak):
    seen = []

    def hook(step, learner, reference, indices):
        seen.append((step, learner.image.shape[0], reference.image.shape[0], indices.clone()))

    with register_selection_hook(hook):
        with _loader(make_vector_batches(8, 8), scoring="sync") as ld:
            infos = []
            for _ in ld:
                infos.append(ld.last_info)
    assert [s[0] for s in seen] == [0, 1]
    for (step, n_learner, n_reference, idx), info in zip(seen, infos):
        assert step == info.step
        assert n_learner == n_reference == 32
        assert torch.equal(idx, info.indices)
    with _loader(make_vector_batches(8, 8), scoring="sync") as ld:
        list(ld)
    assert len(seen) == 2  # removed with the with block
    with pytest.raises(TypeError, match="hook must be callable"):
        register_selection_hook(3)


def test_selection_spec_validates_once():
    for kw, match in [
        ({"loss": "hinge"}, "loss="),
        ({"criterion": "x"}, "criterion="),
        ({"n_chunks": 0}, "n_chunks"),
        ({"temperature": float("nan")}, "temperature"),
        ({"on_bad_scores": "skip"}, "on_bad_scores"),
    ]:
        with pytest.raises(ValueError, match=match):
            SelectionSpec(**kw)
    spec = SelectionSpec()
    assert spec.for_batch(8).n_chunks == 8 and spec.for_batch(64).n_chunks == 16
    assert SelectionSpec(n_chunks=4).for_batch(64).n_chunks == 4
    with pytest.raises(ValueError, match="exceeds the batch size"):
        SelectionSpec(n_chunks=9).check_batch_size(8, "test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.loss = "softmax"
