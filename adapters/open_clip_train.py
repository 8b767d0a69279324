"""``jeststream openclip-train``: open_clip_train with its training loader wrapped in JEST.

    jeststream openclip-train [every open_clip_train argument] --jest-ratio 0.2 \\
        --jest-reference MODEL_NAME_OR_CHECKPOINT [--jest-reference-pretrained TAG] \\
        [--jest-reference-model ARCH] [--jest-n-chunks 16] [--jest-criterion learnability] \\
        [--jest-score-dtype bf16] [--jest-refresh-every 1] [--jest-selection-log PATH] \\
        [--jest-reference-cache DIR]

``--jest-reference-cache DIR`` (a cache written by ``jeststream precompute-reference``) replaces
the reference forward by a lookup of its precomputed embeddings by sample key; the webdataset
pipeline is made to carry ``__key__`` (as for the selection log). With ``--jest-reference`` too,
that model is only checked against the cache's fingerprint. The cached embeddings are of the
reference's eval preprocessing, not of open_clip's training augmentations.

The ``--jest-*`` flags are split off; everything else goes to ``open_clip_train.main.main``
unchanged. Without ``--jest-*`` flags the command *is* ``python -m open_clip_train.main``.

How the loader is swapped in (no open_clip_train code is copied): ``open_clip_train.main``
imports ``create_model_and_transforms`` and ``get_data`` into its own namespace and, in
``main()``, creates the model, then calls ``get_data``, then builds the LR schedule from
``data["train"].dataloader.num_batches``. For the duration of the run we rebind those two
names in ``open_clip_train.main`` -- the first to remember the (unwrapped) learner, the second to
return ``data["train"]`` jestified -- and restore them afterwards. The installed open_clip_torch
version and that structure are checked before anything runs.

``--jest-score-resolution R`` on webdataset data also defers decoding
(:func:`jeststream.adapters.open_clip.defer_webdataset_images`): every example of a super-batch
is decoded only to an R-px scoring view (JPEG draft scaling), and open_clip's own training
transform runs on the selected examples after selection, seeded by (--seed, epoch, key).

Counting: ``--batch-size`` stays the trained batch b; each step draws a super-batch of
n = round(1/ratio) base batches. An epoch still reads ``--train-num-samples`` examples, so it has
1/n of the plain run's optimizer steps (the LR schedule is built from that count); to keep the
number of steps, multiply ``--train-num-samples`` by n.

Statistics: at open_clip's log cadence (``--log-every-n-steps`` and the last step of an epoch)
a ``JEST Epoch: ...`` line goes to open_clip's log, and ``jest/selected_mean``,
``jest/super_batch_mean``, ``jest/scoring_share``, ``jest/wait_share``, ``jest/staleness`` and
``jest/fallbacks`` go to tensorboard (an event file in open_clip's tensorboard folder) and
wandb, on open_clip's step axis.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import torch

from jeststream.loader import SCORING
from jeststream.losses import CRITERIA
from jeststream.selection_log import SelectionLog

__all__ = ["ALLOW_ENV", "SUPPORTED_OPEN_CLIP", "check_open_clip_version", "main", "split_jest_argv"]

logger = logging.getLogger(__name__)

# [min, max): the versions the end-to-end tests have run against. The hook relies on
# open_clip_train.main's module-level get_data / create_model_and_transforms and on main()
# building the scheduler after get_data; the structural check below guards that too, but a
# version nobody ran is refused rather than trusted. To try one anyway, set
# JESTSTREAM_ALLOW_OPEN_CLIP=1: the version error becomes a warning (the structural check stays).
SUPPORTED_OPEN_CLIP = ("3.3.0", "3.4.0")
ALLOW_ENV = "JESTSTREAM_ALLOW_OPEN_CLIP"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# flag -> (dest, type, default, help). Every --jest-* flag takes a value.
_JEST_FLAGS: dict[str, tuple[str, Callable[[str], Any], Any, str]] = {
    "--jest-ratio": ("ratio", float, None, "fraction b/B of each super-batch trained on (e.g. 0.2)"),
    "--jest-reference": (
        "reference", str, None,
        "reference model: open_clip model name (+ --jest-reference-pretrained), "
        "local-dir:PATH, or an open_clip_train checkpoint (epoch_N.pt)",
    ),
    "--jest-reference-pretrained": ("reference_pretrained", str, None, "pretrained tag or weights"),
    "--jest-reference-model": (
        "reference_model", str, None,
        "architecture of a --jest-reference checkpoint file (default: from the run's params.txt)",
    ),
    "--jest-n-chunks": (
        "n_chunks", int, None, "chunks of the joint sampler (<= --batch-size; default min(16, b))",
    ),
    "--jest-criterion": ("criterion", str, "learnability", f"one of {', '.join(CRITERIA)}"),
    "--jest-score-dtype": (
        "score_dtype", str, None, f"dtype of the scoring models: {', '.join(_DTYPES)}",
    ),
    "--jest-refresh-every": (
        "refresh_every", int, 1, "refresh the learner snapshot every N steps (0: each epoch)",
    ),
    "--jest-temperature": ("temperature", float, 1.0, "sampling temperature (0: greedy)"),
    "--jest-score-resolution": (
        "score_resolution", int, None,
        "score the learner snapshot on images resized to this side in pixels (ViT positional "
        "embeddings resampled; e.g. 112 for a 224 px model: ~4x fewer image-tower FLOPs); on "
        "webdataset data the scorer then sees JPEG draft-decoded views of this size and "
        "open_clip's training transform runs on the selected examples only",
    ),
    "--jest-prefilter": (
        "prefilter", float, 1.0,
        "keep the top Q of each super-batch by the reference's score before the learner scores "
        "it (0 < Q <= 1; 1: off): the learner's scoring FLOPs fall by 1 - Q",
    ),
    "--jest-scoring": (
        "scoring", str, "auto",
        "which learner weights score a super-batch: sync (the current learner, inline), lagged "
        "(a background thread scores super-batch t with the snapshot after step t - 1: runs "
        "repeat), latest (the newest snapshot, timing-dependent) or auto (sync on the CPU, "
        "lagged on an accelerator)",
    ),
    "--jest-deterministic": (
        "deterministic", int, None, "deprecated: 1 is --jest-scoring lagged, 0 --jest-scoring latest",
    ),
    "--jest-reference-cache": (
        "reference_cache", str, None,
        "a reference cache (jeststream precompute-reference --out DIR): look the reference's "
        "embeddings up by sample key instead of running it (webdataset training data)",
    ),
    "--jest-selection-log": (
        "selection_log", str, None, "write per-example scores/selections here (.parquet/.jsonl)",
    ),
}


def _jest_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jeststream openclip-train",
        description="open_clip_train with JEST selection; other flags go to open_clip_train",
        allow_abbrev=False,
    )
    for flag, (dest, typ, default, help_) in _JEST_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=typ, default=default, help=help_)
    return parser


def split_jest_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into (--jest-* flags with their values, the open_clip_train arguments)."""
    jest: list[str] = []
    rest: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":  # everything after is open_clip_train's
            rest.extend(argv[i:])
            break
        if tok.startswith("--jest-"):
            flag = tok.split("=", 1)[0]
            if flag not in _JEST_FLAGS:
                raise ValueError(
                    f"unknown flag {flag!r}; the JEST flags are {', '.join(_JEST_FLAGS)}"
                )
            if "=" in tok:
                jest.append(tok)
            elif i + 1 < len(argv):
                jest.extend(argv[i:i + 2])
                i += 1
            else:
                raise ValueError(f"{flag} needs a value")
        else:
            rest.append(tok)
        i += 1
    return jest, rest


