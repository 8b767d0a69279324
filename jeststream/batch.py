"""Batch plumbing: concatenate n base batches into a super-batch and gather a sub-batch from it.

A *batch* is whatever the base loader yields: a tensor, a numpy array, a per-example list (e.g.
captions or webdataset keys), or a tuple / list / dict (possibly nested, namedtuples included)
of those. The functions here keep that structure, so the training step sees exactly the shape
of batch it would have seen without JEST.

Rule that disambiguates lists: a list or tuple is a *container* when at least one element is a
tensor, array, mapping, list or tuple; otherwise it is a *per-example list* (one entry per
example, e.g. a list of strings). One exception: a list or tuple whose elements are all mappings
without any tensor or array inside is a per-example list of *records* (webdataset collates a
``.json`` column into a list of dicts, one per example). Anything else (ints, None, ...) is
per-batch metadata and is carried through unchanged from the first base batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "batch_size",
    "concat_batches",
    "find_keys",
    "index_batch",
    "iter_tensors",
    "map_tensors",
]

_CONTAINER_ELEMS = (torch.Tensor, np.ndarray, Mapping, list, tuple)


def _holds_array(m: Mapping) -> bool:
    return any(
        isinstance(v, (torch.Tensor, np.ndarray)) or (isinstance(v, Mapping) and _holds_array(v))
        for v in m.values()
    )


def _is_container_seq(x: Any) -> bool:
    # Only the first few elements are looked at: structure tuples are short, and per-example
    # lists (thousands of captions) are homogeneous -- scanning them all cost ~1 ms per batch.
    if not isinstance(x, (list, tuple)):
        return False
    head = x[:8]
    if head and all(isinstance(e, Mapping) and not _holds_array(e) for e in head):
        return False  # per-example records (e.g. decoded .json metadata), not a structure
    return any(isinstance(e, _CONTAINER_ELEMS) for e in head)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _rebuild_seq(template: Sequence, items: list) -> Any:
    if _is_namedtuple(template):
        return type(template)(*items)
    if isinstance(template, tuple):
        return tuple(items) if type(template) is tuple else type(template)(items)
    if type(template) is list:
        return items
    try:
        return type(template)(items)
    except TypeError:  # exotic list subclasses with other constructors
        return items


def _rebuild_map(template: Mapping, items: dict) -> Any:
    if type(template) is dict:
        return items
    try:
        return type(template)(items)
    except TypeError:
        return items


def _leaf_sizes(batch: Any, out: list[int]) -> None:
    if isinstance(batch, torch.Tensor) or isinstance(batch, np.ndarray):
        if batch.ndim > 0:
            out.append(int(batch.shape[0]))
    elif isinstance(batch, Mapping):
        for v in batch.values():
            _leaf_sizes(v, out)
    elif _is_container_seq(batch):
        for v in batch:
            _leaf_sizes(v, out)
    elif isinstance(batch, (list, tuple)):
        out.append(len(batch))


def batch_size(batch: Any) -> int:
    """Number of examples in ``batch`` (the leading size shared by all of its per-example leaves).

    Raises ValueError when the batch has no per-example leaf or when leaves disagree.
    """
    sizes: list[int] = []
    _leaf_sizes(batch, sizes)
    if not sizes:
        raise ValueError(
            f"cannot find the batch size of a {type(batch).__name__} batch: it has no tensor, "
            "numpy array or per-example list with a leading batch dimension"
        )
    if len(set(sizes)) != 1:
        raise ValueError(
            f"the per-example fields of a batch disagree on its size: {sorted(set(sizes))}; "
            "every tensor, array and per-example list must have the same leading dimension"
        )
    return sizes[0]


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate base batches along the example dimension, keeping their structure.

    Batches may differ in size (e.g. webdataset's partial last batch); per-batch metadata (a
    leaf that is not per-example) is taken from the first batch.
    """
    if len(batches) == 0:
        raise ValueError("concat_batches needs at least one batch, got none")
    first = batches[0]
    if len(batches) == 1:
        return first
    if isinstance(first, torch.Tensor):
        if first.ndim == 0:
            return first
        return torch.cat(list(batches), dim=0)
    if isinstance(first, np.ndarray):
        if first.ndim == 0:
            return first
        return np.concatenate(list(batches), axis=0)
    if isinstance(first, Mapping):
        for b in batches[1:]:
            if not isinstance(b, Mapping) or b.keys() != first.keys():
                raise ValueError(
                    "base batches have different structure: dict keys "
                    f"{sorted(map(str, first.keys()))} vs "
                    f"{sorted(map(str, b.keys())) if isinstance(b, Mapping) else type(b).__name__}"
                )
        return _rebuild_map(first, {k: concat_batches([b[k] for b in batches]) for k in first})
    if _is_container_seq(first):
        for b in batches[1:]:
            if not isinstance(b, (list, tuple)) or len(b) != len(first):
                raise ValueError(
                    f"base batches have different structure: a {type(first).__name__} of "
                    f"{len(first)} fields vs {type(b).__name__} of "
                    f"{len(b) if isinstance(b, (list, tuple)) else '?'}"
                )
        fields = [concat_batches([b[i] for b in batches]) for i in range(len(first))]
        return _rebuild_seq(first, fields)
    if isinstance(first, (list, tuple)):
        items: list = []
        for b in batches:
            items.extend(b)
        return _rebuild_seq(first, items)
    return first


