"""webdataset tar shards as a JEST-ready base loader.

    loader = webdataset_loader("shards/{0000..0099}.tar", batch_size=256,
                               tokenizer=open_clip.get_tokenizer("ViT-B-32"),
                               transform=preprocess, num_workers=8)
    jest = JESTLoader(loader, learner, reference, ratio=0.2, selection_log="sel.parquet")
    for images, texts, keys in jest: ...

Each batch is a tuple ``(images [b,3,H,W], texts [b,ctx] or list[str], keys list[str])`` of
exactly ``batch_size`` examples; ``keys`` are the samples' ``__key__`` so that every selection
can be traced to its sample (JESTLoader finds them at position 2).

The reading is built from stages that also serve your own webdataset pipelines: shard URLs
are expanded by webdataset's ``expand_urls``; :func:`checked_tarfile_to_samples` takes the
place of webdataset's tar reader in a ``wds.DataPipeline`` (or start from
:func:`checked_webdataset` for the fluid form); ``shuffle_buffer`` is webdataset's ``shuffle``
stage, seeded. The tar reader and the grouping of members into samples stay ours:

- Python's ``tarfile`` in stream mode (what ``wds.WebDataset`` reads with) ends *silently* on a
  truncated or corrupt header, so a damaged shard would just shorten the epoch. Here every
  shard must end with tar's end-of-archive block and pass its header checksums, or it is
  reported: a :class:`BadShardWarning` naming the shard and ``loader.stats["bad_shards"]``
  (shared across DataLoader workers, surfaced by ``JESTLoader.stats``).
- Speed: JEST reads 1/ratio base batches per training step. Reading and grouping a batch of
  128 of the demo's samples takes 2.3 ms here and 13.9 ms through webdataset's
  ``tarfile_to_samples``; webdataset's ``group_by_keys`` on our reader takes 2.7 ms, and the
  whole loader (decode, collate) 15.1 ms per batch with it where ours gives 14.6
  (``benchmarks/pipeline.py``, section ``shards``, webdataset 0.2.86; 1.0.2: 15.3 vs 14.0).
  The grouping follows ``group_by_keys`` exactly -- key split, lower-cased extensions,
  metadata skipped, and a member name repeated within a sample raises its ValueError -- and
  the tests compare the two.

open_clip issue #935 (``KeyError: 'fname'``) came from mixing webdataset's tar expander, whose
records changed between versions, with a copied ``group_by_keys``; here the reader and the
grouping are one piece, whatever the webdataset version. Our own decoding and collation make
the output identical under webdataset 0.2.x (lists) and 1.0.x (tuples/dicts).

Your own pipeline works as JESTLoader's base loader too (``wds.WebLoader(pipeline,
batch_size=None, num_workers=...)``, tuple batches with ``__key__`` at position 2 for the
selection log; dict batches with ``image`` / ``text`` fields, or mapped through
:func:`normalize_batch`), with webdataset's limits: no ``len`` unless ``with_length(n)``, no
resume (``JESTLoader.load_state_dict`` raises), and ``batched(b)`` is ``partial=True`` by
default -- a super-batch holding a short base batch yields ``round(size / n)`` examples, not b,
and with several workers a short batch can come in the middle of an epoch; pass
``partial=False`` to keep every batch at b. ``tests/test_user_pipelines.py`` runs them all.

Distributed: shards are split by node (``wds.split_by_node``: torch.distributed rank or
RANK/WORLD_SIZE) and then by DataLoader worker (``wds.split_by_worker``); each worker drops its
last partial batch, so every batch has ``batch_size`` examples. Without ``num_samples`` an epoch
is one pass over the shards, so ranks whose shares differ (uneven split, a bad shard) yield
different numbers of batches -- and DDP hangs at the end of the epoch, the longer rank waiting in
an all-reduce. With ``num_samples`` every rank yields exactly ``num_samples // (batch_size *
world_size)`` batches (open_clip's ``with_epoch`` over resampled shards, made deterministic):
worker w of W gets a fixed share (``rank_batches // W``, plus one for the first ``rank_batches %
W`` workers) and, when its shards run out first, reads them again -- pass p reshuffled by (seed,
epoch, p) with ``shuffle_shards`` -- each pass dropping its partial batch; it never yields more
than its share. A bad shard is reported once per epoch; its samples before the damage are read
again in every pass. A worker that must yield batches but has no shard (more ranks x workers
than shards), or whose shards give no full batch in a whole pass, raises ValueError: borrowing
another worker's shards would duplicate data silently, so the fix (fewer workers, more shards)
is left to you. Resume (below) stays exact: the passes are part of the deterministic replay.

Shuffling: ``shuffle_shards`` shuffles the shard order per epoch (the same on every rank, before
splitting); ``shuffle_buffer=N`` also shuffles samples through webdataset's ``shuffle`` stage
(as open_clip's pipeline does), over a buffer of N raw (undecoded) samples per worker filled
before the first sample leaves it, seeded by (seed, epoch, rank, worker, pass) so that it is
deterministic -- the same order under webdataset 0.2.x and 1.0.x, which share the algorithm.

Augmentation: each sample's ``transform`` runs with its random draws seeded by (seed, epoch,
``__key__``) (:class:`jeststream.deferred.SeededTransform`), so a replayed epoch and the deferred
pipeline give the same pixels. ``deferred=True`` with ``score_resolution=R`` yields the images
as a :class:`jeststream.deferred.Deferred` field (R-px scoring views, the training transform
after selection; :mod:`jeststream.adapters.deferred_images`, docs/cheaper_scoring.md).

Resume: a tar stream has no random access, so :meth:`WebDatasetLoader.state_dict` records
``(epoch, batches yielded)`` and ``load_state_dict`` replays the epoch's deterministic order
(shard order and sample buffer both seeded), skipping that many batches. Exact for the same shards, ``num_workers`` and world size; the skipped batches are
read and decoded again (cost proportional to the position in the epoch).
"""

