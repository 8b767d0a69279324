"""``jeststream report``: what JEST kept and what it threw away, as one self-contained HTML page.

    jeststream report run/sel.parquet --shards "data/{00000..00099}.tar" --out report.html
    jeststream report sel.rank0.jsonl sel.rank1.jsonl --mds data/mds --config run.json
    write_report(["run/sel.parquet"], "data/{00000..00099}.tar", "report.html")

The page shows thumbnails with captions, scores and keys of the most and least selected samples
and of random samples selected often and never; the score distributions of selected and
rejected examples; the score margin between them and the mean scores over training steps; the
selection rate and the share of the selected batch of each value of a low-cardinality sample
field (a label, a noise type) over training; and the run as recorded: examples seen,
super-batch size B and sub-batch b per log (one log per rank), the ratio b/B they imply, and the
configuration the loader recorded beside each log (``LOG.run.json``), or the one passed with
``config=`` / ``--config``, which takes its place. It reads only what a run leaves behind, with
memory bounded by the number of distinct keys, never by rows; problems in the data (missing
keys, unreadable images or shards, keyless rows, an empty log) are lines in its "Notes".

The package, in the order the data flows: :mod:`.chunks` (the log in chunks, resumed runs),
:mod:`.aggregate` (per-key, per-step and histogram aggregates), :mod:`.shards` (the samples),
:mod:`.collect` (:func:`collect_report`), :mod:`.svg` (plots), :mod:`.page`
(:func:`render_html`), :mod:`.cli` (:func:`write_report`, ``jeststream report``). Scale and
timings: ``docs/report.md``.
"""

from jeststream.report.aggregate import MAX_FIELD_VALUES, LogStats
from jeststream.report.chunks import CHUNK_ROWS
from jeststream.report.cli import main, write_report
from jeststream.report.collect import ReportData, collect_report
from jeststream.report.page import render_html
from jeststream.report.shards import Sample

__all__ = [
    "CHUNK_ROWS",
    "MAX_FIELD_VALUES",
    "LogStats",
    "ReportData",
    "Sample",
    "collect_report",
    "main",
    "render_html",
    "write_report",
]