def index_batch(batch: Any, idx: torch.Tensor) -> Any:
    """Gather the examples ``idx`` (a 1-D LongTensor, in that order) from ``batch``.

    Tensors are gathered on their own device; numpy arrays and per-example lists on the host.
    """
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        return batch.index_select(0, idx.to(batch.device, non_blocking=True))
    if isinstance(batch, np.ndarray):
        if batch.ndim == 0:
            return batch
        return batch[_host_index(idx)]
    if isinstance(batch, Mapping):
        return _rebuild_map(batch, {k: index_batch(v, idx) for k, v in batch.items()})
    if _is_container_seq(batch):
        return _rebuild_seq(batch, [index_batch(v, idx) for v in batch])
    if isinstance(batch, (list, tuple)):
        return _rebuild_seq(batch, [batch[i] for i in _host_index(idx).tolist()])
    return batch


def _host_index(idx: torch.Tensor) -> np.ndarray:
    return idx.detach().to("cpu").numpy()


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor leaf of ``batch``, keeping the structure."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild_map(batch, {k: map_tensors(v, fn) for k, v in batch.items()})
    if _is_container_seq(batch):
        return _rebuild_seq(batch, [map_tensors(v, fn) for v in batch])
    return batch


def iter_tensors(batch: Any):
    """Yield every tensor leaf of ``batch``."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from iter_tensors(v)
    elif _is_container_seq(batch):
        for v in batch:
            yield from iter_tensors(v)


def _is_str_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, str) for e in x)


def find_keys(batch: Any, key_fn: Callable[[Any], Sequence[str]] | None = None) -> list[str] | None:
    """Per-example keys of ``batch`` for the selection log, or None when there are none.

    ``key_fn(batch)`` wins when given; otherwise a dict's ``"__key__"`` / ``"key"`` entry, or in
    a tuple/list batch the first position >= 2 that is a list/tuple of strings (webdataset's
    ``to_tuple("jpg", "txt", "__key__")``).
    """
    if key_fn is not None:
        keys = key_fn(batch)
        return None if keys is None else [str(k) for k in keys]
    if isinstance(batch, Mapping):
        for name in ("__key__", "key"):
            if name in batch and _is_str_list(batch[name]):
                return list(batch[name])
        return None
    if isinstance(batch, (list, tuple)):
        for field in list(batch)[2:]:
            if _is_str_list(field):
                return list(field)
    return None
