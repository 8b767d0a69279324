"""Global-context joint selection across ranks on torch.distributed, and the loader's protocol.

The maths is :func:`jeststream.selection.blocked_joint_sample`: rank r holds its super-batch of
B_r examples, draws exactly k_r of its own, and after chunk 1 takes every candidate's conditional
logit against the examples selected by **all** ranks. :func:`global_joint_sample` runs the same
chunk loop with an all-gather as its transport: after each chunk but the last, the ranks
all-gather the learner and reference embeddings (image, text) of the examples they just drew --
W·c rows of width 2·d per model, never the super-batches. Softmax: chunk 1 scores each example
by its CLIP loss against its own rank's super-batch (all-gathering whole super-batches is what
this design avoids).

Every call starts with one small all-gather (a fixed-size *round* record per rank: status,
sizes, settings and an error message) so that a rank with bad input makes every rank raise,
naming it, instead of leaving the others blocked in the next collective.

For the loader (``JESTLoader(distributed="global")``) this module also owns:

- the process group, made at construction with ``new_group`` over the ranks of the default
  group (or of ``process_group=``), same backend, timeout = the loader's ``timeout`` (torch's
  default when None), so that its collectives never interleave with DDP's on the default group;
- the per-super-batch round (:class:`PassRounds`): every rank contributes one record before
  each super-batch's selection: a full super-batch (select), ended (every rank ends the pass
  together; the examples drawn and left unread are counted per rank in ``stats``), failed
  (every rank raises, naming the failing rank and its error), stopped (the consumer left the
  pass, e.g. ``break``: every rank ends it). All of the loader's collectives run on one thread
  (the selection step), so they are issued in the same order on every rank; a rank that leaves
  a pass contributes its last record when its pipeline has stopped, so a peer blocked in that
  round is released. A rank that died makes the others raise within the group's timeout.
- seeds per (seed, rank, epoch), the world size in the loader state, and the FSDP refusal.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jeststream.losses import CRITERIA, Embeddings
from jeststream.selection import LOSSES, chunk_loop, chunk_sizes, embedding_block

if TYPE_CHECKING:
    from jeststream.superbatch import SelectionSpec

__all__ = [
    "MODES",
    "Coordinator",
    "PassRounds",
    "check_not_sharded",
    "global_joint_sample",
    "rank_seed",
    "resolve_mode",
]

logger = logging.getLogger(__name__)

# Seconds a rank that leaves a pass early waits for its peers to take its last record (at most
# the group's timeout). A peer that is still iterating reaches that round within one
# super-batch's draw and scoring; after this the rank leaves anyway (its group is then unusable
# and the peer raises within the group's timeout).
FAREWELL_TIMEOUT_S = 60.0

MODES = ("auto", "global", "local", None)

# Round record statuses, in increasing precedence of what every rank then does.
OK, BAD_SCORES, ENDED, STOPPED, FAILED, INVALID = range(6)
_STATUS_NAMES = ("ok", "bad scores", "ended", "stopped", "failed", "invalid input")

# version, pass, round, status, step, B, k, n_chunks asked, n_chunks usable, loss, criterion,
# payload width, first model width, payload dtype, examples drawn, message length; temperature
_RECORD = struct.Struct("<16qd")
_RECORD_BYTES = 1024  # one record per rank per round; the rest of it is the error message
_MESSAGE_BYTES = _RECORD_BYTES - _RECORD.size
_VERSION = 1
_DTYPES = (torch.float32, torch.float64)


@dataclasses.dataclass
class _Record:
    status: int
    pass_id: int = -1
    round_id: int = -1
    step: int = -1
    size: int = 0
    k: int = 0
    n_chunks: int = 0
    n_usable: int = 0
    loss: int = -1
    criterion: int = -1
    width: int = 0
    first_width: int = 0
    dtype: int = -1
    drawn: int = 0
    temperature: float = math.nan
    message: str = ""

    def encode(self) -> bytes:
        msg = self.message.encode("utf-8")[:_MESSAGE_BYTES]
        head = _RECORD.pack(
            _VERSION, self.pass_id, self.round_id, self.status, self.step, self.size, self.k,
            self.n_chunks, self.n_usable, self.loss, self.criterion, self.width,
            self.first_width, self.dtype, self.drawn, len(msg), self.temperature,
        )
        return head + msg + bytes(_MESSAGE_BYTES - len(msg))

    @classmethod
    def decode(cls, raw: bytes) -> _Record:
        fields = _RECORD.unpack_from(raw)
        if fields[0] != _VERSION:
            raise RuntimeError(
                f"a peer sent a round record of version {fields[0]} (this rank: {_VERSION}); "
                "every rank must run the same jeststream"
            )
        n_msg = fields[15]
        message = raw[_RECORD.size : _RECORD.size + n_msg].decode("utf-8", errors="replace")
        return cls(
            status=fields[3], pass_id=fields[1], round_id=fields[2], step=fields[4],
            size=fields[5], k=fields[6], n_chunks=fields[7], n_usable=fields[8], loss=fields[9],
            criterion=fields[10], width=fields[11], first_width=fields[12], dtype=fields[13],
            drawn=fields[14], temperature=fields[16], message=message,
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------


def _comm_device(group: Any, device: torch.device) -> torch.device:
    """Where a collective's tensors live: gloo works on host tensors, NCCL (and other device
    backends) on the accelerator the embeddings are on."""
    if device.type == "cpu":
        return device
    if str(dist.get_backend(group)).lower() == "gloo":  # gloo alone: host tensors only
        return torch.device("cpu")
    return device  # nccl, xccl, or a "cpu:gloo,cuda:nccl" mix (it picks by the tensor)


def _record_device(group: Any) -> torch.device:
    """One device for every status record of a group, whatever the caller holds: a rank that
    ends a pass (no embeddings) must meet its peers in the same backend as those selecting.
    Host tensors where the backend has gloo (alone or in a "cpu:gloo,cuda:nccl" mix), else the
    current accelerator (NCCL and other device-only backends)."""
    if "gloo" in str(dist.get_backend(group)).lower():
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator()
    if acc is None:
        return torch.device("cpu")
    return torch.device(acc.type, torch.accelerator.current_device_index())


def _exchange_records(
    group: Any, record: _Record, device: torch.device, timeout: float | None = None
) -> list[_Record]:
    """All-gather one record per rank; with ``timeout`` (seconds) the wait is bounded by it
    rather than by the group's timeout (it raises, and the group is then unusable)."""
    raw = torch.frombuffer(bytearray(record.encode()), dtype=torch.uint8)
    device = _comm_device(group, device)
    raw = raw.to(device)
    out = [torch.empty_like(raw) for _ in range(dist.get_world_size(group))]
    if timeout is None:
        dist.all_gather(out, raw, group=group)
    else:
        work = dist.all_gather(out, raw, group=group, async_op=True)
        work.wait(timeout=datetime.timedelta(seconds=float(timeout)))
    return [_Record.decode(bytes(o.cpu().numpy())) for o in out]


