"""ShapeBucketBatchSampler (one image size per batch, rank-aware, seeded by (seed, epoch)) and a resumable loader."""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Optional

import numpy as np
from torch.utils.data import DataLoader, Sampler


class ShapeBucketBatchSampler(Sampler[list[int]]):
    """Batches of sample indices whose images share one size, split across distributed ranks.

    Samples are grouped by shape (H, W) and cut into batches of at most `batch_size` within each group.
    Training (`shuffle=True`): the order within groups and the order of the batches are drawn from
    numpy's default_rng([seed, epoch]), so an epoch's order depends only on (seed, epoch); the batch list is padded
    by repeating its first batches until it divides by `world_size`, so every rank gets the same number of batches.
    Evaluation (`shuffle=False`): fixed order, no padding; the samples, listed group by group, are dealt to the ranks
    in turn (sample k to rank k mod world_size) and then batched per group, so every sample is seen exactly once
    across all ranks and rank sizes differ by at most one sample (every rank has a batch when there are at least
    `world_size` samples).

    Lightning calls `set_epoch` on `loader.batch_sampler.sampler`, hence the `sampler` property returning self.
    `state_dict`/`load_state_dict` let a run resume in the middle of an epoch (see ResumableDataLoader).
    """

    def __init__(self, sample_shapes: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        shapes = np.asarray(sample_shapes, dtype=np.int64).reshape(-1, 2)
        if len(shapes) == 0:
            raise ValueError("no samples to batch")
        unique_shapes, group_of = np.unique(shapes, axis=0, return_inverse=True)
        self.groups = [np.flatnonzero(group_of.reshape(-1) == g) for g in range(len(unique_shapes))]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume: Optional[tuple[int, int]] = None

    @property
    def sampler(self) -> "ShapeBucketBatchSampler":
        """Itself, so that Lightning finds `set_epoch` at `loader.batch_sampler.sampler`."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def _batched(self, groups: list[np.ndarray]) -> list[np.ndarray]:
        return [group[start:start + self.batch_size] for group in groups
                for start in range(0, len(group), self.batch_size)]

    def _evaluation_groups(self) -> list[np.ndarray]:
        """This rank's share of every group when samples are dealt to the ranks in turn."""
        sizes = np.array([len(group) for group in self.groups])
        starts = np.cumsum(sizes) - sizes
        return [group[(self.rank - start) % self.world_size::self.world_size]
                for group, start in zip(self.groups, starts)]

    def __len__(self) -> int:
        if self.shuffle:
            total = sum(math.ceil(len(group) / self.batch_size) for group in self.groups)
            return math.ceil(total / self.world_size)
        return sum(math.ceil(len(group) / self.batch_size) for group in self._evaluation_groups())

    def rank_batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch (sample index arrays), in the order they are yielded."""
        if not self.shuffle:
            return self._batched(self._evaluation_groups())
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = self._batched([rng.permutation(group) for group in self.groups])
        batches = [batches[i] for i in rng.permutation(len(batches))]
        padding = len(self) * self.world_size - len(batches)
        batches += [batches[i % len(batches)] for i in range(padding)]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([batch.tolist() for batch in self.rank_batches()[self.resume_offset():]])

    def resume_offset(self) -> int:
        """Batches of the current epoch that iteration skips because a loaded state says they were consumed."""
        if self._resume is None or self._resume[0] != self.epoch:
            return 0
        return min(self._resume[1], len(self))

    def finish_resume(self) -> None:
        """Forget the loaded position: later iterations yield whole epochs again."""
        self._resume = None

    def state_dict(self, batches_done: int = 0) -> dict:
        """Position to resume from: `batches_done` batches of epoch `epoch` were consumed on this rank."""
        return {"epoch": self.epoch, "batches_done": int(batches_done), "world_size": self.world_size,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Make iterations of epoch state['epoch'] skip the batches already consumed (until `finish_resume`)."""
        if state.get("world_size", self.world_size) != self.world_size or state.get("seed", self.seed) != self.seed:
            warnings.warn(f"resuming a sampler saved with world_size={state.get('world_size')}, seed="
                          f"{state.get('seed')} on world_size={self.world_size}, seed={self.seed}: the rest of the "
                          "interrupted epoch will not match the original order", stacklevel=2)
        self._resume = (int(state["epoch"]), int(state["batches_done"]))


class _CountingIterator:
    """Wraps a DataLoader iterator and counts the batches it has handed out."""

    def __init__(self, iterator, loader: "ResumableDataLoader"):
        self.iterator = iterator
        self.loader = loader

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.loader.batches_fetched += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)


class ResumableDataLoader(DataLoader):
    """DataLoader over a ShapeBucketBatchSampler whose position Lightning saves in checkpoints.

    `state_dict()` records (epoch, batches handed out); after `load_state_dict` the next iteration of that epoch
    continues with the following batch, so a mid-epoch checkpoint resumes where it stopped. Lightning does not
    prefetch ahead of the loop when the loader has a length, so the count equals the batches the loop consumed.
    (A multi-process iterator iterates the batch sampler twice while it starts; the skip holds for both.)
    """

    def __init__(self, dataset, batch_sampler: ShapeBucketBatchSampler, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.batches_fetched = 0

    def __iter__(self):
        iterator = super().__iter__()
        self.batches_fetched = self.batch_sampler.resume_offset()
        self.batch_sampler.finish_resume()
        return _CountingIterator(iterator, self)

    def state_dict(self) -> dict:
        """The batch sampler's position after the batches handed out so far in this epoch."""
        return self.batch_sampler.state_dict(batches_done=self.batches_fetched)

    def load_state_dict(self, state: dict) -> None:
        """Resume the epoch recorded in `state` after its consumed batches."""
        self.batch_sampler.load_state_dict(state)
