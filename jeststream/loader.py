"""JESTLoader: the user-facing, drop-in data loader that does joint example selection.

    loader = JESTLoader(base_loader, learner, reference, ratio=0.2)
    for images, texts in loader:     # same structure and batch size as base_loader's
        ...                          # unchanged training step

Each yielded batch is selected from a super-batch of n = round(1/ratio) consecutive base
batches, scored by a snapshot of the learner and by the frozen reference. This module is the
facade: argument validation, the public surface and ``state_dict``/``load_state_dict``. The
super-batch step is :mod:`jeststream.superbatch`, a pass :mod:`jeststream.loader_pass`, the
state :mod:`jeststream.loader_state` (one cursor, written on the consumer's thread only), the
threads :mod:`jeststream.pipeline`. The configuration the producer reads is frozen after
construction: setting it raises AttributeError.
"""

from __future__ import annotations

import logging
import numbers
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from jeststream.deferred import Materializer
from jeststream.distributed import Coordinator, check_not_sharded, check_resume, resolve_mode
from jeststream.loader_args import (
    SCORING,
    check_distributed_options,
    check_models,
    check_options,
    model_loss,
    resolve_ratio,
    resolve_scoring,
    resolve_selection_log,
)
from jeststream.loader_log import LoaderLog
from jeststream.loader_pass import JESTIterator
from jeststream.loader_state import Cursor, check_state, epoch_seed, make_state
from jeststream.losses import criterion_weights
from jeststream.reference_cache import ReferenceCache
from jeststream.scoring import EmbedFn, Scorer
from jeststream.selection_log import SelectionLog
from jeststream.snapshot import (
    LearnerSnapshot,
    scheduled_step,
    scoring_device,
)
from jeststream.superbatch import (
    Item,
    SelectionInfo,
    SelectionSpec,
    register_selection_hook,
)

__all__ = [
    "JESTLoader", "SelectionInfo", "SCORING", "register_selection_hook", "resolve_scoring"
]

logger = logging.getLogger(__name__)

# read by the producer thread: fixed once the loader is built (as DataLoader does)
_FROZEN = frozenset({
    "base_loader", "n", "ratio", "n_chunks", "loss", "criterion", "temperature", "on_bad_scores",
    "refresh_every", "scoring", "async_scoring", "deterministic", "prefetch", "seed", "drop_last",
    "key_fn", "batch_learnability", "timeout", "device", "epoch", "prefilter",
})


