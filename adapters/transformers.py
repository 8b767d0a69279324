"""Hugging Face ``transformers`` two-tower models as JEST learners and references: no embed to write.

    from transformers import CLIPModel            # or SiglipModel, Siglip2Model, ...
    loader = JESTLoader(base_loader, learner, reference, ratio=0.2)   # batches from the processor

:func:`embed` (what :func:`jeststream.embed.default_embed` runs for a ``transformers`` model)
takes the batches HF processors and collators produce -- dicts with ``pixel_values``,
``input_ids``, ``attention_mask`` (and ``position_ids``, ``token_type_ids``; SigLIP 2's
``pixel_attention_mask`` / ``spatial_shapes``), other entries such as keys or ``return_loss``
ignored -- or ``(pixel_values, input_ids[, attention_mask], ...)`` tuples, and returns
``get_image_features`` / ``get_text_features`` L2-normalised, ``logit_scale.exp()`` and the
model's ``logit_bias`` (SigLIP) or None (CLIP). Any model of the package with those two methods
and a ``logit_scale`` is served: ``CLIPModel``, ``SiglipModel``, ``Siglip2Model``,
``VisionTextDualEncoderModel`` (transformers' contrastive example), ``AltCLIPModel``, ...
:func:`default_loss` is "sigmoid" for a model with a ``logit_bias``, else "softmax".

Two cheaper forwards, both exact by construction:

- Text trimming for CLIP's text tower (``CLIPTextTransformer``: causal mask, pooled at the
  end-of-text token): the rows are cut after their pooled token, grouped by length, and run
  shorter -- the same embeddings, fewer FLOPs. Other text towers (SigLIP's pools the last
  position and is not causal, BERT-style towers attend both ways) run as they are.
- Images of another size than the config's (``JESTLoader(score_resolution=...)`` resizes the
  learner's) run with the model's own position-embedding interpolation
  (``interpolate_pos_encoding=True``); a model without it raises, naming the fix. SigLIP 2's
  patchified ``pixel_values`` have no image side to resize.

This module imports ``transformers`` only where a model is built or looked up by class; the
core calls it lazily, for models whose class comes from that package.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jeststream.embed import Embeddings, unwrap_model

__all__ = [
    "default_loss",
    "embed",
    "encode_text_trimmed",
    "needed_lengths",
    "supports",
    "trimmable_text_tower",
    "unsupported_reason",
]

# batch entries forwarded to each tower when present
_IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
_TEXT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")

_HINT = (
    "batches as the model's processor returns them: a dict with 'pixel_values' and 'input_ids' "
    "(and 'attention_mask', ...), or a (pixel_values, input_ids[, attention_mask], ...) tuple"
)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`embed` cannot embed ``model`` (None when it can)."""
    model = unwrap_model(model)
    missing = [a for a in ("get_image_features", "get_text_features") if not hasattr(model, a)]
    if missing:
        return (
            f"it has no {' / '.join(missing)} (a two-tower model such as CLIPModel, SiglipModel, "
            "Siglip2Model or VisionTextDualEncoderModel has both; a pair of "
            "CLIPVisionModelWithProjection / CLIPTextModelWithProjection has no shared "
            "logit_scale: wrap them in one module and pass embed=)"
        )
    if not isinstance(getattr(model, "logit_scale", None), torch.Tensor):
        return "it has no logit_scale parameter (the temperature of its contrastive loss)"
    return None


def supports(model: nn.Module) -> bool:
    """Whether :func:`embed` serves ``model``."""
    return unsupported_reason(model) is None


def default_loss(model: nn.Module) -> str:
    """"sigmoid" for a model with a logit bias (SigLIP, SigLIP 2), "softmax" otherwise (CLIP)."""
    return "softmax" if getattr(unwrap_model(model), "logit_bias", None) is None else "sigmoid"


# -- reading a batch -----------------------------------------------------------------------------


def _inputs(batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(image kwargs, text kwargs) of a processor dict or a tuple batch."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch and "image" in batch and "text" in batch:
            batch = {"pixel_values": batch["image"], "input_ids": batch["text"]}
        missing = [k for k in ("pixel_values", "input_ids") if k not in batch]
        if missing:
            raise TypeError(
                f"a dict batch for a transformers model needs {missing} (keys: "
                f"{sorted(map(str, batch.keys()))}); the default embed takes {_HINT}"
            )
        image = {k: batch[k] for k in _IMAGE_KEYS if batch.get(k) is not None}
        text = {k: batch[k] for k in _TEXT_KEYS if batch.get(k) is not None}
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        image, text = {"pixel_values": batch[0]}, {"input_ids": batch[1]}
        extra = batch[2] if len(batch) > 2 else None
        ids = batch[1]
        if isinstance(extra, torch.Tensor) and isinstance(ids, torch.Tensor):
            if extra.shape == ids.shape:
                text["attention_mask"] = extra
    else:
        raise TypeError(
            f"the default embed for a transformers model takes {_HINT}; got a "
            f"{type(batch).__name__}"
        )
    for name, value in (*image.items(), *text.items()):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"the default embed needs {name} as a tensor, got {type(value).__name__} "
                "(run the processor with return_tensors='pt' in the base loader's collate_fn)"
            )
    return image, text


