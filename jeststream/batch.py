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

Lists of tensors: a list or tuple (not a namedtuple, which is always a container) whose elements
are all tensors or arrays is read against the batch size b fixed by the *other* per-example
fields of the batch (its tensors, arrays and per-example lists outside any list of tensors). It
is a per-example list of tensors (one per example, as a collate_fn that does not stack
variable-length token ids or boxes yields) when its length is b and its elements do not all have
leading dim b: concatenation appends the lists, indexing picks the selected elements. It is a
container of fields when its elements all have leading dim b (0-d ones are metadata) and its
length is not b. Anything else raises a ValueError naming the field: a list that fits neither
reading, and a list that fits both (length b, every element with leading dim b) where nothing
settles it -- concat_batches settles it from another base batch (a full batch next to a partial
one), index_batch cannot. b 0-d tensors are one per example (labels left unstacked) unless
another base batch reads them as metadata. When no other field fixes b (the batch is only lists
of tensors, e.g. the usual ``[images, texts]``), a list of tensors is a container when its
elements agree on their leading dim, which is then b, and is refused otherwise (``[t_0, ...,
t_{b-1}]`` of different lengths): stack it into one tensor, or yield it next to a per-example
field. A batch that is only a list of *equal-length* per-example tensors cannot be told from a
container of fields and is read as one; stack such tensors.

A :class:`PerExampleField` leaf (e.g. :class:`jeststream.deferred.Deferred`: a scoring view plus
per-example records materialised after selection) keeps its own per-example data: it counts as
a per-example field of its length, concatenates and indexes itself, and its tensors (the view)
are the ones ``map_tensors`` / ``iter_tensors`` see.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "PerExampleField",
    "batch_size",
    "concat_batches",
    "find_keys",
    "index_batch",
    "iter_tensors",
    "map_tensors",
    "replace_fields",
]



class PerExampleField:
    """A batch leaf that holds per-example data in its own form (module docstring).

    Subclasses implement ``__len__`` (examples), ``concat(others)`` (this field followed by
    the same field of other base batches), ``index(idx)`` (the examples ``idx``, a cpu
    LongTensor, in that order), ``map_tensors(fn)`` and ``tensors()``.
    """

    __slots__ = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def concat(self, others: Sequence[Any]) -> PerExampleField:
        raise NotImplementedError

    def index(self, idx: torch.Tensor) -> PerExampleField:
        raise NotImplementedError

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PerExampleField:
        raise NotImplementedError

    def tensors(self):
        raise NotImplementedError


_ARRAYS = (torch.Tensor, np.ndarray)
_CONTAINER_ELEMS = (torch.Tensor, np.ndarray, Mapping, list, tuple, PerExampleField)

# How a list of tensors reads against the batch size b (module docstring).
# _SCALARS: b 0-d tensors, one per example unless another base batch reads them as metadata.
_FIELDS, _EXAMPLES, _EITHER, _SCALARS = "fields", "examples", "either", "scalars"


