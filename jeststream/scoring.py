"""Score a super-batch: learner-snapshot and frozen-reference forwards -> Embeddings.

Knows models, not loaders. The embed protocol (``default_embed``, ``check_embeddings``,
``freeze_reference``, ``EmbedFn``) lives in :mod:`jeststream.embed` and is re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from jeststream.batch import index_batch
from jeststream.deferred import scoring_views
from jeststream.embed import (
    Embeddings,
    EmbedFn,
    autocast_dtype,
    check_default_embed,
    check_embeddings,
    default_embed,
    freeze_reference,
)
from jeststream.low_res import check_resolution, resize_batch_images
from jeststream.reference_cache import ReferenceCache
from jeststream.snapshot import LearnerSnapshot, is_accelerator

__all__ = [
    "EmbedFn",
    "ScoreResult",
    "Scorer",
    "check_embeddings",
    "default_embed",
    "freeze_reference",
]

logger = logging.getLogger(__name__)


class ScoreResult(NamedTuple):
    learner: Embeddings | None  # None when the criterion gives the learner no weight
    reference: Embeddings | None
    version: int
    seconds: float
    # the super-batch positions both embeddings' rows stand for, ascending (a pre-filter kept
    # them); None: every example, in order
    kept: torch.Tensor | None = None


def _rows(e: Embeddings, idx: torch.Tensor) -> Embeddings:
    """The embeddings of rows ``idx`` (the logit scale and bias are the model's)."""
    idx = idx.to(e.image.device)
    return e._replace(image=e.image[idx], text=e.text[idx])


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

    Every embed result goes through :func:`~jeststream.embed.check_embeddings`: with ``loss``,
    a learner bias that contradicts it raises (a reference's, or with ``loss_fallback`` -- the
    loss was nobody's choice -- it only warns, once); a user's ``embed`` whose ``logit_scale`` looks un-exponentiated is
    warned about once per model. Without ``embed``, a model the default embed does not know
    raises TypeError here, at construction.
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
        loss: str | None = None,
        loss_fallback: bool = False,
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
        self.loss = loss
        self.loss_fallback = bool(loss_fallback)
        self._warned: set = set()  # warnings given once per loader and model
        if embed is None:  # fail now, not at the first next() in the producer thread
            if self.score_learner:
                check_default_embed(snapshot.live, "learner")
            if self.reference is not None:
                check_default_embed(self.reference, "reference")

    def _check(self, raw: Any, who: str, size: int, *, user_embed: bool) -> Embeddings:
        # the loss is the learner's: a reference of another family is warned about, not refused
        return check_embeddings(
            raw, who, size, loss=self.loss, loss_fallback=self.loss_fallback,
            loss_strict=who == "learner", check_scale=user_embed, warned=self._warned,
        )

    def _autocast(self, for_learner: bool):
        if is_accelerator(self.device):
            return torch.autocast(self.device.type, dtype=autocast_dtype(self.device))
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
        keep: Callable[[Embeddings], torch.Tensor | None] | None = None,
    ) -> ScoreResult:
        """Both forwards. ``snapshot_step``: score with the learner snapshot taken at or before
        that step (deterministic scoring; waits for it) instead of the latest one. ``keys``: the
        per-example keys, which a reference cache needs. ``keep``: a pre-filter, called with the
        reference's embeddings of the whole super-batch (scored first), returning the ascending
        positions to keep (or None: all); the learner then runs on those examples only, and
        both embeddings in the result hold their rows (``ScoreResult.kept``)."""
        t0 = time.perf_counter()
        batch = scoring_views(super_batch)  # Deferred fields: the scorer sees their views
        batch = batch if self.score_transform is None else self.score_transform(batch)
        with torch.inference_mode():
            ref = None
            if self.cache is not None:
                ref = self._check(self._lookup(keys, batch, super_batch_size),
                                  "reference cache", super_batch_size, user_embed=False)
            elif self.reference is not None:
                with self._autocast(for_learner=False):
                    raw = self.embed(self.reference, batch)
                ref = self._check(raw, "reference", super_batch_size,
                                  user_embed=self.embed is not default_embed)
            kept = None
            if keep is not None and ref is not None:
                kept = keep(ref)
            if kept is not None:
                batch = index_batch(batch, kept)
                ref = _rows(ref, kept)
                super_batch_size = int(kept.numel())
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
                    learner = self._check(raw, "learner", super_batch_size,
                                          user_embed=self.embed is not default_embed)
        return ScoreResult(learner, ref, version, time.perf_counter() - t0, kept)

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
