"""The super-batch step: n base batches -> scores -> selected indices -> the yielded sub-batch.

A :class:`Producer` runs one pass of it for :mod:`jeststream.loader_pass`, in two calls that the
asynchronous path puts in two threads (``draw_and_score``, ``select``) and the synchronous path
runs inline. Invariants: the producer never writes the loader's state; what it drew and counted
travels with each item (:class:`~jeststream.loader_state.Drawn`), and with the end of the pass in
``Producer.leftover``, for the consumer to commit. The selection settings are a frozen
:class:`SelectionSpec`, validated once by the loader.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from jeststream.batch import batch_size as _batch_size
from jeststream.batch import concat_batches, find_keys, iter_tensors
from jeststream.deferred import Materializer
from jeststream.diagnostics import BatchLearnability, measure_draws
from jeststream.loader_state import Drawn
from jeststream.losses import CRITERIA, Embeddings
from jeststream.pipeline import END, to_device
from jeststream.scoring import ScoreResult
from jeststream.selection import LOSSES, example_scores, joint_sample_from_embeddings
from jeststream.snapshot import Stopped

if TYPE_CHECKING:
    from jeststream.loader import JESTLoader

__all__ = ["SelectionInfo", "SelectionSpec", "register_selection_hook"]

logger = logging.getLogger("jeststream.loader")  # the loader's messages, as before the split

DEFAULT_N_CHUNKS = 16
BAD_SCORES = ("raise", "uniform")


@dataclasses.dataclass(frozen=True)
class SelectionSpec:
    """How a super-batch's scores become a selection; validated on construction.

    ``n_chunks=None`` is min(16, b), resolved by :meth:`for_batch` once b is known.
    ``prefilter`` q < 1 keeps the top ceil(q * B) of a super-batch by the reference's score
    (at least the batch it yields) before the learner scores it (:func:`prefilter_keep`).
    """

    loss: str = "sigmoid"
    criterion: str = "learnability"
    n_chunks: int | None = None
    temperature: float = 1.0
    on_bad_scores: str = "raise"
    prefilter: float = 1.0

    def __post_init__(self) -> None:
        n_chunks, temperature = self.n_chunks, self.temperature
        if n_chunks is not None and (
            isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1
        ):
            raise ValueError(f"n_chunks must be an int >= 1 or None (min(16, b)), got {n_chunks!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSSES}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r} is not one of {CRITERIA}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        object.__setattr__(self, "temperature", float(temperature))
        if self.on_bad_scores not in BAD_SCORES:
            raise ValueError(f"on_bad_scores={self.on_bad_scores!r} is not one of {BAD_SCORES}")
        q = self.prefilter
        if (
            isinstance(q, bool)
            or not isinstance(q, numbers.Real)
            or not math.isfinite(q)
            or not 0 < q <= 1
        ):
            raise ValueError(
                f"prefilter must be a number q with 0 < q <= 1 (the share of each super-batch "
                f"the learner scores; 1 = off), got {q!r}"
            )
        object.__setattr__(self, "prefilter", float(q))

    def chunks(self, b: int | None) -> int:
        """The number of chunks for batch size b (16 or the explicit value while b is unknown)."""
        if self.n_chunks is not None:
            return self.n_chunks
        return DEFAULT_N_CHUNKS if b is None else min(DEFAULT_N_CHUNKS, b)

    def check_batch_size(self, b: int, source: str) -> None:
        """Raise for an explicit n_chunks above b; warn for b = 1 (no contrastive negatives)."""
        if b == 1:
            warnings.warn(
                f"batch size b=1 (from {source}): every yielded batch holds a single example, "
                "so a contrastive loss (CLIP softmax or SigLIP sigmoid) has no negatives in it "
                "and JEST has no joint selection to make; use a base batch size of at least 2",
                UserWarning,
                stacklevel=3,
            )
        if self.n_chunks is not None and self.n_chunks > b:
            raise ValueError(
                f"n_chunks={self.n_chunks} exceeds the batch size b={b}: each chunk must select "
                "at least one example; lower n_chunks (or leave it unset: min(16, b))"
            )

    def for_batch(self, b: int | None) -> SelectionSpec:
        """This spec with n_chunks resolved against b."""
        return dataclasses.replace(self, n_chunks=self.chunks(b))


@dataclasses.dataclass
class SelectionInfo:
    """What happened to one yielded batch.

    indices: positions of the yielded examples in their super-batch (cpu LongTensor[k], draw
    order); scores: their per-example scores (``selection.example_scores``); timings in seconds:
    waited_s (consumer blocked in ``next()``), scored_s (both forwards), selected_s (sampling);
    staleness: yielded batches between the snapshot refresh and this batch's yield;
    batch_learnability: with ``JESTLoader(batch_learnability=True)``, the criterion's score of
    the yielded sub-batch as a whole next to an independent and a uniform draw from the same
    super-batch (:mod:`jeststream.diagnostics`), else None.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    super_batch_mean: float
    selected_mean: float
    waited_s: float
    scored_s: float
    selected_s: float
    snapshot_version: int
    staleness: int
    fallback: bool
    step: int
    epoch: int
    super_batch_size: int
    batch_learnability: BatchLearnability | None = None
    # examples the pre-filter (``JESTLoader(prefilter=q)``) dropped before the learner scored
    # the super-batch; their scores are NaN in the selection log
    prefiltered: int = 0
    # (position, replacement) pairs for deferred records that failed to materialise after
    # selection (:mod:`jeststream.deferred`), each replaced by the next candidate by score:
    # ``indices`` hold the replacements
    replaced: tuple[tuple[int, int], ...] = ()


