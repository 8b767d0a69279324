"""Packaging: ``adapters/`` ships as ``jeststream.adapters`` in editable and wheel installs.

A top-level package named ``adapters`` would clash with AdapterHub's, so setuptools maps the
directory with ``[tool.setuptools.package-dir] "jeststream.adapters" = "adapters"``.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import jeststream

REPO = Path(__file__).resolve().parents[1]
# What a wheel build needs from the checkout (copied so the build never writes into it).
BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE")


def adapter_modules() -> list[str]:
    return sorted(p.stem for p in (REPO / "adapters").glob("*.py") if p.stem != "__init__")


def package_files(subdir: str) -> list[str]:
    """Files under jeststream/<subdir>, as wheel paths (bytecode caches excluded)."""
    root = REPO / "jeststream" / subdir
    return sorted(
        "jeststream/" + p.relative_to(REPO / "jeststream").as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def test_editable_install_maps_adapters_dir():
    if Path(jeststream.__file__).resolve().parent != REPO / "jeststream":
        pytest.skip("jeststream is not an editable install of this checkout")
    adapters = importlib.import_module("jeststream.adapters")
    assert Path(adapters.__file__).resolve() == REPO / "adapters" / "__init__.py"
    for name in adapter_modules():
        # find_spec locates the module without running it (its optional extras may be absent).
        spec = importlib.util.find_spec(f"jeststream.adapters.{name}")
        assert spec is not None, f"jeststream.adapters.{name} is not importable"
        assert Path(spec.origin).resolve() == REPO / "adapters" / f"{name}.py"
    demo = importlib.util.find_spec("jeststream.demo")
    assert demo is not None and Path(demo.origin).resolve().parent == REPO / "jeststream" / "demo"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the checkout, as a user would with pip."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("jeststream", "adapters"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    dist = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run(
        [*cmd, "-w", str(dist), str(src)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = dist.glob("jeststream-*.whl")
    return whl


def test_wheel_contains_adapters_demo_and_entry_point(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "jeststream/__init__.py" in names
    assert "jeststream/adapters/__init__.py" in names
    for name in adapter_modules():
        assert f"jeststream/adapters/{name}.py" in names
    subpackages = [p.name for p in (REPO / "jeststream").iterdir() if (p / "__init__.py").is_file()]
    assert "demo" in subpackages
    for sub in subpackages:  # pyproject lists each package: a new one must be added there
        for path in package_files(sub):
            assert path in names, f"{path} is missing from the wheel (package-data / packages?)"
    core = sorted(p.name for p in (REPO / "jeststream").glob("*.py"))
    assert {f"jeststream/{name}" for name in core} <= names
    # No stray top-level package that would shadow AdapterHub's `adapters`.
    assert not any(n.startswith("adapters/") for n in names)

    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    assert parser["console_scripts"]["jeststream"].strip() == "jeststream.cli:main"


def test_wheel_install_imports_adapters(wheel, tmp_path):
    """Install the wheel into a throw-away venv (never the shared one) and import from it."""
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Importing jeststream.adapters needs no third-party package (the top level is lazy), so the
    # bare venv can run it; the adapter modules themselves are only located, not executed.
    probe = (
        "import importlib.util, jeststream.adapters as a; print(a.__file__); "
        f"print(all(importlib.util.find_spec('jeststream.adapters.' + n) for n in {adapter_modules()!r}))"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    path, found = out.stdout.split()
    assert Path(path).resolve().is_relative_to(venv.resolve())
    assert found == "True"
    assert (venv / "bin" / "jeststream").exists()


def test_wheel_extras_split_open_clip_from_its_training_stack(wheel):
    """``openclip`` (jestify, load_reference) must not pull open_clip's [training] extra, which
    pins webdataset<=0.2.86; ``openclip-train`` does, and ``dev`` / ``all`` have both."""
    names = zipfile.ZipFile(wheel).namelist()
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    lines = zipfile.ZipFile(wheel).read(meta).decode().splitlines()
    extras = {line.split(":", 1)[1].strip() for line in lines if line.startswith("Provides-Extra:")}
    assert {"openclip", "openclip-train", "webdataset", "streaming", "dev", "all"} <= extras
    requires: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("Requires-Dist:") and "; extra ==" in line:
            req, extra = line.split(":", 1)[1].split("; extra ==")
            requires.setdefault(extra.strip().strip("'\""), []).append(req.strip())
    (plain,) = [r for r in requires["openclip"] if r.lower().startswith("open-clip-torch")
                or r.lower().startswith("open_clip_torch")]
    assert "[" not in plain, plain
    (train,) = requires["openclip-train"]
    assert "[training]" in train, train
    for bundle in ("dev", "all"):
        (self_req,) = [r for r in requires[bundle] if r.startswith("jeststream[")]
        assert {"openclip", "openclip-train", "webdataset"} <= set(
            self_req[len("jeststream["):].split("]")[0].split(",")
        ), self_req