def _round_error(records: list[_Record], statuses: tuple[int, ...], what: str) -> str:
    parts = [
        f"rank {r} ({_STATUS_NAMES[rec.status]}"
        + (f" at step {rec.step}" if rec.step >= 0 else "")
        + (f"): {rec.message}" if rec.message else ")")
        for r, rec in enumerate(records)
        if rec.status in statuses
    ]
    return f"{what}: " + "; ".join(parts)


def _check_consistent(records: list[_Record], *, same_n_chunks: bool) -> None:
    """Every rank must run the same selection; the records are the same on every rank, so
    every rank raises the same error."""
    fields = ["loss", "criterion", "temperature", "width", "first_width", "dtype"]
    if same_n_chunks:
        fields.append("n_chunks")
    for name in fields:
        values = [getattr(rec, name) for rec in records]
        if len(set(values)) > 1:
            shown = values
            if name == "loss":
                shown = [LOSSES[v] for v in values]
            elif name == "criterion":
                shown = [CRITERIA[v] for v in values]
            elif name == "dtype":
                shown = [str(_DTYPES[v]) for v in values]
            raise ValueError(
                f"global selection needs the same {name} on every rank, got {shown} (rank 0, "
                "1, ...); every rank must score with the same models and selection settings"
            )


def _dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _DTYPES:
        raise TypeError(f"selection payload dtype {dtype} is not one of {_DTYPES}")
    return _DTYPES.index(dtype)


