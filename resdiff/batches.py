"""What each process sees at each step: its share of every epoch, in micro-batches, flipped, resumable.

``ShardedBatches`` cuts a seeded permutation of a dataset (``resdiff.data``, ``resdiff.prepare``) into global
micro-batches of which each process takes its own slice, and decides which items are mirrored: the one place
random flips are decided. Its position is two integers, saved in checkpoints. ``loader_workers`` decides how many
DataLoader worker processes feed it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from .errors import UsageError

__all__ = ["ShardedBatches", "loader_workers", "continue_at"]


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


def continue_at(epoch: int, batch: int, old_micro: int, micro: int) -> tuple[int, int]:
    """Where the data continues after a checkpoint at (``epoch``, ``batch``) taken with ``old_micro`` images per
    global micro-batch (0: not known), when the run now takes ``micro``. An epoch's order does not depend on the
    number of processes (each takes its slice of every global micro-batch), so with the same images per
    micro-batch (the same global batch and accumulation) the run continues at the same place on any number of
    processes; with another micro-batch it continues at the image it reached when a whole number of
    micro-batches gets there, else at the next epoch."""
    done = batch * old_micro  # images of the epoch already trained on
    if old_micro and done % micro == 0:
        return epoch, done // micro
    return epoch + 1, 0


class ShardedBatches:
    """Endless, deterministic, resumable batches for one of ``world`` processes.

    Epoch e is a permutation seeded by (seed, e), cut into global micro-batches of which each process
    takes its own slice. The position is two integers, (epoch, index), so a resumed run sees exactly
    the batches it would have seen. With ``flip``, the same seed also chooses which items of the epoch are
    mirrored left-right (each with probability 1/2), so flips do not depend on the loader workers or on the
    global RNG. A dataset with ``flipped(i)`` gives the item of the mirrored image itself (a latent dataset
    stores the latents of the mirrored images, since mirroring a latent is not mirroring its image); any
    other item is mirrored as it is read.
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

    def _epoch_batches(self) -> list[list[tuple[int, bool]]]:
        """This process's micro-batches of the epoch: lists of (item, mirrored)."""
        generator = self._generator()
        order = torch.randperm(len(self.dataset), generator=generator)
        flips = torch.rand(len(self.dataset), generator=generator) < 0.5 if self.flip else torch.zeros(len(order), dtype=torch.bool)
        shape = (self.per_epoch, self.world, self.per_process)
        kept = self.per_epoch * self.per_process * self.world
        items, mirrored = order[:kept].view(shape)[:, self.rank].tolist(), flips[:kept].view(shape)[:, self.rank].tolist()
        return [list(zip(batch, flipped)) for batch, flipped in zip(items, mirrored)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        items = _Items(self.dataset)
        while True:
            batches = self._epoch_batches()[self.index :]
            for images, labels in DataLoader(items, batch_sampler=batches, generator=self._generator(), **self.loader_kwargs):
                self.index += 1
                yield images, labels
            self.epoch, self.index = self.epoch + 1, 0


class _Items(torch.utils.data.Dataset):
    """A dataset's items by (index, mirrored): the dataset's ``flipped(i)`` where it has one, else item i mirrored
    left-right."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        i, mirrored = key
        if not mirrored:
            return self.dataset[i]
        if hasattr(self.dataset, "flipped"):
            return self.dataset.flipped(i)
        x, label = self.dataset[i]
        return x.flip(-1), label
