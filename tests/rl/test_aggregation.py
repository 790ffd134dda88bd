"""Loss aggregation modes on responses of uneven length, on one process and split over two."""

import pytest
import torch

from llmstack.rl.aggregation import aggregate, global_counts

# three responses of 4, 1 and 2 tokens; 99 sits on padding and must never count
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 99.0, 99.0, 99.0], [-2.0, 6.0, 99.0, 99.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
MAX_NEW_TOKENS = 4

# token sums 10, 10, 4 (total 24) over 7 tokens; token means 2.5, 10, 2 over 3 sequences
EXPECTED = {"token_mean": 24 / 7, "sequence_mean": 14.5 / 3, "token_sum_constant": 24 / 12}


def two_process_reduce(mask_BT):
    """all_reduce_sum as seen by a process whose peer holds `mask_BT`: adds the peer's local tensor."""
    peer = []
    global_counts(mask_BT, MAX_NEW_TOKENS, lambda t: peer.append(t) or t)
    return lambda t: t + peer[0]


def test_counts_cover_every_process():
    counts = global_counts(MASK[:1], MAX_NEW_TOKENS, two_process_reduce(MASK[1:]))
    assert (counts.tokens.item(), counts.sequences.item(), counts.max_new_tokens) == (7, 3, 4)


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_each_mode_on_one_process(mode):
    counts = global_counts(MASK, MAX_NEW_TOKENS)
    assert aggregate(LOSS, MASK, mode, counts).item() == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize("mode, first, second", [
    ("token_mean", 10 / 7, 14 / 7), ("sequence_mean", 2.5 / 3, 12 / 3), ("token_sum_constant", 10 / 12, 14 / 12)])
def test_the_shares_of_two_processes_add_up_to_the_global_value(mode, first, second):
    shares = []
    for mine, peer in ((slice(0, 1), slice(1, 3)), (slice(1, 3), slice(0, 1))):
        counts = global_counts(MASK[mine], MAX_NEW_TOKENS, two_process_reduce(MASK[peer]))
        shares.append(aggregate(LOSS[mine], MASK[mine], mode, counts).item())
    assert shares == pytest.approx([first, second])
    assert sum(shares) == pytest.approx(EXPECTED[mode])


def test_sequence_mean_weighs_each_response_once_whatever_its_length():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    counts = global_counts(mask, MAX_NEW_TOKENS)
    assert aggregate(loss, mask, "sequence_mean", counts).item() == pytest.approx(2.0)
    assert aggregate(loss, mask, "token_mean", counts).item() == pytest.approx(7 / 5)


def test_gradient_reaches_real_tokens_only():
    loss = LOSS.clone().requires_grad_()
    aggregate(loss, MASK, "sequence_mean", global_counts(MASK, MAX_NEW_TOKENS)).backward()
    # d/dl_bt = 1 / (3 x |o_b|) on real tokens
    expected = torch.tensor([[1 / 12] * 4, [1 / 3, 0, 0, 0], [1 / 6, 1 / 6, 0, 0]])
    torch.testing.assert_close(loss.grad, expected)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'.*sequence_mean"):
        aggregate(LOSS, MASK, "mean", global_counts(MASK, MAX_NEW_TOKENS))