def _holds_array(m: Mapping) -> bool:
    return any(
        isinstance(v, (torch.Tensor, np.ndarray, PerExampleField))
        or (isinstance(v, Mapping) and _holds_array(v))
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


def _is_tensor_list(x: Any) -> bool:
    """A non-empty list/tuple, not a namedtuple, of tensors/arrays only: fields or per-example.

    Cheap for everything else: the first element that is not a tensor or array ends the scan
    (a list of strings at once); only a list of tensors is scanned to its end."""
    if not isinstance(x, (list, tuple)) or not x or _is_namedtuple(x):
        return False
    for e in x:
        if not isinstance(e, _ARRAYS):
            return False
    return True


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


def _key_path(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def _item_path(path: str, seq: Sequence, i: int) -> str:
    if _is_namedtuple(seq):
        return f"{path}.{seq._fields[i]}"
    return f"{path}[{i}]"


def _describe(x: Sequence) -> str:
    shapes = ", ".join(str(tuple(e.shape)) for e in x[:4])
    more = f", ... ({len(x) - 4} more)" if len(x) > 4 else ""
    return f"a {type(x).__name__} of {len(x)} tensors with shapes [{shapes}{more}]"


_STACK_HINT = (
    "stack per-example tensors into one tensor (pad them, plus a tensor of lengths); keep "
    "fields of the batch in a dict or a namedtuple, which are always read as fields"
)


def _fits_fields(x: Sequence, b: int) -> bool:
    """Every element of the list of tensors ``x`` has leading dim ``b`` or is 0-d (metadata)."""
    for e in x:
        if e.ndim and e.shape[0] != b:
            return False
    return True


def _first_lead(x: Sequence) -> int | None:
    for e in x:
        if e.ndim:
            return int(e.shape[0])
    return None


def _scan(x: Any, path: str, firm: list[tuple[int, str]], lists: list[tuple[Any, str]]) -> None:
    """Collect the per-example sizes outside lists of tensors (``firm``) and those lists."""
    if isinstance(x, _ARRAYS):
        if x.ndim > 0:
            firm.append((int(x.shape[0]), path))
    elif isinstance(x, PerExampleField):
        firm.append((len(x), path))
    elif isinstance(x, Mapping):
        for k, v in x.items():
            _scan(v, _key_path(path, k), firm, lists)
    elif _is_tensor_list(x):
        lists.append((x, path))
    elif _is_container_seq(x):
        for i, v in enumerate(x):
            _scan(v, _item_path(path, x, i), firm, lists)
    elif isinstance(x, (list, tuple)):
        firm.append((len(x), path))


def _resolve(batch: Any) -> tuple[int, bool]:
    """``(b, fixed)``: the batch size, and whether a field outside the lists of tensors fixes
    it. Raises ValueError for a batch without a size, with fields that disagree, or with a list
    of tensors that is neither one tensor per example nor fields."""
    if _is_tensor_list(batch):  # the usual [images, texts]: no other field, fast path
        lead = _first_lead(batch)
        if lead is not None and _fits_fields(batch, lead):
            return lead, False
    firm: list[tuple[int, str]] = []
    lists: list[tuple[Any, str]] = []
    _scan(batch, "batch", firm, lists)
    if firm:
        b, where = firm[0]
        for s, p in firm:
            if s != b:
                raise ValueError(
                    "the per-example fields of a batch disagree on its size: "
                    f"{sorted({s for s, _ in firm})} ({where} has {b}, {p} has {s}); every "
                    "tensor, array and per-example list must have the same leading dimension"
                )
        for x, p in lists:
            if len(x) != b and not _fits_fields(x, b):
                raise ValueError(
                    f"{p} is {_describe(x)}, in a batch of {b} examples ({where} has {b}): it is "
                    f"neither one tensor per example (that takes {b} of them) nor fields of the "
                    f"batch (each would have leading dim {b}); check the collate_fn, or "
                    + _STACK_HINT
                )
        return b, True
    if not lists:
        raise ValueError(
            f"cannot find the batch size of a {type(batch).__name__} batch: it has no tensor, "
            "numpy array or per-example list with a leading batch dimension"
        )
    # Nothing else fixes b: the lists of tensors can only be read as fields of one batch.
    lead = next((d for x, _ in lists if (d := _first_lead(x)) is not None), None)
    if lead is None:
        raise ValueError(
            f"cannot find the batch size of a {type(batch).__name__} batch: it has no tensor, "
            "numpy array or per-example list with a leading batch dimension, only 0-d tensors "
            f"({lists[0][1]} is {_describe(lists[0][0])}); if they are one per example, stack "
            "them into one tensor (torch.stack)"
        )
    bad = next(((x, p) for x, p in lists if not _fits_fields(x, lead)), None)
    if bad is None:
        return lead, False
    raise ValueError(
        f"cannot find the batch size: the tensors of {bad[1]} ({_describe(bad[0])}) disagree on "
        "their leading dim, so they are not fields of one batch, and no other per-example field "
        "(a tensor, array or list of strings outside a list of tensors) fixes the batch size "
        "to read them as one tensor per example. Stack per-example tensors into one tensor "
        "(pad them, plus a tensor of lengths), or yield them next to a per-example field, e.g. "
        "(images, [t_0, ..., t_b-1]) or a dict batch {'image': images, 'boxes': [...]}"
    )


class _Size:
    """The batch size of one batch, resolved on first need (only lists of tensors need it)."""

    __slots__ = ("_batch", "_resolved")

    def __init__(self, batch: Any) -> None:
        self._batch = batch
        self._resolved: tuple[int, bool] | None = None

    def get(self) -> tuple[int, bool]:
        if self._resolved is None:
            self._resolved = _resolve(self._batch)
        return self._resolved


def _read(x: Sequence, size: _Size) -> str:
    """How the list of tensors ``x`` reads in its batch: _FIELDS, _EXAMPLES, _EITHER (both
    readings fit) or _SCALARS (b 0-d tensors)."""
    b, fixed = size.get()  # raises for a list that fits neither reading
    if not fixed or len(x) != b:
        return _FIELDS
    if not _fits_fields(x, b):
        return _EXAMPLES
    return _SCALARS if _first_lead(x) is None else _EITHER


def _ambiguous(x: Sequence, path: str, b: int) -> ValueError:
    return ValueError(
        f"{path} is ambiguous: {_describe(x)} in a batch of {b} examples, each with leading dim "
        f"{b}, so it may be {b} per-example tensors or {len(x)} fields of the batch; " + _STACK_HINT
    )


def batch_size(batch: Any) -> int:
    """Number of examples in ``batch`` (the leading size shared by all of its per-example leaves).

    Raises ValueError when the batch has no per-example leaf, when leaves disagree, or when a
    list of tensors is neither one tensor per example nor fields (module docstring).
    """
    return _resolve(batch)[0]


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate base batches along the example dimension, keeping their structure.

    Batches may differ in size (e.g. webdataset's partial last batch); per-batch metadata (a
    leaf that is not per-example) is taken from the first batch. Per-example lists of tensors
    are appended (module docstring).
    """
    if len(batches) == 0:
        raise ValueError("concat_batches needs at least one batch, got none")
    if len(batches) == 1:
        return batches[0]
    return _concat(list(batches), "batch", [_Size(b) for b in batches])


def _concat(batches: list, path: str, sizes: list[_Size]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        if first.ndim == 0:
            return first
        return torch.cat(batches, dim=0)
    if isinstance(first, np.ndarray):
        if first.ndim == 0:
            return first
        return np.concatenate(batches, axis=0)
    if isinstance(first, PerExampleField):
        for b in batches[1:]:
            if type(b) is not type(first):
                raise ValueError(
                    f"base batches have different structure at {path}: a "
                    f"{type(first).__name__} vs a {type(b).__name__}"
                )
        return first.concat(batches[1:])
    if isinstance(first, Mapping):
        for b in batches[1:]:
            if not isinstance(b, Mapping) or b.keys() != first.keys():
                raise ValueError(
                    f"base batches have different structure at {path}: dict keys "
                    f"{sorted(map(str, first.keys()))} vs "
                    f"{sorted(map(str, b.keys())) if isinstance(b, Mapping) else type(b).__name__}"
                )
        return _rebuild_map(
            first, {k: _concat([b[k] for b in batches], _key_path(path, k), sizes) for k in first}
        )
    if _is_tensor_list(first) and all(_is_tensor_list(b) for b in batches[1:]):
        if _read_all(batches, path, sizes) == _EXAMPLES:
            items: list = []
            for b in batches:
                items.extend(b)
            return _rebuild_seq(first, items)
    if _is_container_seq(first):
        for b in batches[1:]:
            if not isinstance(b, (list, tuple)) or len(b) != len(first):
                raise ValueError(
                    f"base batches have different structure at {path}: a "
                    f"{type(first).__name__} of {len(first)} fields vs {type(b).__name__} of "
                    f"{len(b) if isinstance(b, (list, tuple)) else '?'}"
                )
        fields = [
            _concat([b[i] for b in batches], _item_path(path, first, i), sizes)
            for i in range(len(first))
        ]
        return _rebuild_seq(first, fields)
    if isinstance(first, (list, tuple)):
        items = []
        for b in batches:
            items.extend(b)
        return _rebuild_seq(first, items)
    return first


def _read_all(batches: list, path: str, sizes: list[_Size]) -> str:
    """How the lists of tensors at ``path`` read across the base batches: a base batch where
    the reading is ambiguous takes it from the others; they must not contradict each other."""
    kinds = [_read(x, s) for x, s in zip(batches, sizes)]
    if all(k == _SCALARS for k in kinds):
        return _EXAMPLES
    if _FIELDS in kinds and _EXAMPLES in kinds:
        i, j = kinds.index(_EXAMPLES), kinds.index(_FIELDS)
        raise ValueError(
            f"base batches disagree on what {path} is: in base batch {i} it is one tensor per "
            f"example ({_describe(batches[i])}, {sizes[i].get()[0]} examples), in base batch "
            f"{j} fields of the batch ({_describe(batches[j])}, {sizes[j].get()[0]} examples); "
            + _STACK_HINT
        )
    if _FIELDS in kinds:
        return _FIELDS
    if _EXAMPLES in kinds:
        return _EXAMPLES
    raise _ambiguous(batches[0], path, sizes[0].get()[0])


def index_batch(batch: Any, idx: torch.Tensor) -> Any:
    """Gather the examples ``idx`` (a 1-D LongTensor, in that order) from ``batch``.

    Tensors are gathered on their own device; numpy arrays and per-example lists (of tensors
    too: the selected elements, each left on its device) on the host.
    """
    return _index(batch, idx, "batch", _Size(batch))


def _index(batch: Any, idx: torch.Tensor, path: str, size: _Size) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        return batch.index_select(0, idx.to(batch.device, non_blocking=True))
    if isinstance(batch, np.ndarray):
        if batch.ndim == 0:
            return batch
        return batch[_host_index(idx)]
    if isinstance(batch, PerExampleField):
        return batch.index(idx.detach().to("cpu"))
    if isinstance(batch, Mapping):
        return _rebuild_map(
            batch, {k: _index(v, idx, _key_path(path, k), size) for k, v in batch.items()}
        )
    if _is_tensor_list(batch):
        kind = _read(batch, size)
        if kind == _EITHER:
            raise _ambiguous(batch, path, size.get()[0])
        if kind in (_EXAMPLES, _SCALARS):
            return _rebuild_seq(batch, [batch[i] for i in _host_index(idx).tolist()])
    if _is_container_seq(batch):
        return _rebuild_seq(
            batch, [_index(v, idx, _item_path(path, batch, i), size) for i, v in enumerate(batch)]
        )
    if isinstance(batch, (list, tuple)):
        return _rebuild_seq(batch, [batch[i] for i in _host_index(idx).tolist()])
    return batch


def _host_index(idx: torch.Tensor) -> np.ndarray:
    return idx.detach().to("cpu").numpy()


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor leaf of ``batch``, keeping the structure."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, PerExampleField):
        return batch.map_tensors(fn)
    if isinstance(batch, Mapping):
        return _rebuild_map(batch, {k: map_tensors(v, fn) for k, v in batch.items()})
    if _is_container_seq(batch):  # per-example lists of tensors too: same leaves either way
        return _rebuild_seq(batch, [map_tensors(v, fn) for v in batch])
    return batch


def iter_tensors(batch: Any):
    """Yield every tensor leaf of ``batch``."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, PerExampleField):
        yield from batch.tensors()
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from iter_tensors(v)
    elif _is_container_seq(batch):
        for v in batch:
            yield from iter_tensors(v)


def replace_fields(batch: Any, fn: Callable[[PerExampleField, str], Any]) -> Any:
    """``batch`` with every :class:`PerExampleField` leaf replaced by ``fn(field, path)`` (path:
    where it sits, e.g. ``batch[0]`` or ``batch['image']``), keeping the structure; the batch
    itself (not a copy) when it holds none."""
    found = [False]
    out = _replace(batch, fn, "batch", found)
    return out if found[0] else batch


def _replace(x: Any, fn: Callable, path: str, found: list) -> Any:
    if isinstance(x, PerExampleField):
        found[0] = True
        return fn(x, path)
    if isinstance(x, Mapping):
        return _rebuild_map(x, {k: _replace(v, fn, _key_path(path, k), found) for k, v in x.items()})
    if _is_container_seq(x):
        return _rebuild_seq(x, [_replace(v, fn, _item_path(path, x, i), found) for i, v in enumerate(x)])
    return x


def _is_str_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, str) for e in x)