class JESTLoader:
    """Wrap ``base_loader`` so that each yielded batch is JEST-selected from n base batches.

    Args:
        base_loader: iterable of batches of b examples (any tuple/list/dict structure).
        learner: the live model being trained (DDP / torch.compile wrappers are unwrapped).
        reference: frozen reference model (None only with ``criterion="hard_learner"``), or a
            :class:`~jeststream.reference_cache.ReferenceCache` of its embeddings (looked up by
            per-example key instead of running it: the batches must carry keys, see key_fn).
        ratio: filtering ratio b/B; n = round(1/ratio) base batches make a super-batch.
        loss: "sigmoid" (SigLIP) or "softmax" (CLIP): the loss the learner trains with. None
            (default): the model's -- "sigmoid" for a model with a logit bias (open_clip SigLIP,
            ``transformers`` SiglipModel / Siglip2Model), "softmax" for one without (open_clip
            CLIP, CLIPModel), read from the learner (else the reference or its cache); for a
            model jeststream does not recognise, "sigmoid" (and a warning if its embed returns
            no bias). A loss that contradicts the learner's embeddings (sigmoid without a bias,
            softmax with one) raises at the first scored super-batch; the reference's warns.
        n_chunks, criterion, temperature: passed to the joint sampler.
        embed: ``fn(model, batch) -> Embeddings``; default: ``jeststream.embed.default_embed``
            (open_clip models by duck typing, ``transformers`` CLIP/SigLIP models); a model it
            does not know raises TypeError here, at construction.
        refresh_every: copy the live learner into the snapshot every this many yielded
            batches (0: only at the start of each pass).
        snapshot_dtype: optional dtype of the learner snapshot (e.g. torch.bfloat16).
        scoring: which learner weights score a super-batch, and where:
            "sync": inline in the caller's thread with the current learner (lag 0);
            "lagged": a background thread (its own stream on an accelerator) scores super-batch
            t with the snapshot taken after step t - ``prefetch``, so runs repeat exactly;
            "latest": a background thread scores with whatever snapshot is newest
            (timing-dependent: runs do not repeat); "auto" (default): "sync" on the CPU, where
            overlap buys no wall time, "lagged" with ``prefetch=1`` on an accelerator. Each step
            of lag costs learning speed (measured in ``docs/performance.md``).
        prefetch: super-batches scored ahead by the background thread (a bounded queue); under
            "lagged" also the lag. Default 1.
        async_scoring, deterministic: deprecated spellings of ``scoring`` (``DeprecationWarning``):
            (True, False) is "latest", (True, True) "lagged", (False, False) "sync"; (False, True)
            runs the "lagged" schedule inline. Their default prefetch stays 2.
        device: scoring device; defaults to the learner's.
        seed: seeds the loader's own CPU generator (sampling is device-independent).
        drop_last: drop a trailing super-batch of fewer than n base batches.
        score_transform: ``batch -> batch`` applied to the super-batch before scoring only.
        score_resolution: score the learner snapshot on images resized to this side (pixels);
            an open_clip ViT runs with resampled positional embeddings (``jeststream.low_res``).
            The reference, the live learner and the yielded batch are unchanged.
        on_bad_scores: "raise" or "uniform" for super-batches with NaN/inf scores.
        prefilter: q with 0 < q <= 1 (default 1: off). Rank each super-batch of B examples by
            the reference's score alone (the ``easy_reference`` criterion's per-example score,
            from a ReferenceCache or the reference forward, which runs first), keep the top
            ceil(q * B), run the learner snapshot's forward on those only (1 - q of its scoring
            FLOPs saved) and select jointly among them. A q that would keep fewer examples than
            the yielded batch holds keeps that many (b for a full super-batch). The yielded
            batch, ``SelectionInfo.indices`` and the selection log stay in super-batch
            positions; the dropped examples are logged with a NaN score and not selected, and
            ``SelectionInfo.prefiltered`` counts them. Needs a reference. Under
            distributed="global" each rank pre-filters its own super-batch before the rounds.
        return_info: deprecated: yield ``(batch, SelectionInfo)`` instead of ``batch``. Read
            ``loader.last_info`` after each batch instead (the batch structure stays the base's).
        batch_learnability: also measure each yielded sub-batch's learnability as a whole next
            to an independent and a uniform draw of its size (``SelectionInfo.batch_learnability``
            and the selection log's columns; :mod:`jeststream.diagnostics`). Its own generator:
            the selection is the same with or without it.
        selection_log: a path, or a :class:`~jeststream.selection_log.SelectionLog` that carries
            its own mode. A path is opened at the first yielded batch: it overwrites an old log
            there, but appends after ``load_state_dict``. To append always (a run resumed from a
            checkpoint that holds no loader state), pass ``SelectionLog(path, mode="a")``. The
            loader closes the log when it is closed.
        selection_log_mode: deprecated: "a" is ``selection_log=SelectionLog(path, mode="a")``,
            "w" is ``SelectionLog(path, mode="w")``.
        key_fn: ``batch -> list[str]`` of per-example keys for the selection log and a
            reference cache (default: ``jeststream.batch.find_keys``'s rules).
        timeout: seconds the consumer waits for the next selected batch, and a snapshot wait
            may take, before a ``TimeoutError`` that names the stuck stage (e.g. ``next()`` on
            the base loader); also bounds the collectives under distributed="global". None
            (default) waits for ever.
        distributed: "global": under torch.distributed, select from the super-batches of all
            ranks as from one (each rank still yields b of its own examples; the ranks
            all-gather the embeddings of each chunk they draw, :mod:`jeststream.distributed`),
            end every pass together when any rank's base loader ends, and raise on every rank
            when one fails; "local": each rank selects from its own super-batch alone, no
            collectives; "auto" (default): "global" when torch.distributed is initialised with
            world size > 1, else None (a single process). Under "global" each rank's generator
            is seeded by (seed, rank, epoch), the group's collectives wait at most ``timeout``
            seconds (torch's default when None), and every rank must build its loader, start
            and leave each pass at the same points (it is collective).
        process_group: the ranks that select together and the backend of the loader's own
            process group (default: all ranks, the default group's backend).
        materialise_workers: threads that materialise the selected examples of
            :class:`~jeststream.deferred.Deferred` fields (a base loader built with
            ``deferred=True``); 0: on the producer's thread. Started at the first such batch.
    """

    def __init__(
        self,
        base_loader: Any,
        learner: nn.Module,
        reference: nn.Module | ReferenceCache | None,
        ratio: float = 0.2,
        *,
        n_chunks: int | None = None,
        loss: str | None = None,
        criterion: str = "learnability",
        temperature: float = 1.0,
        embed: EmbedFn | None = None,
        refresh_every: int = 1,
        snapshot_dtype: torch.dtype | None = None,
        scoring: str = "auto",
        prefetch: int | None = None,
        async_scoring: bool | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
        drop_last: bool = True,
        score_transform: Callable[[Any], Any] | None = None,
        score_resolution: int | None = None,
        on_bad_scores: str = "raise",
        prefilter: float = 1.0,
        return_info: bool = False,
        selection_log: str | os.PathLike | SelectionLog | None = None,
        selection_log_mode: str | None = None,
        key_fn: Callable[[Any], Sequence[str]] | None = None,
        deterministic: bool | None = None,
        timeout: float | None = None,
        batch_learnability: bool = False,
        distributed: str | None = "auto",
        process_group: Any = None,
        materialise_workers: int = 4,
    ) -> None:
        self._closed = True  # until construction succeeds, so __del__ has nothing to do
        self._materializer = Materializer(materialise_workers)  # threads start on first use
        self._dist: Coordinator | None = None
        if not hasattr(base_loader, "__iter__"):
            raise TypeError(f"base_loader must be iterable, got {type(base_loader).__name__}")
        check_models(learner, reference)
        n = resolve_ratio(ratio)
        loss, loss_fallback = model_loss(loss, learner, reference)
        spec = SelectionSpec(loss, criterion, n_chunks, temperature, on_bad_scores, prefilter)
        check_options(
            reference=reference, spec=spec, timeout=timeout, refresh_every=refresh_every,
            prefetch=prefetch, seed=seed, key_fn=key_fn, return_info=return_info,
        )
        dist_mode = resolve_mode(distributed, process_group)
        check_distributed_options(dist_mode, batch_learnability)
        check_not_sharded(learner)

        self.base_loader = base_loader
        self.n = n
        self.ratio = float(ratio)
        # loss, criterion, n_chunks (None: min(16, b) once b is known), temperature, NaN policy
        self._spec = spec
        self.refresh_every = refresh_every
        # the scoring schedule: scoring= names it; the loader runs on these three
        self.scoring, self.async_scoring, self.deterministic, self.prefetch = resolve_scoring(
            scoring, async_scoring, deterministic, prefetch, scoring_device(learner, device)
        )
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.return_info = bool(return_info)
        self.key_fn = key_fn
        self.batch_learnability = bool(batch_learnability)
        self.timeout = None if timeout is None else float(timeout)
        self.last_info: SelectionInfo | None = None
        # the loader's state and counters, written on the consumer's thread only
        self._cursor = Cursor()
        base_b = getattr(base_loader, "batch_size", None)
        if isinstance(base_b, int) and not isinstance(base_b, bool) and base_b > 0:
            spec.check_batch_size(base_b, "base_loader.batch_size")
            self._cursor.set_batch_size(base_b, "base_loader.batch_size")

        # Deterministic scoring with lag L holds the snapshots of steps t-L..t: L + 1 copies.
        # Otherwise two, so that a refresh writes one while a forward reads the other.
        self._snapshot = LearnerSnapshot(
            learner,
            dtype=snapshot_dtype,
            device=device,
            max_copies=max(2, self.prefetch + 1) if self.deterministic else 2,
            timeout=self.timeout,
        )
        self.device = self._snapshot.device
        # easy_reference gives the learner no weight: its snapshot forward would be wasted
        self._scorer = Scorer(
            self._snapshot,
            reference,
            embed=embed,
            score_transform=score_transform,
            score_resolution=score_resolution,
            score_learner=criterion_weights(criterion)[0] != 0,
            loss=loss,
            loss_fallback=loss_fallback,
        )
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._active: weakref.ref[JESTIterator] | None = None
        # A path is opened at the first yielded batch (overwriting, or appending after
        # load_state_dict()); a SelectionLog the caller opened keeps its own mode
        self._log = LoaderLog(*resolve_selection_log(selection_log, selection_log_mode))
        if dist_mode is not None:  # last: its process group is made only for a built loader
            self._dist = Coordinator(dist_mode, process_group, self.timeout)
            # per rank from the start (a single process keeps `seed`)
            self._generator.manual_seed(self._epoch_generator_seed(0))
        self._closed = False
        self._built = True  # from here on the producer's configuration is fixed (__setattr__)

    # -- sizes -------------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FROZEN and self.__dict__.get("_built", False):
            raise AttributeError(
                f"JESTLoader.{name} cannot be changed after construction: the loader's producer "
                f"reads it while a pass runs; build a new JESTLoader with {name}={value!r}"
            )
        super().__setattr__(name, value)

    @property
    def loss(self) -> str:
        return self._spec.loss

    @property
    def criterion(self) -> str:
        return self._spec.criterion

    @property
    def temperature(self) -> float:
        return self._spec.temperature

    @property
    def on_bad_scores(self) -> str:
        return self._spec.on_bad_scores

    @property
    def prefilter(self) -> float:
        return self._spec.prefilter

    @property
    def n_chunks(self) -> int:
        """Chunks of the joint sampler: as given, else min(16, b) (16 until b is known)."""
        return self._spec.chunks(self._cursor.b)

    @property
    def epoch(self) -> int:
        """The epoch of the next pass, or of the running one (:meth:`set_epoch` sets it)."""
        return self._cursor.epoch

    # -- the snapshot schedule ---------------------------------------------------------------

    def _lag(self) -> int | None:
        """Steps between the snapshot and the super-batch it scores: ``prefetch`` when
        deterministic, 0 for synchronous scoring, None (whatever is latest) otherwise."""
        if self.deterministic:
            return self.prefetch
        return None if self.async_scoring else 0

    def _scheduled(self, step: int, start: int) -> int | None:
        """The step whose snapshot scores super-batch ``step`` (None: whatever is latest). It is
        also the pool's floor: no super-batch from ``step`` on needs a snapshot taken before."""
        lag = self._lag()
        if lag is None:
            return None
        return scheduled_step(step, start=start, lag=lag, refresh_every=self.refresh_every)

    @property
    def batch_size(self) -> int | None:
        """b: examples per yielded batch (None until known for base loaders without batch_size)."""
        return self._cursor.b

    @property
    def super_batch_size(self) -> int | None:
        """B = n * b."""
        return None if self._cursor.b is None else self.n * self._cursor.b

    def __len__(self) -> int:
        try:
            base_len = len(self.base_loader)
        except TypeError:
            raise TypeError(
                f"the base loader ({type(self.base_loader).__name__}) has no length, so neither "
                "has the JESTLoader"
            ) from None
        return base_len // self.n if self.drop_last else -(-base_len // self.n)

    @property
    def num_batches(self) -> int:
        """Yielded batches per epoch (open_clip_train reads this)."""
        base = getattr(self.base_loader, "num_batches", None)
        if isinstance(base, int):
            return base // self.n if self.drop_last else -(-base // self.n)
        return len(self)

    @property
    def num_samples(self) -> int:
        """Training examples yielded per epoch (open_clip_train reads this)."""
        if self._cursor.b is not None:
            return self.num_batches * self._cursor.b
        base = getattr(self.base_loader, "num_samples", None)
        if isinstance(base, int):
            return base // self.n
        raise TypeError("num_samples is unknown until the first batch (the base has no batch_size)")

    # -- passthrough -------------------------------------------------------------------------

    @property
    def dataset(self) -> Any:
        return self.base_loader.dataset

    @property
    def sampler(self) -> Any:
        return self.base_loader.sampler

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch and pass it to the base loader (or its sampler) when it takes one.

        Call it between passes, like ``DistributedSampler.set_epoch``. The sampler's generator is
        reseeded from ``(seed, epoch)``, so each epoch's selection randomness is reproducible
        without the loader's state (open_clip_train resumes from epoch checkpoints that do not
        hold it); right after ``load_state_dict`` for the same epoch the restored generator is kept.
        The reseed takes effect when the next pass starts, never in the middle of a running one.
        """
        epoch = int(epoch)
        cursor = self._cursor
        if not (cursor.restored and epoch == cursor.epoch):
            cursor.pending_epoch = epoch
        cursor.epoch = epoch
        if hasattr(self.base_loader, "set_epoch"):
            self.base_loader.set_epoch(epoch)
        else:
            sampler = getattr(self.base_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    @property
    def restore_pending(self) -> bool:
        """True after :meth:`load_state_dict` until the next batch is yielded: the restored
        position stands (:meth:`set_step` refuses to move it)."""
        return self._cursor.restored

    def set_step(self, step: int) -> None:
        """Number the next yielded batch ``step`` (and the selection log's records from it).

        For a training loop with its own step axis, e.g. open_clip_train's ``epoch *
        num_batches``, so that a run resumed from an epoch checkpoint that holds no loader state
        counts its super-batches as the uninterrupted run did. Call it between passes: a running
        pass is ended first (its iterator stops). The snapshot schedule counts from ``step``. Not
        after :meth:`load_state_dict` before the next yielded batch (``restore_pending``): the
        restored state has its own step, and this raises RuntimeError.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self._cursor.restored:
            raise RuntimeError(
                "set_step() right after load_state_dict(): the restored state's step "
                f"({self._cursor.step}) stands; iterate, or restore a different state"
            )
        self._close_active()  # between passes; a running one would hold snapshot copies
        self._cursor.step = int(step)
        self._snapshot.reset_steps(self._cursor.step)

    @property
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batches": self._cursor.step,
            "fallbacks": self._cursor.fallbacks,
            "base_batches": self._cursor.base_batches,
            "dropped_examples": self._cursor.dropped,
            # deferred records that failed to materialise, each replaced by the next candidate
            "replaced_examples": self._cursor.replaced,
        }
        base_stats = getattr(self.base_loader, "stats", None)
        if isinstance(base_stats, dict) and "bad_shards" in base_stats:
            out["bad_shards"] = base_stats["bad_shards"]
        elif hasattr(self.base_loader, "bad_shards"):
            out["bad_shards"] = self.base_loader.bad_shards
        if self._dist is not None:
            out["distributed"] = self._dist.stats()
        return out

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> JESTIterator:
        """Start a pass (an epoch) over the base loader.

        One pass at a time, as a DataLoader without persistent workers makes a new iterator per
        ``for``: a new ``iter(loader)`` (or ``load_state_dict``) ends the pass before it, stops
        its producer and starts from the last yielded batch. So ``break`` and then a new ``for``
        simply works; but an unfinished earlier iterator is *superseded*, not silently ended:
        its next ``next()`` raises RuntimeError saying so (``zip(loader, loader)`` raises at its
        first step: build a second JESTLoader to iterate two passes at once). An iterator that
        had finished keeps raising StopIteration; one closed with ``it.close()`` ends quietly.
        """
        if self._closed:
            raise RuntimeError("this JESTLoader was closed; build a new one to iterate again")
        self._close_active("a new iter(loader)")
        it = JESTIterator.start(self)
        self._active = weakref.ref(it)
        return it

    def _close_active(self, superseded_by: str | None = None) -> None:
        """Close the live pass, if any; ``superseded_by`` names the call that ends it, and its
        iterator's next ``next()`` raises naming it (unless the pass had finished)."""
        it = self._active() if self._active is not None else None
        if it is not None:
            it.close(
                None
                if superseded_by is None
                else (
                    f"this JESTLoader pass was superseded by {superseded_by}: a JESTLoader runs "
                    "one pass at a time (it has one base iterator, one generator and one "
                    "resumable state). Finish, break out of or close() a pass's iterator "
                    "before starting the next; to iterate two passes at once (e.g. "
                    "zip(loader, loader)), build a second JESTLoader"
                )
            )
        self._active = None

    def _epoch_generator_seed(self, epoch: int) -> int:
        """The sampling generator's seed for ``epoch``: per (seed, rank, epoch) under
        torch.distributed ("global" or "local": ranks never share a random stream), per
        (seed, epoch) in a single process."""
        if self._dist is not None:
            return self._dist.seed(self.seed, epoch)
        return epoch_seed(self.seed, epoch)

    def _apply_pending_seed(self) -> None:
        if self._cursor.pending_epoch is not None:
            self._generator.manual_seed(self._epoch_generator_seed(self._cursor.pending_epoch))
            self._cursor.pending_epoch = None

    def _run_config(self, b: int | None) -> dict[str, Any]:
        """The selection settings recorded beside the selection log (``LOG.run.json``), which
        ``jeststream report`` shows."""
        dist = self._dist
        return {
            "ratio": self.ratio,
            "n": self.n,
            "batch_size": b,
            "n_chunks": self._spec.chunks(b),
            "criterion": self._spec.criterion,
            "loss": self._spec.loss,
            "temperature": self._spec.temperature,
            "prefilter": self._spec.prefilter,
            "refresh_every": self.refresh_every,
            "scoring": self.scoring,
            "deterministic": self.deterministic,
            "seed": self.seed,
            "distributed": None if dist is None else dist.mode,
            "rank": 0 if dist is None else dist.rank,
            "world_size": 1 if dist is None else dist.world_size,
        }

    def _on_yield(self, item: Item, info: SelectionInfo) -> None:
        """Log the yielded batch, then commit it to the cursor (the consumer's thread)."""
        # Everything that can fail comes first: a failing next() leaves the state at the last
        # yielded batch, so a restore (or the caller's retry from a checkpoint) loses nothing.
        b = self._cursor.b if self._cursor.b is not None else item.drawn.b
        self._log.write(item, info, lambda: self._run_config(b))
        self._cursor.commit_yield(
            info.step, item.resume, info.fallback, item.drawn, len(info.replaced)
        )
        self.last_info = info

    def close(self) -> None:
        """Stop the producer, free its buffers and close the selection log. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._close_active()
        self._log.close()
        if self._dist is not None:
            self._dist.close()
        self._materializer.close()

    def __enter__(self) -> JESTLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from GC
            pass

    # -- state -------------------------------------------------------------------------------

    def _base_state(self) -> Any:
        fn = getattr(self.base_loader, "state_dict", None)
        return fn() if callable(fn) else None

    def _make_state(self, base_state: Any, step: int, pass_start: int | None, epoch: int) -> dict:
        """A resume state with the generator as it is now (:func:`loader_state.make_state`)."""
        dist_state = {"world_size": 1} if self._dist is None else self._dist.state()
        return make_state(
            base_state, self._generator.get_state(), step, pass_start, epoch, dist_state
        )

    def state_dict(self, include_snapshot: bool = False) -> dict[str, Any]:
        """Resumable state at the super-batch boundary after the last yielded batch.

        Super-batches the producer scored ahead are not part of it: a restore draws them again.
        The selection log is flushed first (durably), so that everything this checkpoint covers
        is on disk.

        Args:
            include_snapshot: also save the learner-snapshot weights that the next super-batches
                of this pass are scheduled to be scored with (one copy of the learner per saved
                version, on the CPU). Without them a restore in the middle of a pass scores
                those super-batches with the learner as restored (the weights after the last
                yielded step) instead of the older snapshots: with synchronous or deterministic
                scoring the first ``L`` super-batches after the restore (L = ``prefetch`` when
                deterministic, else up to ``refresh_every - 1``) may select differently (and a
                learner trained on them diverges from then on). At a pass boundary nothing
                differs: every pass starts by copying the live learner.
        """
        cursor = self._cursor
        self._log.flush()
        if cursor.resume is not None:
            state = cursor.checkpoint()
        else:
            self._apply_pending_seed()  # no pass has started, so no producer uses the generator
            state = self._make_state(self._base_state(), cursor.step, cursor.step, cursor.epoch)
            state["fallbacks"] = cursor.fallbacks
        if include_snapshot:
            start = state["pass_start"]
            mid_pass = start is not None and start < state["step"]
            snap = None
            if mid_pass and cursor.loaded_snapshot is not None:
                snap = cursor.loaded_snapshot  # restored and nothing yielded since
            elif mid_pass:
                snap = self._snapshot.state_dict(self._scheduled(state["step"], start))
                if not snap["versions"]:  # restored without weights, not iterated yet
                    snap = None
            state["snapshot"] = snap
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the next iteration continues from that boundary."""
        if not callable(getattr(self.base_loader, "load_state_dict", None)):
            raise TypeError(
                f"cannot restore: the base loader ({type(self.base_loader).__name__}) has no "
                "load_state_dict(); use a resumable base such as "
                "torchdata.stateful_dataloader.StatefulDataLoader"
            )
        state = check_state(state)
        if self._dist is None:
            check_resume(state, 1, 0)
        else:
            check_resume(state, self._dist.world_size, self._dist.rank)
        # scored-ahead super-batches are dropped and drawn again, by a new iter(loader)
        self._close_active("load_state_dict()")
        if state.get("snapshot") is not None:
            self._snapshot.load_state_dict(state["snapshot"])
        if state["base"] is not None:
            self.base_loader.load_state_dict(state["base"])
        self._generator.set_state(state["generator"])
        self._cursor.restore(state)
        self._log.restored()
        if self._cursor.loaded_snapshot is None:
            self._snapshot.reset_steps(self._cursor.step)
