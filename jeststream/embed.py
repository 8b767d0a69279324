"""The embed protocol: what jeststream needs from a model, and the checks on what it returns.

An *embed* is ``fn(model, batch) -> Embeddings(image, text, logit_scale, logit_bias)``: [B, d]
L2-normalised features, the temperature already exponentiated, and a bias for the sigmoid
(SigLIP) loss or None for the softmax (CLIP) loss. :func:`default_embed` serves the model
families jeststream recognises (:func:`model_family`): open_clip's ``CLIP`` /
``CustomTextCLIP`` (duck-typed: ``encode_image`` / ``encode_text``) and Hugging Face
``transformers`` two-tower models (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``,
``VisionTextDualEncoderModel``...). :func:`check_embeddings` refuses what would score wrongly
without a word: features that are not unit-norm, a bias that contradicts the loss, a
``logit_scale`` that looks like its log (warned).

Layering: at import time this module imports only the leaf :mod:`jeststream.device` (it is the
bottom layer that :mod:`jeststream.scoring` and :mod:`jeststream.reference_cache` both build on). Each family's
forward is imported when a model of that family is first embedded: :mod:`jeststream.low_res`
and :mod:`jeststream.text_trim` (torch-only leaves) for open_clip, and
:mod:`jeststream.adapters.transformers` for a model whose class comes from the ``transformers``
package -- the one place the core imports an adapter, lazily, and only for such a model
(``type(model).__module__`` is read; ``transformers`` itself is never imported for other models).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from jeststream.device import unwrap_model

__all__ = [
    "EmbedFn",
    "Embeddings",
    "LOGIT_SCALE_LOOKS_LOG",
    "autocast_dtype",
    "check_default_embed",
    "check_embeddings",
    "default_embed",
    "default_loss",
    "freeze_reference",
    "model_family",
    "unwrap_model",
]

# open_clip and SigLIP keep log(t): log 10 = 2.30 at SigLIP's init, log(1/0.07) = 2.66 at CLIP's,
# clamped at log 100 = 4.61. An exponentiated scale below this almost always is such a log.
LOGIT_SCALE_LOOKS_LOG = 5.0
# |norm - 1| allowed per row: float32 normalisation is exact to ~1e-7; bf16 / fp16 features (an
# autocast forward, a float16 reference cache) to ~4e-3.
_NORM_TOL = {torch.float64: 1e-3, torch.float32: 1e-3}
_NORM_TOL_LOW_PRECISION = 2e-2

EMBED_HINT = (
    "pass embed=fn where fn(model, batch) -> jeststream.losses.Embeddings(image, text, "
    "logit_scale, logit_bias) with L2-normalised [B, d] embeddings"
)


class Embeddings(NamedTuple):
    """One model's view of a super-batch, as open_clip returns it.

    Attributes:
        image: [B, d] L2-normalised image embeddings x_i.
        text: [B, d] L2-normalised text embeddings y_j.
        logit_scale: scalar tensor (or float), the temperature t, *already exponentiated*.
        logit_bias: scalar tensor (or float) β, or None (SigLIP has one, CLIP does not).
    """

    image: Tensor
    text: Tensor
    logit_scale: Tensor | float
    logit_bias: Tensor | float | None = None


EmbedFn = Callable[[nn.Module, Any], Embeddings]


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The dtype scoring forwards autocast to on an accelerator (bf16 where CUDA has it)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.get_autocast_dtype(device.type)


# -- model families ------------------------------------------------------------------------------


def _is_transformers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def model_family(model: nn.Module) -> str | None:
    """``"transformers"`` for a two-tower model of the ``transformers`` package that the default
    embed knows, ``"open_clip"`` for a model with ``encode_image`` / ``encode_text``, else None."""
    model = unwrap_model(model)
    if _is_transformers(model):
        from jeststream.adapters import transformers as hf  # lazy: the sanctioned adapter import

        return "transformers" if hf.supports(model) else None
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        return "open_clip"
    return None


def check_default_embed(model: nn.Module, who: str) -> None:
    """TypeError, at construction, when the default embed cannot embed ``model``."""
    if model_family(model) is not None:
        return
    inner = unwrap_model(model)
    if _is_transformers(inner):
        from jeststream.adapters import transformers as hf

        why = hf.unsupported_reason(inner)
    else:
        why = "it has no encode_image/encode_text (open_clip) and is not a transformers model"
    raise TypeError(
        f"the default embed cannot embed the {who}, a {type(inner).__name__}: {why}; {EMBED_HINT}"
    )


def default_loss(model: nn.Module) -> str | None:
    """The loss ``model`` trains with, when its family says: ``"sigmoid"`` when it has a logit
    bias (SigLIP), ``"softmax"`` when not (CLIP); None for a model the default embed does not
    know (the caller decides)."""
    family = model_family(model)
    if family is None:
        return None
    model = unwrap_model(model)
    if family == "transformers":
        from jeststream.adapters import transformers as hf

        return hf.default_loss(model)
    return "softmax" if getattr(model, "logit_bias", None) is None else "sigmoid"


# -- the default embed -------------------------------------------------------------------------


def _images_and_texts(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        missing = [k for k in ("image", "text") if k not in batch]
        if missing:
            raise TypeError(
                f"a dict batch needs 'image' and 'text' entries for the default embed; missing "
                f"{missing} (keys: {sorted(map(str, batch.keys()))}); or {EMBED_HINT}"
            )
        images, texts = batch["image"], batch["text"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, texts = batch[0], batch[1]
    else:
        raise TypeError(
            f"the default embed understands tuple/list batches (images, texts, ...) and dict "
            f"batches with 'image'/'text', got a {type(batch).__name__}; {EMBED_HINT}"
        )
    for name, value in (("images", images), ("texts", texts)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"the default embed needs {name} as a tensor, got {type(value).__name__} "
                "(tokenize texts in the base loader, e.g. with open_clip.get_tokenizer); "
                f"or {EMBED_HINT}"
            )
    return images, texts


def default_embed(model: nn.Module, batch: Any) -> Embeddings:
    """Embeddings of a model of a known family (:func:`model_family`) for a batch.

    ``transformers`` models: :func:`jeststream.adapters.transformers.embed` (processor dicts
    with ``pixel_values`` / ``input_ids`` / ..., or (pixel_values, input_ids, ...) tuples).

    open_clip models: a tuple/list batch takes images and texts from positions 0 and 1 (further
    positions, e.g. webdataset keys, are ignored here); a dict batch uses ``"image"`` and
    ``"text"``. Text towers that are causal and pool at the end-of-text token (open_clip's CLIP)
    run on captions trimmed to the length they need (:mod:`jeststream.text_trim`: the same
    embeddings, fewer FLOPs); images smaller than a ViT's native size run with resampled
    positional embeddings (:mod:`jeststream.low_res`).
    """
    if _is_transformers(unwrap_model(model)):
        from jeststream.adapters import transformers as hf

        return hf.embed(model, batch)
    if isinstance(batch, Mapping) and "pixel_values" in batch and "image" not in batch:
        raise TypeError(
            f"a Hugging Face processor batch (pixel_values, ...) for a {type(model).__name__}, "
            f"which is not a transformers model; {EMBED_HINT}"
        )
    images, texts = _images_and_texts(batch)
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise TypeError(
            f"the default embed needs an open_clip-style model with encode_image/encode_text, "
            f"got {type(model).__name__}; {EMBED_HINT}"
        )
    from jeststream.low_res import encode_image_resampled  # torch-only leaves
    from jeststream.text_trim import encode_text_trimmed

    # Images smaller than the ViT's native size (low-resolution learner scoring) run with
    # resampled positional embeddings; at the native size this is open_clip's forward.
    image = encode_image_resampled(model, images, normalize=True)
    # Padding after each caption's end-of-text token cannot change a causal, EOT-pooled text
    # embedding: run such towers on trimmed captions (exact; None for any other tower).
    text = encode_text_trimmed(model, texts, normalize=True)
    if text is None:
        text = model.encode_text(texts, normalize=True)
    logit_scale = model.logit_scale.exp()
    logit_bias = getattr(model, "logit_bias", None)
    return Embeddings(image, text, logit_scale, logit_bias)


# -- the reference -------------------------------------------------------------------------------


def freeze_reference(reference: nn.Module) -> nn.Module:
    """Put the reference in eval mode with gradients off, then verify it stayed that way."""
    reference = unwrap_model(reference)
    reference.eval()
    reference.requires_grad_(False)
    trainable = [n for n, p in reference.named_parameters() if p.requires_grad]
    training = [n or "<root>" for n, m in reference.named_modules() if m.training]
    if trainable or training:
        # A module overriding eval()/requires_grad_() could leave itself trainable; fail early.
        raise ValueError(
            f"the reference model is not frozen after eval() and requires_grad_(False): "
            f"trainable parameters {trainable[:5]}, modules in training mode {training[:5]}"
        )
    return reference


# -- checks on an embed's result -----------------------------------------------------------------


def _as_scalar(value: Any, who: str, name: str, device: torch.device) -> Tensor:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = torch.tensor(float(value), device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"the {who}'s {name} is a {type(value).__name__}; it must be a scalar tensor or a float"
        )
    if value.numel() != 1:
        raise ValueError(f"the {who}'s {name} must be a scalar, got shape {tuple(value.shape)}")
    # cloned: default_embed returns the snapshot's own parameters (and a custom embed may
    # return parameters), which the next refresh overwrites in place while selection still
    # reads these embeddings
    return value.float().reshape(()).clone()


def _warn_once(warned: set | None, key: tuple, message: str) -> None:
    if warned is not None:
        if key in warned:
            return
        warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def _check_norms(image: Tensor, text: Tensor, who: str) -> None:
    for name, t in (("image", image), ("text", text)):
        if t.shape[0] == 0:
            continue
        norms = torch.linalg.vector_norm(t.detach().float(), dim=1)
        finite = torch.isfinite(norms)  # non-finite rows are on_bad_scores' business
        if not bool(finite.any()):
            continue
        dev = (norms[finite] - 1.0).abs()
        tol = _NORM_TOL.get(t.dtype, _NORM_TOL_LOW_PRECISION)
        worst = int(dev.argmax())
        if float(dev[worst]) > tol:
            observed = float(norms[finite][worst])
            raise ValueError(
                f"the {who}'s {name} embeddings are not unit-norm: a row has L2 norm "
                f"{observed:.4g} (allowed: 1 ± {tol:g} for {str(t.dtype).removeprefix('torch.')}); "
                "the losses JEST scores with take normalised features: return "
                "torch.nn.functional.normalize(features, dim=-1) from embed (open_clip: "
                "encode_image(x, normalize=True))"
            )


def _check_loss(bias: Tensor | None, who: str, loss: str, fallback: bool, strict: bool,
                warned: set | None) -> None:
    if loss == "sigmoid" and bias is None:
        if fallback:
            message = (
                f"loss was not given and the {who} is not a model whose loss jeststream knows: "
                "scoring with loss='sigmoid' (the fallback), but its embeddings have no "
                "logit_bias (a CLIP-style model), so β = 0 is used. Pass loss='softmax' if it "
                "trains with CLIP's softmax loss, or return its logit_bias from embed"
            )
        else:
            message = (
                f"loss='sigmoid' (SigLIP) but the {who}'s embeddings have logit_bias=None, as a "
                "CLIP model's do: the sigmoid loss needs the model's bias. Either pass "
                "loss='softmax' (the CLIP loss) to match the model, or use a SigLIP-style model "
                "/ an embed that returns its logit_bias (a float 0.0 if it truly trains without one)"
            )
    elif loss == "softmax" and bias is not None:
        message = (
            f"loss='softmax' (CLIP) but the {who}'s embeddings carry a logit_bias, as a SigLIP "
            "model's do: the softmax loss has no bias. Either pass loss='sigmoid' (the SigLIP "
            "loss) to match the model, or use a CLIP-style model / an embed that returns "
            "logit_bias=None"
        )
    else:
        return
    if strict and not fallback:
        raise ValueError(message)
    _warn_once(warned, ("loss", who), message + (
        "" if strict else " (a reference of another family than the learner: scored as it is)"
    ))


def check_embeddings(
    e: Any,
    who: str,
    super_batch_size: int,
    *,
    loss: str | None = None,
    loss_fallback: bool = False,
    loss_strict: bool = True,
    check_scale: bool = True,
    warned: set | None = None,
) -> Embeddings:
    """Validate an embed() result and return it in float32 (selection maths wants fp32).

    Raises on wrong types or shapes, on features that are not unit-norm (non-finite rows are
    left to the loader's ``on_bad_scores``), and -- with ``loss`` -- on a bias that contradicts
    the loss (sigmoid needs one, softmax has none). That only warns with ``loss_fallback`` (the
    loss was nobody's choice) or without ``loss_strict`` (a reference, which may come from
    another family than the learner whose loss it is). ``check_scale``: warn when
    ``logit_scale`` < 5, which almost always is its log (a missing ``.exp()``). ``warned``: a
    set the caller keeps so that each warning is given once per ``who`` (None: every call).
    """
    if not (isinstance(e, tuple) and len(e) == 4):
        raise TypeError(
            f"embed() for the {who} returned {type(e).__name__}; it must return "
            "jeststream.losses.Embeddings(image, text, logit_scale, logit_bias)"
        )
    image, text, scale, bias = e
    for name, t in (("image", image), ("text", text)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"the {who}'s {name} embedding is a {type(t).__name__}, not a tensor")
    if image.ndim != 2 or text.ndim != 2:
        raise ValueError(
            f"the {who}'s embeddings must be [B, d]; got image {tuple(image.shape)} and text "
            f"{tuple(text.shape)}"
        )
    if image.shape != text.shape:
        raise ValueError(
            f"the {who}'s image and text embeddings can't be compared: image "
            f"{tuple(image.shape)} vs text {tuple(text.shape)} (same batch and width needed)"
        )
    if image.shape[0] != super_batch_size:
        raise ValueError(
            f"the {who} returned {image.shape[0]} embeddings for a super-batch of "
            f"{super_batch_size} examples; embed() must return one row per example"
        )
    scale = _as_scalar(scale, who, "logit_scale", image.device)
    if bias is not None:
        bias = _as_scalar(bias, who, "logit_bias", image.device)
    _check_norms(image, text, who)
    if loss is not None:
        _check_loss(bias, who, loss, loss_fallback, loss_strict, warned)
    if check_scale:
        value = float(scale)
        if math.isfinite(value) and value < LOGIT_SCALE_LOOKS_LOG:
            _warn_once(
                warned, ("logit-scale", who),
                f"the {who}'s logit_scale is {value:.4g}, which looks like the log of the "
                "temperature (open_clip and SigLIP keep log t: 2.3 to 4.6), not t itself: "
                "Embeddings wants it already exponentiated, e.g. model.logit_scale.exp()",
            )
    return Embeddings(image.float(), text.float(), scale, bias)
