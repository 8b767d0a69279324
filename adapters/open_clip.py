"""open_clip glue: the embed for open_clip models, a JEST-wrapped ``DataInfo``, and reference loading.

    from jeststream.adapters.open_clip import jestify, load_reference
    reference = load_reference("ViT-B-32", pretrained="datacomp_xl_s13b_b90k", device="cuda")
    data["train"] = jestify(data["train"], model, reference, ratio=0.2, loss="sigmoid")

``jestify`` keeps open_clip's counting conventions: ``dataloader.num_batches`` is the number of
(selected) batches per epoch -- open_clip builds its LR schedule from it -- and
``dataloader.num_samples`` is ``num_batches`` times the *global* batch size, as in open_clip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jeststream.loader import JESTLoader
from jeststream.losses import Embeddings
from jeststream.scoring import default_embed
from jeststream.selection_log import SelectionLog
from jeststream.snapshot import unwrap_model

__all__ = [
    "OpenCLIPJESTLoader",
    "carry_webdataset_keys",
    "checkpoint_architecture",
    "defer_webdataset_images",
    "check_compatible",
    "embed",
    "jestify",
    "load_reference",
    "read_checkpoint_state_dict",
    "unwrap_model",
    "write_local_dir",
]

logger = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"


def _param_dtype(module: nn.Module | None) -> torch.dtype | None:
    if module is None:
        return None
    for p in module.parameters():
        return p.dtype if p.is_floating_point() else None
    return None


def embed(model: nn.Module, batch: Any) -> Embeddings:
    """Embeddings of an open_clip ``CLIP`` / ``CustomTextCLIP`` for an (images, texts) batch.

    Same semantics as open_clip's ``output_dict=True`` forward (L2-normalised features,
    ``logit_scale`` already exponentiated, ``logit_bias`` for SigLIP models); it is
    ``jeststream.scoring.default_embed`` on the unwrapped model, with the images cast to the
    vision tower's dtype first: open_clip_train casts inputs inside its training step
    (``--precision pure_bf16`` / ``fp16``), so the base loader still yields float32 images.
    """
    model = unwrap_model(model)
    dtype = _param_dtype(getattr(model, "visual", None))
    if dtype is not None and dtype != torch.float32:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor):
            batch = (batch[0].to(dtype), *batch[1:])
        elif isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
            batch = {**batch, "image": batch["image"].to(dtype)}
    return default_embed(model, batch)


class OpenCLIPJESTLoader(JESTLoader):
    """A JESTLoader that counts like an open_clip_train dataloader.

    ``num_samples`` is global (all ranks), as open_clip's own loaders report it, and
    ``on_yield(i, loader)`` -- if given -- is called for each yielded batch of a pass, after
    ``last_info`` is set (the open_clip_train command logs selection statistics from it).

    Steps follow open_clip's axis: ``set_epoch(e)`` puts the step counter at
    ``e * num_batches`` (unless a ``load_state_dict`` is pending), so that a run resumed from an
    epoch checkpoint (open_clip_train ``--resume``, which does not hold the loader's state)
    numbers its super-batches -- and its selection-log records -- as the uninterrupted run did.
    To append to an existing selection log when resuming, pass
    ``selection_log=SelectionLog(path, mode="a")`` (the reader keeps the last record of a step
    written twice); ``append_log=True`` is its deprecated spelling.
    ``strip_keys=True`` drops the third column of each yielded (images, texts, keys) batch:
    the keys reach the selection log, open_clip's training step still unpacks two values (see
    :func:`carry_webdataset_keys`).
    """

    def __init__(
        self,
        base_loader: Any,
        learner: nn.Module,
        reference: nn.Module | None,
        ratio: float = 0.2,
        *,
        on_yield: Callable[[int, OpenCLIPJESTLoader], None] | None = None,
        append_log: bool | None = None,
        strip_keys: bool = False,
        **jest_kwargs: Any,
    ) -> None:
        if on_yield is not None and not callable(on_yield):
            raise TypeError(f"on_yield must be callable (i, loader) -> None, got {on_yield!r}")
        jest_kwargs.setdefault("embed", embed)
        if append_log is not None:
            warnings.warn(
                "OpenCLIPJESTLoader(append_log=) is deprecated; pass "
                "selection_log=SelectionLog(path, mode='a') to append",
                DeprecationWarning,
                stacklevel=2,
            )
            log = jest_kwargs.get("selection_log")
            if append_log and isinstance(log, (str, os.PathLike)):
                jest_kwargs["selection_log"] = SelectionLog(log, mode="a")
        super().__init__(base_loader, learner, reference, ratio, **jest_kwargs)
        self.on_yield = on_yield
        self.strip_keys = bool(strip_keys)
        base_batches = getattr(base_loader, "num_batches", None)
        base_samples = getattr(base_loader, "num_samples", None)
        base_b = getattr(base_loader, "batch_size", None)
        if isinstance(base_b, int) and base_b > 0:
            # map-style (csv, synthetic): num_samples is len(dataset), not a multiple of the batch
            self._global_batch: int | None = base_b * _world_size()
        elif isinstance(base_batches, int) and isinstance(base_samples, int) and base_batches > 0:
            # webdataset: num_samples == num_batches * batch_size * world_size (the global batch)
            self._global_batch = base_samples // base_batches
        else:
            self._global_batch = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if not self.restore_pending:
            try:
                per_epoch = self.num_batches
            except TypeError:
                return
            self.set_step(int(epoch) * per_epoch)

    @property
    def num_samples(self) -> int:
        if self._global_batch is None:
            return super().num_samples
        return self.num_batches * self._global_batch

    def __iter__(self):
        it = super().__iter__()
        if self.on_yield is None and not self.strip_keys:
            return it
        return self._observed(it)

    def _observed(self, it: Any):
        try:
            for i, batch in enumerate(it):
                if self.on_yield is not None:
                    self.on_yield(i, self)
                if self.strip_keys:
                    if self.return_info:
                        batch = (batch[0][:2], batch[1])
                    else:
                        batch = batch[:2]
                yield batch
        finally:
            it.close()


def carry_webdataset_keys(dataloader: Any) -> bool:
    """Make an open_clip_train webdataset pipeline carry each sample's ``__key__``.

    open_clip_train's ``get_wds_dataset`` ends its pipeline with ``to_tuple("image", "text")``,
    so its batches hold no sample keys and a selection log could not name what was selected.
    This replaces that one stage, in place and before any worker starts, by
    ``to_tuple("image", "text", "__key__")``; pair it with ``OpenCLIPJESTLoader(strip_keys=True)``
    so the training step still receives (images, texts). Returns False, changing nothing, when
    the loader is not such a pipeline (csv, synthetic, or a different open_clip_train).
    """
    try:
        import webdataset as wds
        from webdataset.filters import FilterFunction, _to_tuple
    except ImportError:
        return False
    # wds.WebLoader is a DataPipeline around a torch DataLoader around the wds.DataPipeline.
    stages = getattr(dataloader, "pipeline", None) or []
    inner = getattr(stages[0], "dataset", None) if stages else None
    pipeline = getattr(inner, "pipeline", None)
    if not isinstance(pipeline, list):
        return False
    for i, stage in enumerate(pipeline):
        if (
            isinstance(stage, FilterFunction)
            and stage.f is _to_tuple
            and tuple(stage.args) == ("image", "text")
        ):
            pipeline[i] = wds.to_tuple("image", "text", "__key__", **stage.kw)
            return True
    return False


class _DeferSample:
    """wds map stage: the sample's encoded image -> (scoring view, record); the text through
    open_clip's text function (what its ``map_dict`` did). The augmentation seed reads the
    pipeline's shared epoch when the sample is made."""

    def __init__(self, mode: str, resolution: int, seed: int, epoch: Any, text: Any) -> None:
        self.mode, self.resolution, self.seed, self.epoch, self.text = (
            mode, resolution, seed, epoch, text,
        )

    def __call__(self, sample: dict) -> dict:
        from jeststream.adapters.deferred_images import deferred_sample, pil_decode_rgb

        epoch = self.epoch.get_value() if self.epoch is not None else 0
        make = deferred_sample(
            self.mode, self.resolution, decode=pil_decode_rgb, seed=self.seed, epoch=epoch
        )
        out = dict(sample)
        item = (sample["image"], "", sample["__key__"], str(sample.get("__url__", "?")))
        out["image"] = make(item)
        out["text"] = self.text(sample["text"]) if self.text is not None else sample["text"]
        return out