def _installed_open_clip_version() -> str:
    return metadata.version("open_clip_torch")


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        out.append(int(digits))
    return tuple(out + [0] * (3 - len(out)))


def check_open_clip_version(version: str | None = None) -> str:
    """Fail loudly unless open_clip_torch is in ``SUPPORTED_OPEN_CLIP`` and main() has our hook."""
    try:
        version = version or _installed_open_clip_version()
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            "open_clip_torch is not installed; `pip install 'jeststream[openclip-train]'`"
        ) from None
    lo, hi = SUPPORTED_OPEN_CLIP
    if not _version_tuple(lo) <= _version_tuple(version) < _version_tuple(hi):
        message = (
            f"jeststream openclip-train supports open_clip_torch >={lo},<{hi}; found {version}. "
            f"Install a supported version (pip install 'open_clip_torch[training]>={lo},<{hi}'), "
            "wrap the loader yourself with jeststream.adapters.open_clip.jestify, or set "
            f"{ALLOW_ENV}=1 to try this version at your own risk"
        )
        if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
            logger.warning("%s (continuing: %s is set)", message, ALLOW_ENV)
        else:
            raise RuntimeError(message)
    import open_clip_train.main as ocm

    names = set(ocm.main.__code__.co_names)
    missing = [n for n in ("create_model_and_transforms", "get_data") if n not in names]
    if missing or not all(callable(getattr(ocm, n, None)) for n in ("create_model_and_transforms",
                                                                    "get_data")):
        raise RuntimeError(
            f"open_clip_train {version}'s main() no longer looks up {missing or 'its hooks'} in "
            "open_clip_train.main, so JEST cannot replace its training loader; use a supported "
            f"open_clip_torch (>={lo},<{hi})"
        )
    return version


