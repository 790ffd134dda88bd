"""Per-token rewards, generalised advantage estimation and whitening, over masked response tokens.

Shape legend: B sequences, T response tokens (right-aligned padding after each response's end); `mask_BT` is
1 on real response tokens. Reductions take an optional `all_reduce_sum` so statistics cover the global batch
across processes, not each process's share.
"""

from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def last_token_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """[B] index of each response's last real token (0 for an empty response)."""
    positions = torch.arange(mask_BT.shape[1], device=mask_BT.device)
    return (positions * mask_BT).argmax(-1)


def token_rewards(scores_B: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, plus the sequence score on its last real token
    (Stiennon et al. 2020, eq. 2, spread per token as in Ouyang et al. 2022)."""
    rewards = -kl_coef * kl_BT * mask_BT
    rows = torch.arange(len(scores_B), device=scores_B.device)
    rewards[rows, last_token_index(mask_BT)] += scores_B
    return rewards


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (Schulman et al. 2016): A_t = sum_l (gamma*lam)^l delta_{t+l} with
    delta_t = r_t + gamma * V_{t+1} - V_t, where V after a response's last token is 0 (the episode ends).
    Padding positions get advantage 0 and are skipped by the recursion."""
    mask = mask_BT.to(values_BT.dtype)
    advantages = torch.zeros_like(values_BT)
    next_value = torch.zeros_like(values_BT[:, 0])
    running = torch.zeros_like(values_BT[:, 0])
    for t in reversed(range(values_BT.shape[1])):
        delta = rewards_BT[:, t] + gamma * next_value - values_BT[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]
        advantages[:, t] = running
        # a padding position passes on nothing: next step's value and running sum restart at the real end
        next_value = values_BT[:, t] * mask[:, t]
    returns = advantages + values_BT * mask
    return advantages, returns


def masked_mean_var(x_BT: torch.Tensor, mask_BT: torch.Tensor, all_reduce_sum: Reduce = _identity):
    mask = mask_BT.to(x_BT.dtype)
    stats = all_reduce_sum(torch.stack([(x_BT * mask).sum(), (x_BT * x_BT * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    # unbiased, so a batch of two tokens does not report zero spread
    return mean, var * stats[2] / (stats[2] - 1).clamp(min=1)


def whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, all_reduce_sum: Reduce = _identity,
           eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the valid tokens of the global batch; padding stays 0."""
    mean, var = masked_mean_var(x_BT, mask_BT, all_reduce_sum)
    return (x_BT - mean) * torch.rsqrt(var + eps) * mask_BT


class RunningMoments:
    """Running mean and standard deviation of sequence rewards (Chan et al. parallel update), kept in
    checkpoints, for optional reward normalisation."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        n = float(values.numel())
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / max(self.count - 1, 1)) ** 0.5

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
