"""Training losses as pure functions of tensors.

Shape legend: B batch, T sequence length, V vocabulary, N preference pairs or rankings, K responses per ranking.

Losses return a *sum* over target tokens, not a mean. The training loop divides by the number of target
tokens in the whole global batch (all micro-batches, all processes), so a step's objective does not depend on
how the batch is split into micro-batches, devices or packed rows. The DPO losses return one value per pair or
ranking, to be summed and divided the same way by the global number of pairs or rankings; the RL policy
loss returns one value per token, which `llmstack.rl.aggregation` turns into the step's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstack.kernels.linear_cross_entropy import IGNORE_INDEX

__all__ = ["DPO_LOSSES", "DPO_RANKING_MODES", "IGNORE_INDEX", "causal_lm_loss_sum", "count_targets", "dpo_loss",
           "dpo_ranking_loss", "ppo_policy_loss_tokens", "ranking_loss_sum", "value_loss_sum"]


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


def ppo_policy_loss_tokens(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_BT: torch.Tensor,
                           mask_BT: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7) per response token [B, T], 0 on padding:
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) with ratio = exp(logp - old_logp). How the tokens
    become one loss (a token mean, a sequence mean, a constant) is `llmstack.rl.aggregation`'s choice.
    Also returns token sums of the clip indicator and of the (k3) old->new KL estimate, for metrics."""
    mask = mask_BT.to(logp_BT.dtype)
    log_ratio = logp_BT - old_logp_BT
    ratio = torch.exp(log_ratio)
    unclipped = -advantages_BT * ratio
    clipped = -advantages_BT * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss_BT = torch.maximum(unclipped, clipped) * mask
    with torch.no_grad():
        stats = {"clipped_tokens": ((clipped > unclipped).to(mask.dtype) * mask).sum(),
                 "approx_kl_sum": ((torch.expm1(-log_ratio) + log_ratio) * mask).sum()}
    return loss_BT, stats


