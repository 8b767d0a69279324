"""An on-disk cache of the frozen reference's embeddings, keyed by sample key.

    cache = ReferenceCache("ref-cache/")                   # written by `jeststream precompute-reference`
    loader = JESTLoader(base, learner, cache, ratio=0.2)   # no reference forward at all

The reference never changes, so its embedding of a sample is computed once (one pass over the
shards, ``jeststream precompute-reference``) instead of on every super-batch it appears in; the
loader then only runs the learner snapshot. Lookup is by the per-example key the selection log
uses (``jeststream.batch.find_keys``: webdataset's ``__key__``, an MDS key column, or
``key_fn=``), so the base loader must be a keyed one.

Format: a directory with ``manifest.json`` and, per input shard ``NAME``, three files --
``NAME.keys.json`` (the shard's keys, in row order), ``NAME.image.npy`` and ``NAME.text.npy``
(``[n, d]`` float16 or float32, L2-normalised). Plain ``.npy`` arrays rather than Parquet because
they are memory-mapped as they are: a lookup gathers a few hundred random rows straight from the
page cache, with no column chunk to decode, no copy of a whole shard in memory and no pyarrow
dependency; and one file set per shard lets ranks or machines split the precompute (each rank
writes its own shards) and lets an interrupted run resume shard by shard. In memory the cache
holds only the key -> (shard, row) index, built at the first lookup.

``manifest.json`` identifies what the embeddings are of: the reference (architecture, where it
was loaded from, and :func:`reference_fingerprint`, a SHA-256 over its parameters), the
preprocessing (image size, mean/std, interpolation, resize mode; tokenizer and context length),
the embedding width and storage dtype, ``logit_scale`` (already exponentiated) and
``logit_bias``; and one completion record per shard (source, examples, bad samples). Shard files
are written under temporary names and renamed when complete, and a shard counts only once its
record is in the manifest (updated under a file lock, atomically), so a killed writer leaves
nothing a reader would trust.

Note: the cached embeddings are of the *precompute's* preprocessing (the reference's own eval
transform), not of the training batches' augmentations, which a live reference would see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jeststream.atomic import atomic_write
from jeststream.embed import (
    Embeddings,
    autocast_dtype,
    check_embeddings,
    default_embed,
    freeze_reference,
    unwrap_model,
)

__all__ = [
    "FORMAT",
    "MANIFEST",
    "ReferenceCache",
    "read_manifest",
    "reference_fingerprint",
    "shard_problem",
    "write_shard",
]

FORMAT = "jeststream-reference-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
_ON_MISSING = ("raise", "compute")
_LOCK = ".manifest.lock"
# header fields that must agree between runs writing into the same directory
_HEADER_FIELDS = ("reference", "preprocessing", "embed_dim", "dtype", "logit_scale", "logit_bias")


def reference_fingerprint(model: nn.Module) -> str:
    """``"sha256:..."`` over the model's parameters: name, dtype, shape and raw bytes of each, in
    name order (DDP / torch.compile wrappers are unwrapped first; buffers are not included).

    The dtype is part of it: a reference cast to bfloat16 embeds differently from its float32
    original, so it is a different reference."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap_model(model).named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{str(p.dtype).removeprefix('torch.')}|{tuple(p.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


