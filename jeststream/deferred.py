"""Deferred batch fields: score a cheap view of every example, prepare only the selected ones.

A :class:`Deferred` field stands where a batch would hold its training tensor (e.g. the images)
and carries: ``view``, a tensor ``[B, ...]`` from which the scorer's input is made (e.g. images
decoded at the scoring resolution with JPEG draft scaling); optionally ``view_transform``, the
batched ``view -> scorer input`` applied once per super-batch (e.g. uint8 -> normalised float:
the view stays 4x smaller through collation, concatenation and holding); ``records``, one per
example (encoded bytes, or decoded uint8 awaiting augmentation); ``materialise``, ``record ->
that example's training tensor``. :mod:`jeststream.batch` concatenates and indexes it like a
per-example field, the scorer sees the view (:func:`scoring_views`), and after selection
:class:`Materializer` turns the selected records into the training tensor on a thread pool (PIL
and torch release the GIL) -- the yielded batch has the structure, dtypes and device the eager
pipeline gives.

Invariants:

- Same pixels: :class:`SeededTransform` runs an augmentation with torch's, Python's and numpy's
  random streams seeded by :func:`example_seed` (seed, epoch, key), so an eager pipeline that
  uses it produces bit-identical training tensors to the deferred one, in any thread. Random
  draws run under one process-wide lock (the generators are global); the heavy work of a
  torchvision ``RandomResizedCrop`` and of known deterministic transforms runs outside it.
- Always b examples: a record that fails to materialise goes to the field's ``on_error``
  (None: raise naming the field and the record); when that returns, the example is replaced by
  the next candidate (by score), and the replacement is reported -- never a short batch.
- A Deferred field without ``materialise`` is refused when the first super-batch is scored,
  with an error naming the field.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from jeststream.batch import PerExampleField, index_batch, replace_fields

__all__ = [
    "Deferred",
    "DeferredRecordError",
    "Gathered",
    "Materializer",
    "SeededTransform",
    "example_seed",
    "materialise_batch",
    "no_random_draws",
    "scoring_views",
]

OnError = Callable[[Any, BaseException], None]


def example_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed for one example's augmentation, the same in every process and run."""
    h = hashlib.blake2b(f"jeststream-aug:{int(seed)}:{int(epoch)}:{key}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


class DeferredRecordError(RuntimeError):
    """A deferred record failed to materialise and the field has no ``on_error`` to skip it."""


class Deferred(PerExampleField):
    """A batch field whose training tensor is made after selection (module docstring).

    Args:
        view: tensor ``[B, ...]``, what the scorer sees in place of this field (through
            ``view_transform`` when given).
        records: B per-example records, whatever ``materialise`` takes.
        materialise: ``record -> tensor`` (one example; the results are stacked into
            ``[b, ...]`` on the view's device). Must be picklable to cross DataLoader workers.
            If it has a ``collate(tensors, device)`` method, that makes the batch instead of
            stacking and moving: e.g. per-example uint8 rows, converted to float once per
            batch on the device (:class:`~jeststream.adapters.deferred_images.MaterialiseImage`).
        on_error: ``(record, exception) -> None`` called when ``materialise`` fails: return to
            skip the example (after warning and counting it), or raise. None: raise.
        view_transform: ``view [B, ...] -> scorer input [B, ...]``, applied by
            :meth:`scored_view` (:func:`scoring_views`) to the whole super-batch's view, on the
            view's device; row-wise (row i of the result depends on row i of the view only).
            None: the scorer sees ``view`` itself. Picklable, like ``materialise``.

    Concatenating base batches keeps the first one's ``materialise``, ``on_error`` and
    ``view_transform``.
    """

    __slots__ = ("view", "records", "materialise", "on_error", "view_transform")

    def __init__(
        self,
        view: torch.Tensor,
        records: Sequence[Any],
        materialise: Callable[[Any], torch.Tensor] | None = None,
        on_error: OnError | None = None,
        view_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(view, torch.Tensor) or view.ndim < 1:
            raise TypeError(
                f"Deferred view must be a tensor [B, ...], got {type(view).__name__}"
                + (f" of shape {tuple(view.shape)}" if isinstance(view, torch.Tensor) else "")
            )
        if len(records) != view.shape[0]:
            raise ValueError(
                f"Deferred has {len(records)} records for a view of {view.shape[0]} examples; "
                "give one record per example"
            )
        if materialise is not None and not callable(materialise):
            raise TypeError(f"Deferred materialise must be callable record -> tensor, got {materialise!r}")
        if view_transform is not None and not callable(view_transform):
            raise TypeError(
                f"Deferred view_transform must be callable view -> scorer input, got "
                f"{view_transform!r}"
            )
        self.view = view
        self.records = list(records)
        self.materialise = materialise
        self.on_error = on_error
        self.view_transform = view_transform

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        fn = getattr(self.materialise, "__name__", type(self.materialise).__name__)
        return f"Deferred(view={tuple(self.view.shape)} {self.view.dtype}, {len(self)} records, materialise={fn})"

    def __reduce__(self):
        return (
            Deferred,
            (self.view, self.records, self.materialise, self.on_error, self.view_transform),
        )

    def _with(self, view: torch.Tensor, records: list) -> Deferred:
        return Deferred(view, records, self.materialise, self.on_error, self.view_transform)

    def scored_view(self) -> torch.Tensor:
        """What the scorer sees: ``view_transform(view)``, or ``view`` without one."""
        return self.view if self.view_transform is None else self.view_transform(self.view)

    def concat(self, others: Sequence[Any]) -> Deferred:
        views = [self.view, *(o.view for o in others)]
        records = list(self.records)
        for o in others:
            records.extend(o.records)
        return self._with(torch.cat(views, dim=0), records)

    def index(self, idx: torch.Tensor) -> Deferred:
        rows = idx.tolist()
        return self._with(
            self.view.index_select(0, idx.to(self.view.device)), [self.records[i] for i in rows]
        )

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Deferred:
        return self._with(fn(self.view), self.records)

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.view

    def pin_memory(self) -> Deferred:  # torch DataLoader(pin_memory=True) calls this
        return self._with(self.view.pin_memory(), self.records)


def _no_materialise(path: str) -> ValueError:
    return ValueError(
        f"{path} is a Deferred field without a materialise function, so the selected examples "
        "could not be turned into training tensors; build it with Deferred(view, records, "
        "materialise=record -> tensor) (the adapters' deferred=True do), or yield the "
        "training tensor itself"
    )


def scoring_views(batch: Any) -> Any:
    """``batch`` with every Deferred field replaced by its scorer input
    (:meth:`Deferred.scored_view`); refuses a field without ``materialise`` (ValueError naming
    it)."""

    def view(f: PerExampleField, path: str) -> Any:
        if not isinstance(f, Deferred):
            return f
        if f.materialise is None:
            raise _no_materialise(path)
        return f.scored_view()

    return replace_fields(batch, view)


class Gathered(NamedTuple):
    batch: Any  # the sub-batch, Deferred fields materialised
    indices: torch.Tensor  # cpu LongTensor [k]: positions in the super-batch, after replacements
    replaced: tuple[tuple[int, int], ...]  # (failed position, its replacement), in order


class Materializer:
    """Gathers the selected examples of a super-batch and materialises their Deferred fields.

    ``workers`` threads (0: inline on the caller's thread) are started on first use and joined
    by :meth:`close`.
    """

    def __init__(self, workers: int = 4) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"materialise workers must be an int >= 0, got {workers!r}")
        self.workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.failed = 0  # records that failed and were replaced, over the Materializer's life

    def _map(self, fn: Callable[[Any], Any], items: list) -> list:
        if self.workers == 0 or len(items) <= 1:
            return [fn(x) for x in items]
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix="jeststream-materialise"
                )
            pool = self._pool
        return list(pool.map(fn, items))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Materializer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def gather(
        self,
        super_batch: Any,
        idx: torch.Tensor,
        order: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ) -> Gathered:
        """The examples ``idx`` of ``super_batch`` (``index_batch``), Deferred fields
        materialised. A failed record whose ``on_error`` returns is replaced by the next of
        ``order`` (all positions, best first, or a function giving them, called only then;
        default: position order) not yet tried."""
        idx = idx.detach().to("cpu", torch.long)
        fields: list[tuple[str, Deferred]] = []

        def note(f: PerExampleField, path: str) -> PerExampleField:
            if isinstance(f, Deferred):
                if f.materialise is None:
                    raise _no_materialise(path)
                fields.append((path, f))
            return f

        replace_fields(super_batch, note)
        if not fields:
            return Gathered(index_batch(super_batch, idx), idx, ())
        chosen = idx.tolist()
        size = len(fields[0][1])
        tried = set(chosen)

        def candidates() -> Iterator[int]:
            ranked = order() if callable(order) else order
            for i in range(size) if ranked is None else ranked.tolist():
                if i not in tried:
                    yield i

        spare = candidates()
        done: dict[int, list[torch.Tensor]] = {}  # position -> one tensor per field
        replaced: list[tuple[int, int]] = []
        pending = list(range(len(chosen)))  # slots of ``chosen`` still to materialise
        while pending:
            results = self._map(lambda s: _materialise_one(fields, chosen[s]), pending)
            retry = []
            for slot, (tensors, failure) in zip(pending, results):
                if failure is None:
                    done[chosen[slot]] = tensors
                    continue
                path, field, exc = failure
                record = field.records[chosen[slot]]
                if field.on_error is None:
                    raise DeferredRecordError(
                        f"{path}: the deferred record of example {chosen[slot]} of the "
                        f"super-batch ({_describe(record)}) failed to materialise: "
                        f"{type(exc).__name__}: {exc}; give the Deferred field an on_error "
                        "handler to skip such records (the adapters' deferred=True do)"
                    ) from exc
                field.on_error(record, exc)  # warns and counts, or raises
                self.failed += 1
                nxt = next(spare, None)
                if nxt is None:
                    raise DeferredRecordError(
                        f"{path}: no candidate left to replace example {chosen[slot]} of the "
                        f"super-batch, whose record failed ({type(exc).__name__}: {exc}); "
                        f"every one of its {size} examples was selected or failed"
                    ) from exc
                replaced.append((chosen[slot], nxt))
                tried.add(nxt)
                chosen[slot] = nxt
                retry.append(slot)
            pending = retry
        final = torch.tensor(chosen, dtype=torch.long)
        sub = index_batch(super_batch, final)
        stacked = {
            path: _collate(f, [done[i][j] for i in chosen]) for j, (path, f) in enumerate(fields)
        }
        out = replace_fields(sub, lambda f, p: stacked[p] if isinstance(f, Deferred) else f)
        return Gathered(out, final, tuple(replaced))


