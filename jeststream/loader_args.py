"""Argument checks and resolution for :class:`jeststream.loader.JESTLoader`'s constructor.

Pure functions of the arguments: each returns the resolved value or raises with the value
and the fix. Nothing here holds state.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from typing import Any

import torch
from torch import nn

from jeststream.device import is_accelerator, unwrap_model
from jeststream.embed import default_loss
from jeststream.reference_cache import ReferenceCache
from jeststream.selection import LOSSES
from jeststream.selection_log import SelectionLog

__all__ = [
    "SCORING",
    "check_distributed_options",
    "check_models",
    "check_options",
    "model_loss",
    "resolve_ratio",
    "resolve_scoring",
    "resolve_selection_log",
]

logger = logging.getLogger("jeststream.loader")  # the loader's messages

SCORING = ("auto", "sync", "lagged", "latest")
_LOG_MODES = ("auto", "a", "w")


def resolve_scoring(
    scoring: str,
    async_scoring: bool | None,
    deterministic: bool | None,
    prefetch: int | None,
    device: torch.device,
) -> tuple[str, bool, bool, int]:
    """``scoring`` (or the deprecated booleans) -> (name, async_scoring, deterministic, prefetch).

    "sync": inline, the current learner (lag 0). "lagged": a background thread scores super-batch
    t with the snapshot after step t - prefetch (deterministic). "latest": a background thread
    scores with whatever snapshot is newest (timing-dependent). "auto": "sync" on the CPU,
    "lagged" with prefetch 1 on an accelerator.
    """
    if scoring not in SCORING:
        raise ValueError(f"scoring={scoring!r} is not one of {SCORING}")
    if async_scoring is not None or deterministic is not None:
        if scoring != "auto":
            raise ValueError(
                f"scoring={scoring!r} and the deprecated async_scoring=/deterministic= were both "
                "given; pass scoring= alone"
            )
        a = True if async_scoring is None else bool(async_scoring)
        d = bool(deterministic)
        name = "lagged" if d else ("latest" if a else "sync")
        spelling = (
            "scoring='lagged' (which scores in a background thread)"
            if d and not a
            else f"scoring={name!r}"
        )
        warnings.warn(
            f"JESTLoader(async_scoring=, deterministic=) is deprecated; pass {spelling}",
            DeprecationWarning,
            stacklevel=3,
        )
        return name, a, d, 2 if prefetch is None else prefetch  # their default was prefetch=2
    if scoring == "auto":
        scoring = "lagged" if is_accelerator(device) else "sync"
    return scoring, scoring != "sync", scoring == "lagged", 1 if prefetch is None else prefetch


def check_models(learner: Any, reference: Any) -> None:
    """The learner is a module; the reference a separate module (sharing no parameter with the
    learner, which freezing it would freeze), a ReferenceCache, or None."""
    if not isinstance(learner, nn.Module):
        raise TypeError(f"learner must be a torch.nn.Module, got {type(learner).__name__}")
    if reference is not None and not isinstance(reference, (nn.Module, ReferenceCache)):
        raise TypeError(
            "reference must be a torch.nn.Module, a ReferenceCache or None, got "
            f"{type(reference).__name__}"
        )
    ref_model = reference if isinstance(reference, nn.Module) else None
    if ref_model is not None and unwrap_model(ref_model) is unwrap_model(learner):
        raise ValueError(
            "reference is the learner itself; pass a separate frozen reference model "
            "(freezing it would stop the learner from training)"
        )
    if ref_model is not None:
        live = {id(p): n for n, p in unwrap_model(learner).named_parameters()}
        shared = [live[id(p)] for p in unwrap_model(ref_model).parameters() if id(p) in live]
        if shared:
            raise ValueError(
                f"the reference shares {len(shared)} parameter(s) with the learner (e.g. "
                f"{shared[:3]}); freezing the reference would freeze them in the learner too. "
                "Pass an independent reference, e.g. copy.deepcopy of the reference model"
            )


def resolve_selection_log(
    selection_log: Any, selection_log_mode: str | None
) -> tuple[SelectionLog | None, str | None, str]:
    """(the caller's SelectionLog or None, the log's path or None, the mode "auto"/"a"/"w").

    A path is opened by the loader at the first yielded batch: a fresh run overwrites an old
    log at that path, a run restored with load_state_dict() appends to it (the reader keeps the
    last record of a re-drawn step). Its directory is checked now, before any GPU-hour. A
    SelectionLog the caller opened keeps its own mode; the run configuration is written beside
    it at the first yielded batch, as for a path.
    """
    if selection_log_mode is not None:
        if selection_log_mode not in _LOG_MODES:
            raise ValueError(
                f"selection_log_mode={selection_log_mode!r} must be 'auto', 'a' (append) or "
                "'w' (overwrite)"
            )
        if isinstance(selection_log, SelectionLog):
            raise ValueError(
                "selection_log_mode= applies to a path; the SelectionLog passed as "
                f"selection_log carries its own mode ({selection_log.mode!r})"
            )
        if selection_log_mode != "auto":
            warnings.warn(
                f"JESTLoader(selection_log_mode={selection_log_mode!r}) is deprecated; pass "
                f"selection_log=SelectionLog(path, mode={selection_log_mode!r})",
                DeprecationWarning,
                stacklevel=3,
            )
    mode = selection_log_mode or "auto"
    if isinstance(selection_log, SelectionLog):
        return selection_log, os.fspath(selection_log.path), mode
    if selection_log is None:
        return None, None, mode
    if not isinstance(selection_log, (str, os.PathLike)):
        raise TypeError(
            "selection_log must be a path, a jeststream.selection_log.SelectionLog or None, "
            f"got {type(selection_log).__name__}"
        )
    path = os.fspath(selection_log)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ValueError(
            f"selection_log={path!r}: directory {parent!r} is not writable; "
            "pass a path in a writable directory"
        )
    return None, path, mode


def resolve_ratio(ratio: Any) -> int:
    """n = round(1/ratio) base batches per super-batch (n >= 2); logs when 1/n != ratio."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
        raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}")
    n = round(1 / ratio)
    if n < 2:
        raise ValueError(
            f"ratio={ratio} gives n=round(1/ratio)={n} base batches per super-batch; "
            "JEST needs n >= 2, i.e. ratio <= 2/3"
        )
    if abs(1 / n - ratio) > 1e-9:
        logger.warning("ratio=%s is applied as 1/%d = %.4f", ratio, n, 1 / n)
    return n