# -- manifest ----------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The cache's manifest; FileNotFoundError naming the directory and the fix if it has none."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{os.fspath(directory)!r} is not a reference cache (no {MANIFEST}); write one with "
            "`jeststream precompute-reference --shards SPEC --reference MODEL --out DIR`"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # it says which shards are complete: without it no shard file can be trusted
        raise ValueError(
            f"reference cache {os.fspath(directory)!r}: {path} is damaged ({exc}); it records "
            "which shards are complete, so move the directory aside and run `jeststream "
            "precompute-reference` again into a new --out directory"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {manifest.get('version')}; this jeststream reads "
            f"version {FORMAT_VERSION}: precompute the cache again"
        )
    return manifest


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the directory's manifest (ranks writing shards into one cache)."""
    with open(directory / _LOCK, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover -- no advisory locks: single writer assumed
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _update_manifest(directory: Path, update: Callable[[dict | None], dict]) -> dict:
    with _locked(directory):
        path = directory / MANIFEST
        current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        new = update(current)
        atomic_write(
            path, lambda fh: fh.write(json.dumps(new, indent=1, sort_keys=True) + "\n"), "w"
        )
        return new


def init_cache(directory: str | os.PathLike, header: Mapping[str, Any]) -> dict:
    """Create the cache directory and its manifest, or check that an existing one was written by
    the same reference and preprocessing (ValueError naming both otherwise). Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    missing = [f for f in _HEADER_FIELDS if f not in header]
    if missing:
        raise ValueError(f"a reference cache header needs {missing}")
    if header["dtype"] not in DTYPES:
        raise ValueError(f"dtype {header['dtype']!r} is not one of {DTYPES}")
    header = json.loads(json.dumps(dict(header)))  # tuples -> lists, as they read back

    def update(current: dict | None) -> dict:
        if current is None:
            return {"format": FORMAT, "version": FORMAT_VERSION, **header, "shards": {}}
        diff = {f: (current.get(f), header[f]) for f in _HEADER_FIELDS if current.get(f) != header[f]}
        if diff:
            lines = "; ".join(f"{f}: cache {a!r} vs now {b!r}" for f, (a, b) in diff.items())
            raise ValueError(
                f"{os.fspath(directory)!r} holds a reference cache written with a different "
                f"reference or preprocessing ({lines}); write to a new --out directory, or "
                "delete the old cache"
            )
        return current

    return _update_manifest(directory, update)


def write_shard(
    directory: str | os.PathLike,
    name: str,
    keys: Sequence[str],
    image: np.ndarray,
    text: np.ndarray,
    record: Mapping[str, Any] | None = None,
) -> None:
    """Write one shard's keys and embeddings (temporary names, renamed when complete), then record
    it as complete in the manifest (which :func:`init_cache` must have created)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest["dtype"])
    n, d = len(keys), int(manifest["embed_dim"])
    for what, arr in (("image", image), ("text", text)):
        if arr.shape != (n, d):
            raise ValueError(f"shard {name}: {what} embeddings {arr.shape}, expected {(n, d)}")
    if len(set(keys)) != n:
        raise ValueError(f"shard {name}: its {n} keys are not unique")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad shard name {name!r}")
    files = _shard_files(directory, name)
    atomic_write(files["keys"], lambda fh: fh.write(json.dumps(list(keys)).encode()))
    for what in ("image", "text"):
        arr = np.ascontiguousarray(image if what == "image" else text, dtype=dtype)
        atomic_write(files[what], lambda fh, a=arr: np.save(fh, a, allow_pickle=False))
    entry = {"examples": n, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **dict(record or {})}

    def update(current: dict | None) -> dict:
        assert current is not None
        current.setdefault("shards", {})[name] = entry
        return current

    _update_manifest(directory, update)


def _shard_files(directory: Path, name: str) -> dict[str, Path]:
    return {
        "keys": directory / f"{name}.keys.json",
        "image": directory / f"{name}.image.npy",
        "text": directory / f"{name}.text.npy",
    }


def _damaged(directory: Path, name: str, file: Path | None, problem: str) -> ValueError:
    where = f"{file.name} of shard {name}" if file is not None else f"shard {name}"
    return ValueError(
        f"reference cache {os.fspath(directory)!r}: {where} is damaged or truncated ({problem}); "
        f"run `jeststream precompute-reference` again for that shard (the same command redoes "
        "recorded shards whose files are damaged, missing or truncated)"
    )


