"""Per-example selection log: one record per example that entered a super-batch.

    with SelectionLog("run/selection.parquet") as log:
        log.write(keys=keys, epoch=0, step=12, scores=scores, selected=mask)

Each record holds the sample key (when the source provides one), epoch, step, the example's
position in its super-batch, its score and whether JEST selected it. Memory is bounded: rows are
buffered and flushed every ``flush_every`` rows (one Parquet row group / a block of JSON lines)
and on ``close()``. Parquet (via pyarrow) when the path ends with ``.parquet`` and pyarrow is
importable, JSON lines otherwise.

Resume: an existing log is appended to, never overwritten (mode="a"). Records are identified by
(step, pos); when a resumed run rewrites steps that the interrupted run had already logged, the
reader keeps the last record written, so ``read_selection_log`` and ``jeststream inspect``
describe the resumed run exactly.

``jeststream inspect LOG`` (:func:`inspect_main`) summarises a log and exports the selected keys.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SelectionLog", "read_selection_log", "inspect_main", "summarize"]

logger = logging.getLogger(__name__)

COLUMNS = ("key", "epoch", "step", "pos", "score", "selected")
_PARQUET_MAGIC = b"PAR1"


# Logs still open at interpreter exit (a loader never closed, an unhandled exception) are
# closed then: a Parquet file without its footer cannot be read at all.
_OPEN_LOGS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_logs() -> None:
    for log in list(_OPEN_LOGS):
        try:
            log.close()
        except Exception:  # noqa: BLE001 -- report, and close the others
            logger.exception("could not close selection log %s at exit", log.path)


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("epoch", pa.int64()),
            ("step", pa.int64()),
            ("pos", pa.int32()),
            ("score", pa.float32()),
            ("selected", pa.bool_()),
        ]
    )


class SelectionLog:
    """Append-only writer of selection records with bounded memory.

    Args:
        path: file to write. ``*.parquet`` -> Parquet when pyarrow is importable (else JSON lines
            next to it, ``*.jsonl``, with a warning); any other suffix -> JSON lines.
        flush_every: rows buffered before they are written out.
        mode: "a" appends to an existing log (resume-safe, the default); "w" starts afresh.
    """

    def __init__(
        self, path: str | os.PathLike, *, flush_every: int = 65536, mode: str = "a"
    ) -> None:
        self._closed = True
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if mode not in ("a", "w"):
            raise ValueError(f"mode must be 'a' (append) or 'w' (overwrite), got {mode!r}")
        path = Path(path)
        self.format = "jsonl"
        if path.suffix == ".parquet":
            if _have_pyarrow():
                self.format = "parquet"
            else:
                fallback = path.with_suffix(".jsonl")
                logger.warning(
                    "pyarrow is not installed: writing the selection log %s as JSON lines to %s "
                    "(pip install pyarrow for Parquet)",
                    path,
                    fallback,
                )
                path = fallback
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.flush_every = flush_every
        self.mode = mode
        self.rows_written = 0
        self._lock = threading.Lock()
        self._chunks: list[dict[str, Any]] = []  # one per write(): numpy columns + keys
        self._n_buf = 0
        self._file = None
        self._writer = None
        self._open()
        self._closed = False
        _OPEN_LOGS.add(self)

    # -- opening -----------------------------------------------------------------------------

    def _open(self) -> None:
        exists = self.path.exists() and self.path.stat().st_size > 0
        if self.format == "jsonl":
            torn = False
            if exists and self.mode == "a":
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
            self._file = open(self.path, "a" if self.mode == "a" else "w", encoding="utf-8")
            if torn:  # a crash cut the last record: end it, so the next record stays readable
                self._file.write("\n")
            return
        import pyarrow.parquet as pq

        old = None
        if exists and self.mode == "a":
            try:
                pq.ParquetFile(str(self.path)).close()
            except Exception as exc:  # noqa: BLE001 -- e.g. no footer: the writer was killed
                # A run killed before close() leaves a Parquet file without its footer; nothing
                # in it can be read back. Keep it for forensics, start a new log, say so.
                aside = self.path.with_name(self.path.name + ".unreadable")
                os.replace(self.path, aside)
                logger.warning(
                    "selection log %s cannot be read (%s: %s), probably because the previous run "
                    "was killed before closing it; moved it to %s and starting a new log (use a "
                    ".jsonl path for a log that survives crashes)",
                    self.path,
                    type(exc).__name__,
                    exc,
                    aside,
                )
                exists = False
        if exists and self.mode == "a":
            # Parquet files cannot be appended to: move the old file aside and stream its row
            # groups into the new one (one row group in memory at a time).
            old = self.path.with_name(self.path.name + ".resume-tmp")
            os.replace(self.path, old)
        self._writer = pq.ParquetWriter(str(self.path), _schema())
        if old is not None:
            try:
                src = pq.ParquetFile(str(old))
                for i in range(src.num_row_groups):
                    table = src.read_row_group(i).cast(_schema())
                    self._writer.write_table(table)
                    self.rows_written += table.num_rows
                src.close()
            except Exception:
                self._writer.close()
                os.replace(old, self.path)  # never lose the interrupted run's log
                raise
            os.remove(old)
            logger.info("appending to selection log %s (%d rows)", self.path, self.rows_written)

    # -- writing -----------------------------------------------------------------------------

    def write(
        self,
        *,
        keys: Sequence[str] | None,
        epoch: int,
        step: int,
        scores: torch.Tensor,
        selected: torch.Tensor,
    ) -> None:
        """Record one super-batch: ``scores`` and bool ``selected`` are [B]; ``keys`` B or None."""
        if self._closed:
            raise RuntimeError(f"SelectionLog {self.path} is closed")
        scores_np = torch.as_tensor(scores).detach().to("cpu", torch.float32).reshape(-1).numpy()
        selected_np = torch.as_tensor(selected).detach().to("cpu", torch.bool).reshape(-1).numpy()
        size = scores_np.shape[0]
        if selected_np.shape[0] != size:
            raise ValueError(
                f"scores has {size} entries but selected has {selected_np.shape[0]}; both must "
                "be the super-batch size"
            )
        if keys is not None and len(keys) != size:
            raise ValueError(
                f"got {len(keys)} keys for a super-batch of {size} scores; pass one key per "
                "example or keys=None"
            )
        # Columns stay numpy until written: write() runs on the training loop's thread.
        chunk = {
            "key": [None] * size if keys is None else [str(k) for k in keys],
            "epoch": np.full(size, int(epoch), dtype=np.int64),
            "step": np.full(size, int(step), dtype=np.int64),
            "pos": np.arange(size, dtype=np.int32),
            "score": scores_np.copy(),  # the caller's tensor may be reused
            "selected": selected_np.copy(),
        }
        with self._lock:
            self._chunks.append(chunk)
            self._n_buf += size
            if self._n_buf >= self.flush_every:
                self._flush_locked()

    def flush(self) -> None:
        """Write the buffered rows out now."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._n_buf == 0:
            return
        chunks = self._chunks
        if self.format == "parquet":
            import pyarrow as pa

            columns = {
                c: (
                    [k for ch in chunks for k in ch[c]]
                    if c == "key"
                    else np.concatenate([ch[c] for ch in chunks])
                )
                for c in COLUMNS
            }
            self._writer.write_table(pa.table(columns, schema=_schema()))
        else:
            # the same lines as json.dumps(record, separators=(",", ":")), JSON has no NaN
            enc = json.encoder.encode_basestring_ascii
            lines = []
            for ch in chunks:
                for k, e, s, p, sc, sel in zip(
                    ch["key"],
                    ch["epoch"].tolist(),
                    ch["step"].tolist(),
                    ch["pos"].tolist(),
                    ch["score"].tolist(),
                    ch["selected"].tolist(),
                ):
                    lines.append(
                        f'{{"key":{"null" if k is None else enc(k)},"epoch":{e},"step":{s},'
                        f'"pos":{p},"score":{repr(sc) if math.isfinite(sc) else "null"},'
                        f'"selected":{"true" if sel else "false"}}}'
                    )
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        self.rows_written += self._n_buf
        self._chunks = []
        self._n_buf = 0

    def close(self) -> None:
        """Flush and close the file. Idempotent."""
        if getattr(self, "_closed", True):
            return
        with self._lock:
            self._closed = True
            try:
                self._flush_locked()
            finally:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                if self._file is not None:
                    self._file.close()
                    self._file = None

    def __enter__(self) -> SelectionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from GC
            pass


