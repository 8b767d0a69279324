"""``jeststream report LOG [LOG ...] --shards SPEC [--mds DIR] --out report.html`` and
:func:`write_report`, its Python form: collect (:mod:`.collect`), render (:mod:`.page`), write.

The page is written atomically (a reader never sees half a page). Bad arguments and unreadable
inputs (a missing log, a bad ``--config`` or shard pattern) exit with status 2 and one line
naming them; problems inside the data become the page's notes instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jeststream.atomic import atomic_write
from jeststream.report.collect import ReportData, collect_report
from jeststream.report.page import render_html

__all__ = ["main", "write_report"]


def write_report(
    log_paths: str | os.PathLike | Sequence[str | os.PathLike],
    shards: str | Sequence[str | os.PathLike] | None,
    out_path: str | os.PathLike,
    **kwargs: Any,
) -> Path:
    """Write the report of ``log_paths`` (one log per rank) over ``shards`` (a brace pattern,
    a list of shard paths or directories of ``*.tar``) to ``out_path``; returns its path.
    ``kwargs`` go to :func:`collect_report` (``mds=``, ``meta=``, ``config=``, ``top=``...)."""
    if isinstance(log_paths, (str, os.PathLike)):
        log_paths = [log_paths]
    return _write(collect_report(log_paths, shards, **kwargs), Path(out_path))


def _write(data: ReportData, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(data)
    atomic_write(out, lambda fh: fh.write(page), mode="w")  # a reader never sees half a page
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``jeststream report LOG [LOG ...] --shards SPEC [--mds DIR] --out report.html``."""
    p = argparse.ArgumentParser(
        prog="jeststream report",
        description="Write a self-contained HTML page of what JEST selected: thumbnails of the "
        "most and least selected samples, score distributions, selection over training, per "
        "label/noise type when the samples carry such a field.",
    )
    p.add_argument("log", nargs="+", help="selection log(s) (one per rank: sel.rank*.jsonl)")
    p.add_argument("--shards", help="webdataset shards: a brace pattern, '::'-separated list, "
                   "or a directory of *.tar")
    p.add_argument("--mds", metavar="DIR", help="a local MosaicML (MDS) dataset directory")
    p.add_argument("--meta", action="append", default=[], metavar="FILE",
                   help="sidecar fields: a JSON object {key: {field: value}} or JSON lines with "
                   "'key'; NAME-meta.json beside NAME-00000.tar shards is read without it")
    p.add_argument("--config", metavar="FILE.json",
                   help="the run's configuration to show (a JSON object: ratio, n_chunks, "
                   "criterion, loss, ...); the log does not record it")
    p.add_argument("--out", default="report.html", help="output HTML file (default report.html)")
    p.add_argument("--top", type=int, default=24, help="samples per gallery (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random galleries")
    p.add_argument("--title", default=None)
    p.add_argument("--image-field", default="image", help="MDS image column")
    p.add_argument("--text-field", default="text", help="MDS caption column")
    p.add_argument("--key-field", default="key", help="MDS key column (absent: sample index)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.top < 1:
        p.error(f"--top must be >= 1, got {args.top}")
    config = None
    try:
        if args.config:
            config = json.loads(Path(args.config).read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError(f"--config {args.config}: not a JSON object")
        data = collect_report(
            args.log, args.shards, mds=args.mds, meta=args.meta, config=config, top=args.top,
            seed=args.seed, title=args.title, image_field=args.image_field,
            text_field=args.text_field, key_field=args.key_field,
        )
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"jeststream report: {exc}", file=sys.stderr)
        return 2
    out = _write(data, Path(args.out))
    shown = sum(1 for _, _, ss in data.galleries for s in ss if s.image)
    print(f"report: {out} ({data.rows:,} examples, {data.unique_keys:,} keys, {shown} "
          f"thumbnails, {len(data.notes)} notes)")
    return 0
