"""What each process sees at each step: its share of every epoch, in micro-batches, flipped, resumable.

``ShardedBatches`` cuts a seeded permutation of a dataset (``resdiff.data``) into global micro-batches of
which each process takes its own slice; its position is two integers, saved in checkpoints. ``loader_workers``
decides how many DataLoader worker processes feed it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from .data import random_flip
from .errors import UsageError

__all__ = ["ShardedBatches", "loader_workers"]


def loader_workers(setting: int | str, cached: bool, device: torch.device | str, local_processes: int = 1,
                   cpus: int | None = None) -> tuple[int, str]:
    """How many DataLoader worker processes to use, and why (for the start-up summary).

    An integer ``setting`` is used as it is. ``"auto"`` picks none when the decoded images are cached in
    memory (a batch is then a few slices of one tensor: microseconds) or when the model computes on the
    CPU (workers are processes that would take the cores the model's threads run on, and start again every
    epoch). Otherwise, a GPU run decoding files per item gets one worker per
    core this process may use, less the one its main thread needs, at most 8.
    """
    if setting != "auto":
        return int(setting), "data.num_workers"
    if cached:
        return 0, "auto: the decoded images are cached in memory"
    if torch.device(device).type == "cpu":
        return 0, "auto: the model computes on the CPU, workers would take its cores"
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(cpus // max(local_processes, 1), 1)
    return min(8, max(share - 1, 1)), f"auto: images are decoded per batch; {share} core(s) per process"


class ShardedBatches:
    """Endless, deterministic, resumable batches for one of ``world`` processes.

    Epoch e is a permutation seeded by (seed, e), cut into global micro-batches of which each process
    takes its own slice. The position is two integers, (epoch, index), so a resumed run sees exactly
    the batches it would have seen. With ``flip``, each batch is mirrored by ``random_flip`` as it is
    handed out, in the training process (never in a loader worker), so the flips follow the saved RNG too.
    """

    def __init__(
        self, dataset: torch.utils.data.Dataset, per_process: int, rank: int, world: int, seed: int,
        loader_kwargs: dict, flip: bool = False,
    ):
        self.dataset, self.per_process, self.rank, self.world, self.seed = dataset, per_process, rank, world, seed
        self.loader_kwargs, self.flip = loader_kwargs, flip
        self.epoch, self.index = 0, 0
        self.per_epoch = len(dataset) // (per_process * world)
        if self.per_epoch == 0:
            raise UsageError(
                f"the dataset has {len(dataset)} images, fewer than one batch of {per_process * world} "
                f"({per_process} per process x {world} processes); add images or lower --batch-size"
            )

    @property
    def position(self) -> tuple[int, int]:
        """Where the batches are: (epoch, index of the next batch in it). Checkpoints save it."""
        return self.epoch, self.index

    def seek(self, epoch: int, index: int) -> None:
        """Continue from ``position`` (epoch, index); the next iteration starts there."""
        self.epoch, self.index = epoch, index

    def _generator(self) -> torch.Generator:
        """This epoch's generator. DataLoader draws worker seeds from it, not from the global RNG."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def _epoch_batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.dataset), generator=self._generator())
        order = order[: self.per_epoch * self.per_process * self.world].view(self.per_epoch, self.world, self.per_process)
        return order[:, self.rank].tolist()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            batches = self._epoch_batches()[self.index :]
            for images, labels in DataLoader(self.dataset, batch_sampler=batches, generator=self._generator(), **self.loader_kwargs):
                self.index += 1
                yield (random_flip(images) if self.flip else images), labels
            self.epoch, self.index = self.epoch + 1, 0