# -- a public hook on what was scored --------------------------------------------------------

SelectionHook = Callable[[int, "Embeddings | None", "Embeddings | None", torch.Tensor], None]
_HOOKS: dict[int, SelectionHook] = {}
_next_hook_id = 0


class HookHandle:
    """Returned by :func:`register_selection_hook`; ``remove()`` unregisters the hook."""

    def __init__(self, hook_id: int) -> None:
        self.id = hook_id

    def remove(self) -> None:
        _HOOKS.pop(self.id, None)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_selection_hook(hook: SelectionHook) -> HookHandle:
    """Call ``hook(step, learner, reference, indices)`` for each super-batch any JESTLoader in
    this process selects from (like torch's global module hooks): the learner snapshot's and
    the reference's :class:`~jeststream.losses.Embeddings` the sampler got (either may be None
    when the criterion does not use it) and the selected rows (LongTensor, draw order). With
    ``prefilter`` < 1 the embeddings hold the rows the pre-filter kept, and the indices are
    rows of those (``SelectionInfo.indices`` are super-batch positions).

    It runs in the thread that selects (a background thread under scoring="lagged"/"latest"),
    before the batch is yielded, also for a super-batch scored ahead and never yielded; the
    tensors are the loader's: copy what you keep. A hook that raises fails the loader's step.
    Returns a handle whose ``remove()`` (or ``with`` block) unregisters it.
    """
    global _next_hook_id
    if not callable(hook):
        raise TypeError(f"hook must be callable (step, learner, reference, indices), got {hook!r}")
    _next_hook_id += 1
    _HOOKS[_next_hook_id] = hook
    return HookHandle(_next_hook_id)


def _call_hooks(step: int, learner, reference, idx: torch.Tensor) -> None:
    for hook in list(_HOOKS.values()):
        hook(step, learner, reference, idx)


# -- what travels between the two steps and to the consumer ----------------------------------


@dataclasses.dataclass
class Item:
    batch: Any
    info: SelectionInfo
    resume: dict  # loader state right after this super-batch: restoring it draws the next one
    keys: list[str] | None
    all_scores: torch.Tensor  # cpu [B]
    selected: torch.Tensor  # cpu bool [B]
    drawn: Drawn  # what the producer drew and counted for it, for the consumer to commit


