"""``JESTTrainer``: transformers' ``Trainer`` with its train dataloader wrapped in a JESTLoader.

    trainer = JESTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                          data_collator=collate_fn, jest_reference=reference, jest_ratio=0.2)
    trainer.train(resume_from_checkpoint=...)     # one class changed, nothing else

The base loader is a ``torchdata`` ``StatefulDataLoader`` over ``train_dataset`` with the
trainer's batch size, collator, workers and seed: a map-style dataset is shuffled by a seeded
stateful sampler (``StatefulDistributedSampler`` across ranks under ``torchrun``), an iterable
one (e.g. a streaming ``datasets.IterableDataset``, split across ranks with
``datasets.distributed.split_dataset_by_node``) is read in order. Each yielded batch is JEST-
selected from ``round(1/jest_ratio)`` base batches, so one trainer epoch has 1/n of the base
batches: ``num_train_epochs`` counts passes over the data, ``max_steps`` counts optimizer steps
on selected batches (n base batches drawn per step). Under ``torchrun`` the loader selects
globally across ranks (``JESTLoader(distributed="auto")``).

Per-example keys (a ``__key__`` or ``key`` column) are carried past the collator into the
selection log (default ``OUTPUT_DIR/selection-rank{rank}.jsonl``) and stripped before the
model's forward. Each checkpoint holds every rank's loader state (``jest_loader_rank{R}.pt``,
with the learner snapshots scheduled for the next super-batches), and
``train(resume_from_checkpoint=...)`` restores it instead of skipping batches, so the resumed
run selects what the uninterrupted one did.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from jeststream.loader import JESTLoader

__all__ = ["JESTTrainer", "KeyedCollator", "LOADER_STATE"]

LOADER_STATE = "jest_loader_rank{rank}.pt"
KEY_COLUMNS = ("__key__", "key")


class KeyedCollator:
    """Wraps a collator so that each example's key (``__key__`` / ``key``) survives it: the key
    is taken off every example, the rest collated as before, the keys added as ``__key__``."""

    def __init__(self, collate: Callable[[list], Any], key_columns=KEY_COLUMNS) -> None:
        self.collate, self.key_columns = collate, tuple(key_columns)

    def __call__(self, examples: list) -> Any:
        column = None
        if examples and isinstance(examples[0], Mapping):
            column = next((c for c in self.key_columns if c in examples[0]), None)
        if column is None:
            return self.collate(examples)
        keys = [str(e[column]) for e in examples]
        batch = self.collate([{k: v for k, v in e.items() if k != column} for e in examples])
        if isinstance(batch, Mapping):
            batch = dict(batch)
            batch["__key__"] = keys
        return batch


class _TrainLoader:
    """What the trainer iterates: the JESTLoader's batches without key entries, its length,
    ``set_epoch`` (passed to an iterable dataset too) and state."""

    def __init__(self, loader: JESTLoader, dataset: Any) -> None:
        self.jest = loader
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self.jest)

    def set_epoch(self, epoch: int) -> None:
        self.jest.set_epoch(epoch)
        if isinstance(self._dataset, torch.utils.data.IterableDataset) and hasattr(
            self._dataset, "set_epoch"
        ):
            self._dataset.set_epoch(epoch)

    def __iter__(self):
        for batch in self.jest:
            if isinstance(batch, Mapping):
                batch = {k: v for k, v in batch.items() if k not in KEY_COLUMNS}
            yield batch


class _EpochFraction(TrainerCallback):
    """After a resume in the middle of an epoch the trainer counts that epoch's batches from the
    resume point (it skipped none: the loader resumed itself); restore the fraction it would
    have logged had it run through."""

    def __init__(self, trainer: JESTTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        loader = self.trainer._jest_train_loader
        if loader is None or not self.trainer._jest_resumed:
            return
        try:
            per_epoch = len(loader)
        except TypeError:
            return
        updates = max(1, math.ceil(per_epoch / args.gradient_accumulation_steps))
        epoch = max(0, state.global_step - 1) // updates
        done = state.global_step - epoch * updates
        state.epoch = epoch + min(done * args.gradient_accumulation_steps, per_epoch) / per_epoch


class JESTTrainer(Trainer):
    """A ``transformers.Trainer`` whose train batches are JEST-selected (see the module doc).

    Args (besides Trainer's):
        jest_reference: the frozen reference model, a ``ReferenceCache``, or None with
            ``jest_kwargs={"criterion": "hard_learner"}``.
        jest_ratio: the filtering ratio b/B (n = round(1/ratio) base batches per step).
        jest_kwargs: further ``JESTLoader`` arguments (loss, n_chunks, embed, score_resolution,
            ...). ``seed`` defaults to ``args.seed`` and ``selection_log`` to
            ``OUTPUT_DIR/selection-rank{rank}.jsonl`` (``{rank}`` is filled in; None: no log).
        jest_save_snapshot: save the learner snapshots the next super-batches are scheduled to
            be scored with in each checkpoint (exact resume under deterministic lagged scoring;
            costs a CPU copy of the model per scheduled version).
    """

    def __init__(
        self,
        *args: Any,
        jest_reference: nn.Module | Any = None,
        jest_ratio: float = 0.2,
        jest_kwargs: dict | None = None,
        jest_save_snapshot: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.jest_reference = jest_reference
        self.jest_ratio = jest_ratio
        self.jest_kwargs = dict(jest_kwargs or {})
        self.jest_save_snapshot = bool(jest_save_snapshot)
        self._jest_train_loader: _TrainLoader | None = None
        self._jest_resume_from: str | None = None
        self._jest_resumed = False
        self.add_callback(_EpochFraction(self))

    # -- the loaders -------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # keep the key column through remove_unused_columns: the selection log needs it
        self._signature_columns = list(self._signature_columns) + [
            c for c in KEY_COLUMNS if c not in self._signature_columns
        ]

    def get_jest_base_loader(self) -> Any:
        """The base loader JEST draws from (override to bring your own resumable loader)."""
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset = self.train_dataset
        try:
            import datasets
        except ImportError:  # pragma: no cover -- the transformers extra works without it
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
            collate = self.data_collator
        else:
            collate = self._get_collator_with_removed_columns(self.data_collator, "training")
        world, rank = self.args.world_size, self.args.process_index
        kwargs: dict[str, Any] = {
            "batch_size": self._train_batch_size,
            "collate_fn": KeyedCollator(collate),
            "num_workers": self.args.dataloader_num_workers,
            "pin_memory": False,
            "drop_last": True,
        }
        if self.args.dataloader_num_workers > 0:
            kwargs["persistent_workers"] = self.args.dataloader_persistent_workers
            kwargs["prefetch_factor"] = self.args.dataloader_prefetch_factor
        if isinstance(dataset, torch.utils.data.IterableDataset):
            if world > 1 and datasets is not None and isinstance(dataset, datasets.IterableDataset):
                from datasets.distributed import split_dataset_by_node

                dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
            return StatefulDataLoader(dataset, **kwargs)
        if world > 1:
            sampler = StatefulDistributedSampler(dataset, num_replicas=world, rank=rank,
                                                 shuffle=True, seed=self.args.seed, drop_last=True)
            return StatefulDataLoader(dataset, sampler=sampler, **kwargs)
        generator = torch.Generator().manual_seed(self.args.seed)
        return StatefulDataLoader(dataset, shuffle=True, generator=generator, **kwargs)

    def get_train_dataloader(self) -> _TrainLoader:
        if self._jest_train_loader is not None:
            self._jest_train_loader.jest.close()
        base = self.get_jest_base_loader()
        kwargs = dict(self.jest_kwargs)
        kwargs.setdefault("seed", self.args.seed)
        rank = self.args.process_index
        log = kwargs.get("selection_log", os.path.join(self.args.output_dir,
                                                       "selection-rank{rank}.jsonl"))
        if log is not None:
            kwargs["selection_log"] = os.fspath(log).format(rank=rank)
        loader = JESTLoader(base, self.model, self.jest_reference, self.jest_ratio, **kwargs)
        if self._jest_resume_from is not None:
            path = os.path.join(self._jest_resume_from, LOADER_STATE.format(rank=rank))
            if not os.path.isfile(path):
                loader.close()
                raise ValueError(
                    f"the checkpoint {self._jest_resume_from} holds no JEST loader state for rank "
                    f"{rank} ({os.path.basename(path)}): it was not written by JESTTrainer, or by "
                    "another number of ranks; resume from a JESTTrainer checkpoint (or start "
                    "afresh)"
                )
            loader.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
            self._jest_resumed = True
        self._jest_train_loader = _TrainLoader(loader, base.dataset)
        return self._jest_train_loader

    @property
    def jest_loader(self) -> JESTLoader | None:
        """The JESTLoader of the current (or last) training run."""
        return None if self._jest_train_loader is None else self._jest_train_loader.jest

    # -- checkpoints -------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self._jest_train_loader is not None:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            state = self._jest_train_loader.jest.state_dict(include_snapshot=self.jest_save_snapshot)
            path = os.path.join(folder, LOADER_STATE.format(rank=self.args.process_index))
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # written before the trainer's own files
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: bool | str | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """``Trainer.train``; a checkpoint to resume from restores the loader's state, and the
        trainer skips no batches (``ignore_data_skip`` for the run): the loader is already
        where the checkpoint left it."""
        ckpt = resume_from_checkpoint
        if isinstance(ckpt, bool):
            ckpt = get_last_checkpoint(self.args.output_dir) if ckpt else None
            if resume_from_checkpoint and ckpt is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._jest_resume_from = None if ckpt is None else os.fspath(ckpt)
        self._jest_resumed = False
        skip = self.args.ignore_data_skip
        self.args.ignore_data_skip = True if ckpt is not None else skip
        try:
            return super().train(resume_from_checkpoint=ckpt, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self.args.ignore_data_skip = skip
            self._jest_resume_from = None
            if self._jest_train_loader is not None:
                self._jest_train_loader.jest.close()