from __future__ import annotations

import functools
import io
import logging
import multiprocessing as mp
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from jeststream.adapters.deferred_images import (
    MaterialiseImage,
    SkipBadRecord,
    collate_deferred,
    deferred_mode,
    deferred_sample,
    normalisation,
)
from jeststream.deferred import Deferred, SeededTransform, example_seed

__all__ = [
    "BadShardError",
    "BadShardWarning",
    "ShardErrorCounter",
    "TruncatedShardError",
    "WebDatasetLoader",
    "checked_tarfile_samples",
    "checked_tarfile_to_samples",
    "checked_webdataset",
    "decode_image",
    "default_image_transform",
    "expand_urls",
    "first_field",
    "normalize_batch",
    "shard_samples",
    "webdataset_loader",
]

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pnm")
NETPBM_EXTS = ("ppm", "pgm", "pnm")
TEXT_EXTS = ("txt", "text", "caption")
_NAMES_BYTES = 8192


class BadShardWarning(UserWarning):
    """A shard could not be opened or read to its end (truncated, corrupt, missing)."""


class BadShardError(ValueError):
    """A shard could not be opened or read to its end: truncated or corrupt (see
    :class:`TruncatedShardError`), missing, or with a member name repeated within one sample.

    What :func:`checked_tarfile_samples` hands its ``handler`` (and raises without one);
    ``url`` names the shard, ``__cause__`` is the original error.
    """

    def __init__(self, url: str, cause: BaseException, hint: str = "") -> None:
        self.url = url
        super().__init__(
            f"webdataset shard {url} is bad ({type(cause).__name__}: {_error_text(cause)}); its "
            f"remaining samples are not read{hint}"
        )
        self.__cause__ = cause


def _error_text(exc: BaseException) -> str:
    # webdataset's stages append (stream, url) to an exception's args; keep its message readable
    args = getattr(exc, "args", ())
    if len(args) > 1 and isinstance(args[0], str):
        return args[0]
    return str(exc)


class ShardErrorCounter:
    """Counts bad shards and bad samples across DataLoader worker processes (shared memory).

    ``on_bad_shard``: "warn" (warn, count, go on with the next shard) or "raise".
    ``context``: the DataLoader's ``multiprocessing_context`` (a name or a context; None: the
    default), so that the shared counters can be handed to its workers.

    It is also a webdataset handler for :func:`checked_tarfile_to_samples`: build it before the
    DataLoader (its workers then share it) and read ``bad_shards`` / ``bad_shard_names`` in the
    training process::

        counter = ShardErrorCounter("warn")
        stage = checked_tarfile_to_samples(handler=counter)
    """

    def __init__(self, on_bad_shard: str = "warn", context: Any = None) -> None:
        if on_bad_shard not in ("warn", "raise"):
            raise ValueError(f"on_bad_shard must be 'warn' or 'raise', got {on_bad_shard!r}")
        self.on_bad_shard = on_bad_shard
        ctx = mp.get_context(context) if context is None or isinstance(context, str) else context
        self._shards = ctx.Value("q", 0)
        self._samples = ctx.Value("q", 0)
        self._names = ctx.Array("c", _NAMES_BYTES)  # newline-separated, bounded

    @property
    def bad_shards(self) -> int:
        return int(self._shards.value)

    @property
    def bad_samples(self) -> int:
        return int(self._samples.value)

    @property
    def bad_shard_names(self) -> list[str]:
        with self._names.get_lock():
            raw = self._names.value
        return [n for n in raw.decode("utf-8", "replace").split("\n") if n]

    def __call__(self, exn: BaseException) -> bool:
        """webdataset handler protocol: count and warn (True: go on) or raise."""
        url = getattr(exn, "url", None) or "<unknown shard>"
        cause = exn.__cause__ if isinstance(exn, BadShardError) and exn.__cause__ else exn
        self.shard_error(url, cause)
        return True

    def shard_error(self, url: str, exc: BaseException) -> None:
        with self._shards.get_lock():
            self._shards.value += 1
        with self._names.get_lock():
            entry = (url + "\n").encode("utf-8", "replace")
            cur = self._names.value
            if len(cur) + len(entry) < _NAMES_BYTES:
                self._names.value = cur + entry
        if self.on_bad_shard == "raise":
            raise BadShardError(url, exc, "; pass on_bad_shard='warn' to skip bad shards") from exc
        warnings.warn(str(BadShardError(url, exc)), BadShardWarning, stacklevel=2)

    def sample_error(self, key: str, url: str, exc: BaseException) -> None:
        with self._samples.get_lock():
            self._samples.value += 1
        warnings.warn(
            f"skipping sample {key!r} of shard {url}: {type(exc).__name__}: {exc}",
            BadShardWarning,
            stacklevel=2,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "bad_shards": self.bad_shards,
            "bad_samples": self.bad_samples,
            "bad_shard_names": self.bad_shard_names,
        }


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """``"a-{0000..0009}.tar"`` (``::``-separated lists, ``${NAME}`` from ``$WDS_NAME``, braces:
    webdataset's ``shardlists.expand_urls``) or a list -> list; an empty result is an error."""
    if isinstance(urls, str):
        from webdataset.shardlists import expand_urls as wds_expand_urls

        out = list(wds_expand_urls(urls))
    else:
        out = [str(u) for u in urls]
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


# -- tar reading -----------------------------------------------------------------------------


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped: only the end-of-archive block is a clean end."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf._jest_end = exc  # type: ignore[attr-defined]
            raise


