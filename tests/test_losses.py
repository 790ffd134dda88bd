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
    from llmstack.losses import ppo_policy_loss_tokens

    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))  # ratios 1.5, 0.5, 1.1, 3.0
    adv = torch.tensor([[1.0, 1.0, -2.0, 0.7]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_policy_loss_tokens(logp, old, adv, mask, clip=0.2)
    # A>0, r=1.5 -> clipped 1.2 -> -1.2; A>0, r=0.5 -> unclipped -0.5 (pessimistic max); A<0, r=1.1 -> 2.2
    assert loss[0].tolist() == pytest.approx([-1.2, -0.5, 2.2, 0.0])
    assert stats["clipped_tokens"].item() == 1


def test_policy_loss_with_identical_policies_has_ratio_one():
    from llmstack.losses import ppo_policy_loss_tokens

    logp, adv = torch.randn(2, 5), torch.randn(2, 5)
    loss, stats = ppo_policy_loss_tokens(logp, logp.clone(), adv, torch.ones(2, 5), clip=0.2)
    torch.testing.assert_close(loss, -adv)
    assert stats["approx_kl_sum"].item() == 0 and stats["clipped_tokens"].item() == 0


def test_clipped_value_loss_by_hand():
    from llmstack.losses import value_loss_sum

    values, old, returns = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.1]]), torch.tensor([[1.0, 1.0]])
    # token 1: (2-1)^2 = 1 vs clipped 1.2 -> (1.2-1)^2 = .04 -> max 1 -> 0.5
    # token 2: (0-1)^2 = 1 vs clipped 0.0 -> 1 -> 0.5
    assert value_loss_sum(values, old, returns, torch.ones(1, 2), clip=0.2).item() == pytest.approx(1.0)


# two pairs, beta 0.5: h = (-5 + 6) - (-7 + 6) = 2 and (-3 + 4) - (-2 + 4) = -1, so beta h = 1 and -0.5
PAIRS = dict(policy_chosen_logp_N=torch.tensor([-5.0, -3.0]), policy_rejected_logp_N=torch.tensor([-7.0, -2.0]),
             ref_chosen_logp_N=torch.tensor([-6.0, -4.0]), ref_rejected_logp_N=torch.tensor([-6.0, -4.0]), beta=0.5)


def test_dpo_loss_and_implicit_rewards_by_hand():
    from llmstack.losses import dpo_loss

    loss, chosen, rejected = dpo_loss(**PAIRS)
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-0.5) = log(1 + e^0.5)
    assert loss.tolist() == pytest.approx([0.31326169, 0.97407698])
    assert chosen.tolist() == pytest.approx([0.5, 0.5]) and rejected.tolist() == pytest.approx([-0.5, 1.0])


def test_ipo_regresses_the_log_ratio_gap_to_one_over_two_beta():
    from llmstack.losses import dpo_loss

    loss, _, _ = dpo_loss(**PAIRS, loss_type="ipo")
    assert loss.tolist() == pytest.approx([(2 - 1) ** 2, (-1 - 1) ** 2])


def test_label_smoothing_mixes_in_the_flipped_label():
    from llmstack.losses import dpo_loss

    loss, _, _ = dpo_loss(**PAIRS, label_smoothing=0.1)
    # 0.9 log(1 + e^-1) + 0.1 log(1 + e^1); 0.9 log(1 + e^0.5) + 0.1 log(1 + e^-0.5)
    assert loss.tolist() == pytest.approx([0.41326169, 0.92407698])


def test_dpo_with_the_policy_equal_to_the_reference():
    from llmstack.losses import dpo_loss

    chosen, rejected = torch.tensor([-4.0, -12.5, -0.3]), torch.tensor([-9.0, -1.0, -0.3])
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1)
    assert loss.tolist() == pytest.approx([math.log(2)] * 3)
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0
    ipo, _, _ = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.5, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([1.0] * 3)  # 1 / (4 beta^2)


def test_rankings_with_the_policy_equal_to_the_reference():
    from llmstack.losses import dpo_ranking_loss

    logp, ranks = torch.tensor([[-4.0, -12.5, -0.3]]), torch.tensor([[2, 0, 1]])
    loss, margin, accuracy = dpo_ranking_loss(logp, logp.clone(), ranks, 0.1, "pairs")
    assert loss.item() == pytest.approx(math.log(2)) and margin.item() == 0 and accuracy.item() == 0
    # every ordering of three equal rewards is equally likely: 1 / 3!
    loss, _, _ = dpo_ranking_loss(logp, logp.clone(), ranks, 0.1, "plackett_luce")
    assert loss.item() == pytest.approx(math.log(6))


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_a_ranking_of_two_is_the_pair_loss(loss_type, smoothing):
    from llmstack.losses import dpo_loss, dpo_ranking_loss

    # PAIRS as rankings: the chosen response sits second in the first ranking and first in the second
    policy, ref = torch.tensor([[-7.0, -5.0], [-3.0, -2.0]]), torch.tensor([[-6.0, -6.0], [-4.0, -4.0]])
    ranks = torch.tensor([[1, 0], [0, 1]])
    pair_loss, chosen, rejected = dpo_loss(**PAIRS, loss_type=loss_type, label_smoothing=smoothing)
    modes = ["pairs", "plackett_luce"] if loss_type == "sigmoid" and not smoothing else ["pairs"]
    for mode in modes:
        loss, margin, accuracy = dpo_ranking_loss(policy, ref, ranks, 0.5, mode, loss_type, smoothing)
        assert loss.tolist() == pytest.approx(pair_loss.tolist())
        assert margin.tolist() == pytest.approx((chosen - rejected).tolist())
        assert accuracy.tolist() == [1.0, 0.0]


