"""Training losses as pure functions of tensors.

Shape legend: B batch, T sequence length, V vocabulary.

Losses return a *sum* over target tokens, not a mean. The training loop divides by the number of target
tokens in the whole global batch (all micro-batches, all processes), so a step's objective does not depend on
how the batch is split into micro-batches, devices or packed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstack.kernels.linear_cross_entropy import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "causal_lm_loss_sum", "count_targets", "ppo_policy_loss_sum", "ranking_loss_sum",
           "value_loss_sum"]


def causal_lm_loss_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy: position t predicts labels[t + 1]; IGNORE_INDEX targets count 0.

    Computed in fp32 whatever the logits' dtype, since bf16 log-softmax over a large vocabulary loses
    about two decimal digits of the loss.
    """
    logits = logits_BTV[:, :-1].float()
    targets = labels_BT[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(labels_BT: torch.Tensor) -> int:
    """Number of next-token targets that contribute to `causal_lm_loss_sum`."""
    return int((labels_BT[:, 1:] != IGNORE_INDEX).sum())


def ranking_loss_sum(scores_NK: torch.Tensor, ranks_NK: torch.Tensor, margins_N: torch.Tensor | None = None,
                     center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of N rankings, summed over rankings; each ranking's loss is the mean over its pairs.

    For responses i, j of one ranking with rank_i < rank_j (i preferred), the pair loss is
    -log sigmoid(s_i - s_j - m) with m the ranking's margin (Llama 2, Touvron et al. 2023, eq. 2). A tie
    (rank_i == rank_j) is a comparison whose outcome is 1/2: the binary cross-entropy with target 1/2,
    (softplus(d) + softplus(-d)) / 2, which is smallest when the two scores are equal. Padding responses have
    rank -1 and take part in nothing. `center_coef` adds coef * mean(s^2) per ranking, which keeps rewards
    centred on zero (Eisenstein et al. 2023) without changing which response wins.
    """
    valid = ranks_NK >= 0
    both = valid[:, :, None] & valid[:, None, :]
    diff = scores_NK[:, :, None] - scores_NK[:, None, :]  # [N, K, K]: s_i - s_j
    better = both & (ranks_NK[:, :, None] < ranks_NK[:, None, :])
    k = ranks_NK.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=scores_NK.device).triu(1)
    tie = both & (ranks_NK[:, :, None] == ranks_NK[:, None, :]) & upper
    margin = (margins_N if margins_N is not None else torch.zeros_like(scores_NK[:, 0]))[:, None, None]
    pair = F.softplus(-(diff - margin)) * better + 0.5 * (F.softplus(diff) + F.softplus(-diff)) * tie
    n_pairs = (better | tie).sum(dim=(1, 2)).clamp(min=1)
    loss = pair.sum(dim=(1, 2)) / n_pairs
    if center_coef:
        squares = (scores_NK.masked_fill(~valid, 0.0) ** 2).sum(1) / valid.sum(1).clamp(min=1)
        loss = loss + center_coef * squares
    return loss.sum()


def ppo_policy_loss_sum(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_BT: torch.Tensor,
                        mask_BT: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), summed over response tokens:
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) with ratio = exp(logp - old_logp).
    Also returns token sums of the clip indicator and of the (k3) old->new KL estimate, for metrics."""
    mask = mask_BT.to(logp_BT.dtype)
    log_ratio = logp_BT - old_logp_BT
    ratio = torch.exp(log_ratio)
    unclipped = -advantages_BT * ratio
    clipped = -advantages_BT * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = (torch.maximum(unclipped, clipped) * mask).sum()
    with torch.no_grad():
        stats = {"clipped_tokens": ((clipped > unclipped).to(mask.dtype) * mask).sum(),
                 "approx_kl_sum": ((torch.expm1(-log_ratio) + log_ratio) * mask).sum()}
    return loss, stats


def value_loss_sum(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
                   mask_BT: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss, summed over response tokens: 1/2 max((V - R)^2, (V_clipped - R)^2) with
    V_clipped = V_old + clip(V - V_old, -eps, eps), as in the PPO reference implementation."""
    clipped = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values_BT - returns_BT) ** 2, (clipped - returns_BT) ** 2)
    return (loss * mask_BT.to(loss.dtype)).sum()
