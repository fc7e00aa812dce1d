"""A training loader that resumes part-way through an epoch, on one process or sharded over ranks.

Lightning (2.x) stores the ``state_dict()`` of every training dataloader that has ``state_dict`` and
``load_state_dict`` in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, on resume,
loads it before the first ``iter()``. It then expects the loader to yield only the batches of the epoch
that were not trained on yet, while ``len()`` stays the length of the whole epoch (the fit loop adds the
batches already done to its own count). A plain ``DataLoader`` starts its epoch over instead, so a run
resumed mid-epoch would train on other batches than an uninterrupted one.

The sampler is a ``DistributedSampler``, so Lightning keeps it rather than putting its own on top: it
shards by itself (rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of the epoch's order), and the
epoch's order (a permutation seeded by ``seed + epoch``, or the dataset order) is the same whatever the
number of processes. So ``W`` processes with batch ``B`` train on exactly the batches of one process with
batch ``W * B``, and ``set_epoch``, which Lightning calls each epoch, reshuffles.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """The indices of one rank's share of an epoch, which can start ``skip`` samples in.

    Args:
        dataset: a sized (map-style) dataset.
        shuffle: a new permutation each epoch (seeded by ``seed + epoch``) or the dataset order.
        seed: seed of the permutation; the same on every rank.
        num_replicas: processes sharing the data (None: the process group's world size, 1 without one).
        rank: this process's rank (None: from the process group, 0 without one). With both None the
            sampler follows the process group even if it was built before it (a loader made before ``fit``).
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self._from_group = num_replicas is None and rank is None
        replicas, this_rank = _group()
        num_replicas = replicas if num_replicas is None else num_replicas
        rank = this_rank if rank is None else rank
        # drop_last=False: like Lightning's own sampler, the last samples are repeated so every rank has as many
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.skip = 0

    def _follow_the_group(self) -> None:
        """Built before the process group existed (a loader made before ``fit``): shard over it now."""
        if self._from_group and (self.num_replicas, self.rank) != _group():
            self.num_replicas, self.rank = _group()
            self.num_samples = math.ceil(len(self.dataset) / self.num_replicas)  # type: ignore[arg-type]
            self.total_size = self.num_samples * self.num_replicas

    def __len__(self) -> int:
        self._follow_the_group()
        return super().__len__()

    def __iter__(self) -> Iterator[int]:
        self._follow_the_group()
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0  # only the first epoch after a resume starts part-way
        return iter(indices[skip:])


def _group() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose state is how far into the epoch it got.

    Args:
        dataset: a sized (map-style) dataset.
        batch_size: samples per batch on this process.
        sampler: the resumable sampler of ``dataset``.
        **kwargs: any other ``DataLoader`` argument (``drop_last``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._yielded = 0  # batches of the current epoch handed out so far
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator, so nothing runs before the first batch is asked for: Lightning calls set_epoch
        # between iter() and the first next().
        self._yielded, self._resume_at = self._resume_at, 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """How far into which epoch: the samples consumed over all ranks, so a resume with as many ranks
        continues exactly (with another number of ranks, it still trains on the epoch's unseen samples)."""
        replicas = getattr(self.sampler, "num_replicas", 1)
        return {"epoch": getattr(self.sampler, "epoch", 0), "samples": self._yielded * self.batch_size * replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration where the saved one stopped (from the start if its epoch had ended)."""
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):  # Lightning replaced it (overfit_batches): start over
            return
        sampler._follow_the_group()
        batches = state["samples"] // sampler.num_replicas // self.batch_size
        if batches >= len(self):  # saved on the epoch's last batch: the next epoch starts afresh
            batches = 0
        sampler.set_epoch(state["epoch"])
        sampler.skip = batches * self.batch_size
        self._resume_at = batches


def resumable_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, **kwargs: Any
) -> ResumableDataLoader:
    """A :class:`ResumableDataLoader` of ``dataset``, sharded over the process group if there is one.

    Build it where the process group already exists (a ``LightningDataModule``'s ``train_dataloader``).

    Args:
        dataset: a sized (map-style) dataset.
        batch_size: samples per batch on this process.
        shuffle: a new order each epoch, seeded by ``seed + epoch``, or the dataset order.
        seed: seed of the order; the same on every rank.
        **kwargs: any other ``DataLoader`` argument.
    """
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
    # keywords only: Lightning may build the loader again with another sampler (overfit_batches)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