def _materialise_one(
    fields: list[tuple[str, Deferred]], i: int
) -> tuple[list[torch.Tensor] | None, tuple[str, Deferred, BaseException] | None]:
    out = []
    for path, f in fields:
        try:
            t = f.materialise(f.records[i])
            if isinstance(t, np.ndarray) and not t.flags.writeable:
                t = t.copy()  # e.g. np.frombuffer's view: torch warns on a read-only array
            out.append(t if isinstance(t, torch.Tensor) else torch.as_tensor(t))
        except Exception as exc:  # noqa: BLE001 -- a bad record goes to the field's policy
            return None, (path, f, exc)
    return out, None


def _collate(field: Deferred, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The materialised examples of ``field`` as one batch tensor on its view's device."""
    collate = getattr(field.materialise, "collate", None)
    if collate is not None:
        return collate(tensors, field.view.device)
    return torch.stack(tensors).to(field.view.device)


def _describe(record: Any) -> str:
    key = getattr(record, "key", None)
    if key is not None:
        return f"key {key!r}"
    text = repr(record)
    return text if len(text) <= 80 else text[:77] + "..."


def materialise_batch(batch: Any, workers: int = 0) -> Any:
    """``batch`` with every Deferred field materialised, all examples (e.g. to iterate a
    deferred base loader without JEST). A failed record raises."""
    size = None

    def note(f: PerExampleField, path: str) -> PerExampleField:
        nonlocal size
        size = len(f)
        return f

    replace_fields(batch, note)
    if size is None:
        return batch

    def strict(f: PerExampleField, path: str) -> PerExampleField:
        if isinstance(f, Deferred):
            return Deferred(f.view, f.records, f.materialise, None, f.view_transform)
        return f

    with Materializer(workers) as m:
        return m.gather(replace_fields(batch, strict), torch.arange(size)).batch


# --- seeded augmentation ------------------------------------------------------------------

_RNG_LOCK = threading.RLock()  # torch's, random's and numpy's default generators are global

# Transforms without random draws: run outside the lock (module.qualname, no imports needed).
_DETERMINISTIC = frozenset(
    {
        "torchvision.transforms.transforms.ToTensor",
        "torchvision.transforms.transforms.PILToTensor",
        "torchvision.transforms.transforms.Normalize",
        "torchvision.transforms.transforms.Resize",
        "torchvision.transforms.transforms.CenterCrop",
        "torchvision.transforms.transforms.ConvertImageDtype",
        "open_clip.transform.MaybeToTensor",
        "open_clip.transform.MaybeConvertMode",
    }
)
_RRC = "torchvision.transforms.transforms.RandomResizedCrop"


_NO_DRAWS_ATTR = "__jeststream_no_random_draws__"


def no_random_draws(transform: Callable) -> Callable:
    """Mark ``transform`` as making no random draws, and return it.

    :class:`SeededTransform` then runs it as it is, outside the lock and without swapping the
    random generators' states (torch's, Python's and numpy's: ~0.1 ms an example, which a JEST
    base loader pays for 1/ratio examples per trained one). Use it for a plain function (a
    decode, a fixed resize, a dtype conversion); known torchvision and open_clip
    deterministic transforms need no mark. Works as a decorator.
    """
    if not callable(transform):
        raise TypeError(f"no_random_draws needs a callable transform, got {transform!r}")
    try:
        setattr(transform, _NO_DRAWS_ATTR, True)
    except AttributeError as exc:  # e.g. a builtin or a class with __slots__
        raise TypeError(
            f"cannot mark {transform!r} (no attribute can be set on it); wrap it in a "
            "function and mark that"
        ) from exc
    return transform


def _qualname(t: Any) -> str:
    return f"{type(t).__module__}.{type(t).__qualname__}"


class _Streams:
    """One example's random streams, carried from one locked draw to the next. Python's and
    numpy's are set up only for transforms that may use them (numpy's state swap costs ~0.2 ms;
    torchvision's RandomResizedCrop draws from torch only)."""

    __slots__ = ("seed", "torch", "py", "np")

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.torch = torch.Generator().manual_seed(seed).get_state()
        self.py: Any = None
        self.np: Any = None

    @contextlib.contextmanager
    def drawing(self, all_streams: bool = True) -> Iterator[None]:
        with _RNG_LOCK:
            saved_torch = torch.get_rng_state()
            torch.set_rng_state(self.torch)
            if all_streams:
                saved_py, saved_np = random.getstate(), np.random.get_state()
                if self.py is None:
                    random.seed(self.seed)
                    np.random.seed(self.seed % (2**32))
                else:
                    random.setstate(self.py)
                    np.random.set_state(self.np)
            try:
                yield
            finally:
                self.torch = torch.get_rng_state()
                torch.set_rng_state(saved_torch)
                if all_streams:
                    self.py, self.np = random.getstate(), np.random.get_state()
                    random.setstate(saved_py)
                    np.random.set_state(saved_np)


def _rrc_apply(t: Any, image: Any, streams: _Streams) -> Any:
    from torchvision.transforms import functional as F

    with streams.drawing(all_streams=False):
        i, j, h, w = t.get_params(image, t.scale, t.ratio)
    return F.resized_crop(image, i, j, h, w, t.size, t.interpolation, antialias=t.antialias)


class SeededTransform:
    """``transform(image)`` with its random draws seeded per example: ``st(image, seed)``.

    Thread-safe, and the same result in any process or thread for the same seed. A torchvision
    ``Compose`` is run step by step: known deterministic steps outside the lock, a
    ``RandomResizedCrop`` with only its parameter draw inside, anything else wholly inside it
    (unless marked with :func:`no_random_draws`). Picklable when ``transform`` is.
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable image -> tensor, got {transform!r}")
        self.transform = transform
        steps = getattr(transform, "transforms", None)
        if _qualname(transform).endswith("transforms.Compose") and isinstance(steps, list):
            self._steps = list(steps)
        else:
            self._steps = [transform]
        self._kinds = [self._kind(t) for t in self._steps]
        self._draws = any(k != "free" for k in self._kinds)

    @staticmethod
    def _kind(t: Any) -> str:
        name = _qualname(t)
        if name in _DETERMINISTIC or getattr(t, _NO_DRAWS_ATTR, False):
            return "free"
        if name == _RRC:
            return "rrc"
        return "locked"

    def __getstate__(self) -> dict:
        return {"transform": self.transform}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["transform"])

    def __call__(self, image: Any, seed: int) -> Any:
        if not self._draws:  # e.g. an eval transform: nothing to seed
            return self.transform(image)
        streams = _Streams(seed)
        x = image
        for t, kind in zip(self._steps, self._kinds):
            if kind == "free":
                x = t(x)
            elif kind == "rrc":
                x = _rrc_apply(t, x, streams)
            else:
                with streams.drawing():
                    x = t(x)
        return x