def find_keys(
    batch: Any,
    key_fn: Callable[[Any], Sequence[str]] | None = None,
    *,
    size: int | None = None,
) -> list[str] | None:
    """Per-example keys of ``batch`` for the selection log, or None when there are none.

    ``key_fn(batch)`` wins when given; otherwise a dict's ``"__key__"`` / ``"key"`` entry, or in
    a tuple/list batch the first position >= 2 that is a list/tuple of strings (webdataset's
    ``to_tuple("jpg", "txt", "__key__")``).

    What ``key_fn`` returns is checked here, before anything downstream uses it: None, or one
    key per example of ``batch`` (``size`` examples; ``batch_size(batch)`` when not given) as a
    sequence (or 1-D array) of str, bytes (UTF-8) or integers. Raises ValueError for a wrong
    count and TypeError for anything else.
    """
    if key_fn is not None:
        keys = key_fn(batch)
        if keys is None:
            return None
        return _checked_keys(keys, batch_size(batch) if size is None else size)
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


_KEY_HINT = (
    "key_fn is called on each super-batch (its n base batches concatenated) and must return "
    "one key per example, in order: a list of str (or int / bytes)"
)


def _checked_keys(keys: Any, expected: int) -> list[str]:
    if isinstance(keys, (torch.Tensor, np.ndarray)):
        if keys.ndim != 1:
            raise TypeError(
                f"key_fn returned a {keys.ndim}-d {type(keys).__name__} of shape "
                f"{tuple(keys.shape)}; expected {expected} keys. {_KEY_HINT}"
            )
        keys = keys.tolist()
    elif isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise TypeError(
            f"key_fn returned a {type(keys).__name__}"
            + (" (one string, not a list of them)" if isinstance(keys, (str, bytes)) else "")
            + f"; expected a sequence of {expected} keys. {_KEY_HINT}"
        )
    if len(keys) != expected:
        raise ValueError(
            f"key_fn returned {len(keys)} keys for a super-batch of {expected} examples "
            f"(expected {expected}, got {len(keys)}). {_KEY_HINT}"
        )
    out = []
    for i, k in enumerate(keys):
        out.append(k if type(k) is str else _key_str(k, i))
    return out


def _key_str(k: Any, i: int) -> str:
    if isinstance(k, str):
        return str(k)  # numpy.str_ and other subclasses: a plain str
    if isinstance(k, bytes):
        try:
            return k.decode("utf-8")
        except UnicodeDecodeError:
            pass
    elif isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_)):
        return str(int(k))
    elif not (
        k is None
        or isinstance(k, (bool, np.bool_, numbers.Number, torch.Tensor, np.ndarray))
        or isinstance(k, (Mapping, list, tuple, set, frozenset))
        or (type(k).__str__ is object.__str__ and type(k).__repr__ is object.__repr__)
    ):
        return str(k)  # a type with its own str, e.g. uuid.UUID or pathlib.Path
    hint = " (use .tolist() or .item() for tensor keys)" if isinstance(k, _ARRAYS) else ""
    raise TypeError(
        f"key_fn returned a {type(k).__name__} key at position {i} ({k!r:.80}){hint}: keys are "
        f"written to the selection log and match cached reference embeddings, so each must be "
        f"a str, int or UTF-8 bytes. {_KEY_HINT}"
    )
