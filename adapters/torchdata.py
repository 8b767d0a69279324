"""JEST as a ``torchdata.nodes`` node, and helpers for StatefulDataLoader bases.

    node = MapStyleWrapper(ds, sampler)
    node = Mapper(Batcher(node, batch_size=b), collate)       # base batches of b
    node = PinMemory(Prefetcher(node, 2))                     # prefetch, pin (CUDA): *before* JEST
    node = JESTNode(node, learner, reference, ratio=0.2)      # JEST batches of b: the root
    loader = Loader(node)                                     # state_dict()/load_state_dict()
    for batch in loader:                                      # in the training loop's thread
        ...

``JESTNode`` runs a :class:`jeststream.loader.JESTLoader` over its source node, so batching,
scoring, selection, the producer thread and the resumable state are the loader's (no maths
here). JESTLoader already scores and prefetches super-batches in its own thread and copies
batches to the scoring device, so nothing needs to prefetch or pin *after* it.

Threads: ``JESTNode.reset()``, ``next()`` and ``state_dict()`` must run in the training loop's
thread (by default the thread that built the node; ``training_thread=`` names another). Its
``next()`` copies the live learner's weights into the scoring snapshot every ``refresh_every``
batches; called from a worker thread (``Prefetcher``, ``PinMemory`` or a threaded
``ParallelMapper`` wrapped *around* JESTNode) it would copy them while ``optimizer.step()``
changes them, and count the snapshot's staleness in prefetched instead of trained batches.
Such a call raises ``RuntimeError`` (torchdata re-raises it in the consumer, from ``iter(loader)``
or ``next()``). Nodes that run in their caller's thread (``Batcher``, ``Mapper`` with
``num_workers=0``, ...) may wrap it; worker-thread nodes go below it, as above.

State: torchdata's layout, ``{"source": <the source node's state_dict()>, "jest": <the
JESTLoader's state without its "base" entry>}``, at the super-batch boundary after the last
batch the node returned; ``reset(state)`` resumes exactly (mid-epoch and at an epoch's end).

JESTLoader over a ``torchdata.stateful_dataloader.StatefulDataLoader`` needs nothing special:
``JESTLoader(StatefulDataLoader(ds, batch_size=b, ...), ...)`` is resumable as it is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from torch import nn
from torchdata.nodes import BaseNode

from jeststream.loader import JESTLoader, SelectionInfo

__all__ = ["JESTNode"]

logger = logging.getLogger(__name__)

WORKING_COMPOSITION = (
    "Loader(JESTNode(PinMemory(Prefetcher(Mapper(Batcher(...), collate), 2)), learner, "
    "reference, ratio=0.2))"
)


class _NodeSource:
    """Presents a BaseNode as a resumable base loader: one pass = one ``reset()`` of the node."""

    def __init__(self, node: BaseNode) -> None:
        self.node = node
        self._restored = False

    def __iter__(self) -> Iterator[Any]:
        if self._restored:
            self._restored = False  # load_state_dict() already reset the node to the state
        else:
            self.node.reset()
        return self.node

    def state_dict(self) -> dict[str, Any]:
        return self.node.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.node.reset(state)
        self._restored = True


class JESTNode(BaseNode):
    """A ``torchdata.nodes`` node that yields JEST-selected batches of its source's batch size.

    Args:
        source: node yielding base batches of b examples (any structure JESTLoader accepts);
            put ``Prefetcher`` / ``PinMemory`` here, below JESTNode.
        learner, reference, ratio: as for :class:`~jeststream.loader.JESTLoader`.
        training_thread: the thread that runs the training loop, the only one allowed to call
            ``reset()``, ``next()`` and ``state_dict()``; default: the thread building the node.
        include_snapshot: save the learner-snapshot weights in the state (see
            :meth:`JESTLoader.state_dict`): exact mid-epoch resume while the learner trains.
        **jest_kwargs: other JESTLoader arguments (``loss``, ``criterion``, ``n_chunks``,
            ``seed``, ``return_info``, ``selection_log``, ...).

    One epoch = one ``reset()``; ``Loader`` resets the node at the start of each epoch. Make
    JESTNode the root (or wrap it only in nodes that run in their caller's thread): a worker
    thread calling it raises ``RuntimeError``, see the module docstring.
    """

    SOURCE_KEY = "source"
    JEST_KEY = "jest"

    def __init__(
        self,
        source: BaseNode,
        learner: nn.Module,
        reference: nn.Module | None,
        ratio: float = 0.2,
        *,
        training_thread: threading.Thread | None = None,
        include_snapshot: bool = False,
        **jest_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(source, BaseNode):
            raise TypeError(
                f"source must be a torchdata.nodes.BaseNode, got {type(source).__name__}; wrap "
                "iterables with torchdata.nodes.IterableWrapper"
            )
        if training_thread is not None and not isinstance(training_thread, threading.Thread):
            raise TypeError(
                f"training_thread must be a threading.Thread, got {type(training_thread).__name__}"
            )
        self.training_thread = training_thread or threading.current_thread()
        self.include_snapshot = bool(include_snapshot)
        self.source = source
        self._base = _NodeSource(source)
        self.loader = JESTLoader(self._base, learner, reference, ratio, **jest_kwargs)
        self._it: Iterator[Any] | None = None

    def _check_thread(self, method: str) -> None:
        here = threading.current_thread()
        if here is self.training_thread:
            return
        raise RuntimeError(
            f"JESTNode.{method}() was called from thread {here.name!r}, not from the training "
            f"thread {self.training_thread.name!r}. JESTNode copies the live learner's weights "
            "into its scoring snapshot inside next(), so it must run in the training loop's "
            "thread: called from a worker thread (torchdata's Prefetcher, PinMemory or a "
            "threaded ParallelMapper wrapped around JESTNode) it would copy them while "
            "optimizer.step() changes them, and count staleness in prefetched batches instead "
            "of trained ones. Put prefetching and pinning before JESTNode and make JESTNode the "
            f"root: {WORKING_COMPOSITION} (JESTLoader has its own scoring thread and prefetch). "
            "If the training loop runs in another thread, pass JESTNode(..., "
            "training_thread=<that thread>)."
        )

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        self._check_thread("reset")
        super().reset(initial_state)
        if initial_state is not None:
            self.loader.load_state_dict(self._jest_state(initial_state))
        self._it = iter(self.loader)  # closes the previous pass's producer

    def _jest_state(self, state: Any) -> dict[str, Any]:
        if not isinstance(state, dict) or self.JEST_KEY not in state:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a JESTNode state (no {self.JEST_KEY!r} entry): keys {keys}")
        jest = dict(state[self.JEST_KEY])
        if self.SOURCE_KEY in state:
            jest["base"] = state[self.SOURCE_KEY]
        # else: a state saved before the source's state moved out of "jest" (it is in "base")
        return jest

    def next(self) -> Any:
        self._check_thread("next")
        if self._it is None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self._it = None
            raise

    def get_state(self) -> dict[str, Any]:
        self._check_thread("state_dict")
        jest = self.loader.state_dict(include_snapshot=self.include_snapshot)
        return {self.SOURCE_KEY: jest.pop("base"), self.JEST_KEY: jest}

    @property
    def stats(self) -> dict[str, Any]:
        return self.loader.stats

    @property
    def last_info(self) -> SelectionInfo | None:
        return self.loader.last_info

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def close(self) -> None:
        """Stop the producer thread and close the selection log (from any thread)."""
        self._it = None
        self.loader.close()
