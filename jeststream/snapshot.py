"""A scoring copy of the live learner, refreshed in place.

Scoring must never touch the live learner (weights, train/eval mode, BatchNorm statistics,
gradients, RNG), and with asynchronous scoring the forward runs in another thread while the
training step updates the learner. So we keep a separate module of the same architecture, in
eval mode with gradients off, and copy the learner's parameters and buffers into it in place
(``copy_`` into the existing storage, no reallocation) every ``refresh_every`` yielded batches.

Refresh and scoring are ordered by a lock, so a forward never sees a half-copied snapshot. On an
accelerator the copies and forwards are queued on different streams, so the lock alone orders
only the *issuing*: two events make the device honour the same order (a forward waits for the
last refresh's copies, a refresh waits for the last forward that read the snapshot).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["LearnerSnapshot", "unwrap_model", "is_accelerator"]

logger = logging.getLogger(__name__)

_KEEP_VERSIONS = 256  # refresh steps remembered for staleness; far more than prefetch ever needs


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for _ in range(16):  # wrappers nest (compile(DDP(model))), but never deeply
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            model = orig
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        break
    return model


def is_accelerator(device: torch.device) -> bool:
    return device.type not in ("cpu", "meta")


def _current_stream(device: torch.device) -> torch.Stream:
    return torch.accelerator.current_stream(device)


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


class LearnerSnapshot:
    """Deep copy of ``learner`` (unwrapped) in eval mode, refreshed in place from the live one.

    Args:
        learner: the live learner (possibly DDP- or torch.compile-wrapped).
        dtype: optional floating dtype for the snapshot (e.g. torch.bfloat16).
        device: where the snapshot lives; defaults to the learner's device.
    """

    def __init__(
        self,
        learner: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(
                f"snapshot_dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}"
            )
        live = unwrap_model(learner)
        self.live = live
        if device is None:
            first = next(iter(live.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        if is_accelerator(device) and device.index is None:  # "cuda" -> "cuda:<current>"
            device = torch.device(device.type, torch.accelerator.current_device_index())
        self.device = device
        self.dtype = dtype
        try:
            module = copy.deepcopy(live)
        except Exception as exc:  # e.g. modules holding locks or open files
            raise TypeError(
                f"cannot deep-copy the learner ({type(live).__name__}) to make a scoring snapshot: "
                f"{exc}. Make the module deep-copyable (drop non-copyable attributes)"
            ) from exc
        module.to(self.device)
        if dtype is not None:
            module.to(dtype)
        module.eval()
        module.requires_grad_(False)
        for p in module.parameters():
            p.grad = None
        self.module = module
        self._match(live, module)  # fail now if the copy does not mirror the learner
        self._lock = threading.Lock()
        self.version = 0
        self._refreshed_at: OrderedDict[int, int] = OrderedDict({0: 0})
        self._ready_event: torch.Event | None = None  # set after the copies of a refresh
        self._used_event: torch.Event | None = None  # set after the last forward on the snapshot

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

    @torch.no_grad()
    def refresh(self, step: int) -> int:
        """Copy the live learner's parameters and buffers into the snapshot in place.

        ``step`` is the number of batches yielded so far (for staleness). Returns the new version.
        On an accelerator the copies are queued on the caller's current stream, i.e. after the
        optimizer step the caller already queued there.
        """
        accel = is_accelerator(self.device)
        with self._lock:
            if accel and self._used_event is not None:
                _current_stream(self.device).wait_event(self._used_event)
            # Re-read the live tensors each time: a training loop may have replaced a Parameter.
            pairs = self._match(self.live, self.module)
            for src, dst in pairs:
                if src.shape != dst.shape:
                    raise ValueError(
                        f"learner tensor shape changed from {tuple(dst.shape)} to "
                        f"{tuple(src.shape)}; the snapshot is refreshed in place and needs fixed shapes"
                    )
            _copy_all([d for _, d in pairs], [s for s, _ in pairs])
            if accel:
                self._ready_event = _current_stream(self.device).record_event()
            self.version += 1
            self._refreshed_at[self.version] = step
            while len(self._refreshed_at) > _KEEP_VERSIONS:
                self._refreshed_at.popitem(last=False)
            return self.version

    @contextmanager
    def use(self) -> Iterator[tuple[nn.Module, int]]:
        """Hold the snapshot for a forward: yields ``(module, version)``; no refresh meanwhile."""
        accel = is_accelerator(self.device)
        with self._lock:
            if accel and self._ready_event is not None:
                _current_stream(self.device).wait_event(self._ready_event)
            try:
                yield self.module, self.version
            finally:
                if accel:
                    self._used_event = _current_stream(self.device).record_event()

    def staleness(self, version: int, step: int) -> int:
        """Yielded batches between the refresh that made ``version`` and ``step`` (-1: unknown)."""
        at = self._refreshed_at.get(version)
        return -1 if at is None else step - at

    def reset_steps(self, step: int) -> None:
        """Re-anchor the current version at ``step`` (after a restore moved the step counter)."""
        with self._lock:
            self._refreshed_at[self.version] = step
