"""The order in which training blocks are visited: a pure function of (seed, epoch, rank, world size).

Each epoch is a fresh permutation of all blocks drawn from `numpy.random.default_rng([seed, epoch])`;
rank r of W takes every W-th entry starting at r (its own shard), truncated so every rank gets the same
number of micro-batches (DistributedDataParallel needs all ranks to step together); an incomplete last
micro-batch is dropped. Because nothing here depends on global RNG state, a resumed run that knows
(epoch, micro-batch index) sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockOrder:
    """`n_blocks` training blocks cut into micro-batches of `batch_size` blocks for one rank."""

    n_blocks: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        return (self.n_blocks // self.world_size) // self.batch_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Block indices of this rank's micro-batches in `epoch`: int64 [batches_per_epoch, batch_size]."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        per_rank = self.n_blocks // self.world_size
        mine = perm[self.rank :: self.world_size][:per_rank]
        used = self.batches_per_epoch * self.batch_size
        return mine[:used].reshape(self.batches_per_epoch, self.batch_size).astype(np.int64)
