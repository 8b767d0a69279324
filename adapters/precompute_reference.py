"""``jeststream precompute-reference``: one pass of the frozen reference over the shards, into a
:class:`jeststream.reference_cache.ReferenceCache` directory.

    jeststream precompute-reference --shards "data/{00000..00099}.tar" \\
        --reference ViT-B-32 --reference-pretrained datacomp_xl_s13b_b90k --out ref-cache/
    jeststream precompute-reference --mds data/mds --reference run/checkpoints/epoch_5.pt \\
        --reference-model ViT-B-32 --out ref-cache/ --dtype float32
    jeststream precompute-reference --shards "data/{00000..00099}.tar" \\
        --reference hf:models/siglip-base --out ref-cache/     # a local save_pretrained folder

Each sample is read with the reference's *own* eval preprocessing (open_clip's
``image_transform_v2(model preprocess cfg, is_train=False)``) and tokenizer
(``open_clip.get_tokenizer``) -- for ``hf:DIR``, the processor saved with the model, its settings
recorded in the manifest -- embedded, and written per input shard (``NAME.keys.json``,
``NAME.image.npy``, ``NAME.text.npy``). Keys are the ones the base loaders yield: webdataset's
``__key__`` (``jeststream.adapters.webdataset``, and open_clip_train's pipeline made to carry
it), or the MDS key column (``--key-field``; the global sample index when absent, as
``jeststream.adapters.streaming`` does). Bad samples are skipped and counted; a truncated shard
contributes the samples before the damage, as it does in training.

Resume: a shard counts only once its record is in the manifest, so rerunning the same command
after an interruption skips the complete shards and redoes the rest -- and the recorded shards
whose files were damaged since (missing, truncated, a header or keys list that does not match the
record: ``reference_cache.shard_problem``). Several ranks or machines
split the work with ``--rank R --world-size W`` (default: the ``RANK`` / ``WORLD_SIZE``
environment variables): rank R takes shards R, R+W, ... and all write into the same ``--out``.

``--reference-model`` names the architecture of a checkpoint file; it may be a JSON model config
(``path/NAME.json``, registered with ``open_clip.add_model_config``) for a custom model.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from jeststream.mds_index import mds_shards
from jeststream.reference_cache import (
    DTYPES,
    init_cache,
    read_manifest,
    shard_problem,
    write_shard,
)

__all__ = ["load_reference_and_preprocessing", "main", "precompute"]

logger = logging.getLogger(__name__)


# -- the reference and its preprocessing -------------------------------------------------------


def _register_config(model: str | None) -> str | None:
    """``--reference-model path/NAME.json`` -> register the config with open_clip -> ``NAME``."""
    if model is None or not model.endswith(".json"):
        return model
    import open_clip

    path = Path(model)
    if not path.is_file():
        raise ValueError(f"--reference-model {model}: no such model config file")
    open_clip.add_model_config(path)
    return path.stem


def load_reference_and_preprocessing(
    reference: str,
    pretrained: str | None = None,
    model: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor], Callable[[list[str]], torch.Tensor],
           dict]:
    """(frozen reference, eval image transform, tokenizer, header for the cache manifest).

    ``reference="hf:DIR"``: a ``transformers`` model and its processor saved in the local folder
    DIR (:func:`jeststream.adapters.transformers.load_pretrained_reference`)."""
    from jeststream.adapters.transformers import HF_PREFIX

    if reference.startswith(HF_PREFIX):
        from jeststream.adapters.transformers import load_pretrained_reference

        if pretrained is not None or model is not None:
            raise ValueError(
                "--reference hf:DIR takes the model and its processor from DIR; drop "
                "--reference-pretrained / --reference-model"
            )
        return load_pretrained_reference(reference[len(HF_PREFIX):], device)
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from jeststream.adapters.open_clip import checkpoint_architecture, load_reference
    from jeststream.reference_cache import reference_fingerprint

    arch = _register_config(model)
    if Path(reference).is_file():
        arch = arch or checkpoint_architecture(Path(reference))
        tokenizer_name = arch
    else:
        tokenizer_name = reference  # a released name, hf-hub:..., local-dir:...
    ref = load_reference(reference, pretrained, arch, device=device)
    cfg = open_clip.get_model_preprocess_cfg(ref)
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    context = getattr(ref, "context_length", None)
    tokenizer = open_clip.get_tokenizer(tokenizer_name or "", context_length=context)
    inner = getattr(tokenizer, "tokenizer", None)
    with torch.inference_mode():
        scale = float(ref.logit_scale.exp())
        bias = getattr(ref, "logit_bias", None)
        bias = None if bias is None else float(bias)
        dim = int(ref.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    header = {
        "reference": {
            "architecture": arch or (None if Path(reference).is_file() else reference),
            "source": reference,
            "pretrained": pretrained,
            "fingerprint": reference_fingerprint(ref),
        },
        "preprocessing": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "is_train": False,
            "tokenizer": {
                "name": tokenizer_name,
                "class": type(tokenizer).__name__,
                "hf_name": getattr(inner, "name_or_path", None),
                "context_length": getattr(tokenizer, "context_length", context),
            },
        },
        "embed_dim": dim,
        "logit_scale": scale,
        "logit_bias": bias,
    }
    return ref, transform, tokenizer, header


# -- reading the shards -----------------------------------------------------------------------


class _Shard:
    def __init__(self, name: str, source: str, size: int | None, mds_offset: int = 0,
                 mds_info: dict | None = None) -> None:
        self.name, self.source, self.size = name, source, size
        self.mds_offset, self.mds_info = mds_offset, mds_info


def _wds_shards(spec: str) -> list[_Shard]:
    from jeststream.adapters.webdataset import expand_urls

    urls = expand_urls(spec)
    sizes: dict[str, int] = {}
    for folder in {os.path.dirname(u) for u in urls}:
        path = Path(folder or ".") / "sizes.json"
        if path.is_file():
            sizes.update(json.loads(path.read_text()))
    out = []
    for url in urls:
        base = os.path.basename(url)
        name = base[: -len(".tar")] if base.endswith(".tar") else base.replace(".", "_")
        out.append(_Shard(name, url, sizes.get(base)))
    return out


def _mds_shards(local: str) -> list[_Shard]:
    return [_Shard(s.name, s.path, s.samples, s.offset, s.info) for s in mds_shards(local)]


class _Counter:
    """The webdataset reader's error counter, for one shard in one process."""

    def __init__(self) -> None:
        self.bad_samples = 0
        self.truncated: str | None = None

    def shard_error(self, url: str, exc: BaseException) -> None:
        self.truncated = f"{type(exc).__name__}: {exc}"
        logger.warning("shard %s is damaged (%s); its samples before the damage are kept", url,
                       self.truncated)

    def sample_error(self, key: str, url: str, exc: BaseException) -> None:
        self.bad_samples += 1
        logger.warning("skipping sample %r of %s: %s: %s", key, url, type(exc).__name__, exc)