def _npy_problem(path: Path, shape: tuple[int, int], dtype: np.dtype) -> str | None:
    """What is wrong with the .npy file at ``path`` (header, shape, dtype, length), or None.
    Reads its header only."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
        size = path.stat().st_size
    except FileNotFoundError:
        return "the file is missing"
    except (OSError, ValueError, EOFError) as exc:
        return f"unreadable header: {exc}"
    if tuple(got_shape) != shape or got_dtype != dtype or fortran:
        return f"holds {got_dtype} {tuple(got_shape)}, the manifest records {dtype} {shape}"
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        return f"{size} bytes where its header needs {expected}"
    return None


def shard_problem(directory: str | os.PathLike, name: str, manifest: Mapping[str, Any]) -> str | None:
    """A cheap check of one recorded shard's files (sizes and headers, the keys file's end; no
    embeddings read): what is wrong, naming the file, or None. ``precompute-reference`` redoes
    the recorded shards it finds wrong."""
    directory = Path(directory)
    record = manifest.get("shards", {}).get(name)
    if record is None:
        return f"shard {name} is not recorded in the manifest"
    files = _shard_files(directory, name)
    n, d = int(record["examples"]), int(manifest["embed_dim"])
    for what in ("image", "text"):
        problem = _npy_problem(files[what], (n, d), np.dtype(manifest["dtype"]))
        if problem is not None:
            return f"{files[what].name}: {problem}"
    try:
        with open(files["keys"], "rb") as fh:
            first = fh.read(1)
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16))
            tail = fh.read().rstrip()
    except FileNotFoundError:
        return f"{files['keys'].name}: the file is missing"
    except OSError as exc:
        return f"{files['keys'].name}: {exc}"
    if first != b"[" or not tail.endswith(b"]"):
        return f"{files['keys'].name}: not a complete JSON list of keys"
    return None


# -- reading ---------------------------------------------------------------------------------------


class ReferenceCache:
    """The frozen reference's embeddings, looked up by sample key (see the module doc).

    Pass it to :class:`jeststream.JESTLoader` in place of the reference model; the loader then
    needs per-example keys in every batch (a keyed base loader, or ``key_fn=``).

    Args:
        directory: a cache written by ``jeststream precompute-reference`` (or :func:`write_shard`).
        on_missing: what a key absent from the cache does: ``"raise"`` (KeyError naming it) or
            ``"compute"``: run ``reference`` on those examples of the batch (counted in
            ``stats["computed"]``; kept in memory, not written to disk).
        reference: the reference model. When given, its :func:`reference_fingerprint` must match
            the manifest's (ValueError naming both). Needed for ``on_missing="compute"`` (and
            only then kept).
        embed: ``fn(model, batch) -> Embeddings`` for ``on_missing="compute"``; default: the
            JESTLoader's ``embed``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        on_missing: str = "raise",
        reference: nn.Module | None = None,
        embed: Callable[[nn.Module, Any], Embeddings] | None = None,
    ) -> None:
        if on_missing not in _ON_MISSING:
            raise ValueError(f"on_missing={on_missing!r} is not one of {_ON_MISSING}")
        if on_missing == "compute" and reference is None:
            raise ValueError(
                "on_missing='compute' needs the reference model: ReferenceCache(dir, "
                "on_missing='compute', reference=model)"
            )
        if embed is not None and not callable(embed):
            raise TypeError(f"embed must be callable fn(model, batch) -> Embeddings, got {embed!r}")
        self.directory = os.fspath(directory)
        self.manifest = read_manifest(directory)
        self.on_missing = on_missing
        self.embed = embed
        self.reference: nn.Module | None = None
        if reference is not None:
            expected = self.manifest.get("reference", {}).get("fingerprint")
            got = reference_fingerprint(reference)
            if got != expected:
                raise ValueError(
                    f"the reference model does not match the reference cache {self.directory!r}: "
                    f"its fingerprint is {got}, the cache's is {expected} (architecture "
                    f"{self.manifest.get('reference', {}).get('architecture')!r}); pass the "
                    "reference the cache was precomputed with (same weights and dtype), or "
                    "precompute a new cache for this one"
                )
            if on_missing == "compute":  # else only checked: not kept alive
                self.reference = freeze_reference(reference)
        self.dim = int(self.manifest["embed_dim"])
        self.dtype = str(self.manifest["dtype"])
        self.logit_scale = float(self.manifest["logit_scale"])
        bias = self.manifest.get("logit_bias")
        self.logit_bias = None if bias is None else float(bias)
        self.stats: dict[str, int] = {"lookups": 0, "computed": 0}
        self._index: dict[str, tuple[int, int]] | None = None
        self._arrays: list[tuple[np.ndarray, np.ndarray]] = []
        self._computed: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __repr__(self) -> str:
        shards = self.manifest.get("shards", {})
        return (
            f"ReferenceCache({self.directory!r}, {sum(s['examples'] for s in shards.values())} "
            f"examples in {len(shards)} shards, d={self.dim}, {self.dtype})"
        )

    # -- the index --------------------------------------------------------------------------

    def _load(self) -> dict[str, tuple[int, int]]:
        if self._index is not None:
            return self._index
        directory = Path(self.directory)
        self.manifest = read_manifest(directory)  # shards completed since construction count
        index: dict[str, tuple[int, int]] = {}
        arrays = []
        where: list[str] = []
        for s, (name, record) in enumerate(sorted(self.manifest.get("shards", {}).items())):
            keys, image, text = self._open_shard(directory, name, int(record["examples"]))
            for row, key in enumerate(keys):
                if key in index:
                    raise ValueError(
                        f"reference cache {self.directory!r}: key {key!r} is in shard "
                        f"{where[index[key][0]]} and in shard {name}; a cache needs unique sample "
                        "keys (give samples unique __key__s, or a key_fn that adds the shard)"
                    )
                index[key] = (s, row)
            arrays.append((image, text))
            where.append(name)
        self._arrays = arrays
        self._index = index
        return index

    def _open_shard(
        self, directory: Path, name: str, n: int
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The shard's keys and memory-mapped embeddings; a missing, truncated or garbled file
        is a ValueError naming the file, the shard and the fix (never a bare numpy error)."""
        files = _shard_files(directory, name)

        def read(what: str, load: Callable[[Path], Any]) -> Any:
            try:
                return load(files[what])
            except (OSError, ValueError, EOFError) as exc:
                # np.load: "mmap length is greater than file size", "No data left in file", ...;
                # json: JSONDecodeError and UnicodeDecodeError (ValueErrors); FileNotFoundError
                raise _damaged(directory, name, files[what], f"{type(exc).__name__}: {exc}") from exc

        keys = read("keys", lambda f: json.loads(f.read_text(encoding="utf-8")))
        if not isinstance(keys, list) or len(keys) != n:
            got = f"{len(keys)} keys" if isinstance(keys, list) else f"a JSON {type(keys).__name__}"
            raise _damaged(directory, name, files["keys"], f"{got}, the manifest records {n}")
        arrays = []
        for what in ("image", "text"):
            arr = read(what, lambda f: np.load(f, mmap_mode="r", allow_pickle=False))
            if arr.shape != (n, self.dim) or arr.dtype != np.dtype(self.dtype):
                raise _damaged(
                    directory,
                    name,
                    files[what],
                    f"holds {arr.dtype} {arr.shape}, the manifest records {self.dtype} "
                    f"{(n, self.dim)}",
                )
            arrays.append(arr)
        return keys, arrays[0], arrays[1]

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: object) -> bool:
        return key in self._load() or key in self._computed

    # -- lookup -----------------------------------------------------------------------------

    def lookup(
        self,
        keys: Sequence[str],
        *,
        device: torch.device | str | None = None,
        batch: Any = None,
        embed: Callable[[nn.Module, Any], Embeddings] | None = None,
    ) -> Embeddings:
        """Embeddings (float32, on ``device``) of the examples ``keys``, in that order.

        ``batch`` (the examples themselves, same order) and ``embed`` are used only by
        ``on_missing="compute"``, for keys absent from the cache.
        """
        index = self._load()
        keys = [str(k) for k in keys]
        n = len(keys)
        image = np.empty((n, self.dim), dtype=np.float32)
        text = np.empty((n, self.dim), dtype=np.float32)
        shard = np.empty(n, dtype=np.int64)
        rows = np.empty(n, dtype=np.int64)
        missing: list[int] = []
        for i, key in enumerate(keys):
            hit = index.get(key)
            if hit is None:
                shard[i] = -1
                missing.append(i)
            else:
                shard[i], rows[i] = hit
        for s in np.unique(shard[shard >= 0]).tolist():
            at = np.flatnonzero(shard == s)
            order = np.argsort(rows[at], kind="stable")  # ascending rows: sequential reads
            at, r = at[order], rows[at][order]
            img_mm, txt_mm = self._arrays[s]
            image[at] = img_mm[r]
            text[at] = txt_mm[r]
        if missing:
            self._fill_missing(keys, missing, image, text, batch, embed)
        self.stats["lookups"] += 1
        dev = torch.device("cpu") if device is None else torch.device(device)
        non_blocking = dev.type == "cuda"
        to = {"device": dev, "non_blocking": non_blocking}
        img_t = torch.from_numpy(image)
        txt_t = torch.from_numpy(text)
        if non_blocking:
            img_t, txt_t = img_t.pin_memory(), txt_t.pin_memory()
        return Embeddings(
            img_t.to(**to),
            txt_t.to(**to),
            torch.tensor(self.logit_scale, dtype=torch.float32, device=dev),
            None
            if self.logit_bias is None
            else torch.tensor(self.logit_bias, dtype=torch.float32, device=dev),
        )

    def _fill_missing(
        self,
        keys: list[str],
        missing: list[int],
        image: np.ndarray,
        text: np.ndarray,
        batch: Any,
        embed: Callable[[nn.Module, Any], Embeddings] | None,
    ) -> None:
        todo = [i for i in missing if keys[i] not in self._computed]
        if todo and self.on_missing == "raise":
            shown = ", ".join(repr(keys[i]) for i in todo[:3])
            raise KeyError(
                f"{len(todo)} of {len(keys)} keys are not in the reference cache "
                f"{self.directory!r} (e.g. {shown}); precompute the shards they come from "
                "(`jeststream precompute-reference ... --out DIR` resumes and adds missing "
                "shards), check that the base loader's keys are the precompute's (same shards, "
                "same key_fn), or use ReferenceCache(dir, on_missing='compute', reference=model)"
            )
        if todo:
            if batch is None:
                raise ValueError(
                    f"{len(todo)} keys are not in the reference cache {self.directory!r} and no "
                    "batch was given to compute them from (lookup(keys, batch=...))"
                )
            self._compute(keys, todo, batch, embed or self.embed)
        for i in missing:
            image[i], text[i] = self._computed[keys[i]]

    def _compute(self, keys: list[str], todo: list[int], batch: Any, embed: Any) -> None:
        from jeststream.batch import batch_size, index_batch, iter_tensors
        from jeststream.snapshot import is_accelerator

        assert self.reference is not None
        if batch_size(batch) != len(keys):
            raise ValueError(
                f"lookup got {len(keys)} keys for a batch of {batch_size(batch)} examples"
            )
        idx = torch.tensor(todo, dtype=torch.long)
        sub = index_batch(batch, idx)
        device = next((t.device for t in iter_tensors(sub)), torch.device("cpu"))
        param = next(iter(self.reference.parameters()), None)
        if param is not None and param.device != device:
            self.reference.to(device)
        autocast = (
            torch.autocast(device.type, dtype=autocast_dtype(device))
            if is_accelerator(device)
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            raw = (embed or default_embed)(self.reference, sub)
        e = check_embeddings(raw, "reference (computing keys missing from the cache)", len(todo))
        img, txt = e.image.cpu().numpy(), e.text.cpu().numpy()
        for j, i in enumerate(todo):
            self._computed[keys[i]] = (img[j].copy(), txt[j].copy())
        self.stats["computed"] += len(todo)

