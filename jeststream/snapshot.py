"""Scoring copies of the live learner: versioned, refreshed in place, never torn.

Scoring must never touch the live learner (weights, train/eval mode, BatchNorm statistics,
gradients, RNG), and with asynchronous scoring the forward runs in another thread while the
training step updates the learner. So we keep separate modules of the same architecture (*slots*),
in eval mode with gradients off, and copy the learner's parameters and buffers into one of them
in place (``copy_`` into the existing storage) when the loader refreshes.

Each refresh publishes a *version* tagged with the training step it was taken at. A forward holds
the version it reads (``use``), and a refresh writes into a slot that no forward holds and no
scheduled super-batch still needs -- so a refresh never waits for a forward (copy-then-swap over
a small pool) and a forward never sees a half-copied snapshot. Which version a super-batch is
scored with is the caller's choice: the latest one, or (deterministic scoring) the newest one
taken at or before a given step, see :func:`scheduled_step`. ``release_before(step)`` tells the
pool which versions can be recycled; the latest version is always kept.

On an accelerator the copies and forwards are queued on different streams, so the lock orders
only the *issuing*: per-slot events make the device honour the same order (a forward waits for
its slot's copies, a refresh into a slot waits for the last forward that read it).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# unwrap_model and is_accelerator were first defined here; they stay importable from here
from jeststream.device import current_stream, is_accelerator, unwrap_model

__all__ = [
    "LearnerSnapshot",
    "Stopped",
    "is_accelerator",
    "scheduled_step",
    "scoring_device",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

_KEEP_VERSIONS = 256  # refresh steps remembered for staleness; far more than prefetch ever needs
_POLL_S = 0.05


def scheduled_step(step: int, *, start: int, lag: int, refresh_every: int) -> int:
    """The training step whose snapshot scores super-batch ``step`` under deterministic scoring.

    Refreshes happen at the pass start ``start`` and at every step ``s > start`` with
    ``s % refresh_every == 0`` (none but the start for ``refresh_every == 0``). Super-batch t is
    scored by the newest of those taken at or before ``t - lag``; before the pass start, by the
    pass start's. ``lag = 0`` is what synchronous scoring does.
    """
    s = step - lag
    if s <= start or refresh_every == 0:
        return start
    return max(start, s - s % refresh_every)


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """In-place ``dst.copy_(src)`` for every pair; one fused call where the backend has it
    (hundreds of parameters -> a handful of kernel launches instead of hundreds)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        try:
            foreach(dsts, srcs, non_blocking=True)
            return
        except (RuntimeError, TypeError):  # mixed devices/dtypes on some backends
            pass
    for d, s in zip(dsts, srcs):
        d.copy_(s, non_blocking=True)


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [("p:" + n, t) for n, t in module.named_parameters()] + [
        ("b:" + n, t) for n, t in module.named_buffers()
    ]


class _Slot:
    __slots__ = ("module", "version", "step", "readers", "writing", "ready_event", "used_event")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.version: int | None = None  # None while unpublished (new, or being written)
        self.step: int | None = None
        self.readers = 0
        self.writing = False
        self.ready_event: torch.Event | None = None  # after the copies into it
        self.used_event: torch.Event | None = None  # after the last forward that read it


