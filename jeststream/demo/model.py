"""The demo's tiny open_clip SigLIP model and its held-out evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jeststream.demo.data import DIGIT_WORDS, TEMPLATES, WordTokenizer, caption


@dataclass
class ModelConfig:
    """A ViT/text-transformer pair small enough to train in seconds on a CPU core."""

    image_size: int = 16
    patch_size: int = 8  # 2x2 patches + class token: half the cost of 4x4, uniform plateaus higher
    width: int = 64
    layers: int = 1
    heads: int = 2
    text_width: int = 64
    text_layers: int = 1
    embed_dim: int = 64
    context_length: int = 12


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """An open_clip CLIP from a custom config (no download), with SigLIP's logit bias."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg={
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.width,
            "layers": cfg.layers,
            "head_width": cfg.width // cfg.heads,
            "mlp_ratio": 2.0,
        },
        text_cfg={
            "context_length": cfg.context_length,
            "vocab_size": vocab_size,
            "width": cfg.text_width,
            "heads": cfg.heads,
            "layers": cfg.text_layers,
            "mlp_ratio": 2.0,
        },
        init_logit_scale=float(torch.log(torch.tensor(10.0))),
        init_logit_bias=-10.0,
    )


def siglip_loss(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Mean-over-images SigLIP loss, as open_clip's SigLipLoss computes it."""
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(texts, normalize=True)
    logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
    labels = 2 * torch.eye(len(img), device=img.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(img)


@torch.inference_mode()
def class_text_embeddings(model: torch.nn.Module, tokenizer: WordTokenizer) -> torch.Tensor:
    """[10, d]: each class's caption embeddings averaged over the templates, re-normalised."""
    texts = [caption(c, t) for c in range(len(DIGIT_WORDS)) for t in range(len(TEMPLATES))]
    emb = model.encode_text(tokenizer(texts), normalize=True)
    emb = emb.view(len(DIGIT_WORDS), len(TEMPLATES), -1).mean(1)
    return F.normalize(emb, dim=-1)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    texts: torch.Tensor,
    tokenizer: WordTokenizer,
) -> dict[str, float]:
    """Zero-shot accuracy and image->text recall@1 on the held-out split.

    Captions are templates, so many held-out captions are word-for-word identical; a retrieval
    counts as correct when the nearest caption names the image's digit.
    """
    was_training = model.training
    model.eval()
    img = model.encode_image(images, normalize=True)
    cls = class_text_embeddings(model, tokenizer)
    acc = (img @ cls.T).argmax(1).eq(labels).float().mean().item()
    txt = model.encode_text(texts, normalize=True)
    nearest = (img @ txt.T).argmax(1)
    recall = labels[nearest].eq(labels).float().mean().item()
    model.train(was_training)
    return {"accuracy": acc, "recall_at_1": recall}
