"""JESTNode in torchdata.nodes graphs, and JESTLoader over a StatefulDataLoader base: batch
sizes, unique keys, exact resume checked the way torchdata checks its own nodes, and the thread
rule (worker-thread nodes go below JESTNode, never around it)."""

from __future__ import annotations

import threading

import open_clip  # noqa: F401 -- dev extra: a missing one must fail, not skip
import pytest
import torch
import torchdata  # noqa: F401 -- dev extra: a missing one must fail, not skip
from conftest import TinyDual, tiny_dual_embed
from torch.utils.data import Dataset, SequentialSampler
from torchdata.nodes import (
    Batcher,
    Loader,
    Mapper,
    MapStyleWrapper,
    ParallelMapper,
    PinMemory,
    Prefetcher,
)
from torchdata.stateful_dataloader import StatefulDataLoader

from jeststream.adapters.torchdata import WORKING_COMPOSITION, JESTNode
from jeststream.loader import JESTLoader

B = 4
N = 48
CTX = 16
D_IN = 12
EPOCH = N // (2 * B)  # yielded batches per epoch at ratio 0.5


class PairDataset(Dataset):
    """Deterministic image-token pairs with string keys (a map-style dataset)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, 32, 32, generator=g)
        tokens = torch.randint(1, 64, (CTX,), generator=g)
        return image, tokens, f"p{i:03d}"


class VectorDataset(Dataset):
    """Deterministic (x, y, key) pairs for TinyDual: the fast model for state tests."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(1000 + i)
        return torch.randn(D_IN, generator=g), torch.randn(D_IN, generator=g), f"v{i:03d}"


def collate(samples):
    first, second, keys = zip(*samples)
    return torch.stack(first), torch.stack(second), list(keys)


@pytest.fixture(scope="module")
def duals():
    # The learner does not train in these tests: each restore must then reproduce the run
    # exactly whatever the snapshot schedule (the training case is tests/test_loader.py's).
    return TinyDual(d_in=D_IN, seed=0), TinyDual(d_in=D_IN, seed=1)


def base_node(ds: Dataset, *, prefetch: bool):
    node = MapStyleWrapper(ds, sampler=SequentialSampler(ds))
    node = Mapper(Batcher(node, batch_size=B), collate)
    return Prefetcher(node, prefetch_factor=2) if prefetch else node


def make_node(models, *, prefetch: bool = True, **kw):
    """The documented composition (tiny open_clip models): prefetching below JESTNode."""
    src = base_node(PairDataset(), prefetch=prefetch)
    return JESTNode(src, models[0], models[1], ratio=0.5, n_chunks=2, seed=1, **kw)


def make_dual_node(duals, *, prefetch: bool = True, async_scoring: bool = True, **kw):
    src = base_node(VectorDataset(), prefetch=prefetch)
    kw = {"embed": tiny_dual_embed, "async_scoring": async_scoring, **kw}
    return JESTNode(src, duals[0], duals[1], ratio=0.5, n_chunks=2, seed=1, **kw)


def assert_same(got, want, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} batches, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w), f"{what}: batch {i} structure"
        for a, b in zip(g, w):
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            assert same, f"{what}: batch {i} differs"


def run_test_save_load_state(make, midpoint: int) -> None:
    """torchdata's test/nodes/utils.py ``run_test_save_load_state`` for a root-node factory.

    Runs two epochs through a Loader, taking ``state_dict()`` at the start, at ``midpoint`` of
    each epoch, after the last batch of epoch 0 and after its end; every restore goes into a
    fresh Loader over a fresh node (as after a crash) and must continue exactly. (torchdata's
    helper also restores into its running loader: see test_jestnode_restore_into_used_loader.)
    """
    nodes = []

    def loader(**kw) -> Loader:
        nodes.append(make())
        return Loader(nodes[-1], **kw)

    try:
        x = loader()
        initial = x.state_dict()
        it = iter(x)
        epoch0 = [next(it) for _ in range(midpoint)]
        mid0 = x.state_dict()
        for batch in it:
            epoch0.append(batch)
            last0 = x.state_dict()  # after the last batch, before the loader sees the end
        end0 = x.state_dict()
        it = iter(x)
        epoch1 = [next(it) for _ in range(midpoint)]
        mid1 = x.state_dict()
        epoch1 += list(it)
        assert len(epoch0) == len(epoch1) == EPOCH > midpoint
        assert [b[-1] for b in epoch0] != [b[-1] for b in epoch1]  # epochs tell apart

        # (a) mid-epoch: the rest of the epoch, then the same next epoch
        y = loader()
        y.load_state_dict(mid0)
        assert_same(list(y), epoch0[midpoint:], "restored mid-epoch 0")
        assert_same(list(y), epoch1, "epoch 1 after the mid-epoch restore")

        # (b) a resumed run saves again; a third loader restores that state
        y = loader()
        y.load_state_dict(mid0)
        it = iter(y)
        head = [next(it)]
        again = y.state_dict()
        del it
        z = loader()
        z.load_state_dict(again)
        assert_same(head + list(z), epoch0[midpoint:], "restored from a resumed run's state")
        assert_same(list(z), epoch1, "epoch 1 after the second restore")

        # (c) end of epoch 0: nothing of it is left, and the next epoch is the original's
        for name, state in (("after the last batch", last0), ("after the end", end0)):
            y = loader(restart_on_stop_iteration=False)
            y.load_state_dict(state)
            assert list(y) == [], f"restored {name} of epoch 0 (no restart)"
            assert_same(list(y), epoch1, f"epoch 1 after a restore {name} of epoch 0")
            y = loader()
            y.load_state_dict(state)
            assert_same(list(y), epoch1, f"restored {name} of epoch 0 (restart)")

        y = loader()
        y.load_state_dict(mid1)
        assert_same(list(y), epoch1[midpoint:], "restored mid-epoch 1")
        y = loader()
        y.load_state_dict(initial)
        assert_same(list(y), epoch0, "restored the initial state")
        assert_same(list(y), epoch1, "epoch 1 after restoring the initial state")
    finally:
        for node in nodes:
            node.close()