class _ShardStream(IterableDataset):
    """Yields ``("batch", name, images, tokens, keys)`` and, when a shard is finished,
    ``("end", name, bad_samples, truncated)``; DataLoader workers split the shards."""

    def __init__(self, shards: list[_Shard], kind: str, transform: Any, tokenizer: Any,
                 batch_size: int, fields: dict[str, str | None]) -> None:
        super().__init__()
        self.shards, self.kind = shards, kind
        self.transform, self.tokenizer = transform, tokenizer
        self.batch_size, self.fields = batch_size, fields

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        shards = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in shards:
            counter = _Counter()
            samples = self._wds(shard, counter) if self.kind == "wds" else self._mds(shard, counter)
            pending: list[tuple[torch.Tensor, str, str]] = []
            for sample in samples:
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield self._collate(shard, pending)
                    pending = []
            if pending:
                yield self._collate(shard, pending)
            yield ("end", shard.name, counter.bad_samples, counter.truncated)

    def _collate(self, shard: _Shard, samples: list) -> tuple:
        if isinstance(samples[0][0], dict):  # a transformers processor's per-image tensors
            images = {k: torch.stack([s[0][k] for s in samples]) for k in samples[0][0]}
        else:
            images = torch.stack([s[0] for s in samples])
        tokens = self.tokenizer([s[1] for s in samples])
        return ("batch", shard.name, images, tokens, [s[2] for s in samples])

    def _wds(self, shard: _Shard, counter: _Counter) -> Iterator[tuple]:
        from jeststream.adapters.webdataset import (
            IMAGE_EXTS,
            TEXT_EXTS,
            decode_image,
            first_field,
            shard_samples,
        )

        for raw in shard_samples(shard.source, counter):  # type: ignore[arg-type]
            key = raw["__key__"]
            try:
                img, txt = first_field(raw, IMAGE_EXTS), first_field(raw, TEXT_EXTS)
                if img is None or txt is None:
                    raise KeyError("no image" if img is None else "no caption")
                with decode_image(img[1], img[0]) as im:
                    image = self.transform(im)
                text = txt[1].decode("utf-8").strip()
            except Exception as exc:  # noqa: BLE001 -- a bad sample is skipped and counted
                counter.sample_error(key, shard.source, exc)
                continue
            yield image, text, key

    def _mds(self, shard: _Shard, counter: _Counter) -> Iterator[tuple]:
        from PIL import Image
        from streaming.base.format import reader_from_json

        reader = reader_from_json(os.path.dirname(shard.source), None, shard.mds_info)
        image_field, text_field, key_field = (
            self.fields["image"], self.fields["text"], self.fields["key"]
        )
        for i in range(int(shard.size or 0)):
            idx = shard.mds_offset + i
            row = reader.get_item(i)
            key = str(row[key_field]) if key_field and key_field in row else str(idx)
            try:
                image, text = row[image_field], row[text_field]
                if isinstance(image, (bytes, bytearray, memoryview)):
                    with Image.open(io.BytesIO(bytes(image))) as im:
                        im.load()
                        image = im.copy()
                elif isinstance(image, np.ndarray):
                    image = Image.fromarray(image)
                image = self.transform(image)
                if isinstance(text, bytes):
                    text = text.decode("utf-8")
            except Exception as exc:  # noqa: BLE001
                counter.sample_error(key, shard.source, exc)
                continue
            yield image, text, key


