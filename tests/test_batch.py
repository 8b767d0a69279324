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


def _ragged(b: int, offset: int = 0) -> list[torch.Tensor]:
    """One tensor per example, as a collate_fn that does not stack yields: example i's tensor
    has length i % 3 + 1 and is filled with its id, so a mixed-up example shows."""
    return [torch.full((i % 3 + 1,), i) for i in range(offset, offset + b)]


def _ids(ts) -> list[int]:
    assert all(t.unique().numel() == 1 for t in ts), "a per-example tensor mixes examples"
    return [int(t[0]) for t in ts]


def test_per_example_tensor_list_keeps_each_tensor_with_its_example():
    parts = [
        (torch.arange(o, o + b).float().view(b, 1), torch.arange(o, o + b), _ragged(b, o))
        for o, b in ((0, 4), (4, 4), (8, 2))  # last one partial
    ]
    assert batch_size(parts[0]) == 4 and batch_size(parts[2]) == 2
    sb = concat_batches(parts)
    assert isinstance(sb, tuple) and batch_size(sb) == 10
    assert isinstance(sb[2], list) and _ids(sb[2]) == list(range(10))
    assert [t.shape[0] for t in sb[2]] == [i % 3 + 1 for i in range(10)]
    sub = index_batch(sb, torch.tensor([7, 0, 9, 4]))
    assert sub[0][:, 0].tolist() == [7.0, 0.0, 9.0, 4.0] and sub[1].tolist() == [7, 0, 9, 4]
    assert isinstance(sub[2], list) and _ids(sub[2]) == [7, 0, 9, 4]
    assert batch_size(sub) == 4
    assert len(list(iter_tensors(sb))) == 12
    assert _ids(map_tensors(sb, lambda t: t + 0)[2]) == list(range(10))
    # equal-length per-example tensors (boxes of shape (4,)): the length fixes the reading
    boxes = [(torch.zeros(3), [torch.full((4,), o + i) for i in range(3)]) for o in (0, 3)]
    sub = index_batch(concat_batches(boxes), torch.tensor([5, 1]))
    assert _ids(sub[1]) == [5, 1] and sub[1][0].shape == (4,)


def test_dict_batch_with_per_example_tensor_list():
    def part(o: int, b: int) -> dict:
        return {
            "image": torch.arange(o, o + b).float().view(b, 1).repeat(1, 3),
            "boxes": _ragged(b, o),
            "__key__": [f"k{i}" for i in range(o, o + b)],
            "arrays": tuple(np.full((i % 2 + 1, 2), i) for i in range(o, o + b)),
        }

    sb = concat_batches([part(0, 3), part(3, 3), part(6, 1)])
    assert batch_size(sb) == 7 and _ids(sb["boxes"]) == list(range(7))
    assert isinstance(sb["arrays"], tuple) and len(sb["arrays"]) == 7
    sub = index_batch(sb, torch.tensor([6, 2, 3]))
    assert _ids(sub["boxes"]) == [6, 2, 3] and sub["__key__"] == ["k6", "k2", "k3"]
    assert sub["image"][:, 0].tolist() == [6.0, 2.0, 3.0]
    assert [int(a.flat[0]) for a in sub["arrays"]] == [6, 2, 3]
    assert find_keys(sub) == ["k6", "k2", "k3"]


def test_only_a_list_of_tensors_is_refused():
    """No other field fixes the batch size: ragged tensors cannot be fields, and reading them
    as one tensor per example would be a guess."""
    only = _ragged(4)
    for fn in (
        batch_size,
        lambda b: concat_batches([b, b]),
        lambda b: index_batch(b, torch.tensor([0])),
    ):
        with pytest.raises(
            ValueError, match=r"batch \(a list of 4 tensors with shapes \[\(1,\), \(2,\)"
        ) as e:
            fn(only)
        assert "no other per-example field" in str(e.value) and "Stack" in str(e.value)
    with pytest.raises(ValueError, match=r"batch\['boxes'\].*disagree"):
        batch_size({"boxes": _ragged(3)})
    with pytest.raises(ValueError, match="only 0-d tensors"):
        batch_size([torch.tensor(1.0), torch.tensor(2.0)])
    # ... while a list of fields with a common leading dim stays the usual [images, texts]
    assert batch_size([torch.zeros(3, 2), torch.zeros(3)]) == 3


def test_tensor_list_fitting_neither_or_both_readings():
    with pytest.raises(ValueError, match=r"batch\[2\] is a list of 3 tensors.*batch of 4 examples"):
        batch_size((torch.zeros(4), torch.zeros(4), _ragged(3)))

    def part(b: int) -> dict:
        return {"image": torch.zeros(b, 3), "text": [torch.zeros(b, 5), torch.ones(b, 5)]}

    # a partial batch of 2 with 2 fields fits both readings: the full batch settles it
    assert batch_size(part(2)) == 2
    sb = concat_batches([part(4), part(2)])
    assert [t.shape for t in sb["text"]] == [(6, 5), (6, 5)]
    assert torch.equal(index_batch(sb, torch.tensor([5, 0]))["text"][1], torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"batch\['text'\] is ambiguous.*2 tensors.*namedtuple"):
        index_batch(part(2), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"batch\['text'\] is ambiguous"):
        concat_batches([part(2), part(2)])
    per_example = {"image": torch.zeros(2, 3), "text": [torch.zeros(1), torch.zeros(3)]}
    with pytest.raises(ValueError, match=r"disagree on what batch\['text'\] is"):
        concat_batches([per_example, part(2), part(4)])
    # 0-d tensors: b of them are one per example, other counts are per-batch metadata
    labels = [
        (torch.zeros(b), [torch.tensor(o + i) for i in range(b)]) for o, b in ((0, 3), (3, 2))
    ]
    sb = concat_batches(labels)
    assert [int(t) for t in sb[1]] == [0, 1, 2, 3, 4]
    assert [int(t) for t in index_batch(sb, torch.tensor([4, 1]))[1]] == [4, 1]
    meta = [(torch.zeros(b), (torch.tensor(0.07), torch.tensor(1.0))) for b in (4, 2)]
    sb = concat_batches(meta)
    assert batch_size(sb) == 6 and index_batch(sb, torch.tensor([0]))[1] == sb[1]


def test_find_keys_checks_what_key_fn_returns():
    batch = (torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(
        ValueError, match=r"3 keys for a super-batch of 4 examples \(expected 4, got 3\)"
    ):
        find_keys(batch, key_fn=lambda b: ["a", "b", "c"])
    with pytest.raises(ValueError, match="expected 5, got 4"):
        find_keys(batch, key_fn=lambda b: list("abcd"), size=5)
    with pytest.raises(TypeError, match="one string"):
        find_keys(batch, key_fn=lambda b: "abcd")
    with pytest.raises(TypeError, match="generator"):
        find_keys(batch, key_fn=lambda b: (k for k in "abcd"))
    for bad in (None, 1.5, torch.tensor(3), ["x"], object()):
        with pytest.raises(TypeError, match="key at position 1"):
            find_keys(batch, key_fn=lambda b, bad=bad: ["a", bad, "c", "d"])
    assert find_keys(batch, key_fn=lambda b: torch.arange(4)) == ["0", "1", "2", "3"]
    assert find_keys(batch, key_fn=lambda b: [b"a", np.int64(2), np.str_("c"), 4]) == [
        "a",
        "2",
        "c",
        "4",
    ]
    assert find_keys(batch, key_fn=lambda b: None) is None