@dataclasses.dataclass
class Scored:
    super_batch: Any  # on the scoring device
    size: int
    k: int
    step: int
    base_state: Any
    keys: list[str] | None
    scored: ScoreResult
    drawn: Drawn


def scored_tensors(s: Scored):
    """The tensors a Scored holds (to hand them across streams)."""
    if not isinstance(s, Scored):  # a distributed round's marker: no tensors
        return
    yield from iter_tensors(s.super_batch)
    for e in (s.scored.learner, s.scored.reference):
        if e is not None:
            yield from (t for t in e if isinstance(t, torch.Tensor))


def item_tensors(item: Item):
    return iter_tensors(item.batch)


# -- the per-super-batch functions -----------------------------------------------------------


def bad_examples(
    learner: Embeddings | None, reference: Embeddings | None, size: int
) -> torch.Tensor | None:
    """cpu bool [size] marking examples whose embeddings (either model) are non-finite; all of
    them when a logit scale/bias is; None when everything is finite."""
    bad = torch.zeros(size, dtype=torch.bool)
    for e in (learner, reference):
        if e is None:
            continue
        scalars = [e.logit_scale] + ([] if e.logit_bias is None else [e.logit_bias])
        if not all(bool(torch.isfinite(torch.as_tensor(s)).all()) for s in scalars):
            bad[:] = True
        rows_ok = torch.isfinite(e.image).all(dim=1) & torch.isfinite(e.text).all(dim=1)
        bad |= ~rows_ok.cpu()
    return bad if bool(bad.any()) else None


