"""Per-example selection log: one record per example that entered a super-batch.

    with SelectionLog("run/selection.parquet") as log:
        log.write(keys=keys, epoch=0, step=12, scores=scores, selected=mask)
    cols = read_selection_log("run/selection.parquet")

Each example row holds per-example fields only (``COLUMNS``): the sample key (when the source
provides one), epoch, step, the example's position in its super-batch, its score and whether
JEST selected it. Values of a whole super-batch go to one *step row* per step
(``STEP_COLUMNS``), written only when there are any: with ``batch_learnability=True`` the loader
logs ``batch_learnability`` of the selected sub-batch as a whole, and
``batch_learnability_independent`` / ``batch_learnability_uniform`` of an independent and a
uniform draw of its size from the same super-batch (:mod:`jeststream.diagnostics`). Readers
give every example row its step's values, as columns (NaN for a step without them).

A path ending with ``.parquet`` (and pyarrow importable) is a directory of immutable Parquet
segments, one per flush, which ``pyarrow.dataset``, pandas, :func:`read_selection_log` and
``jeststream inspect`` read as one table; any other suffix is one JSON-lines file. A log is
crash-safe (a ``kill -9`` loses at most the rows not yet flushed) and appended to on resume,
never overwritten; readers keep the last record of a step a resumed run wrote again.

The package: :mod:`.format` (the on-disk layout, the run configuration beside the log),
:mod:`.sinks` (writing it durably), :mod:`.writer` (:class:`SelectionLog` and its background
thread), :mod:`.reader` (:func:`read_selection_log`, chunked readers), :mod:`.inspect`
(``jeststream inspect``). Sizes per row: ``docs/performance.md``.
"""

from jeststream.selection_log.format import (
    COLUMNS,
    FORMAT_VERSION,
    LEARNABILITY_COLUMNS,
    STEP_COLUMNS,
    read_run_config,
    run_config_path,
    segment_files,
    write_run_config,
)
from jeststream.selection_log.inspect import inspect_main, selected_keys, summarize
from jeststream.selection_log.reader import (
    is_parquet,
    jsonl_chunks,
    read_selection_log,
    read_step_rows,
    require_pyarrow,
    step_columns,
)
from jeststream.selection_log.writer import SelectionLog, SelectionLogError

__all__ = [
    "COLUMNS",
    "FORMAT_VERSION",
    "LEARNABILITY_COLUMNS",
    "STEP_COLUMNS",
    "SelectionLog",
    "SelectionLogError",
    "inspect_main",
    "is_parquet",
    "jsonl_chunks",
    "read_run_config",
    "read_selection_log",
    "read_step_rows",
    "require_pyarrow",
    "run_config_path",
    "segment_files",
    "selected_keys",
    "step_columns",
    "summarize",
    "write_run_config",
]
