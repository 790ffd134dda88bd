"""KL to the reference policy: per-token estimators and the controllers that set its coefficient.

Shape legend: B sequences, T response tokens.

The estimators take log p(token) under the policy and the reference for tokens sampled from the policy and
estimate KL(policy || reference) per token (Schulman 2020, "Approximating KL Divergence"), with
r = log p_ref - log p_policy:
    k1 = -r                   unbiased, can be negative per token
    k2 = r^2 / 2              biased, always >= 0, low variance
    k3 = (exp(r) - 1) - r     unbiased and always >= 0
All three are exactly 0 where the two policies agree.
"""

from __future__ import annotations

import torch


def kl_k1(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    return logp_BT - ref_logp_BT


def kl_k2(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logp_BT - logp_BT) ** 2


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logp_BT - logp_BT
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


class FixedKLController:
    """A constant coefficient beta."""

    def __init__(self, coef: float):
        self.coef = coef

    def update(self, observed_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: beta moves to keep the observed KL near `target`.

        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)

    with n_steps the number of samples (or updates, consistently) since the last call; K_beta = 0.1 in the
    paper corresponds to horizon = 10 updates-worth of n_steps.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = init_coef, target, horizon

    def update(self, observed_kl: float, n_steps: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]