def _local_record(
    block: Any,
    *,
    k: int,
    size: int,
    n_chunks: int,
    n_usable: int,
    loss: str,
    criterion: str,
    temperature: float,
) -> _Record:
    return _Record(
        status=OK,
        size=size,
        k=k,
        n_chunks=n_chunks,
        n_usable=n_usable,
        loss=LOSSES.index(loss),
        criterion=CRITERIA.index(criterion),
        width=block.payload_width,
        first_width=block.widths[0],
        dtype=_dtype_code(block.payload_dtype),
        drawn=size,
        temperature=float(temperature),
    )


def _sample_agreed(
    block: Any, records: list[_Record], me: int, group: Any, n_chunks: int, stats: dict | None
) -> Tensor:
    """The chunk loop on this rank, all-gathering each chunk's payload (padded to the largest
    chunk of any rank, since ranks with different quotas draw different chunk sizes)."""
    sizes = [chunk_sizes(rec.k, n_chunks) for rec in records]
    block.sizes = sizes[me]
    device = block.logits.device
    width = block.payload_width
    j = 0

    def all_gather(payloads: list[Tensor]) -> list[Tensor]:
        nonlocal j
        (own,) = payloads
        c_max = max(s[j] for s in sizes)
        comm = _comm_device(group, device)
        buf = torch.zeros(c_max, width, dtype=own.dtype, device=comm)
        buf[: own.shape[0]] = own
        out = [torch.empty_like(buf) for _ in records]
        dist.all_gather(out, buf, group=group)
        if stats is not None:
            stats["gathers"] = stats.get("gathers", 0) + 1
            stats["payload_bytes"] = stats.get("payload_bytes", 0) + buf.numel() * buf.element_size()
        everyone = [o[: s[j]].to(device) for o, s in zip(out, sizes)]
        j += 1
        return everyone

    return chunk_loop([block], [me], n_chunks, all_gather)[0]


def global_joint_sample(
    learner: Embeddings | None,
    reference: Embeddings | None,
    k: int,
    *,
    loss: str = "sigmoid",
    criterion: str = "learnability",
    n_chunks: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    group: Any = None,
    own_scores: Tensor | None = None,
    stats: dict | None = None,
) -> Tensor:
    """Joint selection from the global super-batch, on this rank, given only its embeddings.

    Equals ``blocked_joint_sample(learners, references, ks, ...)[r]`` on rank r when the
    generators are in the same states. Every rank of ``group`` must call it (collective);
    ``loss``, ``criterion``, ``n_chunks``, ``temperature`` and the models' embedding widths must
    agree across ranks, ``k`` and the super-batch size may differ. Invalid input on any rank
    makes every rank raise (naming it) instead of leaving the others blocked.

    Communication: one all-gather of a 1 KiB record per rank, then one all-gather per chunk but
    the last of the chunk's embeddings, W · c_max · 2·(d_learner + d_reference) values.

    Args:
        learner, reference, k, loss, criterion, n_chunks, temperature, generator, own_scores:
            as in :func:`jeststream.selection.joint_sample_from_embeddings`, for this rank.
        group: the process group (default: the default group).
        stats: optional dict; ``gathers`` and ``payload_bytes`` (this rank's contribution) are
            added to it.

    Returns:
        LongTensor[k] of this rank's local indices, in draw order.
    """
    group = dist.group.WORLD if group is None else group
    me = dist.get_rank(group)
    device = _embeddings_device(learner, reference)
    block, own_exc = None, None
    try:
        block = embedding_block(
            learner, reference, k, loss=loss, criterion=criterion, n_chunks=n_chunks,
            temperature=temperature, generator=generator, own_scores=own_scores,
        )
        record = _local_record(
            block, k=k, size=block.logits.shape[0], n_chunks=n_chunks, n_usable=n_chunks,
            loss=loss, criterion=criterion, temperature=temperature,
        )
    except (TypeError, ValueError) as exc:
        own_exc = exc
        record = _Record(status=INVALID, message=_describe(exc))
    records = _exchange_records(group, record, device)
    if own_exc is not None:
        raise own_exc
    if any(rec.status != OK for rec in records):
        raise ValueError(_round_error(records, (INVALID,), "global_joint_sample: invalid input"))
    _check_consistent(records, same_n_chunks=True)
    return _sample_agreed(block, records, me, group, n_chunks, stats)


