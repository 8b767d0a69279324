"""Device helpers shared by the layers that run models: which device kind needs streams and
events, the model under its wrappers, and a device's current stream.

Imports nothing else of the package, so that any module may use it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["current_stream", "is_accelerator", "unwrap_model"]


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
    """Whether work on ``device`` is queued on streams (anything but the CPU and meta)."""
    return device.type not in ("cpu", "meta")


def current_stream(device: torch.device) -> torch.Stream:
    return torch.accelerator.current_stream(device)