def value_loss_sum(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
                   mask_BT: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss, summed over response tokens: 1/2 max((V - R)^2, (V_clipped - R)^2) with
    V_clipped = V_old + clip(V - V_old, -eps, eps), as in the PPO reference implementation."""
    clipped = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values_BT - returns_BT) ** 2, (clipped - returns_BT) ** 2)
    return (loss * mask_BT.to(loss.dtype)).sum()


def _dpo_sigmoid(h_N: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * h_N) - label_smoothing * F.logsigmoid(-beta * h_N)


def _ipo(h_N: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return (h_N - 1 / (2 * beta)) ** 2


DPO_LOSSES = {"sigmoid": _dpo_sigmoid, "ipo": _ipo}


def _check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    if beta <= 0:
        raise ValueError(f"DPO needs beta > 0, got {beta}")
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
        raise ValueError(f"label_smoothing must lie in [0, 0.5) and applies to loss_type 'sigmoid' only; got "
                         f"{label_smoothing} with {loss_type!r}")


def dpo_loss(policy_chosen_logp_N: torch.Tensor, policy_rejected_logp_N: torch.Tensor,
             ref_chosen_logp_N: torch.Tensor, ref_rejected_logp_N: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on N pairs, from each response's log-probability summed over its tokens.

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), y_w chosen and y_l rejected:
        sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                 eps = 0 is DPO (Rafailov et al. 2023, eq. 7); eps > 0 is conservative DPO (Mitchell 2023),
                 the expected DPO loss when each label is flipped with probability eps, minimised at the
                 finite beta h = log((1 - eps) / eps) rather than pushed to infinity.
        ipo      (h - 1 / (2 beta))^2 (Azar et al. 2023, IPO with tau = beta), which regresses h to a fixed
                 target instead of driving it up without bound.
    Where the policy equals the reference (h = 0) the sigmoid loss is ln 2 whatever eps, and IPO's 1 / (4 beta^2).

    Returns the loss per pair [N] (the caller sums it and divides by the global number of pairs), and the
    implicit rewards beta (log pi - log pi_ref) of the chosen and rejected responses [N], detached, for metrics.
    """
    _check_dpo_args(beta, loss_type, label_smoothing)
    chosen_log_ratio_N = policy_chosen_logp_N - ref_chosen_logp_N
    rejected_log_ratio_N = policy_rejected_logp_N - ref_rejected_logp_N
    loss_N = DPO_LOSSES[loss_type](chosen_log_ratio_N - rejected_log_ratio_N, beta, label_smoothing)
    return loss_N, beta * chosen_log_ratio_N.detach(), beta * rejected_log_ratio_N.detach()


def _preferred(ranks_NK: torch.Tensor) -> torch.Tensor:
    """[N, K, K]: response i ranks strictly above response j, both real (ties and padding are no pair)."""
    valid_NK = ranks_NK >= 0
    return valid_NK[:, :, None] & valid_NK[:, None, :] & (ranks_NK[:, :, None] < ranks_NK[:, None, :])


def _ranking_pairs(log_ratio_NK, ranks_NK, beta, loss_type, label_smoothing) -> torch.Tensor:
    better_NKK = _preferred(ranks_NK)
    h_NKK = log_ratio_NK[:, :, None] - log_ratio_NK[:, None, :]
    pair_NKK = DPO_LOSSES[loss_type](h_NKK, beta, label_smoothing) * better_NKK
    return pair_NKK.sum(dim=(1, 2)) / better_NKK.sum(dim=(1, 2)).clamp(min=1)


def _plackett_luce(log_ratio_NK, ranks_NK, beta, loss_type, label_smoothing) -> torch.Tensor:
    if loss_type != "sigmoid" or label_smoothing:
        raise ValueError("the plackett_luce ranking loss is a likelihood: it takes loss_type 'sigmoid' and no "
                         f"label_smoothing, got {loss_type!r} and {label_smoothing}")
    valid_NK = ranks_NK >= 0
    rewards_NK = beta * log_ratio_NK
    # j competes for i's place when it is real and not ranked above i; i itself is always in, so no set is empty
    k = ranks_NK.shape[1]
    itself = torch.eye(k, dtype=torch.bool, device=ranks_NK.device)
    competes_NKK = (valid_NK[:, None, :] & (ranks_NK[:, None, :] >= ranks_NK[:, :, None])) | itself
    log_norm_NK = torch.where(competes_NKK, rewards_NK[:, None, :], -torch.inf).logsumexp(-1)
    return torch.where(valid_NK, log_norm_NK - rewards_NK, 0.0).sum(-1)


DPO_RANKING_MODES = {"pairs": _ranking_pairs, "plackett_luce": _plackett_luce}


def dpo_ranking_loss(policy_logp_NK: torch.Tensor, ref_logp_NK: torch.Tensor, ranks_NK: torch.Tensor,
                     beta: float, mode: str = "pairs", loss_type: str = "sigmoid", label_smoothing: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO on N rankings of K responses each (rank 0 is best; padding responses have rank -1), from summed
    log-probabilities. Implicit rewards are r = beta (log pi - log pi_ref).

        pairs          the `dpo_loss` of every pair i above j (ties are no pair and are skipped), averaged over
                       the ranking's pairs, so each ranking weighs once whatever its K; a K = 2 ranking gives
                       exactly the pair loss.
        plackett_luce  the negative log-likelihood of the ranking under the Plackett-Luce model of the
                       implicit rewards (Rafailov et al. 2023, appendix A.3), for responses in rank order 1..K:
                           -sum_k [ r_k - log sum_{j >= k} exp(r_j) ]
                       Tied responses each count the whole tied set in their denominator (Breslow's treatment
                       of ties), which reduces to Plackett-Luce when there are none; K = 2 gives the DPO loss.

    Returns the loss per ranking [N] (the caller sums it and divides by the global number of rankings), and,
    detached, for metrics: the mean reward margin r_i - r_j over the ranking's strict pairs [N] and the
    fraction of those pairs the implicit rewards order correctly [N] (both 0 for a ranking without a strict
    pair).
    """
    _check_dpo_args(beta, loss_type, label_smoothing)
    if mode not in DPO_RANKING_MODES:
        raise ValueError(f"unknown DPO ranking mode {mode!r}; choose one of {sorted(DPO_RANKING_MODES)}")
    # padding may hold any log-probability; zeroed, it cannot turn a masked-out term into NaN
    log_ratio_NK = (policy_logp_NK - ref_logp_NK).masked_fill(ranks_NK < 0, 0.0)
    loss_N = DPO_RANKING_MODES[mode](log_ratio_NK, ranks_NK, beta, loss_type, label_smoothing)
    with torch.no_grad():
        better_NKK = _preferred(ranks_NK)
        margin_NKK = beta * (log_ratio_NK[:, :, None] - log_ratio_NK[:, None, :])
        n_pairs_N = better_NKK.sum(dim=(1, 2)).clamp(min=1)
        margin_N = (margin_NKK * better_NKK).sum(dim=(1, 2)) / n_pairs_N
        accuracy_N = ((margin_NKK > 0) & better_NKK).sum(dim=(1, 2)) / n_pairs_N
    return loss_N, margin_N, accuracy_N
