"""What several test modules share that is not a fixture (those are in conftest.py): data they
write, the JESTLoader the adapter tests build, real processes (gloo ranks, example scripts),
and in-process ``open_clip_train`` runs on a tiny registered model.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# -- webdataset shards of image-caption pairs ----------------------------------------------------

N_SHARDS = 4
PER_SHARD = 12


def image_bytes(i: int, fmt: str) -> bytes:
    """A random 32x32 RGB image (seeded by ``i``) encoded as ``fmt`` (PIL's format name)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_wds_shards(root: Path, n_shards: int = N_SHARDS, per_shard: int = PER_SHARD):
    """Shards of PNG and JPEG image-caption pairs written by ``webdataset.ShardWriter``;
    returns (urls, {shard_url: [keys]})."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    pattern = str(root / "shard-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(n_shards * per_shard):
            ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
            sink.write({"__key__": f"s{i:05d}", ext: image_bytes(i, fmt), "txt": f"a photo {i}"})
    urls = [pattern % s for s in range(n_shards)]
    keys = {
        u: [f"s{i:05d}" for i in range(s * per_shard, (s + 1) * per_shard)]
        for s, u in enumerate(urls)
    }
    return urls, keys


# -- the adapter tests' JESTLoader ---------------------------------------------------------------


def jest_loader(base, models, **kw):
    """JESTLoader over ``base`` with ``models = (learner, reference)``, ratio 0.5 and 2 chunks
    unless ``kw`` says otherwise."""
    from jeststream.loader import JESTLoader

    learner, reference = models
    return JESTLoader(base, learner, reference, **{"ratio": 0.5, "n_chunks": 2, **kw})


# -- real processes: gloo ranks, example scripts -------------------------------------------------

RANK_TIMEOUT_S = 120  # a hung rank fails the test instead of the suite's 300 s timeout


def _rank_entry(target, rank: int, world: int, *args) -> None:
    """Run one rank, then leave without interpreter finalization: after a rank's work and its
    destroy_process_group() were done, torch 2.14's C++ teardown at exit aborted now and then
    ("terminate called without an active exception", exit -6, no Python frame left; about 1
    run in 30 here), which says nothing about the code under test. A failure still exits 1,
    with its traceback."""
    import traceback

    try:
        target(rank, world, *args)
    except BaseException:  # noqa: BLE001 -- reported, then the exit code says it
        traceback.print_exc()
        code = 1
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(target, world: int, *args, timeout: float = RANK_TIMEOUT_S) -> list[int]:
    """Start ``target(rank, world, *args)`` in ``world`` spawned processes; join them with a
    deadline and kill whatever is left, so a bug cannot hang the suite. Returns exit codes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_entry, args=(target, r, world, *args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert not hung, f"ranks {hung} did not finish within {timeout}s"
    return [p.exitcode for p in procs]


def init_gloo(rank: int, world: int, init_file: str, timeout_s: float = 60) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` in a fresh interpreter; its stdout, after checking it ended well."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


# -- open_clip_train in-process on a tiny model --------------------------------------------------

TINY = "jeststream-tiny-e2e"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20),
    "purple": (140, 20, 160), "orange": (250, 140, 0), "black": (5, 5, 5), "white": (250, 250, 250),
}


def register_tiny(folder: Path) -> str:
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    return TINY


def png_bytes(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    # Solid colours: open_clip's random-resized-crop leaves them unchanged, so a run's first
    # batch does not depend on open_clip's time-seeded sample shuffle (see the parity test).
    import PIL.Image as PIL

    buf = io.BytesIO()
    PIL.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_colour_shards(
    folder: Path, n_shards: int, per_shard: int, noise: float, seed: int = 0
) -> str:
    """Shards of coloured squares with captions (a ``noise`` fraction mismatched); -> wds spec."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    sizes = {}
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for j in range(per_shard):
                colour = names[int(torch.randint(len(names), (1,), generator=g))]
                said = colour
                if float(torch.rand((), generator=g)) < noise:
                    said = names[int(torch.randint(len(names), (1,), generator=g))]
                for ext, data in (("png", png_bytes(COLOURS[colour])),
                                  ("txt", f"a photo of a {said} square".encode())):
                    info = tarfile.TarInfo(f"{s:03d}{j:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    last = n_shards - 1
    return str(folder / f"shard-{{000000..{last:06d}}}.tar")


class _RootLogging:
    """open_clip_train adds root handlers per run; undo that so in-process runs don't pile up."""

    def __enter__(self):
        self.handlers = list(logging.root.handlers)
        self.levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
                       if isinstance(lg, logging.Logger)}
        self.level = logging.root.level
        return self

    def __exit__(self, *exc):
        for h in list(logging.root.handlers):
            if h not in self.handlers:
                logging.root.removeHandler(h)
                h.close()
        logging.root.setLevel(self.level)
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.setLevel(self.levels.get(name, logging.NOTSET))


def run_openclip_train(argv: list[str], plain: bool = False) -> int:
    """``jeststream openclip-train`` (or, ``plain``, open_clip_train itself) in-process."""
    with _RootLogging():
        if plain:
            import open_clip_train.main as ocm

            result = ocm.main(argv)
            return 0 if result is None else 1
        from jeststream.adapters import open_clip_train as oct_

        return oct_.main(argv)


def openclip_train_argv(
    tmp: Path, name: str, data: str, *, batch: int, samples: int, epochs: int
) -> list[str]:
    """open_clip_train's flags for a CPU run of the tiny model on ``data``, logging to
    ``tmp/logs/name``."""
    return [
        "--train-data", data, "--dataset-type", "webdataset", "--train-num-samples", str(samples),
        "--model", TINY, "--device", "cpu", "--precision", "fp32", "--workers", "0",
        "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "1e-3", "--warmup", "2",
        "--seed", "0", "--log-every-n-steps", "1", "--logs", str(tmp / "logs"), "--name", name,
        "--report-to", "",
    ]


def log_of(tmp: Path, name: str) -> str:
    return (tmp / "logs" / name / "out.log").read_text()


def benchmark_module(name: str):
    """A benchmarks/ script as a module (benchmarks/ on sys.path, as when run as a script)."""
    import importlib

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)