# log pi - log pi_ref = [2, 0, 4], ranked 1, 2, 0: with beta 0.5 the rewards in rank order are 2, 1, 0
RANKED_POLICY = torch.tensor([[-3.0, -5.0, -1.0]])
RANKED_REF = torch.tensor([[-5.0, -5.0, -5.0]])
RANKED = torch.tensor([[1, 2, 0]])


def test_plackett_luce_on_three_responses_by_hand():
    from llmstack.losses import dpo_ranking_loss

    loss, margin, accuracy = dpo_ranking_loss(RANKED_POLICY, RANKED_REF, RANKED, 0.5, "plackett_luce")
    # [log(e^2 + e^1 + e^0) - 2] + [log(e^1 + e^0) - 1] + [log(e^0) - 0]
    assert loss.item() == pytest.approx(0.72086765)
    assert margin.item() == pytest.approx(4 / 3) and accuracy.item() == 1.0  # margins 1, 2, 1


def test_pairs_of_three_responses_average_their_pair_losses():
    from llmstack.losses import dpo_ranking_loss

    loss, _, _ = dpo_ranking_loss(RANKED_POLICY, RANKED_REF, RANKED, 0.5, "pairs")
    # beta h = 1, 2, 1 for the pairs (2 over 0), (2 over 1), (0 over 1)
    assert loss.item() == pytest.approx((0.31326169 + 0.12692801 + 0.31326169) / 3)


def test_rankings_skip_ties_and_padding():
    from llmstack.losses import dpo_ranking_loss

    # beta 1; a tie between the last two; padding holding NaN; a ranking that is one tie
    policy = torch.tensor([[0.0, 2.0, -2.0], [1.0, math.nan, 0.0], [3.0, 1.0, 0.0]], requires_grad=True)
    ranks = torch.tensor([[0, 1, 1], [1, -1, 0], [0, 0, -1]])
    loss, margin, accuracy = dpo_ranking_loss(policy, torch.zeros(3, 3), ranks, 1.0, "pairs")
    # (0 over 1): log(1 + e^2); (0 over 2): log(1 + e^-2) | (2 over 0): log(1 + e^1) | no pair
    assert loss.tolist() == pytest.approx([1.12692801, 1.31326169, 0.0])
    assert margin.tolist() == pytest.approx([0.0, -1.0, 0.0]) and accuracy.tolist() == [0.5, 0.0, 0.0]
    loss.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad[1, 1] == 0 and policy.grad[2].abs().sum() == 0
    pl, _, _ = dpo_ranking_loss(policy.detach(), torch.zeros(3, 3), ranks, 1.0, "plackett_luce")
    # tied responses share a denominator: [log(e^0 + e^2 + e^-2) - 0] + [log(e^2 + e^-2) - 2] + [log(e^2 + e^-2) + 2]
    # | [log(e^0 + e^1) - 0] + [log(e^1) - 1] | the two tied: [log(e^3 + e^1) - 3] + [log(e^3 + e^1) - 1]
    assert pl.tolist() == pytest.approx([6.17923148, 1.31326169, 2.25385602])


def test_dpo_arguments_out_of_range_are_refused():
    from llmstack.losses import dpo_loss, dpo_ranking_loss

    with pytest.raises(ValueError, match="beta > 0"):
        dpo_loss(**{**PAIRS, "beta": 0.0})
    with pytest.raises(ValueError, match="unknown DPO loss_type 'hinge'"):
        dpo_loss(**PAIRS, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing .* 0.1 with 'ipo'"):
        dpo_loss(**PAIRS, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="plackett_luce .* 'ipo'"):
        dpo_ranking_loss(RANKED_POLICY, RANKED_REF, RANKED, 0.5, "plackett_luce", "ipo")
    with pytest.raises(ValueError, match="unknown DPO ranking mode 'listwise'"):
        dpo_ranking_loss(RANKED_POLICY, RANKED_REF, RANKED, 0.5, "listwise")