class _CollateDeferred:
    """wds ``batched`` collation: column 0's (view, record) pairs -> one Deferred field, the
    other columns as webdataset collates them."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, samples: list) -> Any:
        from webdataset.filters import default_collation_fn

        from jeststream.adapters.deferred_images import collate_deferred, pil_decode_rgb

        images = [s[0] for s in samples]
        field = collate_deferred(
            [v for v, _ in images], [r for _, r in images], transform=self.transform,
            decode=pil_decode_rgb,
        )
        rest = default_collation_fn([tuple(s[1:]) for s in samples])
        return type(rest)([field, *rest]) if isinstance(rest, (list, tuple)) else [field, rest]


def defer_webdataset_images(
    data_info: Any, score_resolution: int, *, seed: int = 0, mode: bool | str = True
) -> bool:
    """Make an open_clip_train webdataset pipeline yield its images as a
    :class:`jeststream.deferred.Deferred` field: ``score_resolution``-px scoring views (JPEG
    draft decoding) now, open_clip's own training transform on the selected examples after
    selection (:mod:`jeststream.adapters.deferred_images`), seeded by (seed, epoch, key).

    Three stages of ``get_wds_dataset``'s pipeline are replaced in place, before any worker
    starts: ``decode("pilrgb")`` by ``decode()`` (images stay encoded), ``map_dict(image=
    preprocess, text=...)`` by a map that makes the view and the record, and ``batched``'s
    collation by one that keeps them. Only for a JESTLoader (``jestify`` materialises the
    selected examples). A record that fails after selection is skipped with a warning and
    replaced by the next candidate (open_clip's pipeline warns and continues too). Returns
    False, changing nothing, when the data is not such a pipeline.
    """
    try:
        import webdataset as wds
        from webdataset.filters import FilterFunction, _batched, _decode, _map_dict
    except ImportError:
        return False
    from jeststream.adapters.deferred_images import deferred_mode

    stages = getattr(data_info.dataloader, "pipeline", None) or []
    inner = getattr(stages[0], "dataset", None) if stages else None
    pipeline = getattr(inner, "pipeline", None)
    if not isinstance(pipeline, list):
        return False
    where = {}
    for i, stage in enumerate(pipeline):
        if isinstance(stage, FilterFunction):
            if stage.f is _decode and tuple(stage.args) == ("pilrgb",):
                where["decode"] = i
            elif stage.f is _map_dict and "image" in stage.kw:
                where["map"] = i
            elif stage.f is _batched:
                where["batched"] = i
    if set(where) != {"decode", "map", "batched"}:
        return False
    transform = pipeline[where["map"]].kw["image"]
    kind = deferred_mode(mode, score_resolution, transform)
    epoch = getattr(data_info, "shared_epoch", None)
    decode = pipeline[where["decode"]]
    pipeline[where["decode"]] = wds.decode(**decode.kw)
    pipeline[where["map"]] = wds.map(
        _DeferSample(kind, score_resolution, seed, epoch, pipeline[where["map"]].kw.get("text"))
    )
    batched = pipeline[where["batched"]]
    pipeline[where["batched"]] = wds.batched(
        *batched.args, **{**batched.kw, "collation_fn": _CollateDeferred(transform)}
    )
    logger.info(
        "JEST: deferred decoding (%s records): %d-px scoring views, open_clip's training "
        "transform on the selected examples only", kind, score_resolution,
    )
    return True


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@dataclasses.dataclass
class _Epochs:
    """Forwards ``set_epoch`` to the wrapped DataInfo's own epoch store and to the JESTLoader."""

    info: Any

    def __call__(self, epoch: int) -> None:
        type(self.info).set_epoch(self.info, epoch)
        self.info.dataloader.set_epoch(epoch)


def jestify(
    data_info: Any,
    learner: nn.Module,
    reference: nn.Module | None,
    ratio: float = 0.2,
    *,
    deferred: bool = False,
    **jest_kwargs: Any,
) -> Any:
    """Return a copy of an open_clip ``DataInfo`` whose dataloader is a JEST loader.

    Args:
        data_info: ``open_clip_train.data.DataInfo`` (or anything with ``dataloader``,
            ``set_epoch``); its dataloader must report ``num_batches`` (open_clip's do).
        learner: the model being trained; scored unwrapped (never through DDP).
        reference: the frozen reference (see :func:`load_reference`).
        ratio: b / B, the fraction of each super-batch that is trained on.
        deferred: decode only what is trained on (:func:`defer_webdataset_images`): the
            scorer sees ``score_resolution``-px views (required), open_clip's training
            transform runs on the selected examples. webdataset data only (ValueError else).
        **jest_kwargs: passed to :class:`OpenCLIPJESTLoader` / JESTLoader (``loss``,
            ``criterion``, ``n_chunks``, ``snapshot_dtype``, ``on_yield`` ...).

    The returned DataInfo's ``set_epoch`` sets open_clip's shared epoch / sampler as before
    and the JEST loader's epoch. ``dataloader.num_batches`` is ``base.num_batches // n``.
    """
    base = getattr(data_info, "dataloader", None)
    if base is None or not hasattr(data_info, "set_epoch"):
        raise TypeError(
            f"jestify needs an open_clip DataInfo (with .dataloader and .set_epoch), got "
            f"{type(data_info).__name__}"
        )
    if isinstance(base, JESTLoader):
        raise ValueError("this DataInfo's dataloader is already a JESTLoader; jestify it once")
    base_batches = getattr(base, "num_batches", None)
    if not isinstance(base_batches, int):
        raise TypeError(
            f"the DataInfo's dataloader ({type(base).__name__}) has no integer num_batches; "
            "open_clip needs it to build the LR schedule"
        )
    if deferred:
        resolution = jest_kwargs.get("score_resolution")
        if resolution is None:
            raise ValueError(
                "jestify(deferred=True) needs score_resolution= (the side of the scoring views, "
                "e.g. 112 for a 224-px model)"
            )
        if not defer_webdataset_images(data_info, resolution, seed=jest_kwargs.get("seed", 0)):
            raise ValueError(
                "jestify(deferred=True) works on open_clip_train's webdataset pipeline "
                f"(--dataset-type webdataset); this DataInfo's dataloader ({type(base).__name__})"
                " is not one: drop deferred=True"
            )
    loader = OpenCLIPJESTLoader(base, unwrap_model(learner), reference, ratio, **jest_kwargs)
    if loader.num_batches < 1:
        loader.close()
        raise ValueError(
            f"the training loader has {base_batches} batches per epoch, fewer than the "
            f"n={loader.n} base batches one JEST super-batch needs at ratio={ratio}; train on "
            "more samples per epoch (--train-num-samples) or raise the ratio"
        )
    if dataclasses.is_dataclass(data_info):
        wrapped = dataclasses.replace(data_info, dataloader=loader)
    else:
        import copy

        wrapped = copy.copy(data_info)
        wrapped.dataloader = loader
    # An instance attribute, so the DataInfo keeps its class (and its own set_epoch logic).
    wrapped.set_epoch = _Epochs(wrapped)
    logger.info(
        "JEST: ratio 1/%d, %d base batches -> %d selected batches per epoch (%d samples)",
        loader.n, base_batches, loader.num_batches, loader.num_samples,
    )
    return wrapped


# -- reference models ----------------------------------------------------------------------------


def read_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state_dict of an open_clip_train checkpoint (``epoch_N.pt``) or a bare one.

    Strips DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes.
    """
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            f"{path} is neither an open_clip_train checkpoint (dict with 'state_dict') nor a "
            "model state_dict"
        )
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def checkpoint_architecture(checkpoint: Path) -> str | None:
    """The architecture of an open_clip_train checkpoint file: the ``model:`` line of the
    params.txt open_clip_train writes next to its ``checkpoints/``; None without one."""
    params = checkpoint.resolve().parent.parent / "params.txt"
    if not params.is_file():
        return None
    for line in params.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("model: "):
            return line[len("model: "):].strip()
    return None


def load_reference(
    name_or_path: str | os.PathLike,
    pretrained: str | None = None,
    model: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a frozen JEST reference model (eval mode, no gradients) with open_clip.

    Args:
        name_or_path: one of
            - a released open_clip model name (``"ViT-B-32"``) with ``pretrained`` = its tag
              (or a weights file), or ``hf-hub:org/repo``;
            - ``"local-dir:PATH"``: a folder with ``open_clip_config.json`` (``model_cfg``) and
              weights, e.g. a stage-1 model;
            - an open_clip_train checkpoint file (``.../checkpoints/epoch_N.pt``) or a bare
              state_dict file, with ``model`` = its architecture (read from the run's
              ``params.txt`` when not given).
        pretrained: tag or weights file for a released model name.
        model: architecture name (or ``local-dir:`` config) for a checkpoint file.
        device, dtype: where / in which floating dtype the reference lives.
        **model_kwargs: passed to ``open_clip.create_model``.
    """
    import open_clip

    spec = os.fspath(name_or_path)
    path = Path(spec)
    if path.is_file():
        arch = model or checkpoint_architecture(path)
        if arch is None:
            raise ValueError(
                f"{spec} is a checkpoint file; name its architecture (--jest-reference-model / "
                "model=, e.g. the --model of the run that wrote it)"
            )
        if pretrained is not None:
            raise ValueError(
                f"pretrained={pretrained!r} makes no sense with the checkpoint file {spec}; drop it"
            )
        state = read_checkpoint_state_dict(path)
        if "logit_bias" in state:  # a SigLIP checkpoint: the model must have the parameter
            model_kwargs.setdefault("init_logit_bias", float(state["logit_bias"]))
        ref = open_clip.create_model(arch, device="cpu", **model_kwargs)
        try:
            ref.load_state_dict(state)
        except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
            raise ValueError(
                f"the checkpoint {spec} does not fit the architecture {arch!r} ({exc}); pass the "
                "--model it was trained with as --jest-reference-model"
            ) from None
        logger.info("JEST reference: %s weights from %s", arch, spec)
    else:
        if model is not None and not spec.startswith(LOCAL_DIR_PREFIX):
            raise ValueError(
                f"model={model!r} is only for checkpoint files, and {spec!r} is not a file"
            )
        if spec.startswith(LOCAL_DIR_PREFIX):
            folder = Path(spec[len(LOCAL_DIR_PREFIX):])
            if not (folder / "open_clip_config.json").is_file():
                raise ValueError(
                    f"{spec}: {folder} must hold open_clip_config.json (with model_cfg) and weights"
                )
            if "init_logit_bias" not in model_kwargs:
                bias = _siglip_bias_missing_from_config(folder)
                if bias is not None:
                    model_kwargs["init_logit_bias"] = bias
        elif os.sep in spec or spec.endswith((".pt", ".bin", ".safetensors")):
            raise ValueError(f"the reference {spec!r} looks like a file path, but does not exist")
        elif pretrained is None and not spec.startswith("hf-hub:"):
            raise ValueError(
                f"the reference {spec!r} is a model name without weights: an untrained reference "
                "is useless for JEST; pass its pretrained tag (--jest-reference-pretrained) or a "
                "trained checkpoint"
            )
        ref = open_clip.create_model(spec, pretrained=pretrained, device="cpu", **model_kwargs)
        logger.info("JEST reference: %s (pretrained=%s)", spec, pretrained)
    if dtype is not None:
        ref.to(dtype)
    ref.to(device)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# open_clip's local-dir loader takes the first of these it finds (factory._find_checkpoint_in_dir)
_LOCAL_DIR_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


def _local_dir_weights(folder: Path) -> Path | None:
    """The weights file open_clip's ``local-dir:`` loader reads (its order of preference)."""
    found = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.pth")])
    found.sort(key=lambda p: p.suffix == ".safetensors", reverse=True)
    preferred = [p for p in found if p.name in _LOCAL_DIR_WEIGHTS]
    if preferred:
        return min(preferred, key=lambda p: _LOCAL_DIR_WEIGHTS.index(p.name))
    return found[0] if found else None


def _stored_logit_bias(path: Path) -> float | None:
    """The ``logit_bias`` in a weights file, read without loading the rest of it."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = [k for k in f.keys() if k in ("logit_bias", "module.logit_bias")]
            return float(f.get_tensor(names[0])) if names else None
    try:  # memory-mapped: only the pages of the tensors touched are read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    sd = state.get("state_dict", state) if isinstance(state, dict) else {}
    for name in ("logit_bias", "module.logit_bias"):
        if isinstance(sd.get(name), torch.Tensor):
            return float(sd[name])
    return None


def _siglip_bias_missing_from_config(folder: Path) -> float | None:
    """The stored ``logit_bias`` of a ``local-dir:`` model whose config has no
    ``init_logit_bias`` (a model trained with ``--siglip`` saved with its architecture's
    config): open_clip would build it without the parameter and then fail loading the weights
    (``'NoneType' object has no attribute 'ndim'``). None when nothing is missing."""
    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else {}
    if not isinstance(model_cfg, dict) or "init_logit_bias" in model_cfg:
        return None
    weights = _local_dir_weights(folder)
    bias = None if weights is None else _stored_logit_bias(weights)
    if bias is not None:
        logger.info(
            "JEST reference: %s has a logit_bias (%.4g) that its open_clip_config.json does not "
            "declare (init_logit_bias); building the model with it",
            weights,
            bias,
        )
    return bias


def check_compatible(learner: nn.Module, reference: nn.Module) -> None:
    """Fail early when the reference cannot read the learner's batches (tokens, image size)."""
    learner, reference = unwrap_model(learner), unwrap_model(reference)
    problems = []
    for what in ("context_length", "vocab_size"):
        a, b = getattr(learner, what, None), getattr(reference, what, None)
        if isinstance(a, int) and isinstance(b, int) and a != b:
            problems.append(f"text {what} {a} (learner) vs {b} (reference)")
    a = getattr(getattr(learner, "visual", None), "image_size", None)
    b = getattr(getattr(reference, "visual", None), "image_size", None)
    if a is not None and b is not None and tuple(_pair(a)) != tuple(_pair(b)):
        problems.append(f"image size {a} (learner) vs {b} (reference)")
    if problems:
        raise ValueError(
            "the reference model cannot score the learner's batches (the base loader tokenises "
            "and resizes for the learner): " + "; ".join(problems)
            + ". Use a reference with the same tokenizer and image size"
        )


def _pair(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def write_local_dir(model: nn.Module, model_cfg: dict, folder: str | os.PathLike) -> str:
    """Save ``model`` as an open_clip ``local-dir:`` folder; returns the ``local-dir:PATH`` spec."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = dict(model_cfg)
    bias = getattr(unwrap_model(model), "logit_bias", None)
    if bias is not None:  # else open_clip builds the model without it and the weights don't load
        model_cfg.setdefault("init_logit_bias", float(bias.detach()))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}, indent=2))
    torch.save(unwrap_model(model).state_dict(), folder / "open_clip_pytorch_model.bin")
    return LOCAL_DIR_PREFIX + os.fspath(folder)
