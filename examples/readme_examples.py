"""The README's Python examples, run as written on tiny data.

    python examples/readme_examples.py

Every ```python block of README.md appears verbatim below between a ``# README: NAME`` line and
a ``# /README`` line (tests/test_readme.py checks it, and runs this file). What the README leaves
to the reader -- ``base_loader``, ``learner``, ``reference``, ``train_step``, ``data``,
``model`` -- is set up here first: tiny open_clip models and shards this script writes itself,
in a temporary working directory.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from open_clip.loss import SigLipLoss
from PIL import Image

from jeststream.adapters.open_clip import write_local_dir
from jeststream.adapters.webdataset import webdataset_loader

CONTEXT = 16
B = 8  # the base loader's batch size b
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 1},
    "init_logit_bias": -10.0,  # SigLIP
}


def tiny_siglip(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=MODEL_CFG["embed_dim"],
        vision_cfg=MODEL_CFG["vision_cfg"],
        text_cfg=MODEL_CFG["text_cfg"],
        init_logit_bias=MODEL_CFG["init_logit_bias"],
    )


def write_shards(root: Path, n_shards: int = 2, per_shard: int = 40) -> str:
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(root / "train-%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n_shards * per_shard):
            grey = int(rng.integers(0, 256))
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), grey, np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:05d}", "png": buf.getvalue(), "txt": f"grey {grey}"})
    return str(root / f"train-{{00000..{n_shards - 1:05d}}}.tar")


def two_tower_example(base_loader) -> None:
    """The README's embed= example: a home-made two-tower model, no open_clip."""
    # README: two-tower-embed
    import torch
    import torch.nn.functional as F

    from jeststream import JESTLoader
    from jeststream.losses import Embeddings


    class TwoTower(torch.nn.Module):  # stands for your model
        def __init__(self, d_image=3 * 32 * 32, vocab=49408, d=32):
            super().__init__()
            self.image_tower = torch.nn.Linear(d_image, d)
            self.text_tower = torch.nn.EmbeddingBag(vocab, d)
            self.log_scale = torch.nn.Parameter(torch.tensor(2.3))   # log 10, as SigLIP keeps it
            self.bias = torch.nn.Parameter(torch.tensor(-10.0))


    def embed(model, batch):
        images, texts = batch[0], batch[1]
        return Embeddings(
            image=F.normalize(model.image_tower(images.flatten(1)), dim=-1),
            text=F.normalize(model.text_tower(texts), dim=-1),
            logit_scale=model.log_scale.exp(),    # the multiplier, not its log
            logit_bias=model.bias,                # sigmoid loss; None for softmax (CLIP)
        )


    learner, reference = TwoTower(), TwoTower()
    loader = JESTLoader(base_loader, learner, reference, ratio=0.2, embed=embed, loss="sigmoid")
    # /README
    with loader:
        chosen = [batch[0].shape[0] for batch in loader]
    assert chosen and all(n == B for n in chosen), chosen
    print(f"two-tower embed: {len(chosen)} JEST steps of {B}")


def hf_trainer_example(out: Path) -> None:
    """The README's JESTTrainer example, on examples/hf_clip_jest.py's tiny CLIPModel and data."""
    from hf_clip_jest import collate_fn, prepare

    model, reference, args, train_dataset = prepare(out, examples=64, max_steps=2, save_steps=2)
    # README: hf-trainer
    from jeststream.adapters.transformers_trainer import JESTTrainer

    trainer = JESTTrainer(model=model, args=args, train_dataset=train_dataset,
                          data_collator=collate_fn, jest_reference=reference, jest_ratio=0.2)
    trainer.train()
    # /README
    assert trainer.state.global_step == 2, trainer.state.global_step
    print(f"JESTTrainer: {trainer.state.global_step} steps, loss {trainer.jest_loader.loss}")


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the README's relative paths (runs/...) land here
        shards = write_shards(Path(tmp))
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)
        preprocess = open_clip.transform.image_transform(32, is_train=False)
        base_loader = webdataset_loader(shards, B, tokenizer=tokenizer, transform=preprocess,
                                        num_samples=80)
        learner, reference = tiny_siglip(0), tiny_siglip(1)
        opt = torch.optim.AdamW(learner.parameters(), lr=1e-3)
        siglip = SigLipLoss()
        steps = []

        def train_step(images, texts):
            out = learner(images, texts)
            loss = siglip(*out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append(images.shape[0])

        # README: quickstart
        from jeststream import JESTLoader

        loader = JESTLoader(base_loader, learner, reference, ratio=0.2)
        for images, texts, keys in loader:    # the base loader's batch structure and size
            train_step(images, texts)         # your unchanged training step
        # /README
        assert steps and all(n == B for n in steps), steps
        loader.close()
        print(f"quickstart: {len(steps)} JEST steps of {B}")

        # README: selection-log
        loader = JESTLoader(base_loader, learner, reference, ratio=0.2, loss="sigmoid",
                            selection_log="runs/selection.jsonl")
        with loader:
            for images, texts, keys in loader:
                train_step(images, texts)
                info = loader.last_info
                print(f"step {info.step}: selected {info.selected_mean:.3f} "
                      f"of super-batch {info.super_batch_mean:.3f}")
        # /README
        assert Path("runs/selection.jsonl").stat().st_size > 0

        two_tower_example(base_loader)
        hf_trainer_example(Path(tmp) / "hf")

        # README: selection-core
        from jeststream import independent_sample, joint_sample_from_embeddings
        from jeststream.losses import Embeddings

        d, n = 32, 640  # a super-batch of 640 embeddings per model
        learner_emb = Embeddings(torch.nn.functional.normalize(torch.randn(n, d), dim=-1),
                                 torch.nn.functional.normalize(torch.randn(n, d), dim=-1),
                                 torch.tensor(10.0), torch.tensor(-10.0))
        reference_emb = Embeddings(torch.nn.functional.normalize(torch.randn(n, d), dim=-1),
                                   torch.nn.functional.normalize(torch.randn(n, d), dim=-1),
                                   torch.tensor(10.0), torch.tensor(-10.0))
        idx = joint_sample_from_embeddings(learner_emb, reference_emb, 128, loss="sigmoid",
                                           criterion="learnability", n_chunks=16)
        rho = independent_sample(learner_emb, reference_emb, 128)   # RHO-LOSS-style baseline
        # /README
        assert idx.shape == (128,) and len(set(idx.tolist())) == 128 and rho.shape == (128,)
        print("selection core: 128 of 640")

        # the stage-1 reference as a local-dir (what the jestify example loads), and an open_clip
        # DataInfo around the base loader, as open_clip_train's get_data builds it
        write_local_dir(reference, MODEL_CFG, "runs/stage1-reference")
        from open_clip_train.data import DataInfo

        assert base_loader.num_batches == 10  # jestify needs it (open_clip's loaders have it)
        data = {"train": DataInfo(dataloader=base_loader)}
        model = learner
        before = len(steps)

        # README: jestify
        from jeststream.adapters.open_clip import jestify, load_reference

        reference = load_reference("local-dir:runs/stage1-reference")
        data["train"] = jestify(data["train"], model, reference, ratio=0.5, loss="sigmoid")
        data["train"].set_epoch(0)
        for batch in data["train"].dataloader:   # what open_clip's train_one_epoch iterates
            images, texts = batch[:2]            # (images, texts), plus keys where the loader has them
            train_step(images, texts)
        # /README
        assert len(steps) > before
        data["train"].dataloader.close()
        os.chdir(Path(__file__).resolve().parent)
    print("ok: every README example ran")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
