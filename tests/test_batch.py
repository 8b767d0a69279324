from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch

from jeststream.batch import (
    batch_size,
    concat_batches,
    find_keys,
    index_batch,
    iter_tensors,
    map_tensors,
)

Pair = namedtuple("Pair", ["image", "text"])


def _nested(b: int, offset: int = 0):
    ar = torch.arange(offset, offset + b)
    return {
        "image": ar.float().view(b, 1).repeat(1, 3),
        "meta": {"id": np.arange(offset, offset + b), "caption": [f"c{i}" for i in ar.tolist()]},
        "pair": Pair(ar.clone(), [f"t{i}" for i in ar.tolist()]),
        "scalar": 7,
        "tup": (ar * 2, tuple(f"u{i}" for i in ar.tolist())),
    }


def test_batch_size_structures():
    assert batch_size(torch.zeros(5, 2)) == 5
    assert batch_size(np.zeros((4, 3))) == 4
    assert batch_size(["a", "b", "c"]) == 3
    assert batch_size((torch.zeros(2, 1), ["x", "y"])) == 2
    assert batch_size(_nested(6)) == 6


def test_batch_size_errors():
    with pytest.raises(ValueError, match="disagree"):
        batch_size((torch.zeros(2), torch.zeros(3)))
    with pytest.raises(ValueError, match="no tensor"):
        batch_size({"a": 1})


def test_concat_nested_and_unequal_sizes():
    parts = [_nested(3, 0), _nested(3, 3), _nested(2, 6)]  # last one partial
    sb = concat_batches(parts)
    assert batch_size(sb) == 8
    assert torch.equal(sb["image"][:, 0], torch.arange(8).float())
    assert isinstance(sb["meta"]["id"], np.ndarray)
    assert sb["meta"]["id"].tolist() == list(range(8))
    assert sb["meta"]["caption"] == [f"c{i}" for i in range(8)]
    assert isinstance(sb["pair"], Pair)
    assert torch.equal(sb["pair"].image, torch.arange(8))
    assert sb["pair"].text == [f"t{i}" for i in range(8)]
    assert sb["scalar"] == 7
    assert isinstance(sb["tup"], tuple) and isinstance(sb["tup"][1], tuple)
    assert sb["tup"][1] == tuple(f"u{i}" for i in range(8))


def test_concat_list_batch_keeps_list_type():
    a = [torch.zeros(2, 1), torch.ones(2)]
    b = [torch.ones(3, 1), torch.zeros(3)]
    sb = concat_batches([a, b])
    assert isinstance(sb, list) and len(sb) == 2
    assert sb[0].shape == (5, 1) and sb[1].shape == (5,)


def test_concat_structure_mismatch():
    with pytest.raises(ValueError, match="dict keys"):
        concat_batches([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="fields"):
        concat_batches([(torch.zeros(1), torch.zeros(1)), (torch.zeros(1),)])
    with pytest.raises(ValueError):
        concat_batches([])


def test_index_batch_preserves_structure_and_order():
    sb = concat_batches([_nested(4, 0), _nested(4, 4)])
    idx = torch.tensor([6, 1, 3])
    sub = index_batch(sb, idx)
    assert torch.equal(sub["image"][:, 0], torch.tensor([6.0, 1.0, 3.0]))
    assert sub["meta"]["id"].tolist() == [6, 1, 3]
    assert sub["meta"]["caption"] == ["c6", "c1", "c3"]
    assert isinstance(sub["pair"], Pair) and sub["pair"].text == ["t6", "t1", "t3"]
    assert sub["tup"][1] == ("u6", "u1", "u3")
    assert sub["scalar"] == 7
    assert batch_size(sub) == 3


def test_map_and_iter_tensors():
    sb = _nested(3)
    doubled = map_tensors(sb, lambda t: t * 2)
    assert torch.equal(doubled["pair"].image, torch.arange(3) * 2)
    assert doubled["meta"]["caption"] == sb["meta"]["caption"]
    assert len(list(iter_tensors(sb))) == 3


def test_find_keys():
    assert find_keys({"__key__": ["a", "b"], "image": torch.zeros(2)}) == ["a", "b"]
    assert find_keys({"key": ["a"], "image": torch.zeros(1)}) == ["a"]
    assert find_keys((torch.zeros(2), torch.zeros(2), ["k1", "k2"])) == ["k1", "k2"]
    # position 1 holds strings (raw captions) but keys are looked for from position 2 on
    assert find_keys((torch.zeros(2), ["c1", "c2"])) is None
    assert find_keys((torch.zeros(2), ["c1", "c2"], torch.zeros(2), ("x", "y"))) == ["x", "y"]
    assert find_keys({"image": torch.zeros(1)}) is None
    assert find_keys((torch.zeros(2),), key_fn=lambda b: [1, 2]) == ["1", "2"]


def test_per_example_records_are_a_per_example_list():
    """webdataset collates a .json column into a list of dicts, one per example: those dicts are
    examples, not fields of the batch, and partial batches must still concatenate."""
    b1 = [torch.zeros(2, 3), ["a", "b"], [{"w": 1, "tags": ["x"]}, {"w": 2, "tags": ["y", "z"]}]]
    b2 = [torch.ones(1, 3), ["c"], [{"w": 3, "tags": []}]]
    assert batch_size(b1) == 2
    sb = concat_batches([b1, b2])
    assert batch_size(sb) == 3 and [r["w"] for r in sb[2]] == [1, 2, 3]
    sub = index_batch(sb, torch.tensor([2, 0]))
    assert sub[1] == ["c", "a"] and [r["w"] for r in sub[2]] == [3, 1]
    assert torch.equal(sub[0][:, 0], torch.tensor([1.0, 0.0]))
    # a list of dicts that hold per-example tensors is still a structure
    nested = [{"x": torch.zeros(2)}, {"y": torch.ones(2)}]
    assert batch_size(nested) == 2 and len(concat_batches([nested, nested])) == 2