def model_loss(loss: str | None, learner: nn.Module, reference: Any) -> tuple[str, bool]:
    """(the loss, whether it is the fallback nobody chose) for ``JESTLoader(loss=loss)``: the
    loss given, else the learner's family's (else the reference's, or its cache's bias)."""
    if loss is not None:
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not one of {LOSSES} (or None: the model's)")
        return loss, False
    found = default_loss(learner)
    if found is None and isinstance(reference, nn.Module):
        found = default_loss(reference)
    if found is None and isinstance(reference, ReferenceCache):
        found = "softmax" if reference.logit_bias is None else "sigmoid"
    return (found, False) if found is not None else ("sigmoid", True)


def check_options(
    *, reference: Any, spec: Any, timeout: Any, refresh_every: Any, prefetch: Any, seed: Any,
    key_fn: Any, return_info: Any = False,
) -> None:
    """The loader's plain options, each against its documented domain (``spec``: its
    SelectionSpec); ``return_info`` warns that it is deprecated."""
    if reference is None and spec.criterion != "hard_learner":
        raise ValueError(
            f"reference=None only works with criterion='hard_learner', got {spec.criterion!r}; "
            "pass the frozen reference model"
        )
    if reference is None and spec.prefilter < 1:
        raise ValueError(
            f"prefilter={spec.prefilter!r} ranks each super-batch by the reference's score, but "
            "reference=None; pass a reference (or a ReferenceCache), or prefilter=1"
        )
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, numbers.Real)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
        raise ValueError(f"refresh_every must be an int >= 0, got {refresh_every!r}")
    if prefetch is not None and (
        isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1
    ):
        raise ValueError(f"prefetch must be an int >= 1 or None (1), got {prefetch!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if key_fn is not None and not callable(key_fn):
        raise TypeError(f"key_fn must be callable batch -> list[str], got {key_fn!r}")
    if return_info:
        warnings.warn(
            "JESTLoader(return_info=True) is deprecated; read loader.last_info after each "
            "batch instead",
            DeprecationWarning,
            stacklevel=3,
        )


def check_distributed_options(mode: str | None, batch_learnability: Any) -> None:
    """Options that the distributed ``mode`` (resolved) rules out."""
    if mode == "global" and batch_learnability:
        raise ValueError(
            "batch_learnability=True measures draws from one super-batch, but "
            "distributed='global' selects from the super-batches of all ranks; pass "
            "distributed='local' to measure per rank, or leave batch_learnability off"
        )
