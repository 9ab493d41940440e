"""The epoch order and the seeds: a permutation seeded by (seed, epoch), padded to a multiple of the
world size and dealt round-robin to the ranks (as ``DistributedSampler``); every random choice of a
sample draws from its own stream, :func:`make_generator` (tag, seed, epoch, pos, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

# Stream tags for :func:`sample_seed`, so that no two random choices share a stream.
_ORDER, _TEMPORAL, _SPATIAL, _REDRAW, _WORKER, _SELECT = range(6)


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, well mixed (numpy SeedSequence): (tag, seed, epoch, pos, ...)."""
    words = np.random.SeedSequence([k % (1 << 63) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def make_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(*keys))


class EpochBatches:
    """Batch sampler: this rank's work items ``(epoch, pos, index)`` of one epoch, from batch `start`
    on (mutable: the loader sets epoch/start before each pass; persistent workers re-read it on every
    pass). Global position ``pos`` of the epoch's order is the sample, whatever rank draws it."""

    def __init__(
        self, num_items: int, *, rank: int, world_size: int, videos_per_batch: int, seed: int
    ) -> None:
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.videos_per_batch, self.seed = videos_per_batch, seed
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_items / self.world_size) // self.videos_per_batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order = torch.randperm(
            self.num_items, generator=make_generator(_ORDER, self.seed, self.epoch)
        ).tolist()
        per_rank = math.ceil(self.num_items / self.world_size)
        # Global positions of this rank (round-robin); positions past the end wrap (padding).
        positions = range(self.rank, per_rank * self.world_size, self.world_size)
        vpb = self.videos_per_batch
        for b in range(self.start, self.batches_per_epoch()):
            yield [(self.epoch, p, order[p % self.num_items]) for p in positions[b * vpb : (b + 1) * vpb]]


__all__ = ["EpochBatches", "make_generator", "sample_seed"]
