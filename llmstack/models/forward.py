"""What trainers compute through a causal LM's forward: the next-token loss, per-token log-probabilities and
entropies of responses, and a value model's per-token values.

Each takes the resolved `KernelPlan` (`llmstack.models.fused.apply_kernels(...).plan`; there is no default,
so a forgotten argument cannot silently take the slow path). For the loss, the `reference` path puts the
model's own logits through `llmstack.losses`; the others give the last hidden states and the head weight to
the fused ops in `llmstack.kernels`, which never hold the [B, T, V] logits. Both give the same values
(tests/kernels and tests/models compare them with their gradients).

Log-probabilities (`token_logprobs`, `logprobs_at`) take one road on every path and in every role (the
rollout's old policy, the reference, the update, DPO's policy and reference): the model's forward up to the
last hidden states under whatever autocast the caller runs, then the LM head and the log-softmax in fp32 with
autocast off (`linear_logprobs`: the full-logits spec on the `reference` path, chunks on the others). Why
fp32 there: RL compares these numbers across passes (the ratio pi/pi_old, the KL to the reference) and
sums them over a response; a bf16 head rounds every logit to 8 bits of mantissa, an error of ~0.01 nats per
token on logits of size ~10 that sums to tenths of a nat per answer, the size of the KL signal itself.
With one road, the same weights give the same numbers bit for bit.

Shape legend: B sequences, P prompt tokens (left-padded), R response tokens (right-padded), T positions,
V vocabulary.
"""

from __future__ import annotations

import torch

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
    """The head's matmuls in the caller's autocast dtype when one is on (trainers run the loss under the run's
    autocast), else in the hidden states' dtype."""
    if hidden.dtype != weight.dtype:
        # low-precision hidden states over fp32 weights: run the head as the model's autocast would
        with torch.autocast(device_type=hidden.device.type, dtype=hidden.dtype):
            return causal_linear_cross_entropy(hidden, weight, labels_BT, bias, kernels=kernels)
    return causal_linear_cross_entropy(hidden, weight, labels_BT, bias, kernels=kernels)


def head_logprobs(model, hidden: torch.Tensor, tokens: torch.Tensor, kernels: KernelPlan, temperature: float = 1.0,
                  with_entropy: bool = False):
    """(log p(tokens) [...], entropy [...] or None) from the last hidden states [..., H] through `model`'s LM
    head: the head's matmul and the log-softmax in fp32, autocast off (see the module docstring for why)."""
    def fn(weight, bias, h, t):
        with torch.autocast(h.device.type, enabled=False):
            return linear_logprobs(h.float(), weight.float(), t, None if bias is None else bias.float(),
                                   temperature=temperature, with_entropy=with_entropy, kernels=kernels)
    return through_head(model, fn, hidden, tokens)


def token_logprobs(model, prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR, temperature: float,
                   kernels: KernelPlan, with_entropy: bool = False):
    """(log p(response token) [B, R] under `model` at the sampling temperature, the entropy [B, R] of each
    next-token distribution or None), the head in fp32 (`head_logprobs`)."""
    ids, mask, positions = join(prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR)
    start = prompt_ids_BP.shape[1] - 1  # the position that predicts the first response token
    hidden = final_hidden_states(model, input_ids=ids, attention_mask=mask, position_ids=positions,
                                 use_cache=False)[:, start:start + response_ids_BR.shape[1]]
    return head_logprobs(model, hidden, response_ids_BR, kernels, temperature, with_entropy)


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
    pass over `inputs` (any attention layout: shared-prompt rows score several responses at once), the head in
    fp32 (`head_logprobs`). Only the M chosen positions go through the head."""
    hidden = final_hidden_states(model, **inputs, use_cache=False)[rows_M, positions_M]
    return head_logprobs(model, hidden, targets_M, kernels)[0]
