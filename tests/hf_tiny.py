"""Tiny randomly initialised Hugging Face two-tower models and processor-style batches (no
downloads): CLIP, SigLIP, SigLIP 2 and a VisionTextDualEncoder, 32x32 images, patch 8,
vocabulary 64, context 16, end-of-text id 63."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from jeststream.embed import Embeddings

IMAGE = 32
PATCH = 8
VOCAB = 64
CONTEXT = 16
EOS = VOCAB - 1
PAD = 0

_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=CONTEXT)
_VISION = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2)


def _seeded(build, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
    bias = getattr(model, "logit_bias", None)
    if bias is not None:  # the SigLIP paper's init (transformers' own starts at t = 1, b = 0)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            bias.fill_(-10.0)
    return model.eval()


def clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(_TEXT, eos_token_id=EOS, bos_token_id=1, pad_token_id=PAD),
        vision_config=_VISION, projection_dim=16,
    )
    return _seeded(lambda: CLIPModel(cfg), seed)


def siglip(seed: int = 0):
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(text_config=dict(_TEXT, projection_size=32), vision_config=_VISION)
    return _seeded(lambda: SiglipModel(cfg), seed)


def siglip2(seed: int = 0):
    from transformers import Siglip2Config, Siglip2Model

    vision = {k: v for k, v in _VISION.items() if k != "image_size"}
    cfg = Siglip2Config(text_config=dict(_TEXT, projection_size=32),
                        vision_config=dict(vision, num_patches=(IMAGE // PATCH) ** 2))
    return _seeded(lambda: Siglip2Model(cfg), seed)


def dual_encoder(seed: int = 0):
    """transformers' contrastive example's model: a VisionTextDualEncoder (a CLIP vision tower
    and a BERT text tower, as the example pairs a ViT with RoBERTa)."""
    from transformers import (
        BertConfig,
        BertModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        VisionTextDualEncoderModel,
    )

    def build():
        text = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    max_position_embeddings=CONTEXT, pad_token_id=PAD))
        vision = CLIPVisionModel(CLIPVisionConfig(**_VISION))
        return VisionTextDualEncoderModel(vision_model=vision, text_model=text)

    return _seeded(build, seed)


def token_batch(b: int, g: torch.Generator, *, eos_pad: bool = False):
    """(input_ids, attention_mask): captions of 2..CONTEXT tokens ending in EOS, right-padded
    (with PAD, or with EOS as CLIP's tokenizer pads)."""
    lengths = torch.randint(2, CONTEXT + 1, (b,), generator=g)
    ids = torch.randint(1, EOS - 1, (b, CONTEXT), generator=g)
    pos = torch.arange(CONTEXT)
    ids[pos >= lengths[:, None]] = EOS if eos_pad else PAD
    ids[torch.arange(b), lengths - 1] = EOS
    mask = (pos < lengths[:, None]).long()
    return ids, mask


def processor_batches(n: int, b: int, *, seed: int = 0, keys: bool = False,
                      siglip2: bool = False) -> list[dict]:
    """Batches shaped like a CLIP/SigLIP processor's output (dicts of tensors), with
    ``__key__`` lists when ``keys``; SigLIP 2's patchified pixel_values when ``siglip2``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        images = torch.randn(b, 3, IMAGE, IMAGE, generator=g)
        ids, mask = token_batch(b, g)
        batch = {"input_ids": ids, "attention_mask": mask}
        if siglip2:
            grid = IMAGE // PATCH
            patches = images.reshape(b, 3, grid, PATCH, grid, PATCH).permute(0, 2, 4, 3, 5, 1)
            batch["pixel_values"] = patches.reshape(b, grid * grid, PATCH * PATCH * 3)
            batch["pixel_attention_mask"] = torch.ones(b, grid * grid, dtype=torch.long)
            batch["spatial_shapes"] = torch.tensor([[grid, grid]] * b)
        else:
            batch["pixel_values"] = images
        if keys:
            batch["__key__"] = [f"s{i:03d}_{j:02d}" for j in range(b)]
        out.append(batch)
    return out


def readme_embed(model, batch) -> Embeddings:
    """The hand-written embed a user had to write before (issue 29): features normalised,
    logit_scale exponentiated, logit_bias for SigLIP and None for CLIP."""
    image_kw = {k: batch[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")
                if k in batch}
    image = F.normalize(model.get_image_features(**image_kw), dim=-1)
    text = F.normalize(model.get_text_features(input_ids=batch["input_ids"],
                                               attention_mask=batch.get("attention_mask")), dim=-1)
    return Embeddings(image, text, model.logit_scale.exp(), getattr(model, "logit_bias", None))


def save_pretrained_clip(folder, seed: int = 0):
    """A tiny CLIPModel and its CLIPProcessor saved with save_pretrained in ``folder`` (a
    character-level vocabulary of 64 tokens: start 1, end-of-text 63): what
    ``precompute-reference --reference hf:DIR`` reads. Returns the model."""
    import json
    from pathlib import Path

    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["!", "<|startoftext|>"] + [c for c in letters] + [c + "</w>" for c in letters]
    tokens += [str(d) + "</w>" for d in range(EOS - len(tokens))] + ["<|endoftext|>"]
    assert len(tokens) == VOCAB and tokens[EOS] == "<|endoftext|>"
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=CONTEXT)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE},
                                         crop_size={"height": IMAGE, "width": IMAGE})
    model = clip(seed)
    model.config.text_config.bos_token_id = 1
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return model