def test_jestnode_epoch(models, no_thread_leak):
    loader = Loader(make_node(models))
    for _ in range(2):  # two epochs through Loader's reset
        keys = []
        for images, tokens, ks in loader:
            assert images.shape == (B, 3, 32, 32) and tokens.shape == (B, CTX) and len(ks) == B
            keys.extend(ks)
        assert len(keys) == N // 2 and len(set(keys)) == len(keys)
        assert set(keys) <= {f"p{i:03d}" for i in range(N)}
    loader.root.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_jestnode_mid_epoch_resume(models, prefetch, no_thread_leak):
    nodes = [make_node(models, prefetch=prefetch) for _ in range(3)]
    try:
        full = [ks for _, _, ks in Loader(nodes[0])]
        assert len(full) == EPOCH

        loader = Loader(nodes[1])
        it = iter(loader)
        head = [next(it)[2] for _ in range(2)]
        state = loader.state_dict()

        fresh = Loader(nodes[2])
        fresh.load_state_dict(state)
        tail = [ks for _, _, ks in fresh]
        assert head + tail == full
    finally:
        for node in nodes:
            node.close()


@pytest.mark.parametrize("async_scoring", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetched-source"])
def test_jestnode_save_load_state(duals, async_scoring, prefetch, no_thread_leak):
    run_test_save_load_state(
        lambda: make_dual_node(duals, prefetch=prefetch, async_scoring=async_scoring),
        midpoint=2,
    )


def test_jestnode_save_load_state_with_snapshot(duals, no_thread_leak):
    # deterministic scoring schedule, snapshot weights in the state: still torchdata-exact
    run_test_save_load_state(
        lambda: make_dual_node(duals, deterministic=True, include_snapshot=True, refresh_every=2),
        midpoint=3,
    )


@pytest.mark.parametrize("async_scoring", [False, True])
def test_jestnode_restore_into_used_loader(duals, async_scoring, no_thread_leak):
    # torchdata's run_test_save_load_state restores into the loader it has been iterating; a
    # restore to an earlier step must not wait for snapshot copies of the later ones (timeout=
    # turns such a wait into an error)
    node = make_dual_node(duals, async_scoring=async_scoring, timeout=5.0)
    try:
        x = Loader(node)
        it = iter(x)
        epoch0 = [next(it) for _ in range(2)]
        mid0 = x.state_dict()
        epoch0 += list(it)
        list(x)  # epoch 1
        x.load_state_dict(mid0)
        assert_same(list(x), epoch0[2:], "restored into the used loader")
    finally:
        node.close()


def test_jestnode_state_layout(duals):
    node = make_dual_node(duals, prefetch=False, async_scoring=False)
    state = node.state_dict()  # torchdata's layout: the source's state under "source"
    assert set(state) == {"source", "jest"} and "base" not in state["jest"]
    assert state["source"] == node.source.state_dict()
    want = [next(node) for _ in range(2)]
    node.close()

    # a state from before the layout (the source's state inside "jest" as "base") still loads
    old = {"jest": {**state["jest"], "base": state["source"]}}
    node = make_dual_node(duals, prefetch=False, async_scoring=False)
    node.reset(old)
    assert_same([next(node) for _ in range(2)], want, "restored from the old layout")
    node.close()


def test_jestnode_exposes_loader_state(models, tmp_path):
    node = make_node(models, prefetch=False, return_info=True, selection_log=tmp_path / "l.jsonl")
    batch, info = next(node)
    assert info.step == 0 and info.super_batch_size == 2 * B
    assert node.last_info is info and node.stats["batches"] == 1
    assert node.state_dict()["jest"]["step"] == 1
    node.close()
    with pytest.raises(TypeError, match="IterableWrapper"):
        JESTNode([1, 2], models[0], models[1])
    with pytest.raises(TypeError, match="training_thread"):
        make_node(models, prefetch=False, training_thread="main")
    with pytest.raises(ValueError, match="not a JESTNode state"):
        make_node(models, prefetch=False).reset({"x": 1})


WORKER_THREAD_WRAPPERS = [
    pytest.param(lambda node: Prefetcher(node, prefetch_factor=2), id="Prefetcher"),
    pytest.param(
        lambda node: ParallelMapper(node, map_fn=lambda b: b, num_workers=2, method="thread"),
        id="ParallelMapper-thread",
    ),
    pytest.param(
        lambda node: PinMemory(node),
        id="PinMemory",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="PinMemory needs CUDA"),
    ),
]


