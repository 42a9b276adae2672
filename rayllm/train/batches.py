"""Micro-batches of packed sequences for one data-parallel rank: from memory-mapped shards in
a global order (:class:`TokenBatches`), streamed by Ray Data (:class:`StreamedBatches`), or
rows of packed fine-tuning examples in the same global order (:class:`ExampleBatches`).

The global order is a function of the seed and the batch index alone: batch ``i`` of the run is the
``i``-th slice of a seeded permutation of all sequences (a new permutation each epoch), and
rank ``r`` takes its part of that slice. So every split of the same global batch over ranks
sees the same sequences, and a resumed run continues at the exact sample it stopped at.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from rayllm.data.shards import open_shard
from rayllm.errors import RayllmError
from rayllm.train.config import TrainConfig
from rayllm.train.mesh import MeshShape

Batch = tuple[torch.Tensor, ...]
"""(inputs, next-token targets), and for packed examples the segment of every token."""


class Batches(Protocol):
    def get(self, index: int) -> Batch: ...


def to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(tensor.to(device) for tensor in batch)


def step_window(batches: Batches, step: int, grad_accum_steps: int) -> list[Batch]:
    """The micro-batches optimizer step ``step`` accumulates over."""
    first = step * grad_accum_steps
    return [batches.get(first + micro) for micro in range(grad_accum_steps)]


class OrderedBatches:
    """Batch ``i`` of the run is the ``i``-th slice of a seeded permutation of all ``rows``
    (a new permutation each epoch); this data-parallel rank takes its part of that slice.
    Subclasses say how a batch is made of the rows it picks."""

    def __init__(self, rows: int, what: str, *, dp_rank: int, dp_size: int, batch: int, seed: int):
        self.rows, self.dp_rank, self.batch, self.seed = rows, dp_rank, batch, seed
        self.global_batch = dp_size * batch
        self.per_epoch = rows // self.global_batch
        if self.per_epoch == 0:
            raise RayllmError(
                f"{what} holds {rows} sequences, fewer than one global batch "
                f"({self.global_batch}); lower micro_batch_size or add data"
            )
        self._order: tuple[int, np.ndarray] | None = None

    def get(self, index: int) -> Batch:
        """This rank's part of global micro-batch ``index``."""
        epoch, position = divmod(index, self.per_epoch)
        start = position * self.global_batch + self.dp_rank * self.batch
        return self._batch(self._permutation(epoch)[start : start + self.batch])

    def _batch(self, picked: np.ndarray) -> Batch:
        raise NotImplementedError

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(self.rows)
            self._order = (epoch, order)
        return self._order[1]


def _rank_options(config: TrainConfig, shape: MeshShape, rank: int) -> dict[str, int]:
    """Global rank ``rank``'s place: the tensor and pipeline ranks of one data-parallel slice
    read the same micro-batches."""
    return {
        "dp_rank": shape.dp_rank(rank),
        "dp_size": shape.dp,
        "batch": config.micro_batch_size,
        "seed": config.seed,
    }


class TokenBatches(OrderedBatches):
    """Pretraining: rows of memory-mapped shards, as (inputs, next-token targets)."""

    def __init__(self, data: str, entries: list[dict[str, Any]], **options: int):
        self.shards = [open_shard(data, entry) for entry in entries]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        super().__init__(int(self.starts[-1]), data, **options)

    @classmethod
    def for_rank(
        cls, config: TrainConfig, entries: list[dict[str, Any]], shape: MeshShape, rank: int
    ) -> TokenBatches:
        return cls(config.data, entries, **_rank_options(config, shape, rank))

    def _batch(self, picked: np.ndarray) -> Batch:
        rows = torch.from_numpy(np.stack([self._row(i) for i in picked]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def _row(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[shard][index - self.starts[shard]]


class ExampleBatches(OrderedBatches):
    """Fine-tuning: rows of packed examples (``inputs``, ``targets`` with the untrained ones
    ignored, ``segments``: which example each token belongs to), all ``[rows, seq_len]``;
    for DPO, ``reference`` log-probabilities per segment, ``[rows, segments]``."""

    def __init__(self, packed: dict[str, np.ndarray], what: str, **options: int):
        self.packed = packed
        super().__init__(len(packed["inputs"]), what, **options)

    @classmethod
    def for_rank(
        cls, config: TrainConfig, packed: dict[str, np.ndarray], shape: MeshShape, rank: int
    ) -> ExampleBatches:
        return cls(packed, "the fine-tuning data", **_rank_options(config, shape, rank))

    def _batch(self, picked: np.ndarray) -> Batch:
        return self.pick(picked)

    def pick(self, picked: np.ndarray) -> Batch:
        """The rows ``picked`` as a batch: token ids, targets and segments, then for DPO the
        reference log-probabilities once they are added."""
        tokens = tuple(
            torch.from_numpy(self.packed[key][picked].astype(np.int64))
            for key in ("inputs", "targets", "segments")
        )
        if "reference" not in self.packed:
            return tokens
        return (*tokens, torch.from_numpy(self.packed["reference"][picked]))


class StreamedBatches:
    """This rank's split of the shard set, streamed by Ray Data (``ray.train.get_dataset_shard``),
    shuffled within a buffer, one epoch after another. Every rank gets as many batches as the
    others (Ray Train splits the rows equally; the last partial batch is dropped)."""

    def __init__(self, batch: int, seed: int):
        import ray.train

        self.shard = ray.train.get_dataset_shard("train")
        self.batch, self.seed, self.epoch, self.position = batch, seed, 0, 0
        self.batches = self._epoch()

    def get(self, index: int) -> Batch:
        """Batch ``index`` of this rank's stream; batches are read in order, so a resumed run
        skips the ones it already trained on."""
        while self.position <= index:
            rows = self._next()
            self.position += 1
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        return tokens[:, :-1], tokens[:, 1:]

    def _next(self) -> np.ndarray:
        try:
            return next(self.batches)["data"]
        except StopIteration:
            self.epoch += 1
            self.batches = self._epoch()
            return next(self.batches)["data"]

    def _epoch(self):
        return iter(
            self.shard.iter_batches(
                batch_size=self.batch,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=8 * self.batch,
                local_shuffle_seed=self.seed + self.epoch,
            )
        )
