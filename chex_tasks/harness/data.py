"""Data loading shared by the tasks: one user-facing data error, one evaluation sampler, and the training loader
whose position can be checkpointed and resumed exactly, with worker processes and inside an epoch.

The training loader is torchdata's ``StatefulDataLoader`` (a drop-in ``DataLoader`` with ``state_dict()`` /
``load_state_dict()``): it records how many batches of the current epoch were consumed and, per worker process, a
snapshot of the worker's state after every batch. Two things make its resume exact here:

- **data order**: the sampler is a pure function of ``(seed, epoch)``: ``DistributedSampler.set_epoch`` with several
  processes (or when the task asks for it), otherwise a ``RandomSampler`` whose generator is re-seeded with
  ``seed + epoch`` (:meth:`TrainLoader.set_epoch`). On resume the loader fast-forwards the sampler to its position;
- **augmentation randomness in workers**: every dataset is wrapped in :class:`WorkerRngState`, whose ``state_dict``
  is the worker process's global RNG state (torch, Python ``random``, numpy). The loader snapshots it with every
  batch, and restarted workers continue those streams instead of re-seeding. In the main process (``workers=0``) it
  is empty: the harness checkpoints the main process's generators itself.

Workers are not persistent: each epoch starts new workers seeded from the loader generator (re-seeded per epoch),
so an epoch's augmentation depends only on ``(seed, epoch)``, whatever process ran the epoch before.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from .runtime import capture_rng, restore_rng

__all__ = ["DataError", "ShardSampler", "WorkerRngState", "TrainLoader", "make_train_loader", "make_eval_loader"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A user-facing data problem (missing folder or annotation file, wrong layout, unreadable images)."""


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank ``r`` of ``w`` reads indices ``r, r+w, ...`` with no padding.

    ``DistributedSampler`` pads the last shard with repeated samples, which would bias accuracy or add duplicate
    detections; results summed or gathered over these exact shards cover every sample once.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class WorkerRngState(Dataset):
    """``dataset`` plus the ``Stateful`` protocol of torchdata: the state of a worker process is its RNG state."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:       # the task's dataset attributes (label maps, coco...) stay visible
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def state_dict(self) -> dict:
        return capture_rng(cuda=False) if get_worker_info() is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state and get_worker_info() is not None:
            restore_rng(state)


class TrainLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose order for epoch ``e`` is fixed by :meth:`set_epoch` (see the module doc)."""

    seed: int = 0

    def set_epoch(self, epoch: int) -> None:
        sampler = self.batch_sampler if self.batch_sampler is not None and hasattr(self.batch_sampler, "set_epoch") \
            else self.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(self.seed + epoch)


def make_train_loader(dataset: Dataset, *, batch_size: int | None = None, batch_sampler: Sampler | None = None,
                      workers: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                      collate_fn: Callable | None = None, pin_memory: bool = False,
                      distributed_order: bool = False) -> TrainLoader:
    """The training loader of a task.

    Args:
        dataset: the training set (wrapped in :class:`WorkerRngState` here).
        batch_size: images per process and micro-batch (with the default sampler).
        batch_sampler: a deterministic batch sampler of the task's own (e.g. aspect-ratio groups); replaces
            ``batch_size``/``drop_last``. It must yield the same batches when rebuilt with the same arguments.
        workers: worker processes.
        seed: the run seed; epoch ``e`` shuffles with ``seed + e``.
        rank, world_size: this process's shard.
        drop_last: drop a trailing incomplete batch (every micro-batch then has the same size).
        distributed_order: use ``DistributedSampler`` even in one process (the order a task had before).
    """
    wrapped = WorkerRngState(dataset)
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=collate_fn, generator=generator,
                  snapshot_every_n_steps=1)
    if batch_sampler is None:
        if world_size > 1 or distributed_order:
            sampler: Sampler = DistributedSampler(wrapped, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
        else:
            sampler = RandomSampler(wrapped, generator=generator)
        common.update(batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    else:
        common.update(batch_sampler=batch_sampler)
    with warnings.catch_warnings():    # torchdata 0.11 calls a torch API that torch 2.14 deprecates: noise
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        loader = TrainLoader(wrapped, **common)
    loader.seed = seed
    if len(loader) == 0:
        raise DataError(f"the training set ({len(dataset)} samples) is too small for {world_size} process(es) "
                        f"with batch size {batch_size}")
    return loader


def make_eval_loader(dataset: Dataset, *, batch_size: int, workers: int = 0, rank: int = 0, world_size: int = 1,
                     collate_fn: Callable | None = None, pin_memory: bool = False,
                     limit: int | None = None) -> torch.utils.data.DataLoader:
    """Evaluation loader over this rank's exact shard (:class:`ShardSampler`) of the first ``limit`` samples."""
    size = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(size, rank, world_size),
                                       num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory)