@pytest.mark.timeout(60)  # a hang here is the bug
@pytest.mark.parametrize("wrap", WORKER_THREAD_WRAPPERS)
def test_worker_thread_node_around_jestnode_raises(duals, wrap, no_thread_leak):
    node = make_dual_node(duals, prefetch=False)
    loader = Loader(wrap(node))
    try:
        with pytest.raises(RuntimeError) as err:
            next(iter(loader))
    finally:
        node.close()
    msg = str(err.value)  # torchdata re-raised it in this thread, with the original message
    here = threading.current_thread().name  # the thread that built the node
    assert "was called from thread" in msg and f"not from the training thread {here!r}" in msg
    assert "copies the live learner's weights" in msg and WORKING_COMPOSITION in msg
    assert node.stats["batches"] == 0  # next() never ran (nor refreshed the snapshot) off-thread


def test_jestnode_refuses_calls_from_other_threads(duals):
    node = make_dual_node(duals, prefetch=False, async_scoring=False)
    node.reset()
    errors: dict[str, str] = {}

    def call(name, fn):
        try:
            fn()
        except RuntimeError as e:
            errors[name] = str(e)

    for name, fn in (("reset", node.reset), ("next", node.next), ("state_dict", node.state_dict)):
        t = threading.Thread(target=call, args=(name, fn), name=f"worker-{name}")
        t.start()
        t.join()
        assert errors[name].startswith(
            f"JESTNode.{name}() was called from thread 'worker-{name}', not from the training "
            f"thread {threading.current_thread().name!r}"
        )
    assert node.stats["batches"] == 0
    assert len(next(node)[2]) == B  # the training thread still can
    node.close()


def test_jestnode_training_thread_override(duals):
    out: dict[str, object] = {}

    def train():
        try:
            out["keys"] = [ks for _, _, ks in Loader(node)]
        except BaseException as e:  # noqa: BLE001 -- reported below
            out["error"] = e

    trainer = threading.Thread(target=train, name="trainer")
    node = make_dual_node(duals, training_thread=trainer)
    with pytest.raises(RuntimeError, match="not from the training thread 'trainer'"):
        node.reset()
    trainer.start()
    trainer.join(60)
    node.close()
    assert "error" not in out, out.get("error")
    assert len(out["keys"]) == EPOCH


def test_same_thread_node_may_wrap_jestnode(duals):
    # Mapper(num_workers=0) runs in its caller's thread: allowed around JESTNode
    node = make_dual_node(duals)
    loader = Loader(Mapper(node, lambda b: b[2]))
    keys = [k for ks in loader for k in ks]
    node.close()
    assert len(keys) == N // 2 and len(set(keys)) == len(keys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PinMemory needs CUDA")
def test_documented_composition_with_pin_memory_on_cuda():
    learner = TinyDual(d_in=D_IN, seed=0).cuda()
    reference = TinyDual(d_in=D_IN, seed=1).cuda()

    def make():
        src = PinMemory(base_node(VectorDataset(), prefetch=True))
        return JESTNode(
            src, learner, reference, ratio=0.5, n_chunks=2, seed=1, embed=tiny_dual_embed
        )

    node = make()
    x, y, keys = next(iter(Loader(node)))
    node.close()
    assert x.is_cuda and y.is_cuda and len(keys) == B
    run_test_save_load_state(make, midpoint=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_jestloader_over_stateful_dataloader_resumes_exactly(models, num_workers):
    def make():
        base = StatefulDataLoader(
            PairDataset(), batch_size=B, shuffle=True, num_workers=num_workers,
            collate_fn=collate, generator=torch.Generator().manual_seed(0),
        )
        return JESTLoader(base, models[0], models[1], ratio=0.5, n_chunks=2, seed=2)

    with make() as jest:
        full = [ks for _, _, ks in jest]
    flat = [k for ks in full for k in ks]
    assert len(full) == EPOCH and len(set(flat)) == len(flat)

    with make() as jest:
        it = iter(jest)
        head = [next(it)[2] for _ in range(3)]
        state = jest.state_dict()
        del it
    with make() as jest:
        jest.load_state_dict(state)
        tail = [ks for _, _, ks in jest]
    assert head + tail == full
