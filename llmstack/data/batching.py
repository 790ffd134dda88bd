"""Deterministic, resumable batch iterators for the supervised stages.

They replace a DataLoader so that (1) a resumed run continues at the exact micro-batch it stopped at, and
(2) the global batch does not depend on the number of processes: global micro-batch g is the same set of
examples whether one process takes it whole or W processes take a slice each.
"""

from __future__ import annotations

from typing import Iterator

import torch

from llmstack.data.sources import DataError
from llmstack.data.text import is_held_out, packed_blocks


class ShuffledBatches:
    """Endless epochs over in-memory rows (anything with `len()` and `rows(index) -> dict of tensors`, such
    as PackedBlocks or ChatRows), reshuffled each epoch from `seed + epoch`.

    Global micro-batch g of an epoch is perm[g*B*W : (g+1)*B*W]; process r takes [r*B : (r+1)*B] of it.
    The incomplete tail of an epoch is dropped so every micro-batch has B rows on every process.
    """

    def __init__(self, blocks, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        global_batch = batch_size * world_size
        if len(blocks) < global_batch:
            raise DataError(f"{len(blocks)} training blocks cannot fill one global micro-batch of {global_batch} "
                             f"({batch_size} per process x {world_size} processes); lower train.batch_size, "
                             "data.block_size or add data")
        self.blocks, self.batch_size, self.rank, self.world_size, self.seed = \
            blocks, batch_size, rank, world_size, seed
        self.per_epoch = len(blocks) // global_batch
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self) -> Iterator[dict]:
        while True:
            perm = torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            while self.position < self.per_epoch:
                start = (self.position * self.world_size + self.rank) * self.batch_size
                rows = perm[start:start + self.batch_size]
                self.position += 1
                yield self.blocks.rows(rows)
            self.epoch, self.position = self.epoch + 1, 0


class StreamingBatches:
    """Batches straight from a streamed corpus, for data larger than memory.

    Blocks come in corpus order (no shuffle beyond the corpus's own order); held-out blocks
    (`is_held_out`) are skipped. At the end of the corpus the next epoch re-reads it from the start.
    Resuming re-reads the stream and skips the micro-batches already consumed without building tensors.
    """

    def __init__(self, spec: str, tokenizer, block_size: int, batch_size: int, rank: int, world_size: int,
                 eval_fraction: float, seed: int, text_field: str = "text"):
        self.spec, self.tokenizer, self.block_size, self.text_field = spec, tokenizer, block_size, text_field
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.eval_fraction, self.seed = eval_fraction, seed
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def _global_batches(self) -> Iterator[list]:
        group, need = [], self.batch_size * self.world_size
        blocks = packed_blocks(self.spec, self.tokenizer, self.block_size, self.text_field)
        for index, block in enumerate(blocks):
            if is_held_out(index, self.eval_fraction, self.seed):
                continue
            group.append(block)
            if len(group) == need:
                yield group
                group = []

    def __iter__(self) -> Iterator[dict]:
        while True:
            produced = 0
            for produced, group in enumerate(self._global_batches(), 1):
                if produced <= self.position:
                    continue
                mine = group[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                self.position = produced
                yield {"input_ids": torch.tensor([ids for ids, _ in mine], dtype=torch.long),
                       "labels": torch.tensor([labels for _, labels in mine], dtype=torch.long)}
            if produced == 0:
                raise DataError(f"{self.spec}: the stream gave no complete global micro-batch of "
                                 f"{self.batch_size * self.world_size} blocks")
            self.epoch, self.position = self.epoch + 1, 0


def eval_batches(blocks, batch_size: int, rank: int, world_size: int) -> Iterator[dict]:
    """Each held-out block exactly once across processes (block i on process i % W), in order."""
    mine = torch.arange(rank, len(blocks), world_size)
    for start in range(0, len(mine), batch_size):
        rows = mine[start:start + batch_size]
        yield blocks.rows(rows)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
