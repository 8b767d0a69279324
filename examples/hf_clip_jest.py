"""Train a (tiny) CLIPModel with transformers' Trainer and JEST: one class changed.

    python examples/hf_clip_jest.py --out runs/hf-clip                  # train, checkpoints
    python examples/hf_clip_jest.py --out runs/hf-clip --resume         # resume the last one
    torchrun --nproc_per_node 2 examples/hf_clip_jest.py --out runs/hf-clip-ddp

The script follows transformers' contrastive image-text example (run_clip.py): a ``datasets``
dataset of image files and captions, the processor's transforms applied on the fly
(``set_transform``), a collator that stacks ``pixel_values`` / ``input_ids`` /
``attention_mask`` and asks for the loss (``return_loss``), and ``Trainer`` -- here
``JESTTrainer`` with a frozen reference. It writes its own data (Parquet shards of PNG images
and captions, with a ``key`` column that reaches the selection log) and its own tiny model and
processor (a 64-token character vocabulary), so it runs offline in seconds on a CPU. With a
real model, load it and its processor with ``from_pretrained`` instead.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def write_shards(folder: Path, n: int, per_shard: int, seed: int = 0) -> list[str]:
    """Parquet shards of (key, PNG image bytes, caption): a colour and a shape word per image."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    files = []
    for s in range(0, n, per_shard):
        rows = {"key": [], "image": [], "caption": []}
        for i in range(s, min(n, s + per_shard)):
            name = list(colours)[i % 3]
            arr = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            arr[8:24, 8:24] = colours[name]
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            rows["key"].append(f"s{i:05d}")
            rows["image"].append(buf.getvalue())
            noisy = rng.random() < 0.3  # a caption that does not match its image
            rows["caption"].append(f"a {list(colours)[(i + noisy) % 3]} square")
        path = folder / f"shard-{s // per_shard:04d}.parquet"
        pq.write_table(pa.table(rows), path)
        files.append(str(path))
    return files


def tiny_clip(seed: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=1,
                eos_token_id=63, pad_token_id=63)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def tiny_processor(folder: Path):
    """A CLIPProcessor with a character vocabulary (start 1, end-of-text 63), saved in folder."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["!", "<|startoftext|>", *letters, *(c + "</w>" for c in letters)]
    tokens += [f"{d}</w>" for d in range(63 - len(tokens))] + ["<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def collate_fn(examples):
    """run_clip.py's collator; keys are carried past it by JESTTrainer."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
        "attention_mask": torch.tensor([e["attention_mask"] for e in examples], dtype=torch.long),
        "return_loss": True,
    }


class StopAt:
    """A callback that ends training after a given step (after that step's checkpoint): an
    interruption, for the resume demonstration."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True

        return _Stop()


def prepare(out: Path, *, examples: int = 96, batch_size: int = 8, max_steps: int = 6,
            save_steps: int = 2):
    """(model, reference, training_args, dataset): everything run_clip.py sets up before it
    builds its Trainer, on data and a tiny model written under ``out``."""
    from datasets import load_dataset
    from PIL import Image
    from transformers import TrainingArguments

    rank = int(os.environ.get("RANK", 0))
    data = out / "data"
    files = sorted(str(f) for f in data.glob("*.parquet"))
    if not files:
        if rank == 0:
            write_shards(data, examples, per_shard=32)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            import time

            while len(list(data.glob("*.parquet"))) < -(-examples // 32):
                time.sleep(0.1)  # the other ranks wait for rank 0's shards
            time.sleep(0.5)
        files = sorted(str(f) for f in data.glob("*.parquet"))
    processor = tiny_processor(out / f"processor-rank{rank}")
    model, reference = tiny_clip(0), tiny_clip(1)  # the reference: a frozen, "pretrained" CLIP

    dataset = load_dataset("parquet", data_files=files, split="train",
                           cache_dir=str(out / f"hf-cache-rank{rank}"))

    def transform(batch):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch["image"]]
        text = processor.tokenizer(batch["caption"], padding="max_length", max_length=16,
                                   truncation=True)
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixels), "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"], "key": batch["key"]}

    dataset.set_transform(transform)
    training_args = TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=1e-3,
        save_steps=save_steps,
        logging_steps=1,
        seed=0,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,  # as run_clip.py: the transform makes the columns
        dataloader_num_workers=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        save_safetensors=True,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    return model, reference, training_args, dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output dir: data, model, checkpoints, logs")
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8, help="per-device train batch size")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--stop-after", type=int, help="end after this step (simulates a crash)")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model on a shared CPU: threads only spin
    from jeststream.adapters.transformers_trainer import JESTTrainer

    out = Path(args.out)
    rank = int(os.environ.get("RANK", 0))
    model, reference, training_args, dataset = prepare(
        out, examples=args.examples, batch_size=args.batch_size, max_steps=args.max_steps,
        save_steps=args.save_steps,
    )
    trainer = JESTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collate_fn,
        jest_reference=reference,
        jest_ratio=args.ratio,
        jest_kwargs={"n_chunks": 2, "scoring": "sync"},  # inline, the current learner: exact resume
        callbacks=[StopAt(args.stop_after)] if args.stop_after else None,
    )
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    if rank == 0:
        print(json.dumps({"global_step": trainer.state.global_step,
                          "epoch": trainer.state.epoch,
                          "train_loss": result.training_loss,
                          "loss": trainer.jest_loader.loss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
