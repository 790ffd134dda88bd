"""Advantage estimators on small tables worked out by hand: 2 prompts x 3 samples for the group estimators."""

import pytest
import torch

from llmstack.rl.advantages import gae, token_rewards, whiten
from llmstack.rl.estimators import ESTIMATORS, EstimatorSettings, check_group_size

# prompt 0 scores 1, 2, 3 (mean 2, std 1); prompt 1 scores 1, 1, 7 (mean 3, std 2 sqrt 3)
SCORES = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 7.0])
LENGTHS = [1, 2, 3, 1, 2, 3]
MASK = torch.tensor([[1 if t < n else 0 for t in range(3)] for n in LENGTHS])
KL_ONES = MASK.float()  # KL 1 on every real token: sequence KL = length


def run(name, scores=SCORES, kl=KL_ONES, mask=MASK, values=None, reduce=lambda t: t, **settings):
    return ESTIMATORS[name].fn(scores, kl, mask, values, EstimatorSettings(**settings), reduce)


def per_token(advantages_B):
    """The expected [B, T] table: each sequence's advantage on its real tokens, 0 on padding."""
    return torch.tensor([[a if t < n else 0.0 for t in range(3)] for a, n in zip(advantages_B, LENGTHS)])


def test_grpo_subtracts_the_group_mean_and_divides_by_the_group_std():
    advantages, returns = run("grpo", group_size=3)
    # (s - mean) / (std + 1e-4): prompt 0 by 1 + 1e-4, prompt 1 by 2 sqrt 3 + 1e-4
    expected = per_token([-0.99990001, 0.0, 0.99990001, -0.57733360, -0.57733360, 1.15466721])
    torch.testing.assert_close(advantages, expected)
    assert returns is None


