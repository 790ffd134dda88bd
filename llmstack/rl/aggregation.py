"""How a per-token loss becomes one number: the choice between a token mean, a sequence mean and a constant
normaliser changes which responses weigh most, and is one of the differences between PPO, GRPO and Dr. GRPO.

Shape legend: B sequences of this process's minibatch, T response tokens; `mask_BT` is 1 on real tokens.

Every mode is a sum over the global minibatch (all processes) divided by global counts, so each process
returns its *share*: its own rows' sum over the global denominator. The shares of all processes add up to the
global value. DDP averages gradients over processes, so a loop backpropagates share x num_processes (as the PPO
update already does with its token mean). Counts must be reduced before the shares are taken, which
`global_counts` does with one all-reduce.

    token_mean           sum_{b,t} l_bt / sum_b |o_b|                              every token weighs the same
    sequence_mean        1/n_seq sum_b (1/|o_b| sum_t l_bt)                        every response weighs the same
                                                                                  (Shao et al. 2024, GRPO)
    token_sum_constant   sum_{b,t} l_bt / (n_seq x max_new_tokens)                 no length normalisation
                                                                                  (Liu et al. 2025, Dr. GRPO)

with |o_b| the number of real tokens of response b and n_seq the number of sequences in the global minibatch.
A sequence mean makes each token of a long response weigh less than a token of a short one, which biases
updates towards short correct and long wrong answers (Liu et al. 2025); the constant of
Dr. GRPO removes that bias without making the loss depend on how tokens split into sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from llmstack.rl.advantages import Reduce, _identity


@dataclass(frozen=True)
class GlobalCounts:
    """Counts over the global minibatch: real response tokens, sequences (rows), and the longest response a
    rollout may generate."""

    tokens: torch.Tensor
    sequences: torch.Tensor
    max_new_tokens: int


def global_counts(mask_BT: torch.Tensor, max_new_tokens: int, all_reduce_sum: Reduce = _identity) -> GlobalCounts:
    """Tokens and sequences of this minibatch summed over processes (each at least 1, so an empty batch divides
    by 1), in float64 so large counts stay exact."""
    local = torch.stack([mask_BT.sum(), torch.tensor(mask_BT.shape[0], device=mask_BT.device)]).double()
    tokens, sequences = all_reduce_sum(local).clamp(min=1)
    return GlobalCounts(tokens, sequences, max_new_tokens)


def token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, counts: GlobalCounts) -> torch.Tensor:
    return (loss_BT * mask_BT).sum() / counts.tokens


def sequence_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, counts: GlobalCounts) -> torch.Tensor:
    lengths_B = mask_BT.sum(-1).clamp(min=1)
    return ((loss_BT * mask_BT).sum(-1) / lengths_B).sum() / counts.sequences


def token_sum_constant(loss_BT: torch.Tensor, mask_BT: torch.Tensor, counts: GlobalCounts) -> torch.Tensor:
    return (loss_BT * mask_BT).sum() / (counts.sequences * counts.max_new_tokens)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, GlobalCounts], torch.Tensor]] = {
    "token_mean": token_mean, "sequence_mean": sequence_mean, "token_sum_constant": token_sum_constant}


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, counts: GlobalCounts) -> torch.Tensor:
    """This process's share of the global loss under `mode` (see the module docstring); a 0-dim tensor."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode](loss_BT, mask_BT.to(loss_BT.dtype), counts)
