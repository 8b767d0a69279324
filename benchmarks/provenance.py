"""Where a benchmark's figures came from, and writing them so a killed run leaves nothing torn.

``code_state()`` records the git commit the code runs from and whether the library or the
benchmarks differ from it; ``write_json`` writes atomically (temporary file, then rename);
``commit_file`` commits one results file as a sweep writes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_PATHS = ("jeststream", "adapters", "benchmarks", "pyproject.toml")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def code_state() -> dict:
    """``{"commit": HEAD or None, "code_uncommitted_changes": bool}``."""
    dirty = _git("status", "--porcelain", "--", *CODE_PATHS)
    return {"commit": _git("rev-parse", "HEAD") or None, "code_uncommitted_changes": bool(dirty)}


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON at ``path`` (parents made), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def commit_file(path: Path, message: str, tries: int = 5) -> bool:
    """Commit just ``path`` (others' staged work is left staged); retried while another git
    command holds the index. False (and a message on stderr) when it could not."""
    for i in range(tries):
        add = subprocess.run(["git", "add", "--", str(path)], cwd=ROOT, capture_output=True)
        if add.returncode == 0:
            done = subprocess.run(
                ["git", "-c", "user.name=jeststream", "-c", "user.email=dev@jeststream",
                 "commit", "-q", "-m", message, "--", str(path)],
                cwd=ROOT, capture_output=True, text=True,
            )
            if done.returncode == 0:
                return True
        time.sleep(2 + 3 * i)
    print(f"could not commit {path}; commit it by hand", file=sys.stderr)
    return False