class TruncatedShardError(OSError):
    """The tar stream ended without its end-of-archive block (or with a corrupt header)."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's isreg(): REGTYPE, AREGTYPE, CONTTYPE
# gzip, bzip2, xz: compressed shards go through tarfile's own stream decompression
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _tar_number(field: bytes) -> int:
    """A header number: octal text, or GNU base-256 when the high bit of the first byte is set."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _tar_number(header[148:156])
    except ValueError:  # not even a number: not a tar header (e.g. not a tar file at all)
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:
        return True
    signed = sum(np.frombuffer(header, dtype=np.int8).tolist()) - sum(
        np.frombuffer(header[148:156], dtype=np.int8).tolist()
    ) + 8 * 32
    return stored == signed


def _pax_records(data: bytes) -> dict[str, str]:
    """'%d key=value\\n' records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _read_exact(stream: Any, n: int, what: str) -> bytes:
    data = stream.read(n) if n else b""
    if len(data) != n:
        raise TruncatedShardError(f"tar stream ended early ({what}: {len(data)} of {n} bytes)")
    return data


def _ustar_members(stream: Any, first: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of an uncompressed tar stream whose first block has
    already been read as ``first``. Reads headers directly: Python's tarfile parses every field
    of every header in Python, which made it the costliest step of reading a shard (the whole
    loader went from 54.5 to 34.7 ms per batch of 128 demo samples when this replaced it;
    reading and grouping alone now take 2.3 ms per batch, webdataset's tarfile-based
    ``tarfile_to_samples`` 13.9 ms: benchmarks/pipeline.py, section ``shards``)."""
    header, offset = first, 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if len(header) != _BLOCK:
            what = "no end-of-archive block" if not header else "truncated header"
            raise TruncatedShardError(f"tar stream ended early ({what} at byte {offset})")
        if header == _ZERO_BLOCK:
            return  # the end-of-archive block: the only clean end
        if not _checksum_ok(header):
            raise TruncatedShardError(f"corrupt tar header at byte {offset} (bad checksum)")
        size = _tar_number(header[124:136])
        kind = header[156:157]
        if "size" in pax:
            size = int(pax["size"])
        data = _read_exact(stream, size, f"member at byte {offset}")
        _read_exact(stream, -size % _BLOCK, "padding")
        offset += _BLOCK + size + (-size % _BLOCK)
        if kind == b"x":  # pax header of the next member
            pax = _pax_records(data)
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in (b"g", b"K"):  # pax global header, GNU long link name: nothing we use
            pass
        else:
            if kind in _REGULAR:
                name = pax.get("path") or long_name
                if name is None:
                    name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if header[257:262] == b"ustar":
                        prefix = header[345:500].split(b"\0", 1)[0]
                        if prefix:
                            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
                yield name, data
            long_name, pax = None, {}
        header = stream.read(_BLOCK)


