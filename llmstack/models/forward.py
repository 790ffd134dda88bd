"""What trainers compute through a causal LM's forward: the next-token loss, per-token log-probabilities and
entropies of responses, and a value model's per-token values.

Each takes the resolved `KernelPlan` (`llmstack.models.fused.apply_kernels(...).plan`; there is no default,
so a forgotten argument cannot silently take the slow path). On the `reference` path the model's own logits
go through `llmstack.losses`; on the others the last hidden states and the head weight go to the fused ops in
`llmstack.kernels`, which never hold the [B, T, V] logits. Both give the same values (tests/kernels and
tests/models compare them with their gradients).

Shape legend: B sequences, P prompt tokens (left-padded), R response tokens (right-padded), T positions,
V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstack.kernels.backend import KernelPlan
from llmstack.kernels.linear_cross_entropy import causal_linear_cross_entropy
from llmstack.kernels.linear_logprobs import linear_logprobs
from llmstack.losses import causal_lm_loss_sum
from llmstack.models.heads import apply_head, at_least_fp32, final_hidden_states, score_head, through_head
from llmstack.rl.experience import join


def lm_loss_sum(model, labels_BT: torch.Tensor, kernels: KernelPlan, **inputs) -> torch.Tensor:
    """Sum of next-token cross-entropy over the targets of `labels_BT` (IGNORE_INDEX counts 0)."""
    if kernels.path == "reference":
        return causal_lm_loss_sum(model(**inputs, use_cache=False).logits, labels_BT)
    hidden = final_hidden_states(model, **inputs, use_cache=False)
    return through_head(model, _fused_loss_sum, hidden, labels_BT, kernels)


def _fused_loss_sum(weight, bias, hidden, labels_BT, kernels: KernelPlan) -> torch.Tensor:
    if hidden.dtype != weight.dtype:
        # mixed precision: the stock head would run under the model's autocast, so run this one likewise
        with torch.autocast(device_type=hidden.device.type, dtype=hidden.dtype):
            return causal_linear_cross_entropy(hidden, weight, labels_BT, bias, kernels=kernels)
    return causal_linear_cross_entropy(hidden, weight, labels_BT, bias, kernels=kernels)


def token_logprobs(model, prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR, temperature: float,
                   kernels: KernelPlan, with_entropy: bool = False):
    """(log p(response token) [B, R] under `model` at the sampling temperature, the entropy [B, R] of each
    next-token distribution or None), computed in fp32."""
    ids, mask, positions = join(prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR)
    start = prompt_ids_BP.shape[1] - 1  # the position that predicts the first response token
    if kernels.path != "reference":
        hidden = final_hidden_states(model, input_ids=ids, attention_mask=mask, position_ids=positions,
                                     use_cache=False)[:, start:start + response_ids_BR.shape[1]]
        return through_head(model, lambda weight, bias, h, r: linear_logprobs(
            h, weight, r, bias, temperature=temperature, with_entropy=with_entropy, kernels=kernels),
            hidden, response_ids_BR)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logits = logits[:, start:start + response_ids_BR.shape[1]].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, response_ids_BR.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def token_values(value_model, prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR) -> torch.Tensor:
    """V [B, R]: the value head at the position that predicts each response token, in fp32 at least."""
    ids, mask, positions = join(prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR)
    out = value_model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    start = prompt_ids_BP.shape[1] - 1
    hidden = out.hidden_states[-1][:, start:start + response_ids_BR.shape[1]]
    return at_least_fp32(apply_head(score_head(value_model), hidden).squeeze(-1))


def logprobs_at(model, rows_M: torch.Tensor, positions_M: torch.Tensor, targets_M: torch.Tensor,
                kernels: KernelPlan, **inputs) -> torch.Tensor:
    """log p(targets_M[m]) [M] predicted at position `positions_M[m]` of row `rows_M[m]`, from one forward
    pass over `inputs` (any attention layout: shared-prompt rows score several responses at once), in fp32.
    Only the M chosen positions go through the head."""
    if kernels.path != "reference":
        hidden = final_hidden_states(model, **inputs, use_cache=False)[rows_M, positions_M]
        return through_head(model, lambda weight, bias, h, t: linear_logprobs(
            h, weight, t, bias, with_entropy=False, kernels=kernels)[0], hidden, targets_M)
    logits = model(**inputs, use_cache=False).logits[rows_M, positions_M].float()
    return F.log_softmax(logits, dim=-1).gather(-1, targets_M[:, None]).squeeze(-1)
