"""The JESTLoader's state: one :class:`Cursor`, written only by the consumer's thread.

The producer (:mod:`jeststream.superbatch`) returns what it drew and counted with each item and
with the end of a pass (:class:`Drawn`); the cursor commits it when the batch is yielded or the
pass ends, and the loader's ``state_dict``/``load_state_dict`` read and restore it. So a
checkpoint is always the boundary after the last yielded batch: super-batches scored ahead are
not part of it, and a restore draws them again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Cursor", "Drawn", "STATE_VERSION", "epoch_seed", "make_state", "check_state"]

STATE_VERSION = 2


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible generator stream per (seed, epoch)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 1) % (2**63 - 1)


@dataclasses.dataclass(frozen=True)
class Drawn:
    """What the producer drew and counted for one super-batch (or a pass's end): base batches
    drawn, examples drop_last threw away, b as the producer knows it (learned from the first
    base batch when the base declares none) and whether it warned about a short base batch."""

    base_batches: int = 0
    dropped: int = 0
    b: int | None = None
    b_source: str = ""
    warned_short: bool = False


def make_state(
    base_state: Any,
    generator_state: Any,
    step: int,
    pass_start: int | None,
    epoch: int,
    dist_state: dict,
) -> dict:
    """A resumable state: the base's state before the next super-batch, the sampling generator,
    the step and the pass it belongs to (``pass_start`` None: at the end of a pass, the next one
    starts afresh). ``fallbacks`` is added by the cursor."""
    return {
        "version": STATE_VERSION,
        "base": base_state,
        "generator": generator_state,
        "step": step,
        "pass_start": pass_start,
        "epoch": epoch,
        **dist_state,
    }


def check_state(state: Any) -> dict:
    """Validate a ``JESTLoader.state_dict()`` and bring an older version up to this one."""
    if not isinstance(state, dict) or state.get("version") not in (1, STATE_VERSION):
        raise ValueError(
            f"not a JESTLoader state_dict (version {STATE_VERSION} expected): "
            f"{type(state).__name__} with keys {sorted(state) if isinstance(state, dict) else '-'}"
        )
    if state["version"] == 1:  # before pass_start was recorded: resume as a pass start
        state = {**state, "version": STATE_VERSION, "pass_start": state.get("step")}
    missing = {"base", "generator", "step", "pass_start"} - state.keys()
    if missing:
        raise ValueError(f"JESTLoader state_dict is missing {sorted(missing)}")
    return state


@dataclasses.dataclass
class Cursor:
    """Where the loader stands, and its counters. Only the consumer's thread changes it (the
    loader's methods and its iterator's ``__next__``); the producer reads it once, when a pass
    starts."""

    step: int = 0  # batches yielded (== super-batches consumed), across passes
    epoch: int = 0
    # set_epoch()'s epoch, whose seed is applied when the next pass starts: a producer still
    # running for the current pass may be drawing from the generator at that moment
    pending_epoch: int | None = None
    # the state right after the last yielded batch (or the restored / pass-end one); None
    # before the first pass
    resume: dict | None = None
    restored: bool = False  # a load_state_dict() not yet followed by a yielded batch
    restore_drawn: bool = False  # an iterator has run since load_state_dict()
    # the snapshot versions load_state_dict() restored (state_dict() returns them until a batch
    # is yielded); None when the restore had none
    loaded_snapshot: dict | None = None
    fallbacks: int = 0
    base_batches: int = 0  # base batches drawn, across passes (committed ones)
    dropped: int = 0  # examples drop_last threw away
    replaced: int = 0  # deferred records that failed after selection, each replaced
    b: int | None = None  # examples per yielded batch, once known
    b_source: str = ""  # where b came from, for error messages
    warned_short: bool = False  # a short base batch in the middle of a pass, warned once

    def set_batch_size(self, b: int, source: str) -> None:
        self.b, self.b_source = b, source

    def count(self, drawn: Drawn) -> None:
        """Commit what the producer drew and counted."""
        self.base_batches += drawn.base_batches
        self.dropped += drawn.dropped
        if self.b is None and drawn.b is not None:
            self.b, self.b_source = drawn.b, drawn.b_source
        self.warned_short = self.warned_short or drawn.warned_short

    def commit_yield(
        self, step: int, resume: dict, fallback: bool, drawn: Drawn, replaced: int = 0
    ) -> None:
        """A batch was yielded: the state moves to the boundary after it."""
        self.count(drawn)
        self.step = step + 1
        self.replaced += replaced
        if fallback:
            self.fallbacks += 1
        self.resume = {**resume, "fallbacks": self.fallbacks}
        self.restored = False
        self.loaded_snapshot = None

    def commit_end(self, drawn: Drawn, end_state: dict) -> None:
        """The pass is over and the base exhausted: from now on the state is the end of this
        epoch (a resumable base then starts the next one), not the last super-batch's boundary,
        which a StatefulDataLoader would resume as an empty rest of the epoch."""
        self.count(drawn)
        self.resume = {**end_state, "fallbacks": self.fallbacks}
        self.restored = False
        self.loaded_snapshot = None

    def checkpoint(self) -> dict:
        """The resume state as ``state_dict()`` returns it (before any snapshot is added)."""
        assert self.resume is not None
        state = dict(self.resume)
        state["fallbacks"] = self.fallbacks
        if self.pending_epoch is not None:
            # set_epoch() since the pass started: this state is still that pass's (its
            # position, generator and epoch); the next pass starts from the new epoch's seed
            state["pending_epoch"] = self.pending_epoch
        return state

    def restore(self, state: dict) -> None:
        """Take a checked state (:func:`check_state`); the base, generator and snapshot are
        the loader's to restore."""
        self.loaded_snapshot = state.get("snapshot")
        self.pending_epoch = None
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", self.epoch))
        if state.get("pending_epoch") is not None:
            self.epoch = self.pending_epoch = int(state["pending_epoch"])
        self.fallbacks = int(state.get("fallbacks", 0))
        self.resume = {k: v for k, v in state.items() if k not in ("snapshot", "pending_epoch")}
        self.restore_drawn = False
        if self.pending_epoch is not None:
            # set_epoch() had abandoned that pass: what comes next is a new pass, as it was for
            # the loader that saved this state (not the old pass's rest under the new seed)
            self.resume["pass_start"] = None
            self.loaded_snapshot = None
        self.restored = True