def _features(out: Any, what: str) -> Tensor:
    """``get_*_features`` returns a tensor (transformers 4.x) or an output with a pooler."""
    if isinstance(out, torch.Tensor):
        return out
    for name in (f"{what}_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"get_{what}_features returned a {type(out).__name__}, not a tensor")


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        return p.dtype if p.is_floating_point() else None
    return None


# -- the image tower at another resolution -----------------------------------------------------


def _native_size(model: nn.Module) -> tuple[int, int] | None:
    cfg = getattr(getattr(model, "config", None), "vision_config", None)
    size = getattr(cfg, "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _takes(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _image_features(model: nn.Module, image: dict[str, Tensor]) -> Tensor:
    pixels = image["pixel_values"]
    dtype = _param_dtype(getattr(model, "vision_model", model))
    if dtype is not None and pixels.is_floating_point() and pixels.dtype != dtype:
        pixels = pixels.to(dtype)  # a bf16 model fed by a float32 processor
    kwargs = {**image, "pixel_values": pixels}
    native = _native_size(model)
    if pixels.ndim == 4 and native is not None and tuple(pixels.shape[-2:]) != native:
        if not _takes(model.get_image_features, "interpolate_pos_encoding"):
            raise ValueError(
                f"{type(model).__name__} got {tuple(pixels.shape[-2:])} images but was built for "
                f"{native}, and its get_image_features has no interpolate_pos_encoding to adapt "
                "its position embeddings; feed images at the model's size (leave "
                "score_resolution unset)"
            )
        kwargs["interpolate_pos_encoding"] = True
    return _features(model.get_image_features(**kwargs), "image")


# -- exact text trimming -------------------------------------------------------------------------


def trimmable_text_tower(model: nn.Module) -> nn.Module | None:
    """The model's ``CLIPTextTransformer`` (causal, pooled at the end-of-text token), when its
    text features can be computed on trimmed rows exactly; else None."""
    model = unwrap_model(model)
    tower = getattr(model, "text_model", None)
    inner = getattr(tower, "text_model", None)  # VisionTextDualEncoder(text_model=CLIPTextModel)
    for t in (tower, inner):
        if t is not None and type(t).__name__ == "CLIPTextTransformer" and type(
            t
        ).__module__.startswith("transformers.models.clip."):
            if isinstance(getattr(t, "eos_token_id", None), int):
                return t
    return None


def needed_lengths(model: nn.Module, input_ids: Tensor) -> Tensor | None:
    """Per row, the prefix length whose forward gives its exact text features (the pooled
    position + 1, as CLIP's text tower picks it); None when trimming is not exact for ``model``."""
    tower = trimmable_text_tower(model)
    if tower is None:
        return None
    ids = input_ids.to(torch.int)
    if tower.eos_token_id == 2:  # legacy configs: the largest id (the end-of-text token)
        pos = ids.argmax(dim=-1)
    else:  # the first end-of-text token (padding may use the same id)
        pos = (ids == tower.eos_token_id).int().argmax(dim=-1)
    return pos.long() + 1


def encode_text_trimmed(
    model: nn.Module, text: dict[str, Tensor], *, bucket: int = 8
) -> Tensor | None:
    """``model.get_text_features(**text)`` computed on rows trimmed after their pooled token
    (grouped by length rounded up to ``bucket``), rows in input order; None when trimming is
    not exact for this model or these inputs (``position_ids`` / ``token_type_ids`` given)."""
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket must be an int >= 1, got {bucket!r}")
    ids = text["input_ids"]
    if set(text) - {"input_ids", "attention_mask"} or ids.ndim != 2 or ids.shape[0] == 0:
        return None
    lengths = needed_lengths(model, ids)
    if lengths is None:
        return None
    n_ctx = ids.shape[1]
    lengths = torch.clamp((lengths + bucket - 1) // bucket * bucket, max=n_ctx)
    mask = text.get("attention_mask")
    out: Tensor | None = None
    for length in torch.unique(lengths).tolist():
        rows = (lengths == length).nonzero(as_tuple=True)[0]
        kwargs = {"input_ids": ids[rows, :length]}
        if mask is not None:
            kwargs["attention_mask"] = mask[rows, :length]
        feats = _features(model.get_text_features(**kwargs), "text")
        if out is None:
            out = feats.new_empty((ids.shape[0], feats.shape[1]))
        out[rows] = feats
    return out


# -- the embed ---------------------------------------------------------------------------------


def embed(model: nn.Module, batch: Any) -> Embeddings:
    """Embeddings of a ``transformers`` two-tower model (see the module doc) for one batch."""
    model = unwrap_model(model)
    why = unsupported_reason(model)
    if why is not None:
        raise TypeError(f"cannot embed a {type(model).__name__}: {why}")
    image, text = _inputs(batch)
    image_features = _image_features(model, image)
    text_features = encode_text_trimmed(model, text)
    if text_features is None:
        text_features = _features(model.get_text_features(**text), "text")
    bias = getattr(model, "logit_bias", None)
    return Embeddings(
        F.normalize(image_features, dim=-1),
        F.normalize(text_features, dim=-1),
        model.logit_scale.exp().reshape(()),
        None if bias is None else bias.reshape(()),
    )


# -- a reference from a local save_pretrained folder ---------------------------------------------

HF_PREFIX = "hf:"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


class ProcessorImageTransform:
    """PIL image -> the processor's per-image tensors (``pixel_values`` [c, h, w], or SigLIP 2's
    patches with their mask and shape): the processor's own eval preprocessing."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Any) -> dict[str, Tensor]:
        out = self.image_processor(images=image.convert("RGB"), return_tensors="pt")
        return {k: v[0] for k, v in out.items() if isinstance(v, torch.Tensor)}


class ProcessorTokenizer:
    """list[str] -> ``{"input_ids", "attention_mask"}`` padded to ``max_length`` (SigLIP is
    trained on max-length padding; CLIP's padding is trimmed away again when scoring)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        out = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask")}


def load_pretrained_reference(
    folder: str, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ProcessorImageTransform, ProcessorTokenizer, dict]:
    """(frozen reference, image transform, tokenizer, cache-manifest header) of a local
    ``save_pretrained`` folder holding the model and its processor; nothing is downloaded."""
    from pathlib import Path

    from transformers import AutoModel, AutoProcessor

    from jeststream.reference_cache import reference_fingerprint

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--reference hf:{folder}: not a save_pretrained folder (no config.json); save the "
            "model and its processor there with model.save_pretrained(DIR) and "
            "processor.save_pretrained(DIR)"
        )
    model = AutoModel.from_pretrained(path, local_files_only=True)
    why = unsupported_reason(model)
    if why is not None:
        raise ValueError(f"--reference hf:{folder}: a {type(model).__name__}: {why}")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"--reference hf:{folder}: no usable processor saved with the model ({exc}); save "
            "it with processor.save_pretrained(DIR)"
        ) from None
    image_processor = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if image_processor is None or tokenizer is None:
        raise ValueError(
            f"--reference hf:{folder}: the saved processor ({type(processor).__name__}) needs an "
            "image processor and a tokenizer"
        )
    model = model.to(device).eval().requires_grad_(False)
    text_cfg = getattr(model.config, "text_config", None)
    max_length = getattr(text_cfg, "max_position_embeddings", None)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 100_000:
        max_length = model_max if max_length is None else min(max_length, model_max)
    if max_length is None:
        raise ValueError(f"--reference hf:{folder}: cannot tell the tokenizer's context length")
    transform = ProcessorImageTransform(image_processor)
    tokenize = ProcessorTokenizer(tokenizer, max_length)
    with torch.inference_mode():
        dim = int(_features(model.get_text_features(**{
            k: v.to(device) for k, v in tokenize(["a"]).items()}), "text").shape[-1])
        scale = float(model.logit_scale.exp())
        bias = getattr(model, "logit_bias", None)
        bias = None if bias is None else float(bias)
    header = {
        "reference": {
            "architecture": type(model).__name__,
            "source": HF_PREFIX + str(folder),
            "pretrained": None,
            "fingerprint": reference_fingerprint(model),
        },
        "preprocessing": {
            "library": "transformers",
            "processor": type(processor).__name__,
            "image_processor": {"class": type(image_processor).__name__,
                                **_jsonable(image_processor.to_dict())},
            "is_train": False,
            "tokenizer": {
                "class": type(tokenizer).__name__,
                "name": getattr(tokenizer, "name_or_path", None),
                "context_length": max_length,
                "padding": "max_length",
            },
        },
        "embed_dim": dim,
        "logit_scale": scale,
        "logit_bias": bias,
    }
    return model, transform, tokenize, header