def _embeddings_device(learner: Embeddings | None, reference: Embeddings | None) -> torch.device:
    for e in (learner, reference):
        image = getattr(e, "image", None) if e is not None else None
        if isinstance(image, Tensor):
            return image.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The loader's side: modes, groups, seeds, state, rounds
# ---------------------------------------------------------------------------------------------


def resolve_mode(distributed: str | None, process_group: Any = None) -> str | None:
    """"auto" -> "global" when torch.distributed is initialised with more than one rank (in
    ``process_group`` when given), else None; "global"/"local" need it initialised."""
    if distributed not in MODES:
        raise ValueError(
            f"distributed={distributed!r} is not one of {MODES}: 'global' selects from the "
            "super-batches of all ranks, 'local' from each rank's own, 'auto' picks 'global' "
            "under torch.distributed with world size > 1"
        )
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        if process_group is not None:
            raise ValueError(
                "process_group= is given but distributed=None; pass distributed='global' (or "
                "'local') to use it"
            )
        return None
    if distributed == "auto":
        if not initialised:
            if process_group is not None:
                raise ValueError("process_group= is given but torch.distributed is not initialised")
            return None
        return "global" if dist.get_world_size(process_group) > 1 else None
    if not initialised:
        raise ValueError(
            f"distributed={distributed!r} needs torch.distributed initialised first "
            "(torchrun + torch.distributed.init_process_group); use distributed=None for a "
            "single process"
        )
    return distributed


def check_not_sharded(model: nn.Module) -> None:
    """Refuse FSDP-sharded learners (``fully_shard`` / FullyShardedDataParallel).

    The snapshot copies the learner's parameters in the producer thread; sharded parameters
    would make each scoring forward all-gather them, a collective on the training group from
    another thread (a deadlock with the training step's), and a rank's copy would hold only its
    shards."""
    found = None
    try:
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                found = "fully_shard (FSDP2)"
                break
    except ImportError:  # pragma: no cover -- torch without FSDP2
        pass
    if found is None:
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel

            if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                found = "FullyShardedDataParallel"
        except ImportError:  # pragma: no cover
            pass
    if found is not None:
        raise ValueError(
            f"the learner is sharded with {found}; JESTLoader does not support FSDP learners "
            "(its scoring snapshot copies whole parameters outside the training step). Wrap the "
            "learner in DistributedDataParallel instead, or score with a separate unsharded "
            "copy through embed="
        )


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A distinct, reproducible generator seed per (seed, rank, epoch)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729 + 17) % (2**63 - 1)


class Coordinator:
    """The loader's distributed side: mode, ranks, its process group, statistics.

    Args:
        mode: "global" or "local" (see :func:`resolve_mode`).
        process_group: the ranks that select together (default: all) and whose backend the
            loader's own group uses.
        timeout: seconds a collective of the loader's group waits for the other ranks (None:
            torch's default for the backend).
    """

    def __init__(self, mode: str, process_group: Any = None, timeout: float | None = None) -> None:
        self.mode = mode
        parent = dist.group.WORLD if process_group is None else process_group
        self.rank = dist.get_rank(parent)
        self.world_size = dist.get_world_size(parent)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.group = None
        if mode == "global":
            kwargs: dict[str, Any] = {"backend": dist.get_backend(parent)}
            if timeout is not None:
                kwargs["timeout"] = datetime.timedelta(seconds=float(timeout))
            # new_group is collective over the members: every rank builds its loader at the
            # same point of the program.
            self.group = dist.new_group(
                ranks=dist.get_process_group_ranks(parent),
                use_local_synchronization=True,
                group_desc="jeststream",
                **kwargs,
            )
        self.record_device = None if self.group is None else _record_device(self.group)
        self.timeout = timeout
        self.broken: BaseException | None = None  # a collective of the group failed
        self._passes = 0
        self.unread = [0] * self.world_size
        self.ended_by: list[int] = []
        self.stopped_by: list[int] = []
        self.failed_by: list[int] = []

    def seed(self, seed: int, epoch: int) -> int:
        return rank_seed(seed, self.rank, epoch)

    def start_pass(self) -> PassRounds | None:
        """The rounds of one pass (None for "local": no collectives, only the pass count)."""
        if self.mode != "global":
            self._passes += 1
            return None
        if self.broken is not None:
            raise RuntimeError(
                "the JESTLoader's process group failed in an earlier pass "
                f"({_describe(self.broken)}); the ranks can no longer agree. Build a new loader"
            ) from self.broken
        self._passes += 1
        # stats describe the latest pass (as ended_by always did): a new pass starts at zero
        self.unread = [0] * self.world_size
        self.ended_by, self.stopped_by, self.failed_by = [], [], []
        return PassRounds(self, self._passes)

    def state(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank}

    def stats(self) -> dict:
        return {
            "mode": self.mode,
            "rank": self.rank,
            "passes": self._passes,
            "world_size": self.world_size,
            "ended_by": list(self.ended_by),
            "stopped_by": list(self.stopped_by),
            "failed_by": list(self.failed_by),
            "unread_examples": list(self.unread),
        }

    def close(self) -> None:
        group, self.group = self.group, None
        if group is None or not dist.is_initialized():
            return
        try:
            dist.destroy_process_group(group)
        except Exception as exc:  # noqa: BLE001 -- the default group may be gone already
            logger.debug("destroying the JESTLoader process group: %s", exc)


