"""Advantage estimators behind one call, so the RL loop differs between PPO, GRPO, RLOO and REINFORCE++ only in
the name it looks up in `ESTIMATORS`.

Shape legend: B sequences on this process, T response tokens (right-aligned padding after each response's end),
G samples per prompt, N = B / G prompts. `mask_BT` is 1 on real response tokens. The G samples of one prompt
are G consecutive rows, and a group never straddles processes, so group statistics are local; statistics over
the whole batch take `all_reduce_sum` (as in `llmstack.rl.advantages.whiten`) and cover every process.

Every estimator has the signature of `EstimatorFn`:

    fn(scores_B, kl_BT, mask_BT, values_BT | None, settings, all_reduce_sum) -> (advantages_BT, returns_BT | None)

Each reads the fields of `EstimatorSettings` its method defines and ignores the rest:

    estimator     critic  G      KL penalty                        reads
    gae           yes     >= 1   per token in the reward           kl_coef, gamma, lam, whiten
    grpo          no      >= 2   none here: the loop puts it in    group_size, scale_by_std
                                 the loss
    rloo          no      >= 2   whole-sequence, in the reward     group_size, kl_coef
    reinforce_pp  no      >= 1   per token in the reward           kl_coef, gamma, whiten

Design decisions:
- Scalars travel in one frozen `EstimatorSettings`, whose defaults and meaning are written once, rather than as
  keyword arguments repeated (with their defaults) in four signatures.
- `Estimator.kl_in_reward` says whether the estimator folds `kl_coef` x KL into the reward. Where it does not,
  the loop adds the KL to the policy loss (GRPO's choice); where it does, the loop adds no KL term to the loss.
  A loop that wants the KL in the loss with an estimator that could put it in the reward passes kl_coef = 0.
- Advantages are 0 on padding; `returns_BT` (the value model's targets) is None without a critic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from llmstack.rl.advantages import Reduce, _identity, gae, token_rewards, whiten


@dataclass(frozen=True)
class EstimatorSettings:
    """group_size: G samples per prompt (consecutive rows). kl_coef: beta of the KL penalty for estimators that
    put it in the reward. gamma: discount over response tokens. lam: GAE lambda. scale_by_std: GRPO divides by
    its group's standard deviation (False gives Dr. GRPO's advantages, Liu et al. 2025). whiten: normalise
    advantages to zero mean and unit variance over the global batch's valid tokens (PPO's usual practice, and
    REINFORCE++'s baseline)."""

    group_size: int = 1
    kl_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 1.0
    scale_by_std: bool = True
    whiten: bool = True


class EstimatorFn(Protocol):
    def __call__(self, scores_B: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor,
                 values_BT: torch.Tensor | None, settings: EstimatorSettings,
                 all_reduce_sum: Reduce = _identity) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages [B, T], returns [B, T] or None) from sequence scores [B], per-token KL to the reference
        [B, T], the response mask [B, T] and, for a critic, values [B, T]."""


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator: what the loop must provide (a critic, G samples per prompt), whether the
    estimator puts the KL penalty into the reward itself, and the function."""

    name: str
    needs_critic: bool
    min_group_size: int
    kl_in_reward: bool
    fn: EstimatorFn


def check_group_size(name: str, group_size: int, batch_size: int) -> None:
    """Raise ValueError unless `name` is an estimator, G meets its minimum, and B sequences split into groups."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    least = ESTIMATORS[name].min_group_size
    if group_size < least:
        raise ValueError(f"the {name} estimator needs a group size (samples per prompt) of at least {least}, "
                         f"got {group_size}")
    if batch_size % group_size:
        raise ValueError(f"{batch_size} sequences do not split into groups of {group_size} samples per prompt; "
                         f"the batch per process must be a multiple of the group size")


def _per_token(advantages_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return advantages_B[:, None] * mask_BT.to(advantages_B.dtype)


def gae_advantages(scores_B, kl_BT, mask_BT, values_BT, settings: EstimatorSettings,
                   all_reduce_sum: Reduce = _identity):
    """PPO's estimator: per-token rewards r_t = -beta KL_t plus the score on the last token (`token_rewards`),
    GAE(gamma, lambda) against the critic's values (Schulman et al. 2016, `gae`), then optionally `whiten`."""
    if values_BT is None:
        raise ValueError("the gae estimator needs values from a critic (a value model); got none")
    rewards_BT = token_rewards(scores_B, kl_BT, mask_BT, settings.kl_coef)
    advantages_BT, returns_BT = gae(rewards_BT, values_BT, mask_BT, settings.gamma, settings.lam)
    if settings.whiten:
        advantages_BT = whiten(advantages_BT, mask_BT, all_reduce_sum)
    return advantages_BT, returns_BT


