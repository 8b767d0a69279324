"""The samples behind a log's keys, read from the shards once: fields of every logged key,
image and caption of the shown ones only.

Sources: webdataset tar shards (a brace pattern, a ``::``-separated list, or directories of
``*.tar``) through the webdataset adapter's public tar reader, imported when shards are given;
a local MDS directory through :mod:`jeststream.mds_index` and ``streaming``'s own shard reader;
and sidecar files mapping keys to field dicts (``--meta FILE``: a JSON object, or JSON lines
with a ``key`` or ``__key__`` entry; ``NAME-meta.json`` beside shards ``NAME-00000.tar`` is
found without the flag). Fields are a sample's ``json`` member's scalar entries, any other
small text member that is neither the image nor the caption (``cls``, ...) and MDS columns
other than the image, caption and key. Damaged shards, unreadable images and samples become
notes for the page, never an error. Thumbnails are small PNG/JPEG ``data:`` URIs.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jeststream.mds_index import mds_shards
from jeststream.report.aggregate import Fields, KeyTable, value_text

__all__ = ["THUMB_PX", "Sample", "ShardReader", "find_sidecars", "shard_urls"]

_SHARD_BATCH = 4096  # samples looked up in the key table at once
THUMB_PX = 96  # displayed thumbnail side


@dataclasses.dataclass
class Sample:
    """A shown sample: what the shards hold for its key."""

    key: str
    seen: int
    selected: int
    mean_score: float
    caption: str | None = None
    image: str | None = None  # data: URI
    size: tuple[int, int] | None = None  # the original image's (width, height)
    problem: str | None = None
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


class _ShardProblems:
    """The webdataset reader's error counter: collects lines for the report's notes."""

    def __init__(self, notes: list[str]) -> None:
        self.notes = notes

    def shard_error(self, url: str, exc: BaseException) -> None:
        self.notes.append(
            f"shard {url} could not be read to its end ({type(exc).__name__}: {exc}); its "
            "samples before the damage were read"
        )

    def sample_error(self, key: str, url: str, exc: BaseException) -> None:
        self.notes.append(f"sample {key!r} of shard {url}: {type(exc).__name__}: {exc}")


_META_SUFFIX = "-meta.json"
_SHARD_NAME_RE = re.compile(r"^(.+?)[-_]\d+\.tar$")


def shard_urls(shards: str | Sequence[str] | None) -> list[str]:
    if shards is None:
        return []
    from jeststream.adapters.webdataset import expand_urls

    urls: list[str] = []
    for url in expand_urls(shards if isinstance(shards, str) else [os.fspath(s) for s in shards]):
        if os.path.isdir(url):
            found = sorted(str(p) for p in Path(url).glob("*.tar"))
            if not found:
                raise ValueError(f"--shards {url}: a directory without *.tar shards")
            urls.extend(found)
        else:
            urls.append(url)
    return urls


def find_sidecars(urls: list[str]) -> list[Path]:
    """``NAME-meta.json`` beside local shards ``NAME-00000.tar`` (the demo's layout)."""
    out: list[Path] = []
    for url in urls:
        m = _SHARD_NAME_RE.match(os.path.basename(url))
        if m is None or ":" in url.split("/")[0]:  # not local (pipe:, http://, s3://)
            continue
        path = Path(url).parent / (m.group(1) + _META_SUFFIX)
        if path.is_file() and path not in out:
            out.append(path)
    return out


def _meta_records(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(key, fields) of a sidecar: JSON lines (records with ``key`` or ``__key__``), streamed,
    or one JSON object ``{key: {field: value}}`` (read whole, as it must be)."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
        try:
            rec = json.loads(first)
        except json.JSONDecodeError:
            rec = None
        f.seek(0)
        if not (isinstance(rec, dict) and ("key" in rec or "__key__" in rec)):
            data = json.load(f)
            if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
                raise ValueError(
                    f"--meta {path}: neither JSON lines with 'key' nor a JSON object "
                    "{key: {field: value}}"
                )
            yield from ((str(k), v) for k, v in data.items())
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            key = rec.get("__key__", rec.get("key")) if isinstance(rec, dict) else None
            if key is None:
                raise ValueError(f"--meta {path}:{lineno}: a record without 'key' or '__key__'")
            yield str(key), {k: v for k, v in rec.items() if k not in ("key", "__key__")}


def _sample_fields(raw: Mapping[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    """Scalar fields of a raw webdataset sample: its ``json`` member's entries and any other
    small text member (``cls``, ...) whose extension is not in ``skip`` (images, captions)."""
    out: dict[str, Any] = {}
    for ext, data in raw.items():
        if ext.startswith("__") or ext in skip or not isinstance(data, bytes):
            continue
        if ext == "json" or ext.endswith(".json"):
            try:
                obj = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict):
                out.update({k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool))})
        elif len(data) <= 64:
            try:
                text = data.decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
            if text and text.isprintable():
                out[ext] = text
    return out


def _thumbnail(image: Any) -> tuple[str, tuple[int, int]]:
    """A PIL image -> (data: URI of a small PNG or JPEG, original size)."""
    from PIL import Image

    size = image.size
    if image.mode not in ("L", "RGB"):
        if "A" in image.getbands() or image.mode == "P":
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        else:
            image = image.convert("RGB")
    if max(image.size) > 2 * THUMB_PX:
        image = image.copy()
        image.thumbnail((2 * THUMB_PX, 2 * THUMB_PX))
    buf = io.BytesIO()
    if image.mode == "RGB" and max(image.size) > 64:
        image.save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        image.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", size


def _fill_sample(sample: Sample, image: Any, image_ext: str | None, caption: Any,
                 fields: Mapping[str, Any]) -> None:
    sample.fields = {k: value_text(v) for k, v in fields.items()}
    if caption is not None:
        sample.caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else (
            str(caption))
        sample.caption = sample.caption.strip()
    if image is None:
        sample.problem = "the sample has no image field"
        return
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            from jeststream.adapters.webdataset import decode_image

            with decode_image(bytes(image), image_ext or "") as im:
                sample.image, sample.size = _thumbnail(im)
        else:
            from PIL import Image

            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            sample.image, sample.size = _thumbnail(image)
    except Exception as exc:  # noqa: BLE001 -- any decoding failure is reported, not raised
        sample.problem = f"image unreadable ({type(exc).__name__}: {exc})"


class ShardReader:
    """One pass over the shards: fields of every logged key, images of the shown ones."""

    def __init__(self, table: KeyTable, wanted: dict[bytes, Sample], fields: Fields,
                 notes: list[str]) -> None:
        self.table, self.wanted, self.fields, self.notes = table, wanted, fields, notes
        self.in_log = np.zeros(len(table), bool)
        self.samples = 0
        self._pending: list[tuple[bytes, dict[str, Any]]] = []

    def _flush(self, in_shards: bool = True) -> None:
        """Look the pending keys up in the table at once; set their fields."""
        if not self._pending:
            return
        keys = np.array([k for k, _ in self._pending], dtype="S")
        idx, found = self.table.lookup(keys)
        for i, f, (_, fields) in zip(idx.tolist(), found.tolist(), self._pending):
            if f:
                if in_shards:
                    self.in_log[i] = True
                if fields:
                    self.fields.set(i, fields)
        self._pending = []

    def add(self, key: str, fields: dict[str, Any]) -> None:
        self.samples += 1
        self._pending.append((key.encode("utf-8", "surrogatepass"), fields))
        if len(self._pending) >= _SHARD_BATCH:
            self._flush()

    def webdataset(self, urls: list[str]) -> None:
        from jeststream.adapters.webdataset import IMAGE_EXTS, TEXT_EXTS, first_field, shard_samples

        problems = _ShardProblems(self.notes)
        skip = frozenset(IMAGE_EXTS) | frozenset(TEXT_EXTS)
        for url in urls:
            for raw in shard_samples(url, problems):  # type: ignore[arg-type]
                key = raw["__key__"]
                img = first_field(raw, IMAGE_EXTS)
                txt = first_field(raw, TEXT_EXTS)
                fields = _sample_fields(raw, skip)
                self.add(key, fields)
                sample = self.wanted.get(key.encode("utf-8", "surrogatepass"))
                if sample is not None and sample.image is None and sample.problem is None:
                    _fill_sample(sample, img and img[1], img and img[0], txt and txt[1], fields)
        self._flush()

    def mds(self, local: str, image_field: str, text_field: str, key_field: str | None) -> None:
        from streaming.base.format import reader_from_json

        for shard in mds_shards(local):
            reader = reader_from_json(os.path.dirname(shard.path), None, shard.info)
            for i in range(shard.samples):
                gidx = shard.offset + i
                try:
                    row = reader.get_item(i)
                except Exception as exc:  # noqa: BLE001
                    self.notes.append(f"MDS sample {gidx} of {shard.path}: "
                                      f"{type(exc).__name__}: {exc}")
                    continue
                key = str(row[key_field]) if key_field and key_field in row else str(gidx)
                fields = {
                    k: (v.item() if isinstance(v, np.generic) else v)
                    for k, v in row.items()
                    if k not in (image_field, text_field, key_field)
                    and isinstance(v, (str, int, float, bool, np.generic))
                }
                self.add(key, fields)
                sample = self.wanted.get(key.encode("utf-8", "surrogatepass"))
                if sample is not None and sample.image is None and sample.problem is None:
                    _fill_sample(sample, row.get(image_field), None, row.get(text_field), fields)
        self._flush()

    def sidecar(self, path: Path) -> None:
        for key, fields in _meta_records(path):
            self._pending.append((key.encode("utf-8", "surrogatepass"), dict(fields)))
            sample = self.wanted.get(key.encode("utf-8", "surrogatepass"))
            if sample is not None:
                for k, v in fields.items():
                    if isinstance(v, (str, int, float, bool)):
                        sample.fields.setdefault(k, value_text(v))
            if len(self._pending) >= _SHARD_BATCH:
                self._flush(in_shards=False)
        self._flush(in_shards=False)
