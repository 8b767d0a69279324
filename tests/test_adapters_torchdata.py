"""JESTNode in torchdata.nodes graphs, and JESTLoader over a StatefulDataLoader base: batch
sizes, unique keys, exact mid-epoch resume."""

from __future__ import annotations

import open_clip  # noqa: F401 -- dev extra: a missing one must fail, not skip
import pytest
import torch
import torchdata  # noqa: F401 -- dev extra: a missing one must fail, not skip
from torch.utils.data import Dataset, SequentialSampler
from torchdata.nodes import Batcher, Loader, Mapper, MapStyleWrapper, Prefetcher
from torchdata.stateful_dataloader import StatefulDataLoader

from jeststream.adapters.torchdata import JESTNode
from jeststream.loader import JESTLoader

B = 4
N = 48
CTX = 16


class PairDataset(Dataset):
    """Deterministic image-token pairs with string keys (a map-style dataset)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, 32, 32, generator=g)
        tokens = torch.randint(1, 64, (CTX,), generator=g)
        return image, tokens, f"p{i:03d}"


def collate(samples):
    images, tokens, keys = zip(*samples)
    return torch.stack(images), torch.stack(tokens), list(keys)


@pytest.fixture(scope="module")
def models():
    from conftest import make_tiny_clip

    return make_tiny_clip(seed=0), make_tiny_clip(seed=1)


def make_node(models, *, prefetch: bool = True, **kw):
    ds = PairDataset()
    node = MapStyleWrapper(ds, sampler=SequentialSampler(ds))
    node = Mapper(Batcher(node, batch_size=B), collate)
    node = JESTNode(node, models[0], models[1], ratio=0.5, n_chunks=2, seed=1, **kw)
    return Prefetcher(node, prefetch_factor=2) if prefetch else node


def test_jestnode_epoch(models):
    loader = Loader(make_node(models))
    for _ in range(2):  # two epochs through Loader's reset
        keys = []
        for images, tokens, ks in loader:
            assert images.shape == (B, 3, 32, 32) and tokens.shape == (B, CTX) and len(ks) == B
            keys.extend(ks)
        assert len(keys) == N // 2 and len(set(keys)) == len(keys)
        assert set(keys) <= {f"p{i:03d}" for i in range(N)}


@pytest.mark.parametrize("prefetch", [False, True])
def test_jestnode_mid_epoch_resume(models, prefetch):
    full = [ks for _, _, ks in Loader(make_node(models, prefetch=prefetch))]
    assert len(full) == N // (2 * B)

    loader = Loader(make_node(models, prefetch=prefetch))
    it = iter(loader)
    head = [next(it)[2] for _ in range(2)]
    state = loader.state_dict()
    del it

    fresh = Loader(make_node(models, prefetch=prefetch))
    fresh.load_state_dict(state)
    tail = [ks for _, _, ks in fresh]
    assert head + tail == full


def test_jestnode_exposes_loader_state(models, tmp_path):
    node = make_node(models, prefetch=False, return_info=True, selection_log=tmp_path / "l.jsonl")
    batch, info = next(node)
    assert info.step == 0 and info.super_batch_size == 2 * B
    assert node.last_info is info and node.stats["batches"] == 1
    assert node.state_dict()["jest"]["step"] == 1
    node.close()
    with pytest.raises(TypeError, match="IterableWrapper"):
        JESTNode([1, 2], models[0], models[1])
    with pytest.raises(ValueError, match="not a JESTNode state"):
        make_node(models, prefetch=False).reset({"x": 1})


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
    assert len(full) == N // (2 * B) and len(set(flat)) == len(flat)

    with make() as jest:
        it = iter(jest)
        head = [next(it)[2] for _ in range(3)]
        state = jest.state_dict()
        del it
    with make() as jest:
        jest.load_state_dict(state)
        tail = [ks for _, _, ks in jest]
    assert head + tail == full