def test_grpo_without_std_scaling_is_the_centred_score():
    advantages, _ = run("grpo", group_size=3, scale_by_std=False)
    torch.testing.assert_close(advantages, per_token([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))


def test_grpo_ignores_the_kl_and_a_group_of_equal_scores_gets_zero():
    advantages, _ = run("grpo", scores=torch.tensor([0.7, 0.7, 0.7, 1.0, 2.0, 3.0]), kl=torch.full((6, 3), 5.0),
                        group_size=3)
    assert advantages[:3].abs().max() < 1e-3
    torch.testing.assert_close(advantages[3:], per_token([0, 0, 0, -0.99990001, 0.0, 0.99990001])[3:])


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    advantages, returns = run("rloo", group_size=3)
    # 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2 | 1 - (1+7)/2, 1 - (1+7)/2, 7 - (1+1)/2
    torch.testing.assert_close(advantages, per_token([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    assert returns is None


def test_rloo_puts_the_sequence_kl_into_the_reward():
    advantages, _ = run("rloo", group_size=3, kl_coef=0.5)
    # R = s - 0.5 x length: 0.5, 1, 1.5 | 0.5, 0, 5.5
    # 0.5 - 1.25, 1 - 1, 1.5 - 0.75 | 0.5 - 2.75, 0 - 3, 5.5 - 0.25
    torch.testing.assert_close(advantages, per_token([-0.75, 0.0, 0.75, -2.25, -3.0, 5.25]))


REINFORCE_SCORES = torch.tensor([1.0, -1.0])
REINFORCE_KL = torch.tensor([[0.2, -0.4, 0.6], [1.0, 0.5, 9.0]])
REINFORCE_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_reinforce_pp_returns_are_future_reward_sums():
    # rewards -0.5 KL, plus the score on the last token: [-0.1, 0.2, 0.7] and [-0.5, -1.25, 0]
    advantages, returns = run("reinforce_pp", REINFORCE_SCORES, REINFORCE_KL, REINFORCE_MASK, kl_coef=0.5,
                              whiten=False)
    torch.testing.assert_close(advantages, torch.tensor([[0.8, 0.9, 0.7], [-1.75, -1.25, 0.0]]))
    assert returns is None
    discounted, _ = run("reinforce_pp", REINFORCE_SCORES, REINFORCE_KL, REINFORCE_MASK, kl_coef=0.5, gamma=0.5,
                        whiten=False)
    # 0.7; 0.2 + 0.5 x 0.7; -0.1 + 0.5 x 0.55 | -1.25; -0.5 + 0.5 x -1.25
    torch.testing.assert_close(discounted, torch.tensor([[0.175, 0.55, 0.7], [-1.125, -1.25, 0.0]]))


def test_reinforce_pp_normalises_over_the_valid_tokens():
    advantages, _ = run("reinforce_pp", REINFORCE_SCORES, REINFORCE_KL, REINFORCE_MASK, kl_coef=0.5)
    # returns 0.8, 0.9, 0.7, -1.75, -1.25: mean -0.12, unbiased variance 6.493 / 4 = 1.62325
    expected = torch.tensor([[0.72209630, 0.80058503, 0.64360757], [-1.27936627, -0.88692263, 0.0]])
    torch.testing.assert_close(advantages, expected)


def test_reinforce_pp_statistics_cover_every_process():
    whole, _ = run("reinforce_pp", REINFORCE_SCORES, REINFORCE_KL, REINFORCE_MASK, kl_coef=0.5)
    halves = [(REINFORCE_SCORES[i:i + 1], REINFORCE_KL[i:i + 1], REINFORCE_MASK[i:i + 1]) for i in (0, 1)]
    seen = []
    run("reinforce_pp", *halves[1], reduce=lambda t: seen.append(t) or t, kl_coef=0.5)
    first, _ = run("reinforce_pp", *halves[0], reduce=lambda t: t + seen[0], kl_coef=0.5)
    torch.testing.assert_close(first, whole[:1])


@pytest.mark.parametrize("whiten_advantages", [True, False])
def test_gae_through_the_registry_is_the_ppo_path(whiten_advantages):
    values = torch.tensor([[0.3, -0.2, 0.9], [1.1, 0.4, 7.0], [0.0, 0.5, -0.5], [2.0, 0.0, 0.0],
                           [-1.0, 0.25, 3.0], [0.6, 0.6, 0.6]])
    kl = torch.linspace(-0.5, 1.2, 18).view(6, 3) * MASK
    advantages, returns = run("gae", kl=kl, values=values, kl_coef=0.1, gamma=0.9, lam=0.8,
                              whiten=whiten_advantages)
    rewards = token_rewards(SCORES, kl, MASK, 0.1)
    expected, expected_returns = gae(rewards, values, MASK, 0.9, 0.8)
    if whiten_advantages:
        expected = whiten(expected, MASK)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected_returns)


def test_gae_without_a_critic_is_refused():
    with pytest.raises(ValueError, match="needs values from a critic"):
        run("gae")


def test_registry_describes_what_each_estimator_needs():
    assert sorted(ESTIMATORS) == ["gae", "grpo", "reinforce_pp", "rloo"]
    assert [name for name, e in ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert {name: e.min_group_size for name, e in ESTIMATORS.items()} == {
        "gae": 1, "grpo": 2, "rloo": 2, "reinforce_pp": 1}
    assert [name for name, e in ESTIMATORS.items() if not e.kl_in_reward] == ["grpo"]


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_a_group_of_one_is_refused(name):
    with pytest.raises(ValueError, match=f"the {name} estimator .* at least 2, got 1"):
        check_group_size(name, 1, 6)
    with pytest.raises(ValueError, match="at least 2"):
        run(name, group_size=1)


def test_a_batch_that_does_not_split_into_groups_is_refused():
    with pytest.raises(ValueError, match="5 sequences do not split into groups of 3"):
        check_group_size("grpo", 3, 5)
    with pytest.raises(ValueError, match="6 sequences do not split into groups of 4"):
        run("rloo", group_size=4)
    with pytest.raises(ValueError, match="6 sequences do not split into groups of 4"):
        check_group_size("gae", 4, 6)


def test_sizes_that_fit_and_unknown_names():
    check_group_size("gae", 1, 5)
    check_group_size("reinforce_pp", 1, 7)
    check_group_size("grpo", 2, 8)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        check_group_size("ppo", 1, 4)