class _SelectionReporter:
    """Logs the JEST loader's selection statistics at open_clip_train's cadence and places.

    Called by the loader for every yielded batch; keeps window sums and, on the steps where
    ``train_one_epoch`` logs (``--log-every-n-steps``, last step of the epoch), writes a
    ``JEST Epoch: ...`` log line and ``jest/*`` scalars to tensorboard / wandb (same step axis).
    """

    def __init__(self, args: Any, criterion: str) -> None:
        from open_clip_train.distributed import is_master

        self.is_master = is_master
        self.args = args
        self.criterion = criterion
        self.writer = None
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.t0 = now
        self.n = 0
        self.selected = 0.0
        self.super_batch = 0.0
        self.scored_s = 0.0
        self.waited_s = 0.0
        self.staleness = 0

    def __call__(self, i: int, loader: Any) -> None:
        info = loader.last_info
        if i == 0:  # a new pass: don't charge the epoch boundary (eval, checkpointing) to JEST
            self._reset(time.perf_counter() - info.waited_s)
        self.n += 1
        self.selected += info.selected_mean
        self.super_batch += info.super_batch_mean
        self.scored_s += info.scored_s
        self.waited_s += info.waited_s
        self.staleness = max(self.staleness, info.staleness)
        args = self.args
        accum = max(1, int(getattr(args, "accum_freq", 1)))
        if (i + 1) % accum:
            return
        per_epoch = loader.num_batches // accum
        i_accum = i // accum
        every = max(1, int(getattr(args, "log_every_n_steps", 100)))
        if not (i_accum % every == 0 or i_accum + 1 == per_epoch) or not self.is_master(args):
            return
        now = time.perf_counter()
        wall = max(now - self.t0, 1e-9)
        stats = {
            "selected_mean": self.selected / self.n,
            "super_batch_mean": self.super_batch / self.n,
            "scoring_share": self.scored_s / wall,
            "wait_share": self.waited_s / wall,
            "staleness": float(self.staleness),
            "fallbacks": float(loader.stats["fallbacks"]),
        }
        self._reset(now)
        logger.info(
            "JEST Epoch: %d [%d/%d] Selected %s: %.5g Super-batch %s: %.5g Scoring share: %.3f "
            "Wait share: %.3f Staleness: %d Fallbacks: %d",
            loader.epoch, i_accum + 1, per_epoch, self.criterion, stats["selected_mean"],
            self.criterion, stats["super_batch_mean"], stats["scoring_share"],
            stats["wait_share"], int(stats["staleness"]), int(stats["fallbacks"]),
        )
        step = per_epoch * loader.epoch + i_accum  # train_one_epoch's step for this batch
        scalars = {f"jest/{k}": v for k, v in stats.items()}
        self._tensorboard(scalars, step)
        if getattr(args, "wandb", False):
            import wandb

            # commit=False: merged into open_clip's own log call for the same step.
            wandb.log(scalars, step=step, commit=False)

    def _tensorboard(self, scalars: dict[str, float], step: int) -> None:
        args = self.args
        path = getattr(args, "tensorboard_path", "")
        if not (getattr(args, "tensorboard", False) and path):
            return
        if self.writer is None:
            # Our own writer in open_clip's tensorboard folder: TensorBoard merges event files.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(path, filename_suffix=".jest")
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _CPUFriendlyDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP as open_clip_train builds it, ``device_ids=[device]``, which torch refuses for a CPU
    module; on CPU the ids are dropped (what DDP wants there), so that ``--device cpu
    --dist-backend gloo`` runs under torchrun. Installed only for a JEST run."""

    def __init__(self, module: torch.nn.Module, device_ids: Any = None, *args: Any,
                 **kwargs: Any) -> None:
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


class _Hook:
    """The two names rebound in open_clip_train.main for one run."""

    def __init__(self, jest: argparse.Namespace, ocm: Any) -> None:
        self.jest = jest
        self.ocm = ocm
        self.orig_create = ocm.create_model_and_transforms
        self.orig_get_data = ocm.get_data
        self.learner: torch.nn.Module | None = None
        self.loaders: list[Any] = []
        self.reporter: _SelectionReporter | None = None

    def create_model_and_transforms(self, *args: Any, **kwargs: Any) -> Any:
        out = self.orig_create(*args, **kwargs)
        if self.learner is None:  # the first model main() creates is the learner (then: distill)
            self.learner = out[0]
        return out

    def get_data(self, args: Any, *rest: Any, **kwargs: Any) -> dict:
        data = self.orig_get_data(args, *rest, **kwargs)
        if "train" in data:
            data["train"] = self._jestify(args, data["train"])
        return data

    def _jestify(self, args: Any, train: Any) -> Any:
        from jeststream.adapters.open_clip import (
            carry_webdataset_keys,
            check_compatible,
            defer_webdataset_images,
            jestify,
            load_reference,
        )

        if self.learner is None:
            raise RuntimeError(
                "open_clip_train called get_data before creating the model; this open_clip_train "
                "is not supported by jeststream openclip-train"
            )
        jest = self.jest
        logger.info("JEST: %s", ", ".join(f"{k}={v}" for k, v in vars(jest).items()))
        dtype = _DTYPES[jest.score_dtype] if jest.score_dtype else None
        device = torch.device(args.device)
        reference = None
        if jest.reference is not None:
            cached = jest.reference_cache is not None  # then only its fingerprint is checked
            reference = load_reference(
                jest.reference, jest.reference_pretrained, jest.reference_model,
                device="cpu" if cached else device, dtype=None if cached else dtype,
                cache_dir=getattr(args, "cache_dir", None),
            )
            if not cached:
                check_compatible(self.learner, reference)
        if jest.reference_cache is not None:
            from jeststream.reference_cache import ReferenceCache

            reference = ReferenceCache(jest.reference_cache, reference=reference)
        log_path = jest.selection_log
        if log_path and getattr(args, "world_size", 1) > 1:
            root, ext = os.path.splitext(log_path)
            log_path = f"{root}.rank{args.rank}{ext}"
        keys = False
        if log_path or jest.reference_cache is not None:
            # open_clip's batches carry no sample keys; without them the log cannot name what
            # was selected, so the pipeline's final to_tuple keeps __key__ (stripped on yield).
            keys = carry_webdataset_keys(train.dataloader)
            if not keys and jest.reference_cache is not None:
                raise ValueError(
                    f"--jest-reference-cache looks the reference's embeddings up by sample key, "
                    f"and the {getattr(args, 'dataset_type', '?')} training data carries none; "
                    "train on webdataset shards (--dataset-type webdataset), or drop "
                    "--jest-reference-cache and pass --jest-reference"
                )
            if log_path and not keys:
                logger.warning(
                    "JEST: the %s training data carries no sample keys; the selection log at %s "
                    "records scores and choices without keys",
                    getattr(args, "dataset_type", "?"),
                    log_path,
                )
        # --jest-score-resolution: decode only what is trained on (webdataset data): the scorer
        # sees draft-decoded views, open_clip's training transform runs after selection
        deferred = (
            jest.score_resolution is not None
            and getattr(args, "dataset_type", None) in ("webdataset", "auto")
            and defer_webdataset_images(train, jest.score_resolution, seed=int(args.seed))
        )
        if jest.score_resolution is not None and not deferred:
            logger.info(
                "JEST: the %s training data is decoded eagerly (deferred decoding needs "
                "open_clip_train's webdataset pipeline)", getattr(args, "dataset_type", "?"),
            )
        self.reporter = _SelectionReporter(args, jest.criterion)
        wrapped = jestify(
            train,
            self.learner,
            reference,
            jest.ratio,
            loss="sigmoid" if args.siglip else "softmax",
            criterion=jest.criterion,
            n_chunks=jest.n_chunks,
            temperature=jest.temperature,
            refresh_every=jest.refresh_every,
            score_resolution=jest.score_resolution,
            prefilter=jest.prefilter,
            scoring=_scoring(jest),
            snapshot_dtype=dtype,
            device=device,
            seed=int(args.seed),
            # --resume (already resolved by main() when get_data runs): continue the log
            selection_log=(
                SelectionLog(log_path, mode="a")
                if log_path and getattr(args, "resume", None)
                else log_path
            ),
            on_yield=self.reporter,
            strip_keys=keys,
        )
        self.loaders.append(wrapped.dataloader)
        dist_stats = wrapped.dataloader.stats.get("distributed")
        if dist_stats is not None:  # under torchrun: global selection by default
            logger.info(
                "JEST: %s selection over %d ranks (this is rank %d)",
                dist_stats["mode"], dist_stats["world_size"], dist_stats["rank"],
            )
        return wrapped

    @contextmanager
    def installed(self) -> Iterator[_Hook]:
        ocm = self.ocm
        ocm.create_model_and_transforms = self.create_model_and_transforms
        ocm.get_data = self.get_data
        ddp = torch.nn.parallel.DistributedDataParallel
        torch.nn.parallel.DistributedDataParallel = _CPUFriendlyDDP
        try:
            yield self
        finally:
            ocm.create_model_and_transforms = self.orig_create
            ocm.get_data = self.orig_get_data
            torch.nn.parallel.DistributedDataParallel = ddp
            for loader in self.loaders:
                loader.close()
            if self.reporter is not None:
                self.reporter.close()


def _validate(jest: argparse.Namespace, rest: list[str]) -> None:
    """Check the JEST flags against open_clip_train's own (parsed by its parser, no side effects)."""
    from open_clip_train.params import parse_args

    if jest.ratio is None:
        raise ValueError("--jest-ratio is required when any --jest-* flag is given (e.g. 0.2)")
    if not 0 < jest.ratio < 1:
        raise ValueError(f"--jest-ratio must be in (0, 1), got {jest.ratio}")
    if jest.criterion not in CRITERIA:
        raise ValueError(f"--jest-criterion {jest.criterion!r} is not one of {', '.join(CRITERIA)}")
    if jest.reference is None and jest.reference_cache is None and jest.criterion != "hard_learner":
        raise ValueError(
            f"--jest-criterion {jest.criterion} needs a reference model: pass --jest-reference "
            "(a model trained on curated data) or --jest-reference-cache, or use "
            "--jest-criterion hard_learner"
        )
    if jest.reference_cache is not None:
        from jeststream.reference_cache import read_manifest

        try:
            read_manifest(jest.reference_cache)
        except FileNotFoundError as exc:
            raise ValueError(f"--jest-reference-cache: {exc}") from None
    if not 0 < jest.prefilter <= 1:  # NaN fails too
        raise ValueError(
            f"--jest-prefilter must be a share q with 0 < q <= 1 (1: off), got {jest.prefilter}"
        )
    if jest.prefilter < 1 and jest.reference is None and jest.reference_cache is None:
        raise ValueError(
            "--jest-prefilter ranks super-batches by the reference's score: pass "
            "--jest-reference or --jest-reference-cache"
        )
    if jest.scoring not in SCORING:
        raise ValueError(f"--jest-scoring {jest.scoring!r} is not one of {', '.join(SCORING)}")
    if jest.deterministic is not None and jest.scoring != "auto":
        raise ValueError(
            "--jest-deterministic is the deprecated spelling of --jest-scoring; pass one of them"
        )
    if jest.score_dtype is not None and jest.score_dtype not in _DTYPES:
        raise ValueError(
            f"--jest-score-dtype {jest.score_dtype!r} is not one of {', '.join(_DTYPES)}"
        )
    args = parse_args(rest)
    if not (args.train_data or args.dataset_type == "synthetic"):
        raise ValueError("JEST selects training data: pass --train-data (or drop the --jest-* flags)")
    if jest.n_chunks is not None and jest.n_chunks > args.batch_size:
        raise ValueError(
            f"--jest-n-chunks {jest.n_chunks} exceeds --batch-size {args.batch_size}: each chunk "
            f"selects at least one example; use --jest-n-chunks <= {args.batch_size}"
        )
    if args.trace:
        raise ValueError("--trace builds an inference-only model; it cannot be trained with JEST")