def check_resume(state: dict, world_size: int, rank: int) -> None:
    """A loader state restores under the world size it was saved under."""
    saved = state.get("world_size")
    if saved is not None and int(saved) != world_size:
        raise ValueError(
            f"this JESTLoader state was saved by rank {state.get('rank')} of world size "
            f"{saved}, but this run has world size {world_size}; the per-rank selection "
            "streams and shard splits differ. Resume with the same number of ranks, or start "
            "the loader fresh (drop its state)"
        )
    saved_rank = state.get("rank")
    if saved_rank is not None and int(saved_rank) != rank:
        logger.warning(
            "restoring the JESTLoader state saved by rank %s on rank %d: this rank continues "
            "with that rank's generator and base-loader position",
            saved_rank,
            rank,
        )


class PassOver(Exception):
    """A round ended the pass (a rank's base ended or a rank stopped); not an error."""


@dataclasses.dataclass
class _Marker:
    """What the producer hands the selection step instead of a super-batch."""

    status: int
    step: int
    exc: BaseException | None = None


class PassRounds:
    """One pass's rounds: every rank contributes one record per super-batch, in order, from the
    thread that selects (the selection step of the pipeline, or the consumer when scoring is
    synchronous), so the loader's collectives are issued in the same order on every rank.

    ``produce`` wraps the producer's draw-and-score (its failure and its end become records);
    ``finish`` wraps the selection; ``sample`` is the selection's global sampler; ``close``
    contributes the last record of a rank that leaves the pass early.
    """

    def __init__(self, coordinator: Coordinator, pass_id: int) -> None:
        self.co = coordinator
        self.pass_id = pass_id
        self.round = 0  # rounds this rank has contributed to in this pass
        self.over = False  # every rank knows the pass is over
        self.in_chunks = False  # inside a selection's chunk loop (its all-gathers)
        self.pending: BaseException | None = None  # a local failure the peers don't know yet
        self._local_done = False  # the producer handed over its end or failure

    # -- the producer (thread 1, or inline) -------------------------------------------------

    def produce(self, draw_and_score: Callable[[Callable[[], bool]], Any], should_stop, step):
        from jeststream.pipeline import END

        if self.over or self._local_done:
            return END
        try:
            item = draw_and_score(should_stop)
        except Exception as exc:  # noqa: BLE001 -- every rank must hear of it
            self._local_done = True
            return _Marker(FAILED, step, exc)
        if item is END:
            self._local_done = True
            return _Marker(ENDED, step)
        return item

    # -- the selection step (thread 2, or inline) --------------------------------------------

    def finish(self, select: Callable[[Any], Any], item: Any, size: Callable[[Any], int]):
        from jeststream.pipeline import END

        if self.over:
            if not isinstance(item, _Marker):
                self.co.unread[self.co.rank] += size(item)  # scored ahead, never selected
            return END
        if isinstance(item, _Marker):
            message = "" if item.exc is None else _describe(item.exc)
            records = self._exchange(_Record(status=item.status, step=item.step, message=message))
            self._outcome(records, item.exc)
            return END
        before = self.round
        try:
            return select(item)
        except PassOver:
            return END
        except Exception as exc:
            if self.over or self.co.broken is not None:
                raise
            if self.round == before:  # failed before its round: tell the peers now
                records = self._exchange(
                    _Record(status=FAILED, step=getattr(item, "step", -1), message=_describe(exc))
                )
                self._outcome(records, exc)
            elif self.in_chunks:  # inside the chunk loop: the group's state is unknown
                self.co.broken = exc
            else:  # after its round: the peers hear of it in the next one (see close())
                self.pending = exc
            raise

    def _exchange(self, record: _Record, timeout: float | None = None) -> list[_Record]:
        record.pass_id, record.round_id = self.pass_id, self.round
        try:
            # every record of the pass on the group's one record device (never the caller's:
            # an ending rank has no embeddings, and a mixed backend picks by the tensor)
            records = _exchange_records(self.co.group, record, self.co.record_device, timeout)
        except Exception as exc:
            self.co.broken = exc
            self.over = True
            raise RuntimeError(
                f"JESTLoader (distributed='global', rank {self.co.rank}): the ranks' per-super-"
                f"batch agreement failed ({_describe(exc)}); a rank died, hung or left the "
                "loop. Every rank must iterate the loader in step"
            ) from exc
        self.round += 1
        for r, rec in enumerate(records):
            if (rec.pass_id, rec.round_id) != (self.pass_id, record.round_id):
                self.co.broken = RuntimeError("out of step")
                self.over = True
                raise RuntimeError(
                    f"JESTLoader ranks are out of step: rank {r} is at pass {rec.pass_id} round "
                    f"{rec.round_id}, rank {self.co.rank} at pass {self.pass_id} round "
                    f"{record.round_id}; every rank must build its loader and start and leave "
                    "each pass at the same points"
                )
        return records

    def _outcome(self, records: list[_Record], own_exc: BaseException | None) -> str:
        """What every rank does after a round (the records are the same on every rank)."""
        me = self.co.rank
        failed = [r for r, rec in enumerate(records) if rec.status in (FAILED, INVALID)]
        if failed:
            self.over = True
            self.co.failed_by = failed
            if me in failed and own_exc is not None:
                note = getattr(own_exc, "add_note", None)
                if note is not None:
                    note(f"(JESTLoader rank {me}: every rank of the selection group stops)")
                raise own_exc
            raise RuntimeError(
                _round_error(
                    records,
                    (FAILED, INVALID),
                    f"JESTLoader (distributed='global', rank {me}): another rank failed, so "
                    "every rank stops the pass",
                )
            )
        ended = [r for r, rec in enumerate(records) if rec.status == ENDED]
        stopped = [r for r, rec in enumerate(records) if rec.status == STOPPED]
        if ended or stopped:
            self.over = True
            self.co.ended_by, self.co.stopped_by = ended, stopped
            for r, rec in enumerate(records):
                if rec.status in (OK, BAD_SCORES):
                    self.co.unread[r] += rec.drawn
            if stopped and me not in stopped:
                logger.warning(
                    "JESTLoader rank %d: rank(s) %s left the pass; this rank ends it too",
                    me,
                    stopped,
                )
            elif ended:
                unread = {r: rec.drawn for r, rec in enumerate(records) if rec.drawn}
                # every rank ending at once is an ordinary end of the pass: no news
                log = logger.info if unread or len(ended) < len(records) else logger.debug
                log(
                    "JESTLoader: the base loader of rank(s) %s ended; every rank ends the pass "
                    "(examples drawn and left unread, by rank: %s)",
                    ended,
                    unread or "none",
                )
            return "end"
        if any(rec.status == BAD_SCORES for rec in records):
            return "bad"
        return "ok"

    def sample(
        self,
        learner: Embeddings | None,
        reference: Embeddings | None,
        k: int,
        *,
        size: int,
        step: int,
        own_scores: Tensor | None,
        bad_message: str | None,
        spec: SelectionSpec,
        generator: torch.Generator,
    ) -> tuple[Tensor, bool]:
        """This rank's indices for one super-batch and whether they are a uniform fallback.

        ``spec``: the loader's selection settings with n_chunks resolved against b.

        Raises :class:`PassOver` when the round ends the pass. Non-finite scores on any rank
        make every rank raise (``on_bad_scores="raise"``) or select uniformly."""
        block, own_exc = None, None
        loss, criterion, temperature = spec.loss, spec.criterion, spec.temperature
        n_chunks = spec.n_chunks
        if bad_message is not None:
            record = _Record(status=BAD_SCORES, step=step, size=size, k=k, drawn=size,
                             message=bad_message)
        else:
            try:
                block = embedding_block(
                    learner, reference, k, loss=loss, criterion=criterion,
                    n_chunks=min(n_chunks, k), temperature=temperature, generator=generator,
                    own_scores=own_scores,
                )
                record = _local_record(
                    block, k=k, size=size, n_chunks=n_chunks, n_usable=min(n_chunks, k),
                    loss=loss, criterion=criterion, temperature=temperature,
                )
                record.step = step
            except (TypeError, ValueError) as exc:
                own_exc = exc
                record = _Record(status=INVALID, step=step, drawn=size, message=_describe(exc))
        records = self._exchange(record)
        outcome = self._outcome(records, own_exc)
        if outcome == "end":
            raise PassOver
        if outcome == "bad":
            if spec.on_bad_scores == "raise":
                self.over = True
                raise ValueError(
                    _round_error(
                        records,
                        (BAD_SCORES,),
                        f"JEST scores at step {step} are non-finite on some rank (this is rank "
                        f"{self.co.rank}; pass on_bad_scores='uniform' to select uniformly on "
                        "every rank for such super-batches)",
                    )
                )
            logger.warning(
                "step %d: non-finite JEST scores on rank(s) %s; every rank selects uniformly",
                step,
                [r for r, rec in enumerate(records) if rec.status == BAD_SCORES],
            )
            return torch.randperm(size, generator=generator)[:k], True
        try:
            _check_consistent(records, same_n_chunks=False)
        except ValueError:
            self.over = True
            raise
        n_usable = min(rec.n_usable for rec in records)
        self.in_chunks = True
        try:
            idx = _sample_agreed(block, records, self.co.rank, self.co.group, n_usable, None)
        except RuntimeError as exc:  # a peer died or hung in the all-gathers, or local maths
            self.co.broken = exc
            self.over = True
            raise RuntimeError(
                f"JESTLoader (distributed='global', rank {self.co.rank}): the selection of step "
                f"{step} failed inside its chunk all-gathers ({_describe(exc)}); a rank died, "
                "hung or failed mid-selection, and the others raise within the group's timeout"
            ) from exc
        self.in_chunks = False
        return idx, False

    # -- leaving the pass -------------------------------------------------------------------

    def close(self, threads_alive: bool) -> None:
        """The consumer left the pass (end, ``break``, error, restore). A pass that is not over
        for every rank gets this rank's last record, ``stopped`` (or ``failed`` after a local
        error), so that a peer blocked in that round is released."""
        if self.over or self.co.broken is not None:
            return
        if threads_alive or self.in_chunks:
            self.co.broken = RuntimeError("a selection step did not stop")
            return
        exc = self.pending
        status = STOPPED if exc is None else FAILED
        # A peer still in the pass reaches this round within one super-batch's work; one that
        # never will (blocked in DDP's all-reduce waiting for this rank, say) must not hold
        # this rank -- and the error it may be carrying -- for the whole group timeout.
        wait = FAREWELL_TIMEOUT_S if self.co.timeout is None else min(
            FAREWELL_TIMEOUT_S, float(self.co.timeout)
        )
        try:
            records = self._exchange(
                _Record(status=status, message="" if exc is None else _describe(exc)),
                timeout=wait,
            )
            self._outcome(records, exc)
        except Exception as err:  # noqa: BLE001 -- leaving anyway; say what the peers did
            if err is not exc:
                logger.warning("JESTLoader rank %d leaving the pass: %s", self.co.rank, err)
        self.over = True