def scoring_device(learner: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """The device the learner snapshot scores on: ``device``, else the learner's (its first
    parameter's; the CPU for a model without parameters), with an accelerator's index resolved."""
    if device is None:
        first = next(iter(unwrap_model(learner).parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if is_accelerator(device) and device.index is None:  # "cuda" -> "cuda:<current>"
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return device


class LearnerSnapshot:
    """Deep copies of ``learner`` (unwrapped) in eval mode, refreshed in place from the live one.

    Args:
        learner: the live learner (possibly DDP- or torch.compile-wrapped).
        dtype: optional floating dtype for the snapshot (e.g. torch.bfloat16).
        device: where the snapshot lives; defaults to the learner's device.
        max_copies: slots in the pool (at most this many copies of the weights exist). Two let
            a refresh write while a forward reads; deterministic scoring with lag L needs L + 1.
        timeout: seconds a wait (for a free slot, or for a scheduled version) may take before it
            raises ``TimeoutError``; None waits for ever.
    """

    def __init__(
        self,
        learner: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        max_copies: int = 2,
        timeout: float | None = None,
    ) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(
                f"snapshot_dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}"
            )
        if isinstance(max_copies, bool) or not isinstance(max_copies, int) or max_copies < 1:
            raise ValueError(f"max_copies must be an int >= 1, got {max_copies!r}")
        live = unwrap_model(learner)
        self.live = live
        self.device = scoring_device(learner, device)
        self.dtype = dtype
        self.max_copies = max_copies
        self.timeout = timeout
        self._cond = threading.Condition()
        first_slot = _Slot(self._make_module())
        self._match(live, first_slot.module)  # fail now if the copy does not mirror the learner
        first_slot.version, first_slot.step = 0, 0  # the construction-time weights
        self._slots = [first_slot]
        self._latest = first_slot
        self._floor: int | None = None  # versions taken before this step may be recycled
        self.version = 0
        self._refreshed_at: OrderedDict[int, int] = OrderedDict({0: 0})

    def _make_module(self, source: nn.Module | None = None) -> nn.Module:
        """A scoring copy of ``source`` (default: the live learner)."""
        try:
            module = copy.deepcopy(self.live if source is None else source)
        except Exception as exc:  # e.g. modules holding locks or open files
            raise TypeError(
                f"cannot deep-copy the learner ({type(self.live).__name__}) to make a scoring "
                f"snapshot: {exc}. Make the module deep-copyable (drop non-copyable attributes)"
            ) from exc
        module.to(self.device)
        if self.dtype is not None:
            module.to(self.dtype)
        module.eval()
        module.requires_grad_(False)
        for p in module.parameters():
            p.grad = None
        return module

    @property
    def module(self) -> nn.Module:
        """The latest published version's module."""
        return self._latest.module


    @property
    def copies(self) -> int:
        """Slots allocated so far (copies of the weights held)."""
        return len(self._slots)

    @staticmethod
    def _match(live: nn.Module, snap: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for kind, src_items, dst_items in (
            ("parameter", live.named_parameters(), snap.named_parameters()),
            ("buffer", live.named_buffers(), snap.named_buffers()),
        ):
            src, dst = dict(src_items), dict(dst_items)
            if src.keys() != dst.keys():
                missing = sorted(set(src) ^ set(dst))[:5]
                raise ValueError(
                    f"the learner's {kind}s changed since the snapshot was made (e.g. {missing}); "
                    "build the JESTLoader after the model is fully constructed"
                )
            pairs.extend((src[name], dst[name]) for name in src)
        return pairs

    # -- the pool ----------------------------------------------------------------------------

    def _newest_at_step(self) -> dict[int, int]:
        """step -> the newest published version taken at it (an older copy of the same step,
        left by a forward that held it through a re-take, is superseded)."""
        newest: dict[int, int] = {}
        for s in self._slots:
            if s.version is not None:
                newest[s.step] = max(newest.get(s.step, -1), s.version)
        return newest

    def _free_slot(self, step: int) -> _Slot | None:
        """A slot to write the copy of ``step`` into (caller holds the condition): one no
        forward holds and no schedule needs; other slots before the latest, so that the latest
        stays readable while it is not needed. A copy taken at ``step`` itself is free: the new
        one supersedes it."""
        for slot in self._slots:
            if slot.step == step and not (slot.readers or slot.writing):
                return slot
        latest = None
        newest = self._newest_at_step()
        for slot in self._slots:
            if slot.readers or slot.writing:
                continue
            published = slot.version is not None
            if (
                published
                and self._floor is not None
                and slot.step >= self._floor
                and newest[slot.step] == slot.version
            ):
                continue  # scheduled
            if published and slot is self._latest:
                latest = slot
                continue
            return slot
        return latest

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _wait(self, deadline: float | None, what: Callable[[], str]) -> None:
        """One bounded wait on the condition (caller holds it); raises past the deadline."""
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"learner snapshot: {what()} for more than {self.timeout:g}s")
        self._cond.wait(_POLL_S)

    def _take_slot(self, step: int) -> _Slot:
        """A slot to write into (caller holds the condition), marked as being written."""
        deadline = self._deadline()
        while True:
            slot = self._free_slot(step)
            if slot is None and len(self._slots) < self.max_copies:
                # Copied from a snapshot, not from the live learner: every copy keeps the
                # structure the learner had when it was built, so the refresh below still
                # catches a replaced Parameter of another shape.
                slot = _Slot(self._make_module(self._slots[0].module))
                self._slots.append(slot)
            if slot is not None:
                slot.version = slot.step = None
                slot.writing = True
                return slot
            self._wait(
                deadline,
                lambda: f"all {self.max_copies} copies were held by forwards or still "
                f"scheduled (steps {sorted(s.step for s in self._slots if s.step is not None)})",
            )

    def _publish(self, slot: _Slot, version: int, step: int) -> None:
        slot.version, slot.step, slot.writing = version, step, False
        self._latest = slot
        self._refreshed_at[version] = step
        while len(self._refreshed_at) > _KEEP_VERSIONS:
            self._refreshed_at.popitem(last=False)
        self._cond.notify_all()

    @torch.no_grad()
    def refresh(self, step: int) -> int:
        """Copy the live learner's parameters and buffers into a free slot and publish it.

        ``step`` is the number of batches yielded so far (the training steps the weights have
        seen). Returns the new version. Never waits for a forward: it writes into a slot that
        no forward holds (allocating one up to ``max_copies``). On an accelerator the copies are
        queued on the caller's current stream, i.e. after the optimizer step it queued there.
        """
        accel = is_accelerator(self.device)
        # Re-read the live tensors each time: a training loop may have replaced a Parameter.
        with self._cond:
            slot = self._take_slot(step)
            self.version += 1
            version = self.version
        try:
            pairs = self._match(self.live, slot.module)
            for src, dst in pairs:
                if src.shape != dst.shape:
                    raise ValueError(
                        f"learner tensor shape changed from {tuple(dst.shape)} to "
                        f"{tuple(src.shape)}; the snapshot is refreshed in place and needs fixed "
                        "shapes"
                    )
            if accel and slot.used_event is not None:
                current_stream(self.device).wait_event(slot.used_event)
            _copy_all([d for _, d in pairs], [s for s, _ in pairs])
            if accel:
                slot.ready_event = current_stream(self.device).record_event()
        except BaseException:
            with self._cond:  # the slot holds a partial copy: free, never readable
                slot.writing = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._publish(slot, version, step)
        return version

    def release_before(self, step: int | None) -> None:
        """Versions taken before ``step`` are no longer needed (None: only the latest is)."""
        with self._cond:
            self._floor = None if step is None else int(step)
            self._cond.notify_all()

    def _pick(self, step: int | None) -> _Slot | None:
        published = [s for s in self._slots if s.version is not None]
        if not published:
            return None
        if step is None:
            return self._latest if self._latest.version is not None else None
        if self._latest.version is None or self._latest.step < step:
            return None  # not taken yet
        at_or_before = [s for s in published if s.step <= step]
        if at_or_before:
            return max(at_or_before, key=lambda s: (s.step, s.version))
        # A restore without the snapshot weights: the copy taken at the restore (the learner as
        # restored, the oldest copy after reset_steps) stands in for the older scheduled ones.
        return min(published, key=lambda s: (s.step, s.version))

    @contextmanager
    def use(
        self, step: int | None = None, *, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[tuple[nn.Module, int]]:
        """Hold a version for a forward: yields ``(module, version)``.

        ``step=None``: the latest version. Otherwise the newest version taken at or before
        ``step``, waiting until the consumer has taken the snapshot at ``step`` or later.
        """
        accel = is_accelerator(self.device)
        deadline = self._deadline()
        with self._cond:
            while True:
                if should_stop is not None and should_stop():
                    raise Stopped  # checked first: a stopped producer takes no copy
                slot = self._pick(step)
                if slot is not None:
                    break
                self._wait(
                    deadline,
                    lambda: f"waited for the snapshot of step {step} (latest: "
                    f"{self._latest.step}); is the training loop still calling next()?",
                )
            slot.readers += 1
        try:
            if accel and slot.ready_event is not None:
                current_stream(self.device).wait_event(slot.ready_event)
            yield slot.module, int(slot.version)
        finally:
            with self._cond:
                if accel:
                    slot.used_event = current_stream(self.device).record_event()
                slot.readers -= 1
                self._cond.notify_all()

    def staleness(self, version: int, step: int) -> int:
        """Yielded batches between the refresh that made ``version`` and ``step`` (-1: unknown)."""
        at = self._refreshed_at.get(version)
        return -1 if at is None else step - at

    def reset_steps(self, step: int) -> None:
        """Forget every version (after a restore or a jump moved the step counter): their steps
        belong to the timeline that was left, and kept they would look scheduled (a restore to
        an earlier step would wait for a free copy) or stand in for the restored learner. The
        next :meth:`refresh` publishes again; until then :meth:`use` waits."""
        with self._cond:
            if any(s.readers or s.writing for s in self._slots):
                raise RuntimeError("cannot move the snapshot's steps while a forward is using it")
            self._refreshed_at[self.version] = step
            for s in self._slots:
                s.version = s.step = None
            self._cond.notify_all()

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self, from_step: int | None) -> dict[str, Any]:
        """Weights of every kept version taken at or after ``from_step`` (always the latest; only
        it for None), on the CPU: what the scoring of the super-batches after a checkpoint needs."""
        with self._cond:
            newest_at = self._newest_at_step()
            slots = [
                s
                for s in self._slots
                if s.version is not None
                and (
                    s is self._latest
                    or (
                        from_step is not None
                        and s.step >= from_step
                        and newest_at[s.step] == s.version
                    )
                )
            ]
            for s in slots:
                s.readers += 1  # not recycled while we copy
        try:
            if is_accelerator(self.device):
                torch.accelerator.synchronize(self.device)
            versions = [
                {
                    "version": int(s.version),
                    "step": int(s.step),
                    "tensors": {n: t.detach().to("cpu", copy=True) for n, t in _named_tensors(s.module)},
                }
                for s in sorted(slots, key=lambda s: (s.step, s.version))
            ]
        finally:
            with self._cond:
                for s in slots:
                    s.readers -= 1
                self._cond.notify_all()
        return {"versions": versions, "version": self.version}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the pool's versions by those of :meth:`state_dict` (no forward may run)."""
        versions = state.get("versions") if isinstance(state, dict) else None
        if not versions:
            raise ValueError(
                "not a snapshot state (no 'versions'); pass loader.state_dict(include_snapshot=True)"
            )
        if len(versions) > self.max_copies:
            raise ValueError(
                f"the snapshot state holds {len(versions)} versions but this loader keeps at most "
                f"{self.max_copies} copies; restore with the same prefetch / deterministic settings"
            )
        own_shapes = {n: tuple(t.shape) for n, t in _named_tensors(self._slots[0].module)}
        for v in versions:  # validate everything before the pool is touched
            saved = v["tensors"]
            if own_shapes.keys() != saved.keys():
                diff = sorted(set(own_shapes) ^ set(saved))[:5]
                raise ValueError(
                    f"the snapshot state does not match this learner (e.g. {diff}); restore "
                    "it into a loader over the same model architecture"
                )
            for name, shape in own_shapes.items():
                if tuple(saved[name].shape) != shape:
                    raise ValueError(
                        f"snapshot state tensor {name} has shape {tuple(saved[name].shape)}, the "
                        f"learner's has {shape}"
                    )
        with self._cond:
            if any(s.readers or s.writing for s in self._slots):
                raise RuntimeError("cannot restore the snapshot while a forward is using it")
            for s in self._slots:
                s.version = s.step = None
            while len(self._slots) < len(versions):
                self._slots.append(_Slot(self._make_module()))
            for slot, v in zip(self._slots, versions):
                for name, dst in _named_tensors(slot.module):
                    dst.copy_(v["tensors"][name])
                if is_accelerator(self.device):
                    slot.ready_event = current_stream(self.device).record_event()
                self._publish(slot, int(v["version"]), int(v["step"]))
            self.version = max(int(state.get("version", 0)), self.version)


class Stopped(Exception):
    """Raised inside ``use()`` when the caller's ``should_stop()`` turned true while waiting."""