class _Prepended:
    """A read-only stream that replays ``head`` before the rest of ``stream`` (for tarfile)."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        if len(out) < n:
            out += self.stream.read(n - len(out))
        return out


def _tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of the shard at ``url``; raises on any damage."""
    from webdataset.gopen import gopen

    stream = gopen(url)
    try:
        first = stream.read(_BLOCK)
        if not first.startswith(_COMPRESSED_MAGIC):
            yield from _ustar_members(stream, first)
            return
        tf = tarfile.open(
            fileobj=_Prepended(first, stream), mode="r|*", tarinfo=_EndCheckingTarInfo
        )
        for info in tf:
            if info.isreg():
                data = tf.extractfile(info).read()  # short data -> ReadError
                yield info.name, data
            tf.members = []  # stream mode keeps every TarInfo otherwise
        end = getattr(tf, "_jest_end", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            what = "no end-of-archive block" if end is None else f"{type(end).__name__}: {end}"
            raise TruncatedShardError(f"tar stream ended early ({what})")
    finally:
        stream.close()


# webdataset's tar_file_iterator skips these metadata members (``__key__``, ``__meta__/...``)
_META = re.compile(r"__[^/]*__($|/)")


def _grouped_samples(
    url: str,
    select_files: Callable[[str], bool] | None = None,
    rename_files: Callable[[str], str] | None = None,
) -> Iterator[dict[str, Any]]:
    """A shard's members grouped by key into ``{"__key__", "__url__", ext: bytes}``, as
    webdataset's ``group_by_keys`` groups them (its ``base_plus_ext`` key split, lower-cased
    extensions, metadata skipped, a repeated extension within a sample refused with its
    ValueError; the tests compare the two on tricky names). Not ``group_by_keys`` itself, for
    speed: on the demo's shards reading and grouping with it took 2.72 ms per batch of 128
    where this takes 2.32, and the whole ``webdataset_loader`` 15.1 ms per batch where this
    gives 14.6 (+3.5%; webdataset 1.0.2: 15.3 vs 14.0, +9%; benchmarks/pipeline.py, section
    ``shards``)."""
    current: dict[str, Any] | None = None
    for fname, data in _tar_members(url):
        if fname.startswith("__") and _META.match(fname):
            continue
        if rename_files is not None:
            fname = rename_files(fname)
        if select_files is not None and not select_files(fname):
            continue
        slash = fname.rfind("/")
        dot = fname.find(".", slash + 1)
        if dot > slash + 1:
            key, ext = fname[:dot], fname[dot + 1 :].lower()
        else:  # no extension, or a dot-file: webdataset's own split decides (rare)
            from webdataset.tariterators import base_plus_ext

            key, ext = base_plus_ext(fname)
            if key is None:
                continue
            ext = ext.lower()
        if current is None or key != current["__key__"]:
            if current is not None and not current.get("__bad__", False):
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            raise ValueError(
                f"{fname}: duplicate file name in tar file {ext} {current.keys()}"
            )
        current[ext] = data
    if current is not None and not current.get("__bad__", False):
        yield current


def checked_tarfile_samples(
    src: Iterable[Mapping[str, Any] | str],
    handler: Callable[[BaseException], bool] | None = None,
    *,
    select_files: Callable[[str], bool] | None = None,
    rename_files: Callable[[str], str] | None = None,
) -> Iterator[dict[str, Any]]:
    """webdataset's ``tarfile_samples`` (open, expand, group), with a tar reader that notices
    damage: shards (``{"url": ...}`` dicts as webdataset's shard lists yield, or str) ->
    samples ``{"__key__", "__url__", ext: bytes}``.

    Every shard must open, end with tar's end-of-archive block, have valid header checksums
    and no member name repeated within a sample (refused as webdataset's ``group_by_keys``
    refuses it); otherwise a :class:`BadShardError` naming the shard goes to
    ``handler`` -- None raises it, and a webdataset handler decides as in webdataset:
    ``wds.warn_and_continue`` warns and goes on with the next shard, ``wds.warn_and_stop``
    ends the stream, a :class:`ShardErrorCounter` counts across DataLoader workers. The sample
    being assembled when the shard broke is dropped; the ones before it were yielded.
    Python's ``tarfile`` (which ``wds.WebDataset`` reads with) ends silently on a truncated or
    corrupt header, so such a shard would only shorten the epoch.

    Samples are grouped as ``group_by_keys`` groups them, within each shard (a key cannot run
    across shards, whatever the webdataset version): metadata files (``__*__``) are skipped,
    ``select_files`` / ``rename_files`` are webdataset's options.
    """
    for source in src:
        url = source["url"] if isinstance(source, Mapping) else source
        if not isinstance(url, str):
            raise TypeError(
                f"checked_tarfile_samples reads shard URLs (str or {{'url': str}}), got "
                f"{source!r}; put it after a shard list (wds.SimpleShardList(urls))"
            )
        try:
            yield from _grouped_samples(url, select_files, rename_files)
        except Exception as exc:  # noqa: BLE001 -- every reading failure is a bad shard
            err = exc if isinstance(exc, BadShardError) else BadShardError(url, exc)
            if handler is None:
                raise err from exc
            if handler(err):
                continue
            return


def checked_tarfile_to_samples(
    handler: Callable[[BaseException], bool] | None = None,
    *,
    select_files: Callable[[str], bool] | None = None,
    rename_files: Callable[[str], str] | None = None,
) -> Callable[[Iterable[Any]], Iterator[dict[str, Any]]]:
    """:func:`checked_tarfile_samples` as a webdataset pipeline stage, the drop-in for
    ``wds.tarfile_to_samples(handler=...)``::

        ds = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_node, wds.split_by_worker,
            checked_tarfile_to_samples(handler=wds.warn_and_continue),  # None: raise
            wds.shuffle(1000), wds.decode("pil"),
            wds.to_tuple("jpg;png", "txt", "__key__"), wds.map_tuple(preprocess, tokenize),
            wds.batched(256, partial=False),
        )

    The stage is a ``functools.partial``, so it pickles to DataLoader workers (also spawned).
    """
    return functools.partial(
        checked_tarfile_samples,
        handler=handler,
        select_files=select_files,
        rename_files=rename_files,
    )


_DEFAULT = object()


def checked_webdataset(
    urls: str | Sequence[str],
    *,
    handler: Callable[[BaseException], bool] | None = None,
    nodesplitter: Any = _DEFAULT,
    workersplitter: Any = _DEFAULT,
    select_files: Callable[[str], bool] | None = None,
    rename_files: Callable[[str], str] | None = None,
) -> Any:
    """``wds.WebDataset(urls, shardshuffle=False)`` reading through
    :func:`checked_tarfile_to_samples`: a fluid pipeline to go on from as usual::

        ds = (checked_webdataset(urls, handler=wds.warn_and_continue)
              .shuffle(1000).decode("pil").to_tuple("jpg;png", "txt", "__key__")
              .map_tuple(preprocess, tokenize).batched(256, partial=False))

    Shards are split by ``nodesplitter`` (default ``wds.split_by_node``: the torch.distributed
    rank) then ``workersplitter`` (default ``wds.split_by_worker``), None for no split. The shard
    order is the order of ``urls``; to shuffle shards, build a ``wds.DataPipeline`` with a
    shuffle stage before the reader.
    """
    import webdataset as wds

    stages: list[Any] = [wds.SimpleShardList(expand_urls(urls))]
    splitters = ((nodesplitter, wds.split_by_node), (workersplitter, wds.split_by_worker))
    for splitter, default in splitters:
        splitter = default if splitter is _DEFAULT else splitter
        if splitter is not None:
            stages.append(splitter)
    stages.append(
        checked_tarfile_to_samples(handler, select_files=select_files, rename_files=rename_files)
    )
    pipeline = wds.FluidWrapper(stages[0])
    for stage in stages[1:]:
        pipeline.append(stage)
    return pipeline


class _ReportOnce:
    """Handler that reports each bad shard once to ``counter`` (its ``shard_error(url, exc)``)
    and goes on; ``reported`` is shared by the passes of one epoch."""

    def __init__(self, counter: Any, reported: set[str] | None = None) -> None:
        self.counter = counter
        self.reported = set() if reported is None else reported

    def __call__(self, err: BaseException) -> bool:
        url = getattr(err, "url", "<unknown shard>")
        if url not in self.reported:
            self.reported.add(url)
            self.counter.shard_error(url, err.__cause__ or err)
        return True


def shard_samples(
    url: str, counter: Any, reported: set[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__": ..., ext: bytes}``) of one shard, for tools that read shards
    outside a loader (``jeststream report``, ``precompute-reference``). Damage goes to
    ``counter.shard_error(url, exc)`` (a :class:`ShardErrorCounter` or anything with that
    method) once per ``reported`` set, so a shard read again in a later pass is not reported
    twice."""
    return checked_tarfile_samples([url], _ReportOnce(counter, reported))


# -- decoding / batching ---------------------------------------------------------------------


# A binary 8-bit netpbm header: magic, width, height, maxval, then exactly one whitespace byte
# before the raster (which may itself start with whitespace-valued bytes).
_NETPBM_HEADER = re.compile(rb"(P[56])\s+(\d+)\s+(\d+)\s+(\d+)\s")
_NETPBM_MODES = {b"P5": ("L", 1), b"P6": ("RGB", 3)}


def _netpbm_raster(data: bytes) -> tuple[str, tuple[int, int], memoryview] | None:
    """(PIL mode, (width, height), raster) of a binary 8-bit PGM/PPM, or None for any other
    netpbm form (comments, 16-bit, ASCII, bitmaps), which PIL then reads."""
    m = _NETPBM_HEADER.match(data, 0, 64)
    if m is None or m.group(4) != b"255":
        return None
    mode, channels = _NETPBM_MODES[m.group(1)]
    width, height = int(m.group(2)), int(m.group(3))
    if width == 0 or height == 0:
        return None  # PIL's error message names the problem
    need = width * height * channels
    have = len(data) - m.end()
    if have < need:
        raise ValueError(
            f"truncated {mode} netpbm image: {have} of {width}x{height}x{channels} = {need} "
            "raster bytes"
        )
    return mode, (width, height), memoryview(data)[m.end() : m.end() + need]


def decode_image(data: bytes, ext: str) -> Any:
    """The PIL image stored as ``data`` in a sample's ``ext`` field, decoded now (a damaged
    file fails here, not in a transform). Binary 8-bit PGM/PPM, the cheapest format for small
    images, become an image over their raster in place: PIL's own reader spends tens of
    microseconds per file on plugin and stream set-up, more than the whole decode of a small
    image, and a JEST base loader decodes 1/ratio batches per step. Everything else goes
    through ``PIL.Image.open``."""
    from PIL import Image

    if ext in NETPBM_EXTS:
        raster = _netpbm_raster(data)
        if raster is not None:
            mode, size, pixels = raster
            return Image.frombuffer(mode, size, pixels, "raw", mode, 0, 1)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def default_image_transform(image: Any) -> torch.Tensor:
    """PIL image -> float tensor [3,H,W] in [0,1] (like torchvision's ToTensor)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def first_field(sample: Mapping[str, Any], exts: Sequence[str]) -> tuple[str, Any] | None:
    """(ext, value) of the first of ``exts`` (e.g. :data:`IMAGE_EXTS`) that a raw sample holds,
    or None."""
    for ext in exts:
        if ext in sample:
            return ext, sample[ext]
    return None


class _Pipeline(IterableDataset):
    """shards -> node split -> worker split -> samples -> decode -> batches of exactly b."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        transform: Callable[[Any], Any],
        tokenizer: Callable[[list[str]], Any] | None,
        image_exts: Sequence[str],
        text_exts: Sequence[str],
        shuffle_shards: bool,
        seed: int,
        counter: ShardErrorCounter,
        num_samples: int | None = None,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        deferred: str | None = None,
        score_resolution: int | None = None,
    ) -> None:
        super().__init__()
        # deferred: None (eager), "encoded" or "decoded" (adapters/deferred_images.py)
        self.deferred = deferred
        self.score_resolution = score_resolution
        self.normalise = normalisation(transform)
        # every sample's augmentation is seeded by (seed, epoch, key): eager and deferred
        # pipelines give the same pixels (default_image_transform draws nothing)
        self.seeded = None if transform is default_image_transform else SeededTransform(transform)
        self.shuffle_buffer = shuffle_buffer
        self.num_samples = num_samples  # over all ranks; None: one pass over the shards
        self.world_size = world_size  # the world num_samples was divided by (at construction)
        self.urls = urls
        self.batch_size = batch_size
        self.transform = transform
        self.tokenizer = tokenizer
        self.image_exts = tuple(image_exts)
        self.text_exts = tuple(text_exts)
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch = 0
        self.counter = counter

    def shard_order(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            # same order on every rank and worker: seeded by (seed, epoch), before splitting
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        return urls

    def rank_batches(self) -> int | None:
        """Batches each rank yields per epoch (None without ``num_samples``: one pass)."""
        if self.num_samples is None:
            return None
        return self.num_samples // (self.batch_size * self.world_size)

    def worker_batches(self, worker: int, num_workers: int) -> int | None:
        """Worker ``worker``'s fixed share of :meth:`rank_batches` (the shares sum to it)."""
        total = self.rank_batches()
        if total is None:
            return None
        return total // num_workers + (1 if worker < total % num_workers else 0)

    def _pass_order(self, shards: list[str], pass_: int) -> list[str]:
        # pass 0 is the epoch's order; later passes (only with num_samples) reshuffle the
        # worker's own shards by (seed, epoch, pass): a str seed is hashed with sha512, so the
        # order is the same in every process (resume replays it)
        if pass_ == 0 or not self.shuffle_shards:
            return shards
        out = list(shards)
        random.Random(f"jeststream-wds:{self.seed}:{self.epoch}:{pass_}").shuffle(out)
        return out

    def _decode(self, raw: dict[str, Any]) -> tuple[Any, str, str] | None:
        key, url = raw["__key__"], raw["__url__"]
        try:
            img = first_field(raw, self.image_exts)
            txt = first_field(raw, self.text_exts)
            if img is None or txt is None:
                missing = "image " + "/".join(self.image_exts) if img is None else "caption"
                raise KeyError(
                    f"no {missing} field (has {sorted(k for k in raw if not k.startswith('__'))})"
                )
            if self.deferred is not None:
                image = deferred_sample(
                    self.deferred, self.score_resolution, decode=decode_image,
                    seed=self.seed, epoch=self.epoch,
                )((img[1], img[0], key, url))
            else:
                with decode_image(img[1], img[0]) as im:
                    if self.seeded is None:
                        image = self.transform(im)
                    else:
                        image = self.seeded(im, example_seed(self.seed, self.epoch, key))
            text = txt[1].decode("utf-8").strip()
        except Exception as exc:  # noqa: BLE001 -- a bad sample is skipped and counted
            self.counter.sample_error(key, url, exc)
            return None
        return image, text, key

    def _collate(self, samples: list[tuple[Any, str, str]]) -> tuple[Any, Any, list[str]]:
        images = [s[0] for s in samples]
        if self.deferred is not None:  # materialise/on_error are attached in the main process
            images = collate_deferred(
                [v for v, _ in images], [r for _, r in images], normalise=self.normalise
            )
        elif isinstance(images[0], (torch.Tensor, np.ndarray)):
            try:
                if isinstance(images[0], np.ndarray):  # e.g. an albumentations/numpy transform
                    images = torch.from_numpy(np.stack(images))
                else:
                    images = torch.stack(images)
            except (RuntimeError, ValueError, TypeError) as exc:
                kinds = sorted({f"{type(i).__name__}{tuple(i.shape)}" for i in images})
                raise ValueError(
                    f"cannot stack images of types/shapes {kinds}"
                    "; pass a transform that resizes/crops them to one size (e.g. open_clip's "
                    "preprocess)"
                ) from exc
        texts: Any = [s[1] for s in samples]
        if self.tokenizer is not None:
            texts = self.tokenizer(texts)
        return images, texts, [s[2] for s in samples]

    def _raw_samples(
        self, shards: Sequence[str], reported: set[str] | None, buffer_seed: str
    ) -> Iterator[dict[str, Any]]:
        raws = checked_tarfile_samples(shards, _ReportOnce(self.counter, reported))
        if self.shuffle_buffer <= 1:
            return raws
        import webdataset as wds

        # webdataset's shuffle stage (the same algorithm in 0.2.x and 1.0.x), filled to the
        # whole buffer before the first sample leaves it, seeded for the deterministic replay
        size = self.shuffle_buffer
        return wds.shuffle(size, initial=size, rng=random.Random(buffer_seed))(raws)

    def _batches(
        self, shards: Sequence[str], reported: set[str] | None = None, buffer_seed: str = ""
    ) -> Iterator[tuple[Any, Any, list[str]]]:
        pending: list[tuple[Any, str, str]] = []
        for raw in self._raw_samples(shards, reported, buffer_seed):
            sample = self._decode(raw)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []
        # the last partial batch is dropped: every batch has batch_size examples

    def _buffer_seed(self, rank: int, worker: int, pass_: int) -> str:
        # a str seed is hashed with sha512: the same stream in every process (resume replays it)
        return f"jeststream-wds-buffer:{self.seed}:{self.epoch}:{rank}:{worker}:{pass_}"

    def __iter__(self) -> Iterator[tuple[Any, Any, list[str]]]:
        import webdataset as wds
        from webdataset.utils import pytorch_worker_info

        shards = list(wds.split_by_worker(wds.split_by_node(iter(self.shard_order()))))
        rank, world, worker, num_workers = pytorch_worker_info()
        if self.num_samples is None:
            # one pass: the epoch ends with the shards
            yield from self._batches(shards, None, self._buffer_seed(rank, worker, 0))
            return
        if world != self.world_size:
            raise ValueError(
                f"webdataset_loader was built for world size {self.world_size} but iterates "
                f"in world size {world}: num_samples={self.num_samples} per rank would not "
                "match len(); build the loader after init_process_group (or set RANK/"
                "WORLD_SIZE before building it)"
            )
        quota = self.worker_batches(worker, num_workers)
        assert quota is not None
        if quota == 0:
            return
        if not shards:
            per_rank = len(self.urls) // world
            fewer = f"num_workers={per_rank} or " if 0 < per_rank < num_workers else ""
            raise ValueError(
                f"rank {rank} DataLoader worker {worker} has no shard ({len(self.urls)} shards "
                f"for {world} ranks x {num_workers} workers) but must yield {quota} of the "
                f"rank's {self.rank_batches()} batches (num_samples={self.num_samples}); use "
                f"{fewer}at least {world * num_workers} shards"
            )
        bad: set[str] = set()  # reported once per epoch, however many passes read them
        done = pass_ = 0
        while True:
            before = done
            order = self._pass_order(shards, pass_)
            for batch in self._batches(order, bad, self._buffer_seed(rank, worker, pass_)):
                yield batch
                done += 1
                if done == quota:
                    return  # never more than the share: every rank yields the same count
            if done == before:
                raise ValueError(
                    f"rank {rank} DataLoader worker {worker}: a whole pass over its "
                    f"{len(shards)} shard(s) gave no batch of {self.batch_size} (bad shards: "
                    f"{sorted(bad) or 'none'}), so it cannot yield its {quota} batches "
                    f"(num_samples={self.num_samples}); fix or drop the bad shards, or use "
                    "fewer workers so that each has more shards"
                )
            pass_ += 1
            logger.info(
                "webdataset: rank %d worker %d read its %d shards; pass %d for batches %d..%d",
                rank, worker, len(shards), pass_, done, quota,
            )


class WebDatasetLoader:
    """Iterable of ``(images, texts, keys)`` batches from webdataset shards (see module doc).

    Exposes what JESTLoader and open_clip_train look at: ``batch_size``, ``stats`` (with
    ``bad_shards``), ``set_epoch``, ``state_dict``/``load_state_dict``, ``num_batches`` /
    ``num_samples`` / ``len`` when ``num_samples`` was given, ``dataset``, ``loader`` (the
    underlying torch DataLoader).
    """

    def __init__(
        self,
        pipeline: _Pipeline,
        loader: DataLoader,
        num_samples: int | None = None,
        world_size: int = 1,
    ) -> None:
        self.dataset = pipeline
        self.loader = loader
        self.batch_size = pipeline.batch_size
        self.sampler = None
        self._counter = pipeline.counter
        self._num_samples = num_samples
        self._world = max(1, int(world_size))  # ranks sharing num_samples (split_by_node)
        self._yielded = 0
        self._skip = 0
        self._materialise = (
            None
            if pipeline.deferred is None
            else MaterialiseImage(pipeline.transform, decode_image)
        )

    @property
    def stats(self) -> dict[str, Any]:
        out = self._counter.as_dict()
        out["batches"] = self._yielded
        return out

    @property
    def bad_shards(self) -> int:
        return self._counter.bad_shards

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order (with ``shuffle_shards``); call before iterating.

        A restored position belongs to the restored epoch: moving to another epoch drops it
        (a checkpoint taken at the end of epoch e must not skip batches of epoch e + 1).
        """
        epoch = int(epoch)
        if epoch != self.dataset.epoch and self._skip:
            logger.info(
                "webdataset: set_epoch(%d) after resuming inside epoch %d; starting epoch %d "
                "from its beginning",
                epoch,
                self.dataset.epoch,
                epoch,
            )
            self._skip = 0
            self._yielded = 0
        self.dataset.epoch = epoch

    @property
    def num_batches(self) -> int:
        if self._num_samples is None:
            # AttributeError, so that getattr(loader, "num_batches", None) means "unknown"
            raise AttributeError(
                "the number of batches of a webdataset stream is unknown; pass num_samples= to "
                "webdataset_loader (e.g. from your dataset's sizes.json)"
            )
        return self._num_samples // (self.batch_size * self._world)

    @property
    def num_samples(self) -> int:
        """Examples this rank yields per epoch (``num_batches * batch_size``)."""
        return self.num_batches * self.batch_size

    def __len__(self) -> int:
        if self._num_samples is None:
            raise TypeError("a webdataset stream has no len(); pass num_samples= to know it")
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        # Eager part (not in the generator) so that state_dict() right after iter() is exact.
        skip, self._skip = self._skip, 0
        self._yielded = skip
        return self._generate(skip)

    def _generate(self, skip: int) -> Iterator[Any]:
        it = iter(self.loader)
        if skip:
            logger.info("webdataset resume: replaying %d batches of epoch %d", skip, self.epoch)
        for _ in range(skip):
            try:
                next(it)
            except StopIteration:
                logger.warning(
                    "webdataset resume: the epoch has fewer than %d batches (shards changed?)",
                    skip,
                )
                return
        seen = self._counter.bad_shards
        for batch in it:
            self._yielded += 1
            if isinstance(batch[0], Deferred):
                batch[0].materialise = self._materialise
                batch[0].on_error = SkipBadRecord(self._counter.sample_error)
            if self.loader.num_workers > 0 and self._counter.bad_shards != seen:
                seen = self._report_from_workers(seen)
            yield batch
        if self.loader.num_workers > 0 and self._counter.bad_shards != seen:
            self._report_from_workers(seen)

    def _report_from_workers(self, seen: int) -> int:
        # A worker's warning goes to its own stderr; repeat it in the training process.
        now = self._counter.bad_shards
        names = self._counter.bad_shard_names[seen:now]
        warnings.warn(
            f"{now - seen} bad webdataset shard(s) skipped by DataLoader workers: "
            f"{', '.join(names) or '(names not recorded)'} (total {now})",
            BadShardWarning,
            stacklevel=3,
        )
        return now

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches"}``: the position after the last yielded batch."""
        return {"epoch": self.epoch, "batches": self._yielded, "seed": self.dataset.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next ``iter()`` replays the epoch and skips ``state["batches"]``."""
        if not isinstance(state, Mapping) or not {"epoch", "batches"} <= state.keys():
            raise ValueError(
                f"not a WebDatasetLoader state_dict (needs 'epoch' and 'batches'): {state!r}"
            )
        if state.get("seed", self.dataset.seed) != self.dataset.seed:
            logger.warning(
                "resuming with seed %s, the state was saved with seed %s: shard order differs",
                self.dataset.seed,
                state["seed"],
            )
        self.dataset.epoch = int(state["epoch"])
        self._skip = int(state["batches"])
        self._yielded = self._skip


def webdataset_loader(
    urls: str | Sequence[str],
    batch_size: int,
    *,
    tokenizer: Callable[[list[str]], Any] | None = None,
    transform: Callable[[Any], Any] | None = None,
    num_workers: int = 0,
    image_exts: Sequence[str] = IMAGE_EXTS,
    text_exts: Sequence[str] = TEXT_EXTS,
    shuffle_shards: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    num_samples: int | None = None,
    on_bad_shard: str = "warn",
    pin_memory: bool = False,
    deferred: bool | str = False,
    score_resolution: int | None = None,
    **dataloader_kwargs: Any,
) -> WebDatasetLoader:
    """Build a JEST-ready base loader over webdataset shards.

    Args:
        urls: shard URLs (brace-expanded string, ``::``-joined, or a list); anything
            ``webdataset.gopen`` opens (paths, ``pipe:``, http, ...).
        batch_size: the training batch size b (every batch has exactly b examples).
        tokenizer: ``list[str] -> tensor [b, ctx]`` (e.g. ``open_clip.get_tokenizer(...)``);
            None keeps captions as a list of str.
        transform: ``PIL image -> tensor`` (e.g. open_clip's preprocess) or ``-> numpy
            array`` (stacked into one tensor per batch); default
            :func:`default_image_transform`.
        num_workers: DataLoader workers; shards are split between them (and between ranks).
        image_exts / text_exts: sample fields tried in order for the image and the caption.
        shuffle_shards: shuffle the shard order each epoch, seeded by ``seed`` and the epoch.
        shuffle_buffer: shuffle samples through a buffer of this many raw samples per worker
            (0: off; open_clip uses 5000), seeded by (seed, epoch, rank, worker, pass).
        num_samples: examples per epoch over all ranks, if known (e.g. the sum of
            ``sizes.json``, like open_clip's ``--train-num-samples``); gives ``len`` /
            ``num_batches`` = ``num_samples // (batch_size * world_size)`` per rank, and every
            rank then yields exactly that many batches per epoch, reading its shards again
            when they run out first (so that DDP ranks end the epoch together; module doc).
            None: an epoch is one pass over the shards.
        on_bad_shard: "warn" (count and continue) or "raise".
        deferred: True, "encoded" or "decoded": yield images as a
            :class:`jeststream.deferred.Deferred` field -- a scoring view of
            ``score_resolution`` pixels now, the training tensor (``transform`` applied to the
            examples JESTLoader selects) after selection; the yielded batches are what the eager
            loader gives (:mod:`jeststream.adapters.deferred_images`). For a JESTLoader only.
            A sample that fails to decode after selection is skipped and counted like any bad
            sample (``stats["bad_samples"]``) and replaced by the next candidate.
        score_resolution: the side of the scoring view (with ``deferred``), e.g. the
            JESTLoader's ``score_resolution``.
        **dataloader_kwargs: passed to ``torch.utils.data.DataLoader``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(
            f"shuffle_buffer must be an int >= 0 (samples; 0 turns it off), got {shuffle_buffer!r}"
        )
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer must be callable list[str] -> tensor, got {tokenizer!r}")
    if "batch_size" in dataloader_kwargs or "collate_fn" in dataloader_kwargs:
        raise TypeError("batching happens in the pipeline; do not pass batch_size/collate_fn")
    if dataloader_kwargs.get("persistent_workers"):
        raise TypeError(
            "persistent_workers=True is not supported: the workers must be restarted each pass "
            "to see set_epoch() and a resumed position; drop the argument"
        )
    dataloader_kwargs.pop("persistent_workers", None)
    url_list = expand_urls(urls)
    from webdataset.utils import pytorch_worker_info

    _, world, _, _ = pytorch_worker_info()
    if len(url_list) < world * max(1, num_workers):
        logger.warning(
            "%d shards for %d ranks x %d workers: some workers get no shard and produce "
            "nothing%s",
            len(url_list),
            world,
            max(1, num_workers),
            "" if num_samples is None else " (with num_samples= iterating raises ValueError)",
        )
    if world > 1 and num_samples is None:
        logger.warning(
            "webdataset_loader under %d ranks without num_samples=: each rank yields the batches "
            "its shards hold. A JESTLoader with global selection (the default under torchrun) "
            "ends every rank's pass together when one runs out; used directly, or with "
            "distributed='local', a DDP rank that runs out first leaves the others waiting in "
            "their next all-reduce; pass num_samples= (the total over all ranks, e.g. the sum "
            "of sizes.json) so that every rank yields the same number of batches",
            world,
        )
    pipeline = _Pipeline(
        url_list,
        batch_size,
        transform or default_image_transform,
        tokenizer,
        image_exts,
        text_exts,
        shuffle_shards,
        seed,
        ShardErrorCounter(on_bad_shard, dataloader_kwargs.get("multiprocessing_context")),
        num_samples,
        world,
        shuffle_buffer,
        deferred_mode(deferred, score_resolution, transform or default_image_transform),
        score_resolution,
    )
    loader = DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers must see set_epoch()/resume each pass
        **dataloader_kwargs,
    )
    return WebDatasetLoader(pipeline, loader, num_samples, world_size=world)


def normalize_batch(
    batch: Any,
    *,
    image_keys: Sequence[str] = ("image", *IMAGE_EXTS),
    text_keys: Sequence[str] = ("text", *TEXT_EXTS),
) -> tuple[Any, Any, list[str] | None]:
    """Any webdataset batch -> ``(images, texts, keys)``.

    webdataset 0.2.x collates ``to_tuple`` samples into a *list* of fields, 1.0.x into a tuple
    (or a dict for dict samples); images may come as a tensor or a list of tensors. Lists of
    tensors are stacked; keys are the ``__key__`` field (or the first list of str after the
    texts), None when absent.
    """
    if isinstance(batch, Mapping):
        img = next((batch[k] for k in image_keys if k in batch), None)
        txt = next((batch[k] for k in text_keys if k in batch), None)
        if img is None or txt is None:
            raise ValueError(
                f"batch dict has keys {sorted(map(str, batch))}; expected an image field among "
                f"{list(image_keys)} and a text field among {list(text_keys)}"
            )
        keys = batch.get("__key__", batch.get("key"))
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        img, txt = batch[0], batch[1]
        keys = next(
            (f for f in batch[2:] if isinstance(f, (list, tuple)) and f and isinstance(f[0], str)),
            None,
        )
    else:
        raise TypeError(
            f"cannot read a {type(batch).__name__} batch as (images, texts[, keys]); map your "
            "pipeline with .to_tuple('jpg;png', 'txt', '__key__') before batching"
        )
    if isinstance(img, (list, tuple)) and img and isinstance(img[0], torch.Tensor):
        img = torch.stack(list(img))
    elif isinstance(img, np.ndarray):
        img = torch.from_numpy(img)
    if isinstance(txt, (list, tuple)) and txt and isinstance(txt[0], torch.Tensor):
        txt = torch.stack(list(txt))
    elif isinstance(txt, tuple):
        txt = list(txt)
    return img, txt, (None if keys is None else [str(k) for k in keys])
