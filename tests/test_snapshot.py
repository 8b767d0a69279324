from __future__ import annotations

import threading

import pytest
import torch
from conftest import TinyDual
from torch import nn

from jeststream.snapshot import LearnerSnapshot, unwrap_model

pytestmark = pytest.mark.timeout(60)


def test_unwrap_dataparallel_and_compile():
    m = TinyDual()
    assert unwrap_model(nn.DataParallel(m)) is m

    class FakeCompiled(nn.Module):  # torch.compile's OptimizedModule keeps the model in _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(FakeCompiled(nn.DataParallel(m))) is m
    compiled = torch.compile(m)
    assert unwrap_model(compiled) is m
    with pytest.raises(TypeError):
        unwrap_model(object())


def test_snapshot_is_separate_frozen_copy():
    m = TinyDual().train()
    snap = LearnerSnapshot(m)
    assert snap.module is not m and type(snap.module) is type(m)
    assert not snap.module.training and all(not s.training for s in snap.module.modules())
    assert not any(p.requires_grad for p in snap.module.parameters())
    assert m.training and all(p.requires_grad for p in m.parameters())
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), snap.module.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()


def test_refresh_in_place_copies_params_and_buffers():
    m = TinyDual()
    snap = LearnerSnapshot(m)
    ptrs = [t.data_ptr() for t in snap.module.state_dict().values()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.img[1].running_mean.fill_(3.0)
    m.img[1].num_batches_tracked.fill_(5)
    assert snap.version == 0
    assert snap.refresh(step=4) == 1
    assert [t.data_ptr() for t in snap.module.state_dict().values()] == ptrs
    for k, v in m.state_dict().items():
        assert torch.equal(snap.module.state_dict()[k], v), k
    assert snap.staleness(1, 6) == 2
    assert snap.staleness(0, 6) == 6
    assert snap.refresh(step=6) == 2 and snap.staleness(2, 6) == 0


def test_snapshot_dtype_bfloat16():
    m = TinyDual()
    snap = LearnerSnapshot(m, dtype=torch.bfloat16)
    assert snap.module.img[0].weight.dtype == torch.bfloat16
    assert m.img[0].weight.dtype == torch.float32
    ptr = snap.module.img[0].weight.data_ptr()
    with torch.no_grad():
        m.img[0].weight.fill_(0.5)
    snap.refresh(1)
    assert snap.module.img[0].weight.data_ptr() == ptr
    assert torch.all(snap.module.img[0].weight == 0.5)
    assert snap.module.img[1].num_batches_tracked.dtype == torch.long
    with pytest.raises(ValueError, match="snapshot_dtype"):
        LearnerSnapshot(m, dtype=torch.int32)


def test_refresh_shape_change_is_an_error():
    m = nn.Linear(3, 2)
    snap = LearnerSnapshot(m)
    m.weight = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="shape changed"):
        snap.refresh(1)


def test_forward_never_sees_half_copied_snapshot():
    """A refresh racing with uses: every use sees one consistent version of all weights."""
    m = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    for p in m.parameters():
        nn.init.constant_(p, 0.0)
    snap = LearnerSnapshot(m)
    stop = threading.Event()
    bad: list[tuple[int, set[float]]] = []

    def reader():
        while not stop.is_set():
            with snap.use() as (module, version):
                values = {float(p.view(-1)[0]) for p in module.parameters()}
                values |= {float(p.view(-1)[-1]) for p in module.parameters()}
                if len(values) != 1 or values != {float(version)}:
                    bad.append((version, values))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for v in range(1, 60):
            with torch.no_grad():
                for p in m.parameters():
                    p.fill_(float(v))
            assert snap.refresh(v) == v
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert bad == []


def test_a_shape_change_raises_also_when_the_refresh_needs_a_new_copy():
    """The copy a refresh allocates lazily (the only one held by a forward) mirrors the learner
    as it was built, not as it is now: a replaced Parameter of another shape still raises
    instead of being copied into a fresh slot of the new shape."""
    m = TinyDual()
    snap = LearnerSnapshot(m)  # two copies at most; one exists
    with snap.use() as (_, version):  # a forward holds the only copy: the refresh must add one
        assert version == 0 and snap.copies == 1
        m.txt[0].weight = nn.Parameter(torch.zeros(3, 12))
        with pytest.raises(ValueError, match="shape changed from \\(16, 12\\) to \\(3, 12\\)"):
            snap.refresh(1)
