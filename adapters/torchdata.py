"""JEST as a ``torchdata.nodes`` node, and helpers for StatefulDataLoader bases.

    node = Batcher(MapStyleWrapper(ds, sampler), batch_size=b)   # yields base batches of b
    node = Mapper(node, collate)
    node = JESTNode(node, learner, reference, ratio=0.2)          # yields JEST batches of b
    node = PinMemory(Prefetcher(node, 2))
    loader = Loader(node)                                         # state_dict()/load_state_dict()

``JESTNode`` runs a :class:`jeststream.loader.JESTLoader` over its source node, so batching,
scoring, selection, the producer thread and the resumable state are the loader's (no maths
here). Its state is the JESTLoader's state at the super-batch boundary after the last batch it
returned, with the source node's ``state_dict()`` inside: ``reset(state)`` resumes exactly.

JESTLoader over a ``torchdata.stateful_dataloader.StatefulDataLoader`` needs nothing special:
``JESTLoader(StatefulDataLoader(ds, batch_size=b, ...), ...)`` is resumable as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch import nn
from torchdata.nodes import BaseNode

from jeststream.loader import JESTLoader, SelectionInfo

__all__ = ["JESTNode"]

logger = logging.getLogger(__name__)


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
        source: node yielding base batches of b examples (any structure JESTLoader accepts).
        learner, reference, ratio: as for :class:`~jeststream.loader.JESTLoader`.
        **jest_kwargs: other JESTLoader arguments (``loss``, ``criterion``, ``n_chunks``,
            ``seed``, ``return_info``, ``selection_log``, ...).

    One epoch = one ``reset()``; ``Loader`` resets the node at the start of each epoch.
    """

    JEST_KEY = "jest"

    def __init__(
        self,
        source: BaseNode,
        learner: nn.Module,
        reference: nn.Module | None,
        ratio: float = 0.2,
        **jest_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(source, BaseNode):
            raise TypeError(
                f"source must be a torchdata.nodes.BaseNode, got {type(source).__name__}; wrap "
                "iterables with torchdata.nodes.IterableWrapper"
            )
        self.source = source
        self._base = _NodeSource(source)
        self.loader = JESTLoader(self._base, learner, reference, ratio, **jest_kwargs)
        self._it: Iterator[Any] | None = None

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            if self.JEST_KEY not in initial_state:
                raise ValueError(
                    f"not a JESTNode state (no {self.JEST_KEY!r} entry): keys "
                    f"{sorted(initial_state)}"
                )
            self.loader.load_state_dict(initial_state[self.JEST_KEY])
        self._it = iter(self.loader)  # closes the previous pass's producer

    def next(self) -> Any:
        if self._it is None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self._it = None
            raise

    def get_state(self) -> dict[str, Any]:
        return {self.JEST_KEY: self.loader.state_dict()}

    @property
    def stats(self) -> dict[str, Any]:
        return self.loader.stats

    @property
    def last_info(self) -> SelectionInfo | None:
        return self.loader.last_info

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def close(self) -> None:
        """Stop the producer thread and close the selection log."""
        self._it = None
        self.loader.close()
