import itertools

import pytest
import torch

from llmstack.data.batching import ShuffledBatches, StreamingBatches, eval_batches
from llmstack.data.text import PackedBlocks, load_blocks


def numbered(n: int, length: int = 4) -> PackedBlocks:
    ids = torch.arange(n).repeat_interleave(length).view(n, length)
    return PackedBlocks(ids, ids.clone())


def rows(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_two_ranks_together_see_the_one_process_global_batch():
    blocks = numbered(50)
    single = [rows(b) for b in itertools.islice(ShuffledBatches(blocks, 4, seed=3), 30)]
    rank0 = [rows(b) for b in itertools.islice(ShuffledBatches(blocks, 2, 0, 2, seed=3), 30)]
    rank1 = [rows(b) for b in itertools.islice(ShuffledBatches(blocks, 2, 1, 2, seed=3), 30)]
    assert [a + b for a, b in zip(rank0, rank1)] == single
    assert all(not set(a) & set(b) for a, b in zip(rank0, rank1))


def test_each_epoch_is_a_fresh_permutation_without_repeats():
    it = iter(ShuffledBatches(numbered(12), 4, seed=0))
    first = sum((rows(next(it)) for _ in range(3)), [])
    second = sum((rows(next(it)) for _ in range(3)), [])
    assert sorted(first) == sorted(second) == list(range(12)) and first != second


def test_resume_mid_epoch_continues_across_the_epoch_boundary():
    full = [rows(b) for b in itertools.islice(ShuffledBatches(numbered(23), 3, seed=5), 20)]
    first = ShuffledBatches(numbered(23), 3, seed=5)
    head = [rows(b) for b in itertools.islice(iter(first), 9)]
    resumed = ShuffledBatches(numbered(23), 3, seed=5)
    resumed.load_state_dict(first.state_dict())
    tail = [rows(b) for b in itertools.islice(iter(resumed), 11)]
    assert head + tail == full


def test_too_few_blocks_for_one_global_batch_is_explained():
    with pytest.raises(ValueError, match="5 training blocks cannot fill one global micro-batch of 8"):
        ShuffledBatches(numbered(5), 4, 0, 2)


def test_streaming_batches_skip_held_out_blocks_and_resume_exactly(tokenizer):
    args = ("synthetic:60", tokenizer, 16, 2, 0, 1, 0.1, 0)
    full = [b["input_ids"] for b in itertools.islice(StreamingBatches(*args), 40)]
    first = StreamingBatches(*args)
    head = [b["input_ids"] for b in itertools.islice(iter(first), 13)]
    resumed = StreamingBatches(*args)
    resumed.load_state_dict(first.state_dict())
    tail = [b["input_ids"] for b in itertools.islice(iter(resumed), 27)]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))
    assert first.state_dict() == {"epoch": 0, "position": 13}
    everything = {tuple(r) for r in load_blocks("synthetic:60", tokenizer, 16).input_ids.tolist()}
    streamed = {tuple(r) for batch in full for r in batch.tolist()}
    assert streamed < everything  # held-out blocks never appear


def test_eval_batches_cover_each_block_once_across_ranks():
    blocks = numbered(11)
    seen = [r for rank in range(3) for b in eval_batches(blocks, 2, rank, 3) for r in rows(b)]
    assert sorted(seen) == list(range(11))
    assert list(eval_batches(numbered(1), 2, 1, 2)) == []
