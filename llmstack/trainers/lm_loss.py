"""The causal-LM loss of pretraining, SFT and PPO-ptx, through the fused kernels unless told otherwise.

`kernels: reference` computes the stock logits and `llmstack.losses.causal_lm_loss_sum`; any other setting
takes the last hidden states and the head weight to `causal_linear_cross_entropy`, which never holds the
[B, T, V] logits. Both give the same sum (tests/kernels compare them step by step).
"""

from __future__ import annotations

import torch

from llmstack.kernels import KernelHandle, apply_kernels, causal_linear_cross_entropy, final_hidden_states, through_head
from llmstack.losses import causal_lm_loss_sum


def use_kernels(model, mode: str, device: torch.device) -> KernelHandle:
    """Apply `mode` to `model` on the device it will train on, since what `auto` picks depends on it."""
    model.to(device)
    return apply_kernels(model, mode)


def lm_loss_sum(model, labels_BT: torch.Tensor, impl: str, **inputs) -> torch.Tensor:
    """Sum of next-token cross-entropy over the targets of `labels_BT` (IGNORE_INDEX counts 0)."""
    if impl == "reference":
        return causal_lm_loss_sum(model(**inputs, use_cache=False).logits, labels_BT)
    hidden = final_hidden_states(model, **inputs, use_cache=False)
    return through_head(model, _fused_loss_sum, hidden, labels_BT, impl)


def _fused_loss_sum(weight, bias, hidden, labels_BT, impl: str) -> torch.Tensor:
    if hidden.dtype != weight.dtype:
        # mixed precision: the stock head would run under the model's autocast, so run this one likewise
        with torch.autocast(device_type=hidden.device.type, dtype=hidden.dtype):
            return causal_linear_cross_entropy(hidden, weight, labels_BT, bias, impl=impl)
    return causal_linear_cross_entropy(hidden, weight, labels_BT, bias, impl=impl)