# -- reading ---------------------------------------------------------------------------------


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _PARQUET_MAGIC


def read_selection_log(path: str | os.PathLike, *, dedupe: bool = True) -> dict[str, Any]:
    """Read a selection log into columns (no pandas needed).

    Returns ``{"key": list[str | None], "epoch": int64[N], "step": int64[N], "pos": int32[N],
    "score": float32[N] (NaN for fallback super-batches), "selected": bool[N]}``, rows in write
    order. With ``dedupe`` (default) a (step, pos) record written again after a resume replaces
    the earlier one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"selection log {path} does not exist")
    if _is_parquet(path):
        if not _have_pyarrow():
            raise ValueError(f"{path} is a Parquet log; pip install pyarrow to read it")
        import pyarrow.parquet as pq

        table = pq.read_table(str(path))
        cols = {
            "key": table.column("key").to_pylist(),
            "epoch": table.column("epoch").to_numpy().astype(np.int64),
            "step": table.column("step").to_numpy().astype(np.int64),
            "pos": table.column("pos").to_numpy().astype(np.int32),
            "score": table.column("score").to_numpy(zero_copy_only=False).astype(np.float32),
            "selected": table.column("selected").to_numpy(zero_copy_only=False).astype(bool),
        }
    else:
        raw: dict[str, list] = {c: [] for c in COLUMNS}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    # A crash can leave a half-written last line; everything before it is good.
                    logger.warning("%s:%d: skipping unreadable record (%s)", path, lineno, exc)
                    continue
                for c in COLUMNS:
                    raw[c].append(rec.get(c))
        cols = {
            "key": raw["key"],
            "epoch": np.asarray(raw["epoch"], dtype=np.int64),
            "step": np.asarray(raw["step"], dtype=np.int64),
            "pos": np.asarray(raw["pos"], dtype=np.int32),
            "score": np.asarray(
                [math.nan if s is None else s for s in raw["score"]], dtype=np.float32
            ),
            "selected": np.asarray(raw["selected"], dtype=bool),
        }
    if dedupe and len(cols["step"]):
        ids = cols["step"] * (int(cols["pos"].max()) + 1) + cols["pos"]
        # keep the last occurrence of each (step, pos), preserving write order
        _, last_rev = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last_rev)
        if len(keep) != len(ids):
            logger.info("%s: %d records rewritten after a resume", path, len(ids) - len(keep))
            cols = {c: ([v[i] for i in keep] if c == "key" else v[keep]) for c, v in cols.items()}
    return cols


# -- summary / CLI ---------------------------------------------------------------------------

_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def summarize(cols: dict[str, Any], top: int = 10) -> dict[str, Any]:
    """Summary of a read log: counts, selected share, score quantiles, top/bottom keys."""
    scores = cols["score"]
    selected = cols["selected"]
    n = int(len(scores))
    finite = np.isfinite(scores)
    out: dict[str, Any] = {
        "examples_seen": n,
        "super_batches": int(len(np.unique(cols["step"]))) if n else 0,
        "epochs": sorted(int(e) for e in np.unique(cols["epoch"])) if n else [],
        "selected": int(selected.sum()),
        "selected_share": float(selected.mean()) if n else math.nan,
        "non_finite_scores": int((~finite).sum()),
    }
    fs = scores[finite].astype(np.float64)
    out["score_quantiles"] = (
        {f"q{round(q * 100):02d}": float(np.quantile(fs, q)) for q in _QUANTILES} if len(fs) else {}
    )
    out["score_mean"] = float(fs.mean()) if len(fs) else math.nan
    sel_f = selected & finite
    rej_f = ~selected & finite
    out["selected_score_mean"] = float(scores[sel_f].mean()) if sel_f.any() else math.nan
    out["rejected_score_mean"] = float(scores[rej_f].mean()) if rej_f.any() else math.nan

    # per-key aggregates: a key can be seen in several epochs
    keys = cols["key"]
    agg: dict[str, list[float]] = {}  # key -> [score_sum, finite_count, seen, selected]
    for k, s, sel in zip(keys, scores.tolist(), selected.tolist()):
        if k is None:
            continue
        a = agg.setdefault(k, [0.0, 0, 0, 0])
        if math.isfinite(s):
            a[0] += s
            a[1] += 1
        a[2] += 1
        a[3] += int(sel)
    out["unique_keys"] = len(agg)
    ranked = sorted(
        ((a[0] / a[1], k, a[2], a[3]) for k, a in agg.items() if a[1]), key=lambda t: (-t[0], t[1])
    )

    def rows(items):
        return [{"key": k, "score": s, "seen": seen, "selected": sel} for s, k, seen, sel in items]

    out["top_keys"] = rows(ranked[:top])
    out["bottom_keys"] = rows(ranked[::-1][:top]) if top else []
    return out


def selected_keys(cols: dict[str, Any]) -> list[str]:
    """Keys selected at least once, in order of first selection (the curated subset)."""
    seen: set[str] = set()
    out = []
    for k, sel in zip(cols["key"], cols["selected"].tolist()):
        if sel and k is not None and k not in seen:
            seen.add(k)
            out.append(k)
    return out


def _format(summary: dict[str, Any], path: Path | str) -> str:
    lines = [f"selection log: {path}"]
    lines.append(
        f"examples seen: {summary['examples_seen']} in {summary['super_batches']} super-batches"
        f" (epochs {summary['epochs']}), unique keys: {summary['unique_keys']}"
    )
    lines.append(
        f"selected: {summary['selected']} ({100 * summary['selected_share']:.1f}%)"
        + (
            f", non-finite scores: {summary['non_finite_scores']}"
            if summary["non_finite_scores"]
            else ""
        )
    )
    q = summary["score_quantiles"]
    if q:
        lines.append("score distribution: " + "  ".join(f"{k}={v:.4g}" for k, v in q.items()))
        lines.append(
            f"score mean: all {summary['score_mean']:.4g}, selected "
            f"{summary['selected_score_mean']:.4g}, rejected {summary['rejected_score_mean']:.4g}"
        )
    for title, name in (("top keys by score", "top_keys"), ("bottom keys by score", "bottom_keys")):
        if summary[name]:
            lines.append(f"{title} (mean score, seen, selected):")
            for r in summary[name]:
                lines.append(
                    f"  {r['score']:>10.4g}  {r['seen']:>4}  {r['selected']:>4}  {r['key']}"
                )
    if not summary["unique_keys"] and summary["examples_seen"]:
        lines.append("(no sample keys in this log: pass key_fn= or a keyed base loader)")
    return "\n".join(lines)


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    return {
        c: ([k for p in parts for k in p[c]] if c == "key" else np.concatenate([p[c] for p in parts]))
        for c in COLUMNS
    }


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """`jeststream inspect LOG [LOG ...] [--top N] [--export-selected OUT.txt] [--json]`."""
    parser = argparse.ArgumentParser(
        prog="jeststream inspect",
        description="Summarise a JEST selection log (Parquet or JSON lines).",
    )
    parser.add_argument(
        "log",
        nargs="+",
        help="selection log(s) written by JESTLoader(selection_log=...); several logs (one per "
        "rank, e.g. sel.rank*.jsonl) are summarised together",
    )
    parser.add_argument("--top", type=int, default=10, help="top/bottom keys to list (default 10)")
    parser.add_argument(
        "--export-selected",
        metavar="OUT.txt",
        help="write the keys selected at least once, one per line (the curated subset)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.top < 0:
        parser.error(f"--top must be >= 0, got {args.top}")
    paths = [Path(p) for p in args.log]
    try:
        # each rank numbers its own steps: resume-dedupe per file, then concatenate
        parts = [read_selection_log(p) for p in paths]
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"jeststream inspect: {exc}", file=sys.stderr)
        return 2
    cols = _concat(parts)
    path = paths[0] if len(paths) == 1 else f"{len(paths)} logs ({', '.join(map(str, paths))})"
    summary = summarize(cols, top=args.top)
    summary["super_batches"] = sum(int(len(np.unique(p["step"]))) for p in parts)
    if args.export_selected:
        keys = selected_keys(cols)
        out = Path(args.export_selected)
        out.write_text("".join(k + "\n" for k in keys), encoding="utf-8")
        summary["exported"] = {"path": str(out), "keys": len(keys)}
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=True))
    else:
        print(_format(summary, path))
        if args.export_selected:
            print(f"exported {summary['exported']['keys']} selected keys to {out}")
    return 0