def _scoring(jest: argparse.Namespace) -> str:
    """--jest-scoring, or the deprecated --jest-deterministic's meaning (1: lagged, 0: latest)."""
    if jest.deterministic is None:
        return jest.scoring
    name = "lagged" if jest.deterministic else "latest"
    logger.warning("--jest-deterministic is deprecated; pass --jest-scoring %s", name)
    return name


def _exit_code(result: Any) -> int:
    # open_clip_train's main returns None on success and -1 on its own errors.
    if result is None:
        return 0
    return 0 if result == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run open_clip_train (with JEST when --jest-* flags are given); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        jest_argv, rest = split_jest_argv(argv)
    except ValueError as exc:
        print(f"jeststream openclip-train: error: {exc}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        _jest_parser().print_help()
        print("\nAll other arguments are open_clip_train's:\n")
    try:
        import open_clip_train.main as ocm
    except ImportError as exc:  # e.g. only the `openclip` extra: no pandas, no training stack
        print(
            f"jeststream openclip-train: error: cannot import open_clip_train ({exc}); it needs "
            "open_clip's training extras: pip install 'jeststream[openclip-train]'",
            file=sys.stderr,
        )
        return 2

    try:
        if not jest_argv:
            return _exit_code(ocm.main(rest))
        jest = _jest_parser().parse_args(jest_argv)
        try:
            check_open_clip_version()
            _validate(jest, rest)
        except (RuntimeError, ValueError) as exc:  # before anything is built or written
            print(f"jeststream openclip-train: error: {exc}", file=sys.stderr)
            return 2
        with _Hook(jest, ocm).installed():
            return _exit_code(ocm.main(rest))
    except SystemExit as exc:  # argparse (--help, bad flags) exits; we return the code instead
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
