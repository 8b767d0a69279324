"""Where a benchmark's figures came from, and writing them so a killed run leaves nothing torn.

``code_state()`` records the git commit the code runs from and whether the library or the
benchmarks differ from it; ``write_json`` writes atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import subprocess
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
