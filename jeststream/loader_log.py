"""The selection log a JESTLoader writes: one record per yielded batch, its run config beside it.

A path given as ``selection_log=`` is opened at the first yielded batch (overwriting, or
appending once the loader was restored), with the loader's selection settings written as
``LOG.run.json`` (what ``jeststream report`` shows); a :class:`SelectionLog` the caller opened
keeps its own mode and gets the run config at its first write. Used on the consumer's thread
only, like the loader's cursor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jeststream.selection_log import SelectionLog, write_run_config

__all__ = ["LoaderLog"]


class LoaderLog:
    """What JESTLoader logs; ``enabled`` is False when it was given no log."""

    def __init__(self, log: SelectionLog | None, path: str | None, mode: str) -> None:
        """From :func:`jeststream.loader_args.resolve_selection_log`'s (log, path, mode)."""
        self.log, self.path, self.mode = log, path, mode
        self.append = self.mode == "a"
        self.config_due = self.log is not None  # a caller's log: its run config not written yet

    @property
    def enabled(self) -> bool:
        return self.path is not None  # a caller's SelectionLog has its path too

    def write(self, item: Any, info: Any, run_config: Callable[[], dict[str, Any]]) -> None:
        """Log a yielded batch (``item``: the producer's Item, ``info``: its SelectionInfo);
        ``run_config()`` gives the loader's settings, called only when they are written."""
        if self.path is not None and self.log is None:
            self.log = SelectionLog(
                self.path, mode="a" if self.append else "w", run_config=run_config()
            )
        elif self.config_due:
            write_run_config(self.log.path, run_config())
            self.config_due = False
        if self.log is not None:
            self.log.write(
                keys=item.keys,
                epoch=info.epoch,
                step=info.step,
                scores=item.all_scores,
                selected=item.selected,
                batch_learnability=info.batch_learnability,
            )

    def restored(self) -> None:
        """After load_state_dict: a path opened from now on appends (unless mode "w")."""
        self.append = self.mode != "w"

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
