"""Reading webdataset tar shards into raw samples, and reporting the damaged ones.

A tar reader of our own (uncompressed ustar/pax/GNU headers read directly; compressed shards
through ``tarfile``'s stream mode) and the grouping of members into samples, as one piece:

- a shard is whole only if it ends with tar's end-of-archive block and every header passes its
  checksum; anything else is a :class:`BadShardError` naming the shard (Python's ``tarfile``,
  which ``wds.WebDataset`` reads with, ends silently on a truncated or corrupt header);
- samples are grouped exactly as webdataset's ``group_by_keys`` groups them, within one shard,
  whatever the webdataset version (the tests compare the two);
- :class:`ShardErrorCounter` counts bad shards and samples across DataLoader workers.

The stages also serve users' own pipelines: :func:`checked_tarfile_to_samples` takes the place
of ``wds.tarfile_to_samples``, :func:`checked_webdataset` of ``wds.WebDataset``.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BadShardError",
    "BadShardWarning",
    "ReportOnce",
    "ShardErrorCounter",
    "TruncatedShardError",
    "checked_tarfile_samples",
    "checked_tarfile_to_samples",
    "checked_webdataset",
    "expand_urls",
    "shard_samples",
    "tar_members",
]

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
    of every header in Python, the costliest step of reading a shard (docs/performance.md,
    "Reading webdataset shards")."""
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


def tar_members(url: str) -> Iterator[tuple[str, bytes]]:
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
    speed (docs/performance.md, "Reading webdataset shards") and because its input records
    changed between webdataset versions."""
    current: dict[str, Any] | None = None
    for fname, data in tar_members(url):
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


class ReportOnce:
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
    return checked_tarfile_samples([url], ReportOnce(counter, reported))
