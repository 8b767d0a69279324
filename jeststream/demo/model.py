"""The demo's tiny open_clip SigLIP (or CLIP) model, its loss and its held-out evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from jeststream.demo.data import WordTokenizer, class_captions, n_classes, templates

LOSSES = ("sigmoid", "softmax")
# Retrieval metrics of :func:`evaluate`, class-level: i2t = image -> text, t2i = text -> image.
RETRIEVAL = ("i2t_recall_at_1", "i2t_recall_at_5", "t2i_recall_at_1", "t2i_recall_at_5")


@dataclass
class ModelConfig:
    """A ViT/text-transformer pair small enough to train in seconds on a CPU core."""

    image_size: int = 16
    # CLIP's cost structure: the image tower is most of a forward pass (ViT-B/16: ~80 %). 4x4
    # patches (16 + class token) and a text tower half as wide put it at 77 % here (83 % on the
    # demo's trimmed captions); see docs/performance.md, "The demo model's cost structure".
    patch_size: int = 4
    width: int = 64
    layers: int = 1
    heads: int = 2
    text_width: int = 32
    text_layers: int = 1
    embed_dim: int = 64
    context_length: int = 12
    # the contrastive loss it trains with: "sigmoid" (SigLIP, logit bias initialised at -10) or
    # "softmax" (CLIP, no bias)
    loss: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSSES}")

    def identity(self) -> dict:
        """Fields for fingerprints; ``loss`` left out at its default (see DataConfig.identity)."""
        out = asdict(self)
        if out["loss"] == "sigmoid":
            del out["loss"]
        return out


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """An open_clip CLIP from a custom config (no download); with SigLIP's logit bias unless
    ``cfg.loss`` is "softmax"."""
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
        init_logit_bias=-10.0 if cfg.loss == "sigmoid" else None,
    )


def _encode_image(model: torch.nn.Module, images: torch.Tensor, encode_image: Callable | None):
    if encode_image is None:
        return model.encode_image(images, normalize=True)
    return encode_image(model, images)


def siglip_loss(
    model: torch.nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    encode_image: Callable | None = None,
) -> torch.Tensor:
    """Mean-over-images SigLIP loss, as open_clip's SigLipLoss computes it. ``encode_image``
    (model, images) -> normalized features replaces ``model.encode_image`` (mixed-resolution
    training: :func:`jeststream.low_res.encode_image_mixed`)."""
    img = _encode_image(model, images, encode_image)
    txt = model.encode_text(texts, normalize=True)
    logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
    labels = 2 * torch.eye(len(img), device=img.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(img)


def clip_loss(
    model: torch.nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    encode_image: Callable | None = None,
) -> torch.Tensor:
    """The CLIP (softmax) loss, as open_clip's ClipLoss computes it; ``encode_image`` as for
    :func:`siglip_loss`."""
    img = _encode_image(model, images, encode_image)
    txt = model.encode_text(texts, normalize=True)
    logits = model.logit_scale.exp() * img @ txt.T
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def contrastive_loss(loss: str):
    """The training loss of ``ModelConfig.loss``: :func:`siglip_loss` or :func:`clip_loss`."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
    return siglip_loss if loss == "sigmoid" else clip_loss


@torch.inference_mode()
def class_text_embeddings(model: torch.nn.Module, tokenizer: WordTokenizer) -> torch.Tensor:
    """[C, d]: each class's caption embeddings (of the tokenizer's task) averaged over the
    templates, re-normalised."""
    task = tokenizer.task
    emb = model.encode_text(tokenizer(class_captions(task)), normalize=True)
    emb = emb.view(n_classes(task), len(templates(task)), -1).mean(1)
    return F.normalize(emb, dim=-1)


def _class_recall(sim: torch.Tensor, query: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of queries (rows of `sim`) whose k nearest targets include one of their class."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return target[top].eq(query[:, None]).any(1).float().mean().item()


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    texts: torch.Tensor,
    tokenizer: WordTokenizer,
) -> dict[str, float]:
    """Zero-shot accuracy and retrieval recall@1 and @5 both ways on the held-out split.

    Captions are templates, so many held-out captions are word-for-word identical: retrieval is
    class-level. Image -> text counts as correct when one of the k nearest held-out captions
    names the image's class, text -> image when one of the k nearest held-out images shows the
    caption's class (every held-out caption describes its own image).
    """
    was_training = model.training
    model.eval()
    img = model.encode_image(images, normalize=True)
    cls = class_text_embeddings(model, tokenizer)
    acc = (img @ cls.T).argmax(1).eq(labels).float().mean().item()
    txt = model.encode_text(texts, normalize=True)
    sim = img @ txt.T
    out = {"accuracy": acc}
    for k in (1, 5):
        out[f"i2t_recall_at_{k}"] = _class_recall(sim, labels, labels, k)
        out[f"t2i_recall_at_{k}"] = _class_recall(sim.T, labels, labels, k)
    model.train(was_training)
    return out


def make_optimizer(model: torch.nn.Module, cfg, steps: int):
    """AdamW with linear warm-up and cosine decay to zero over `steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, cfg.warmup))
        return warm * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
