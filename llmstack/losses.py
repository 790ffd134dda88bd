"""Training losses as pure functions of tensors.

Shape legend: B batch, T sequence length, V vocabulary.

Losses return a *sum* over target tokens, not a mean. The training loop divides by the number of target
tokens in the whole global batch (all micro-batches, all processes), so a step's objective does not depend on
how the batch is split into micro-batches, devices or packed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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
