"""jeststream: JEST (joint example selection, Evans et al. 2024) as a drop-in PyTorch data loader.

    loader = JESTLoader(base_loader, learner, reference, ratio=0.2)

The public API is small and re-exported here; everything else is private by module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> defining module. Resolved on first access (PEP 562) so that importing one submodule,
# e.g. the pure maths, does not pull in threads, scoring or optional extras.
_EXPORTS = {
    "CRITERIA": "jeststream.losses",
    "Embeddings": "jeststream.losses",
    "sigmoid_pair_losses": "jeststream.losses",
    "blocked_joint_sample": "jeststream.selection",
    "example_scores": "jeststream.selection",
    "independent_sample": "jeststream.selection",
    "joint_sample": "jeststream.selection",
    "joint_sample_from_embeddings": "jeststream.selection",
    "topk_sample": "jeststream.selection",
    "global_joint_sample": "jeststream.distributed",
    "JESTLoader": "jeststream.loader",
    "SelectionInfo": "jeststream.loader",
    "ReferenceCache": "jeststream.reference_cache",
    "SelectionLog": "jeststream.selection_log",
}

__all__ = [
    "CRITERIA",
    "Embeddings",
    "JESTLoader",
    "ReferenceCache",
    "SelectionInfo",
    "SelectionLog",
    "blocked_joint_sample",
    "example_scores",
    "global_joint_sample",
    "independent_sample",
    "joint_sample",
    "joint_sample_from_embeddings",
    "sigmoid_pair_losses",
    "topk_sample",
]

if TYPE_CHECKING:  # pragma: no cover
    from jeststream.distributed import global_joint_sample
    from jeststream.loader import JESTLoader, SelectionInfo
    from jeststream.losses import CRITERIA, Embeddings, sigmoid_pair_losses
    from jeststream.reference_cache import ReferenceCache
    from jeststream.selection import (
        blocked_joint_sample,
        example_scores,
        independent_sample,
        joint_sample,
        joint_sample_from_embeddings,
        topk_sample,
    )
    from jeststream.selection_log import SelectionLog


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jeststream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
