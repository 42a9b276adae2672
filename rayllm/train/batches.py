"""Micro-batches of packed sequences for one data-parallel rank, read from memory-mapped shards.

The order is a function of the seed and the batch index alone: batch ``i`` of the run is the
``i``-th slice of a seeded permutation of all sequences (a new permutation each epoch), and
rank ``r`` takes its part of that slice. So every split of the same global batch over ranks
sees the same sequences, and a resumed run continues at the exact sample it stopped at.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rayllm.data.shards import open_shard
from rayllm.errors import RayllmError


class TokenBatches:
    def __init__(
        self,
        data: str,
        entries: list[dict[str, Any]],
        *,
        dp_rank: int,
        dp_size: int,
        batch: int,
        seed: int,
    ):
        self.shards = [open_shard(data, entry) for entry in entries]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        self.dp_rank, self.batch, self.seed = dp_rank, batch, seed
        self.global_batch = dp_size * batch
        self.per_epoch = int(self.starts[-1]) // self.global_batch
        if self.per_epoch == 0:
            raise RayllmError(
                f"{data} holds {self.starts[-1]} sequences, fewer than one global batch "
                f"({self.global_batch}); lower micro_batch_size or curate more data"
            )
        self._order: tuple[int, np.ndarray] | None = None

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of global micro-batch ``index``, as (inputs, next-token targets)."""
        epoch, position = divmod(index, self.per_epoch)
        start = position * self.global_batch + self.dp_rank * self.batch
        picked = self._permutation(epoch)[start : start + self.batch]
        rows = torch.from_numpy(np.stack([self._row(i) for i in picked]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(int(self.starts[-1]))
            self._order = (epoch, order)
        return self._order[1]

    def _row(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[shard][index - self.starts[shard]]
