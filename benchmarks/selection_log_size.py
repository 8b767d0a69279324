"""Bytes per example row of the selection log, at the demo's scale, before and after.

Prints one JSON object. Writes the log of a demo-sized run (``jeststream demo``'s defaults:
b = 128, ratio 0.2 so n = 5 and 640 example rows a step, 1,000 steps, keys ``pool-NNNNNN``
drawn from a pool of 16,384 reshuffled each epoch, batch learnability logged) with this
checkout's ``SelectionLog``, in both formats (JSON lines and a Parquet segment directory,
flushed every 65,536 rows as the loader's log is), and reports the bytes on disk per example
row, the write time and the time ``read_selection_log`` takes. The scores and selections are
random (normal float32 scores, 128 of 640 selected), which is what a float column's size
depends on.

``--compare-to REV`` also writes the same records with jeststream's selection log as of git
revision REV (loaded from ``git show``, e.g. the commit before the format changed) and
reports both, with the ratios: the same records, the same machine, the same run.

    python benchmarks/selection_log_size.py                       # this checkout
    python benchmarks/selection_log_size.py --compare-to ed8ed12  # before / after
    python benchmarks/selection_log_size.py --steps 50            # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from jeststream import selection_log

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def _module_at(rev: str, tmp: Path) -> ModuleType:
    """jeststream's selection log as of git revision ``rev`` (the module
    ``jeststream/selection_log.py`` before it became a package, the package since), imported
    under its own name: the package's imports of itself are pointed at that name."""
    name = f"_selection_log_{rev}"
    if _git("cat-file", "-e", f"{rev}:jeststream/selection_log.py").returncode == 0:
        files = {"__init__": "jeststream/selection_log.py"}
    else:
        listing = _git("ls-tree", "--name-only", f"{rev}:jeststream/selection_log/")
        if listing.returncode != 0:
            raise SystemExit(f"--compare-to {rev}: no selection log there ({listing.stderr})")
        files = {
            f[: -len(".py")]: f"jeststream/selection_log/{f}"
            for f in listing.stdout.split()
            if f.endswith(".py")
        }
    package = tmp / name
    package.mkdir()
    for stem, path in files.items():
        show = _git("show", f"{rev}:{path}")
        show.check_returncode()
        (package / f"{stem}.py").write_text(show.stdout.replace("jeststream.selection_log", name))
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _records(steps: int, b: int, n: int, pool: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = b * n
    order = np.concatenate([rng.permutation(pool) for _ in range(steps * size // pool + 1)])
    for step in range(steps):
        ids = order[step * size : (step + 1) * size]
        selected = np.zeros(size, bool)
        selected[rng.choice(size, b, replace=False)] = True
        yield {
            "keys": [f"pool-{i:06d}" for i in ids.tolist()],
            "epoch": step * size // pool,
            "step": step,
            "scores": rng.normal(2.0, 3.0, size).astype(np.float32),
            "selected": selected,
            "batch_learnability": tuple(rng.normal([900.0, 890.0, 450.0], 30.0).tolist()),
        }


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def measure(module: ModuleType, out: Path, args) -> dict:
    result = {}
    for fmt in ("jsonl", "parquet"):
        path = out / f"log.{fmt}"
        with module.SelectionLog(path, mode="w") as log:  # warm-up: imports, first encodes
            log.write(**next(_records(1, 2, 2, 4)))
        module.read_selection_log(path)
        t0 = time.perf_counter()
        with module.SelectionLog(path, mode="w") as log:
            for rec in _records(args.steps, args.batch_size, args.n, args.pool):
                log.write(**rec)
        written = time.perf_counter() - t0
        rows = args.steps * args.batch_size * args.n
        t0 = time.perf_counter()
        cols = module.read_selection_log(path)
        read = time.perf_counter() - t0
        assert len(cols["step"]) == rows and "batch_learnability" in cols
        size = _size(path)
        result[fmt] = {
            "bytes": size,
            "rows": rows,
            "bytes_per_row": round(size / rows, 2),
            "write_s": round(written, 2),
            "read_s": round(read, 2),
        }
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="logged steps (default: the demo's)")
    p.add_argument("--batch-size", type=int, default=128, help="b (default: the demo's)")
    p.add_argument("--n", type=int, default=5, help="base batches per super-batch (ratio 0.2)")
    p.add_argument("--pool", type=int, default=16384, help="distinct keys (the demo's pool)")
    p.add_argument("--compare-to", metavar="REV", help="also measure the selection log at REV")
    args = p.parse_args(argv)
    report = {
        "benchmark": "selection_log_size",
        "machine": platform.platform(),
        "python": platform.python_version(),
        "config": {"steps": args.steps, "b": args.batch_size, "n": args.n, "pool": args.pool,
                   "batch_learnability": True},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report["now"] = measure(selection_log, tmp, args)
        if args.compare_to:
            report["before"] = {"rev": args.compare_to,
                                **measure(_module_at(args.compare_to, tmp), tmp, args)}
            report["now_over_before"] = {
                fmt: round(report["now"][fmt]["bytes"] / report["before"][fmt]["bytes"], 3)
                for fmt in ("jsonl", "parquet")
            }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
