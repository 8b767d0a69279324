"""Score a super-batch: learner-snapshot and frozen-reference forwards -> Embeddings.

Knows models, not loaders. ``default_embed`` is duck-typed for open_clip's ``CLIP`` /
``CustomTextCLIP`` (no open_clip import); anything else goes through ``embed=``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from jeststream.deferred import scoring_views
from jeststream.losses import Embeddings
from jeststream.low_res import check_resolution, encode_image_resampled, resize_batch_images
from jeststream.reference_cache import ReferenceCache
from jeststream.snapshot import LearnerSnapshot, is_accelerator, unwrap_model
from jeststream.text_trim import encode_text_trimmed

__all__ = ["Scorer", "ScoreResult", "default_embed", "freeze_reference", "check_embeddings"]

logger = logging.getLogger(__name__)

EmbedFn = Callable[[nn.Module, Any], Embeddings]

_EMBED_HINT = (
    "pass embed=fn where fn(model, batch) -> jeststream.losses.Embeddings(image, text, "
    "logit_scale, logit_bias) with L2-normalised [B, d] embeddings"
)


def default_embed(model: nn.Module, batch: Any) -> Embeddings:
    """Embeddings of an open_clip-style model for a batch of (images, tokenized texts, ...).

    A tuple/list batch takes images and texts from positions 0 and 1 (further positions, e.g.
    webdataset keys, are ignored here); a dict batch uses ``"image"`` and ``"text"``. Text towers
    that are causal and pool at the end-of-text token (open_clip's CLIP) run on captions trimmed
    to the length they need (:mod:`jeststream.text_trim`: the same embeddings, fewer FLOPs).
    """
    if isinstance(batch, Mapping):
        missing = [k for k in ("image", "text") if k not in batch]
        if missing:
            raise TypeError(
                f"a dict batch needs 'image' and 'text' entries for the default embed; missing "
                f"{missing} (keys: {sorted(map(str, batch.keys()))}); or {_EMBED_HINT}"
            )
        images, texts = batch["image"], batch["text"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, texts = batch[0], batch[1]
    else:
        raise TypeError(
            f"the default embed understands tuple/list batches (images, texts, ...) and dict "
            f"batches with 'image'/'text', got a {type(batch).__name__}; {_EMBED_HINT}"
        )
    for name, value in (("images", images), ("texts", texts)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"the default embed needs {name} as a tensor, got {type(value).__name__} "
                "(tokenize texts in the base loader, e.g. with open_clip.get_tokenizer); "
                f"or {_EMBED_HINT}"
            )
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise TypeError(
            f"the default embed needs an open_clip-style model with encode_image/encode_text, "
            f"got {type(model).__name__}; {_EMBED_HINT}"
        )
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


def check_embeddings(e: Any, who: str, super_batch_size: int) -> Embeddings:
    """Validate an embed() result and return it in float32 (selection maths wants fp32)."""
    if not (isinstance(e, tuple) and len(e) == 4):
        raise TypeError(
            f"embed() for the {who} returned {type(e).__name__}; it must return "
            "jeststream.losses.Embeddings(image, text, logit_scale, logit_bias)"
        )
    image, text, scale, bias = e
    for name, t in (("image", image), ("text", text), ("logit_scale", scale)):
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
    if scale.numel() != 1:
        raise ValueError(
            f"the {who}'s logit_scale must be a scalar, got shape {tuple(scale.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            bias = torch.as_tensor(bias, device=image.device)
        if bias.numel() != 1:
            raise ValueError(f"the {who}'s logit_bias must be a scalar, got {tuple(bias.shape)}")
        bias = bias.float().reshape(()).clone()
    # The scalars are cloned: default_embed returns the snapshot's own logit_bias parameter (and
    # a custom embed may return parameters), which the next refresh overwrites in place while
    # selection still reads these embeddings.
    return Embeddings(image.float(), text.float(), scale.float().reshape(()).clone(), bias)


class ScoreResult(NamedTuple):
    learner: Embeddings | None  # None when the criterion gives the learner no weight
    reference: Embeddings | None
    version: int
    seconds: float


def _autocast_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.get_autocast_dtype(device.type)


class Scorer:
    """Runs the learner snapshot and the frozen reference on a super-batch.

    ``reference`` may be a :class:`~jeststream.reference_cache.ReferenceCache`: the reference's
    embeddings are then looked up by the super-batch's per-example ``keys`` (no reference
    forward), and a call without keys raises.

    Both forwards run under ``torch.inference_mode()`` and, on an accelerator, autocast. On CPU
    autocast is used only for a learner snapshot stored in a reduced ``snapshot_dtype``.
    A :class:`~jeststream.deferred.Deferred` field is scored through its view.
    ``score_transform`` is applied to the super-batch before scoring only. ``score_resolution``
    resizes the images the learner snapshot sees (:mod:`jeststream.low_res`; the reference sees
    them as they are). With
    ``score_learner=False`` (``criterion="easy_reference"``, whose score ignores the learner)
    the snapshot is not run at all and the result's ``learner`` is None.
    """

    def __init__(
        self,
        snapshot: LearnerSnapshot,
        reference: nn.Module | ReferenceCache | None,
        *,
        embed: EmbedFn | None = None,
        score_transform: Callable[[Any], Any] | None = None,
        score_learner: bool = True,
        score_resolution: int | None = None,
    ) -> None:
        check_resolution(score_resolution, "score_resolution", optional=True)
        if not score_learner and reference is None:
            raise ValueError("score_learner=False needs a reference model: nothing would be scored")
        if embed is not None and not callable(embed):
            raise TypeError(f"embed must be callable fn(model, batch) -> Embeddings, got {embed!r}")
        if score_transform is not None and not callable(score_transform):
            raise TypeError(
                f"score_transform must be callable batch -> batch, got {score_transform!r}"
            )
        self.snapshot = snapshot
        self.device = snapshot.device
        self.cache = reference if isinstance(reference, ReferenceCache) else None
        self.reference = (
            None if reference is None or self.cache is not None else freeze_reference(reference)
        )
        if self.reference is not None:
            ref_dev = next(iter(self.reference.parameters()), None)
            if ref_dev is not None and ref_dev.device != self.device:
                logger.info("moving the reference model to %s for scoring", self.device)
                self.reference.to(self.device)
        self.embed = embed or default_embed
        self.score_transform = score_transform
        self.score_learner = bool(score_learner)
        self.score_resolution = score_resolution

    def _autocast(self, for_learner: bool):
        if is_accelerator(self.device):
            return torch.autocast(self.device.type, dtype=_autocast_dtype(self.device))
        if for_learner and self.snapshot.dtype is not None:
            return torch.autocast("cpu", dtype=self.snapshot.dtype)
        return contextlib.nullcontext()

    def __call__(
        self,
        super_batch: Any,
        super_batch_size: int,
        *,
        snapshot_step: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        keys: list[str] | None = None,
    ) -> ScoreResult:
        """Both forwards. ``snapshot_step``: score with the learner snapshot taken at or before
        that step (deterministic scoring; waits for it) instead of the latest one. ``keys``: the
        per-example keys, which a reference cache needs."""
        t0 = time.perf_counter()
        batch = scoring_views(super_batch)  # Deferred fields: the scorer sees their views
        batch = batch if self.score_transform is None else self.score_transform(batch)
        with torch.inference_mode():
            ref = None
            if self.cache is not None:
                ref = check_embeddings(self._lookup(keys, batch, super_batch_size),
                                       "reference cache", super_batch_size)
            elif self.reference is not None:
                with self._autocast(for_learner=False):
                    raw = self.embed(self.reference, batch)
                ref = check_embeddings(raw, "reference", super_batch_size)
            learner = None
            if not self.score_learner:
                version = self.snapshot.version
            else:
                # resized before a snapshot copy is taken: the copy is held only for the forward
                learner_batch = (
                    batch
                    if self.score_resolution is None
                    else resize_batch_images(batch, self.score_resolution)
                )
                with self.snapshot.use(snapshot_step, should_stop=should_stop) as (
                    module,
                    version,
                ):
                    with self._autocast(for_learner=True):
                        raw = self.embed(module, learner_batch)
                    learner = check_embeddings(raw, "learner", super_batch_size)
        return ScoreResult(learner, ref, version, time.perf_counter() - t0)

    @property
    def needs_keys(self) -> bool:
        """The super-batch's per-example keys are needed (the reference is a cache)."""
        return self.cache is not None

    def _lookup(self, keys: list[str] | None, batch: Any, size: int) -> Embeddings:
        assert self.cache is not None
        if keys is None:
            raise ValueError(
                f"the reference is a ReferenceCache ({self.cache.directory!r}), which is looked "
                "up by sample key, but the super-batch has no per-example keys; use a keyed base "
                "loader (jeststream.adapters.webdataset.webdataset_loader or streaming_loader "
                "yield each sample's key) or pass key_fn=batch -> list[str] to the JESTLoader"
            )
        if len(keys) != size:
            raise ValueError(
                f"the super-batch has {size} examples but {len(keys)} keys; key_fn must return "
                "one key per example"
            )
        return self.cache.lookup(keys, device=self.device, batch=batch, embed=self.embed)