def score_examples(
    scored: ScoreResult, spec: SelectionSpec, size: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(scores on the scoring device for the sampler, or None; cpu float [size]; cpu bool
    [size] of non-finite examples, or None). The selection maths validates finiteness itself
    (ValueError), so the per-row scan runs only when something is wrong."""
    bad: torch.Tensor | None = None
    try:
        own = example_scores(
            scored.learner, scored.reference, loss=spec.loss, criterion=spec.criterion
        )
        per_example = own.float().cpu()
    except ValueError:
        bad = bad_examples(scored.learner, scored.reference, size)
        if bad is None:  # a genuine error, not bad scores
            raise
        return None, torch.full((size,), math.nan), bad
    if not bool(torch.isfinite(per_example).all()):
        bad = ~torch.isfinite(per_example)
    return own, per_example, bad


def uniform_fallback(
    bad: torch.Tensor, spec: SelectionSpec, step: int, size: int, k: int, generator
) -> torch.Tensor:
    """The NaN/inf policy for one super-batch of a single process: raise, or k uniform draws."""
    n_bad = int(bad.sum())
    if spec.on_bad_scores == "raise":
        raise ValueError(
            f"JEST scores at step {step} have {n_bad} non-finite (NaN/inf) example "
            f"score{'s' if n_bad != 1 else ''} out of {size} in the super-batch; check "
            "the learner/reference outputs, or pass on_bad_scores='uniform' to select "
            "uniformly for such super-batches"
        )
    logger.warning("step %d: %d of %d JEST scores are non-finite; selecting uniformly", step,
                   n_bad, size)
    return torch.randperm(size, generator=generator)[:k]


def sample(
    scored: ScoreResult,
    own_scores: torch.Tensor | None,
    bad: torch.Tensor | None,
    spec: SelectionSpec,
    *,
    k: int,
    size: int,
    step: int,
    generator: torch.Generator,
    rounds: Any = None,
) -> tuple[torch.Tensor, bool]:
    """(cpu indices, uniform fallback?) for one super-batch: joint sampling from this rank's
    embeddings, or under distributed="global" one round with the other ranks (``rounds``)."""
    fallback = bad is not None
    if rounds is not None:  # global selection: the ranks agree on the outcome
        idx, fallback = rounds.sample(
            scored.learner,
            scored.reference,
            k,
            size=size,
            step=step,
            own_scores=None if fallback else own_scores,
            bad_message=None if not fallback else f"{int(bad.sum())} of {size} non-finite",
            spec=spec,
            generator=generator,
        )
        return idx.cpu(), fallback
    if fallback:
        return uniform_fallback(bad, spec, step, size, k, generator), True
    idx = joint_sample_from_embeddings(
        scored.learner,
        scored.reference,
        k,
        loss=spec.loss,
        criterion=spec.criterion,
        n_chunks=min(spec.n_chunks, k),
        temperature=spec.temperature,
        generator=generator,
        own_scores=own_scores,  # the first chunk's logits: not computed twice
    )
    return idx.cpu(), False


def assemble(
    s: Scored,
    idx: torch.Tensor,
    per_example: torch.Tensor,
    *,
    kept: torch.Tensor | None,
    fallback: bool,
    selected_s: float,
    epoch: int,
    resume: dict,
    learnability: BatchLearnability | None,
    materializer: Materializer,
) -> Item:
    """The yielded sub-batch with its SelectionInfo and log fields; ``idx`` and ``per_example``
    in super-batch positions (``per_example`` NaN where the pre-filter dropped the example).
    Deferred fields are materialised for the selected examples only (a thread pool); a record
    that fails is replaced by the next-best candidate by score, so the batch stays k."""
    # Tensors made under inference_mode reject in-place use outside it; these reach the user.
    idx, per_example = idx.clone(), per_example.clone()
    gathered = materializer.gather(
        s.super_batch,
        idx,
        lambda: torch.argsort(per_example.nan_to_num(nan=-math.inf), descending=True),
    )
    idx = gathered.indices
    chosen = per_example[idx]
    mask = torch.zeros(s.size, dtype=torch.bool)
    mask[idx] = True
    scored = per_example if kept is None else per_example[kept]
    info = SelectionInfo(
        indices=idx,
        scores=chosen,
        super_batch_mean=float(scored.mean()),
        selected_mean=float(chosen.mean()),
        waited_s=0.0,
        scored_s=s.scored.seconds,
        selected_s=selected_s,
        snapshot_version=s.scored.version,
        staleness=-1,
        fallback=fallback,
        step=s.step,
        epoch=epoch,
        super_batch_size=s.size,
        batch_learnability=learnability,
        prefiltered=0 if kept is None else s.size - int(kept.numel()),
        replaced=gathered.replaced,
    )
    return Item(gathered.batch, info, resume, s.keys, per_example, mask, s.drawn)


def prefilter_size(q: float, size: int, k: int) -> int:
    """How many of ``size`` examples the pre-filter keeps: ceil(q * size), at least the k the
    super-batch yields (b for a full one), at most size."""
    return min(size, max(k, math.ceil(q * size - 1e-9)))


def prefilter_keep(
    reference: Embeddings, spec: SelectionSpec, k: int
) -> torch.Tensor | None:
    """The pre-filter: the ascending super-batch positions of the top ``prefilter_size`` examples
    by the reference-only score (the ``easy_reference`` criterion's per-example score), or None
    (keep all) when q = 1, when that is everything, or when the reference's scores are not
    finite (the selection's NaN/inf policy then sees the whole super-batch)."""
    size = reference.image.shape[0]
    m = prefilter_size(spec.prefilter, size, k)
    if m >= size:
        return None
    try:
        scores = example_scores(None, reference, loss=spec.loss, criterion="easy_reference")
    except ValueError:  # non-finite reference embeddings: left to the NaN/inf policy
        return None
    if not bool(torch.isfinite(scores).all()):
        return None
    top = torch.topk(scores.float().cpu(), m, sorted=False).indices
    return torch.sort(top).values


class Producer:
    """One pass over the base loader, in two steps: ``draw_and_score`` (base batches ->
    super-batch -> both forwards) and ``select`` (scores -> indices -> sub-batch). The async
    path runs them in two threads so that selecting super-batch k overlaps with scoring k+1;
    the sync path runs the same two calls inline -- hence the same results for the same seed.

    Reads the loader's configuration (frozen after construction) and writes nothing of it: its
    own pass-local fields (position, b as learned from the first base batch, the short-batch
    warning) are copied from the loader's cursor when the pass starts. Holds no reference to
    the consumer-side iterator (so dropping the iterator stops the thread).
    """

    def __init__(self, loader: JESTLoader, base_iter: Any, step: int, start: int) -> None:
        cursor = loader._cursor
        self.loader = loader
        self.spec: SelectionSpec = loader._spec
        self.base_iter = base_iter
        self.step = step  # global index of the next super-batch == index of its yielded batch
        self.start = start  # the pass's first step (the snapshot schedule counts from it)
        self.epoch = cursor.epoch  # recorded once per pass: set_epoch() mid-pass is for the next
        self.b, self.b_source = cursor.b, cursor.b_source
        self.warned_short = cursor.warned_short
        self.activity = "starting"  # what the producer is doing (named by timeout errors)
        self.short: str | None = None  # a base batch shorter than b, until the pass ends
        # what the pass's end drew and dropped; read by the consumer once END has reached it
        self.leftover = Drawn()
        # distributed="global": the pass's per-super-batch rounds (jeststream.distributed)
        self.rounds = loader._dist.start_pass() if loader._dist is not None else None

    def _drawn(self, base_batches: int, dropped: int = 0, warned: bool = False) -> Drawn:
        return Drawn(base_batches, dropped, self.b, self.b_source, warned)

    def draw_and_score(self, should_stop: Callable[[], bool]) -> Any:
        ld = self.loader
        if self.base_iter is None:
            return END
        base_batches = []
        warned_before = self.warned_short
        for i in range(ld.n):
            if should_stop():
                return None
            self.activity = f"next() on the base loader (base batch {i + 1} of {ld.n} for step {self.step})"
            try:
                batch = next(self.base_iter)
            except StopIteration:
                self.base_iter = None  # drop it now: a DataLoader iterator frees its workers
                break
            self.check_size(_batch_size(batch), f"base batch {i + 1} of {ld.n} for step {self.step}")
            base_batches.append(batch)
        warned = self.warned_short and not warned_before
        if not base_batches or (len(base_batches) < ld.n and ld.drop_last):
            dropped = 0
            if base_batches:  # drop_last: count what is thrown away, never drop silently
                dropped = sum(_batch_size(b) for b in base_batches)
                logger.info(
                    "drop_last: %d base batch(es) at the end of the pass make no full super-batch "
                    "of %d; dropped (stats['dropped_examples'])",
                    len(base_batches),
                    ld.n,
                )
            self.leftover = self._drawn(len(base_batches), dropped, warned)
            self.base_iter = None
            self.activity = "finished"
            return END
        drawn = self._drawn(len(base_batches), warned=warned)
        # the base's state *before* the next super-batch is drawn (torchdata Prefetcher-style)
        base_state = ld._base_state()
        step = self.step
        self.step += 1

        # Move before concatenating: pinned base batches go straight to the device, and the
        # concatenation then runs there instead of as a host memcpy.
        super_batch = concat_batches([to_device(b, ld.device) for b in base_batches])
        del base_batches
        size = _batch_size(super_batch)
        k = max(1, min(size, math.floor(size / ld.n + 0.5)))
        want_keys = ld._log.enabled or ld._scorer.needs_keys
        keys = find_keys(super_batch, ld.key_fn, size=size) if want_keys else None
        keep = None
        if self.spec.prefilter < 1:  # the learner scores the reference's top share only

            def keep(reference: Embeddings, k: int = k) -> torch.Tensor | None:
                return prefilter_keep(reference, self.spec, k)

        snap_step = ld._scheduled(step, self.start)
        self.activity = (
            f"scoring step {step}"
            + ("" if snap_step is None else f" (waiting for / using the snapshot of step {snap_step})")
        )
        try:
            scored = ld._scorer(
                super_batch, size, snapshot_step=snap_step, should_stop=should_stop, keys=keys,
                keep=keep,
            )
        except Stopped:
            return None
        self.activity = f"selecting step {step}"
        return Scored(super_batch, size, k, step, base_state, keys, scored, drawn)

    def check_size(self, size: int, where: str) -> None:
        """One base batch's size against b: the first batch sets b when the base declares none;
        a larger one raises (the loader would yield more than ``batch_size``); a shorter one is
        legitimate at the end of the pass (drop_last=False), and warned about once when more
        base batches follow it."""
        if self.b is None:
            self.spec.check_batch_size(size, "the first base batch")
            self.b, self.b_source = size, "the first base batch"
            return
        b = self.b
        if size > b:
            raise ValueError(
                f"{where} has {size} examples, more than the batch size b={b} (from "
                f"{self.b_source}): JESTLoader yields batches of b and sizes its selection from "
                "it, so a larger base batch would make a larger yielded one. Make the base "
                "loader yield batches of one size (a shorter one only where the data runs out), "
                "e.g. DataLoader(batch_size=b) or webdataset's .batched(b)"
            )
        if self.short is not None and not self.warned_short:
            self.warned_short = True
            warnings.warn(
                f"the base batch size changed in the middle of a pass: {self.short} has fewer "
                f"examples than b={b} and more base batches follow it, so the yielded batch "
                "of its super-batch has round(size / n) examples, not b. webdataset's "
                ".batched(b) does this with several workers (partial=True, its default: pass "
                "partial=False); otherwise check the base loader (warned once)",
                UserWarning,
                stacklevel=2,
            )
        self.short = f"{where} ({size} examples)" if size < b else None

    def select(self, s: Scored) -> Item:
        ld = self.loader
        spec = self.spec.for_batch(s.drawn.b)
        kept = s.scored.kept  # None, or the rows the pre-filter kept: selection runs on those
        m = s.size if kept is None else int(kept.numel())
        t0 = time.perf_counter()
        with torch.inference_mode():
            own_scores, scores, bad = score_examples(s.scored, spec, m)
            idx, fallback = sample(
                s.scored, own_scores, bad, spec, k=s.k, size=m, step=s.step,
                generator=ld._generator, rounds=self.rounds,
            )
        selected_s = time.perf_counter() - t0
        if _HOOKS:
            _call_hooks(s.step, s.scored.learner, s.scored.reference, idx)
        learnability = None  # measured after the draw, with its own generator: changes nothing
        if ld.batch_learnability and not fallback:
            learnability = measure_draws(
                s.scored.learner,
                s.scored.reference,
                idx,
                loss=spec.loss,
                criterion=spec.criterion,
                temperature=spec.temperature,
                seed=(ld.seed, self.epoch, s.step),
            )
        if kept is not None:  # back to super-batch positions
            idx = kept[idx]
            full = torch.full((s.size,), math.nan)
            full[kept] = scores
            scores = full
        resume = ld._make_state(s.base_state, s.step + 1, self.start, self.epoch)
        return assemble(
            s, idx, scores, kept=kept, fallback=fallback, selected_s=selected_s,
            epoch=self.epoch, resume=resume, learnability=learnability,
            materializer=ld._materializer,
        )

    def produce(self, should_stop: Callable[[], bool]) -> Any:
        """Step 1 (thread 1); under global selection its end or failure is told to every rank."""
        if self.rounds is None:
            return self.draw_and_score(should_stop)
        return self.rounds.produce(self.draw_and_score, should_stop, self.step)

    def finish(self, s: Any) -> Any:
        """Step 2 (thread 2); under global selection each super-batch is one round."""
        if self.rounds is None:
            return self.select(s)
        return self.rounds.finish(self.select, s, size=lambda s: s.size)

    def __call__(self, should_stop: Callable[[], bool]) -> Any:
        """Both steps inline (the sync path)."""
        s = self.produce(should_stop)
        return s if s is None or s is END else self.finish(s)
