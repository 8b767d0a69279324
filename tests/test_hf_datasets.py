"""A streaming ``datasets.IterableDataset`` (local Parquet or webdataset files the test writes) as
the JEST base loader, through a torchdata StatefulDataLoader: per-example keys reach the
selection log, and a restored loader selects what the uninterrupted one did."""

from __future__ import annotations

import io

import hf_tiny
import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

from jeststream import JESTLoader  # noqa: E402
from jeststream.selection_log import read_selection_log  # noqa: E402

N, B = 64, 4


def _png(i: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _caption_ids(text: str) -> list[int]:
    ids = [1 + (ord(c) % 60) for c in text[: hf_tiny.CONTEXT - 1]] + [hf_tiny.EOS]
    return ids + [hf_tiny.PAD] * (hf_tiny.CONTEXT - len(ids))


def _to_model_inputs(example: dict) -> dict:
    """PIL image + caption -> pixel_values / input_ids / attention_mask (a processor's job)."""
    image = example.get("image") or example.get("png")
    if isinstance(image, (bytes, dict)):
        from PIL import Image

        image = Image.open(io.BytesIO(image if isinstance(image, bytes) else image["bytes"]))
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    ids = _caption_ids(example.get("caption") or example["txt"])
    return {"pixel_values": pixels.permute(2, 0, 1), "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor([int(t != hf_tiny.PAD) for t in ids])}


def _collate(examples: list[dict]) -> dict:
    key = "key" if "key" in examples[0] else "__key__"
    batch = {k: torch.stack([e[k] for e in examples])
             for k in ("pixel_values", "input_ids", "attention_mask")}
    batch[key] = [e[key] for e in examples]
    return batch


def _parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for s in range(2):
        rows = range(s * N // 2, (s + 1) * N // 2)
        table = pa.table({"key": [f"p{i:04d}" for i in rows], "image": [_png(i) for i in rows],
                          "caption": [f"picture {i}" for i in rows]})
        files.append(str(tmp_path / f"part-{s}.parquet"))
        pq.write_table(table, files[-1])
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    return ds.map(lambda e: {**_to_model_inputs(e), "key": e["key"]},
                  remove_columns=["image", "caption"])


def _webdataset(tmp_path):
    import tarfile

    files = []
    for s in range(2):
        path = tmp_path / f"shard-{s}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * N // 2, (s + 1) * N // 2):
                for ext, data in (("png", _png(i)), ("txt", f"picture {i}".encode())):
                    info = tarfile.TarInfo(f"w{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        files.append(str(path))
    ds = datasets.load_dataset("webdataset", data_files=files, split="train", streaming=True)
    return ds.map(lambda e: {**_to_model_inputs(e), "__key__": e["__key__"]},
                  remove_columns=["png", "txt", "__url__"])


@pytest.mark.parametrize("source", ["parquet", "webdataset"])
def test_streaming_dataset_as_base_keys_and_exact_resume(source, tmp_path, no_thread_leak):
    ds = (_parquet if source == "parquet" else _webdataset)(tmp_path)
    assert isinstance(ds, datasets.IterableDataset)

    def loader(log):
        base = StatefulDataLoader(ds.with_format("torch"), batch_size=B, collate_fn=_collate)
        return JESTLoader(base, hf_tiny.clip(0), hf_tiny.clip(1), 0.25, n_chunks=2,
                          async_scoring=False, selection_log=log)

    whole = loader(tmp_path / "whole.jsonl")
    want = [b["key" if source == "parquet" else "__key__"] for b in whole]
    whole.close()
    assert len(want) == N // (4 * B)
    cols = read_selection_log(tmp_path / "whole.jsonl")
    prefix = "p" if source == "parquet" else "w"
    assert len(cols["key"]) == N and all(k.startswith(prefix) for k in cols["key"])
    assert sorted(k for k, s in zip(cols["key"], cols["selected"]) if s) == sorted(
        k for b in want for k in b)

    first = loader(tmp_path / "part.jsonl")
    it = iter(first)
    got = [next(it)["key" if source == "parquet" else "__key__"] for _ in range(2)]
    state = first.state_dict()
    first.close()
    again = loader(tmp_path / "part.jsonl")
    again.load_state_dict(state)  # the dataset's own state_dict: resumes mid-stream
    got += [b["key" if source == "parquet" else "__key__"] for b in again]
    again.close()
    assert got == want