# -- the pass -------------------------------------------------------------------------------------


def _model_batch(images: Any, tokens: Any, device: str | torch.device) -> Any:
    """(images, tokens) for open_clip; one processor-style dict for a transformers reference."""
    if isinstance(images, dict) or isinstance(tokens, dict):
        images = images if isinstance(images, dict) else {"pixel_values": images}
        return {k: v.to(device) for k, v in {**images, **tokens}.items()}
    return images.to(device), tokens.to(device)


def precompute(
    shards: list[_Shard],
    kind: str,
    out: str | os.PathLike,
    reference: torch.nn.Module,
    transform: Any,
    tokenizer: Any,
    header: dict,
    *,
    dtype: str = "float16",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_shards: int | None = None,
    fields: dict[str, str | None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every not yet complete shard of this rank's share; returns the run's summary."""
    from jeststream.adapters.open_clip import embed as open_clip_embed
    from jeststream.embed import default_embed, model_family

    # open_clip's embed casts images to a reduced-precision tower; transformers' does itself
    embed = default_embed if model_family(reference) == "transformers" else open_clip_embed

    t0 = time.perf_counter()
    names = [s.name for s in shards]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"shards with the same file name {dupes[:3]} would overwrite each other")
    init_cache(out, {**header, "dtype": dtype})
    manifest = read_manifest(out)
    done = manifest.get("shards", {})
    mine = shards[rank::world_size]
    for s in mine:  # recorded as complete, but a file was damaged since (a cut copy, a full disk)
        problem = shard_problem(out, s.name, manifest) if s.name in done else None
        if problem is not None:
            logger.warning("shard %s of %s is damaged (%s); precomputing it again", s.name, out,
                           problem)
            done = {k: v for k, v in done.items() if k != s.name}
    todo = [s for s in mine if s.name not in done]
    skipped = len(mine) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    total = sum(s.size for s in todo) if all(s.size is not None for s in todo) else None
    stream = _ShardStream(todo, kind, transform, tokenizer, batch_size,
                          fields or {"image": "image", "text": "text", "key": "key"})
    loader = DataLoader(stream, batch_size=None, num_workers=min(num_workers, len(todo)))
    buffers: dict[str, dict[str, list]] = {}
    summary = {"examples": 0, "bad_samples": 0, "shards": 0, "skipped_shards": skipped,
               "truncated_shards": 0}
    from tqdm import tqdm

    bar = tqdm(total=total, unit="ex", desc="precompute-reference", file=sys.stderr,
               disable=not progress or not todo)
    started = {s.name: None for s in todo}
    by_name = {s.name: s for s in todo}
    reference.eval()
    try:
        for item in loader:
            if item[0] == "batch":
                _, name, images, tokens, keys = item
                if started[name] is None:
                    started[name] = time.perf_counter()
                with torch.inference_mode():
                    e = embed(reference, _model_batch(images, tokens, device))
                buf = buffers.setdefault(name, {"keys": [], "image": [], "text": []})
                buf["keys"].extend(keys)
                buf["image"].append(e.image.float().cpu().numpy())
                buf["text"].append(e.text.float().cpu().numpy())
                bar.update(len(keys))
                continue
            _, name, bad, truncated = item
            buf = buffers.pop(name, {"keys": [], "image": [], "text": []})
            d = int(header["embed_dim"])
            image = np.concatenate(buf["image"]) if buf["image"] else np.zeros((0, d), np.float32)
            text = np.concatenate(buf["text"]) if buf["text"] else np.zeros((0, d), np.float32)
            begun = started[name] or time.perf_counter()
            record = {"source": by_name[name].source, "bad_samples": int(bad),
                      "truncated": truncated, "seconds": round(time.perf_counter() - begun, 3)}
            write_shard(out, name, buf["keys"], image, text, record)
            summary["examples"] += len(buf["keys"])
            summary["bad_samples"] += int(bad)
            summary["shards"] += 1
            summary["truncated_shards"] += int(truncated is not None)
    finally:
        bar.close()
    summary["seconds"] = time.perf_counter() - t0
    summary["remaining_shards"] = len(mine) - skipped - summary["shards"]
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jeststream precompute-reference",
        description="embed shards with the frozen JEST reference once, into a reference cache "
        "(JESTLoader(base, learner, ReferenceCache(DIR)) / openclip-train --jest-reference-cache)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="webdataset tar shards, brace spec (a/{000..099}.tar)")
    src.add_argument("--mds", metavar="LOCAL_DIR", help="a local MosaicML (MDS) dataset directory")
    p.add_argument("--reference", required=True,
                   help="open_clip model name (+ --reference-pretrained), hf-hub:..., "
                   "local-dir:PATH, a checkpoint file (+ --reference-model), or hf:DIR (a "
                   "transformers model and processor saved with save_pretrained in DIR)")
    p.add_argument("--reference-model", help="architecture of a checkpoint file: an open_clip "
                   "model name or a JSON model config path")
    p.add_argument("--reference-pretrained", help="pretrained tag or weights of a model name")
    p.add_argument("--out", required=True, help="the cache directory (resumed if it exists)")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers (0: inline)")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--max-shards", type=int, help="stop after this many shards (rerun to go on)")
    p.add_argument("--image-field", default="image", help="MDS image column")
    p.add_argument("--text-field", default="text", help="MDS caption column")
    p.add_argument("--key-field", default="key", help="MDS key column (absent: sample index)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = "jeststream precompute-reference"
    if args.batch_size < 1 or args.num_workers < 0 or args.world_size < 1 or not (
        0 <= args.rank < args.world_size
    ):
        print(f"{prog}: error: need --batch-size >= 1, --num-workers >= 0 and "
              "0 <= --rank < --world-size", file=sys.stderr)
        return 2
    try:
        shards = _wds_shards(args.shards) if args.shards else _mds_shards(args.mds)
        ref, transform, tokenizer, header = load_reference_and_preprocessing(
            args.reference, args.reference_pretrained, args.reference_model, args.device
        )
        summary = precompute(
            shards, "wds" if args.shards else "mds", args.out, ref, transform, tokenizer, header,
            dtype=args.dtype, batch_size=args.batch_size, device=args.device,
            num_workers=args.num_workers, rank=args.rank, world_size=args.world_size,
            max_shards=args.max_shards,
            fields={"image": args.image_field, "text": args.text_field, "key": args.key_field},
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    s = summary
    print(
        f"{prog}: {s['examples']} examples, {s['bad_samples']} bad samples, {s['shards']} shards "
        f"written ({s['skipped_shards']} already complete, {s['remaining_shards']} left, "
        f"{s['truncated_shards']} truncated), {s['seconds']:.1f} s -> {args.out}"
    )
    return 0