def grpo_advantages(scores_B, kl_BT, mask_BT, values_BT, settings: EstimatorSettings,
                    all_reduce_sum: Reduce = _identity):
    """Group-relative advantage (Shao et al. 2024, DeepSeekMath, section 4.1.2, outcome supervision):
    A_i = (s_i - mean(s_group)) / (std(s_group) + eps), the same for every token of response i. std is the
    unbiased (G - 1) estimate; eps = 1e-4 keeps a group of equal scores near 0 instead of rounding noise over
    rounding noise. With `scale_by_std` False, A_i = s_i - mean(s_group) (Dr. GRPO, Liu et al. 2025)."""
    check_group_size("grpo", settings.group_size, len(scores_B))
    scores_NG = scores_B.view(-1, settings.group_size)
    advantages_NG = scores_NG - scores_NG.mean(-1, keepdim=True)
    if settings.scale_by_std:
        advantages_NG = advantages_NG / (scores_NG.std(-1, keepdim=True) + 1e-4)
    return _per_token(advantages_NG.reshape(-1), mask_BT), None


def rloo_advantages(scores_B, kl_BT, mask_BT, values_BT, settings: EstimatorSettings,
                    all_reduce_sum: Reduce = _identity):
    """REINFORCE leave-one-out (Ahmadian et al. 2024; Kool et al. 2019): each response's baseline is the
    mean reward of the other G - 1 responses to its prompt,
        A_i = R_i - 1/(G-1) sum_{j != i} R_j = G/(G-1) (R_i - mean(R_group)),
    the same for every token. As in the paper, the whole response is one action whose reward carries the KL
    penalty: R_i = s_i - beta sum_t KL_{i,t}."""
    check_group_size("rloo", settings.group_size, len(scores_B))
    g = settings.group_size
    rewards_NG = (scores_B - settings.kl_coef * (kl_BT * mask_BT).sum(-1)).view(-1, g)
    advantages_NG = g / (g - 1) * (rewards_NG - rewards_NG.mean(-1, keepdim=True))
    return _per_token(advantages_NG.reshape(-1), mask_BT), None


def reinforce_pp_advantages(scores_B, kl_BT, mask_BT, values_BT, settings: EstimatorSettings,
                            all_reduce_sum: Reduce = _identity):
    """REINFORCE++ (Hu 2025): per-token rewards r_t = -beta KL_t plus the score on the last token, the
    return G_t = sum_{i >= t} gamma^(i-t) r_i, normalised to zero mean and unit variance over the valid tokens
    of the global batch (the normalisation is the baseline; `whiten` False leaves the raw returns)."""
    rewards_BT = token_rewards(scores_B, kl_BT, mask_BT, settings.kl_coef)
    # with zero values and lambda = 1, GAE's advantage is exactly the discounted return
    returns_BT, _ = gae(rewards_BT, torch.zeros_like(rewards_BT), mask_BT, settings.gamma, 1.0)
    if settings.whiten:
        returns_BT = whiten(returns_BT, mask_BT, all_reduce_sum)
    return returns_BT, None


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("gae", needs_critic=True, min_group_size=1, kl_in_reward=True, fn=gae_advantages),
    Estimator("grpo", needs_critic=False, min_group_size=2, kl_in_reward=False, fn=grpo_advantages),
    Estimator("rloo", needs_critic=False, min_group_size=2, kl_in_reward=True, fn=rloo_advantages),
    Estimator("reinforce_pp", needs_critic=False, min_group_size=1, kl_in_reward=True, fn=reinforce_pp_advantages),
)}
