import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llmstack.losses import causal_lm_loss_sum, count_targets, ranking_loss_sum


def test_causal_lm_loss_sum_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[0, 1, -100]])
    # position 0 predicts label 1 (p = 0.25); position 1 predicts -100 (ignored)
    assert causal_lm_loss_sum(logits, labels).item() == pytest.approx(-math.log(0.25))
    assert count_targets(labels) == 1


def pair(si, sj, margin=0.0):
    return -F.logsigmoid(torch.tensor(si - sj - margin)).item()


def test_k_way_loss_is_the_mean_of_its_pairwise_losses():
    scores = torch.tensor([[0.3, -1.2, 2.0, 0.7]])
    ranks = torch.tensor([[1, 3, 0, 2]])
    one_by_one = [pair(scores[0, i].item(), scores[0, j].item()) for i, j in itertools.permutations(range(4), 2)
                  if ranks[0, i] < ranks[0, j]]
    assert len(one_by_one) == 6
    assert ranking_loss_sum(scores, ranks).item() == pytest.approx(sum(one_by_one) / 6, rel=1e-6)


def test_rankings_are_weighed_once_each_ties_and_padding():
    scores = torch.tensor([[1.0, 0.0, 5.0], [0.5, 0.5, -3.0]])
    ranks = torch.tensor([[0, 1, -1], [0, 0, 1]])  # a pair plus padding; a tie above a loser
    margins = torch.tensor([0.5, 0.0])
    first = pair(1.0, 0.0, 0.5)
    tie = 0.5 * (-F.logsigmoid(torch.tensor(0.0)) - F.logsigmoid(torch.tensor(0.0))).item()
    second = (tie + pair(0.5, -3.0) + pair(0.5, -3.0)) / 3
    assert ranking_loss_sum(scores, ranks, margins).item() == pytest.approx(first + second, rel=1e-6)


def test_centering_term_adds_mean_square_of_valid_scores():
    scores, ranks = torch.tensor([[2.0, 0.0, 9.0]]), torch.tensor([[0, 1, -1]])
    plain = ranking_loss_sum(scores, ranks).item()
    assert ranking_loss_sum(scores, ranks, center_coef=0.1).item() == pytest.approx(plain + 0.1 * (4 + 0) / 2)


def test_clipped_policy_loss_at_chosen_ratios():
    from llmstack.losses import ppo_policy_loss_sum

    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))  # ratios 1.5, 0.5, 1.1, 3.0
    adv = torch.tensor([[1.0, 1.0, -2.0, 0.7]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_policy_loss_sum(logp, old, adv, mask, clip=0.2)
    # A>0, r=1.5 -> clipped 1.2 -> -1.2; A>0, r=0.5 -> unclipped -0.5 (pessimistic max); A<0, r=1.1 -> 2.2
    assert loss.item() == pytest.approx(-1.2 - 0.5 + 2.2)
    assert stats["clipped_tokens"].item() == 1


def test_policy_loss_with_identical_policies_has_ratio_one():
    from llmstack.losses import ppo_policy_loss_sum

    logp, adv = torch.randn(2, 5), torch.randn(2, 5)
    loss, stats = ppo_policy_loss_sum(logp, logp.clone(), adv, torch.ones(2, 5), clip=0.2)
    assert loss.item() == pytest.approx(-adv.sum().item(), rel=1e-6)
    assert stats["approx_kl_sum"].item() == 0 and stats["clipped_tokens"].item() == 0


def test_clipped_value_loss_by_hand():
    from llmstack.losses import value_loss_sum

    values, old, returns = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.1]]), torch.tensor([[1.0, 1.0]])
    # token 1: (2-1)^2 = 1 vs clipped 1.2 -> (1.2-1)^2 = .04 -> max 1 -> 0.5
    # token 2: (0-1)^2 = 1 vs clipped 0.0 -> 1 -> 0.5
    assert value_loss_sum(values, old, returns, torch.ones(1, 2), clip=0.2).item() == pytest.approx(1.0)
