"""Rollout: sample responses to left-padded prompts, and recompute their log-probabilities.

Shape legend: B sequences, P prompt tokens (left-padded), R response tokens (right-padded), V vocabulary.

Generation sits behind `Generator`, so a faster engine can replace Hugging Face `generate` without touching
the PPO loop; what the loop needs back is only the response token ids.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from llmstack.kernels import apply_head, final_hidden_states, through_head
from llmstack.kernels.linear_logprobs import linear_logprobs


class Generator(Protocol):
    def __call__(self, model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor) -> torch.Tensor:
        """Response token ids [B, R] (anything after a response's first EOS is ignored)."""


def response_mask(response_ids_BR: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R] covering each response up to and including its first EOS, ended [B]: whether it had one)."""
    is_eos = response_ids_BR == eos_token_id
    ended = is_eos.any(-1)
    first = torch.where(ended, is_eos.float().argmax(-1), torch.full_like(ended, response_ids_BR.shape[1], dtype=torch.long))
    positions = torch.arange(response_ids_BR.shape[1], device=response_ids_BR.device)
    return (positions[None, :] <= first[:, None]).long(), ended


def join(prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR):
    """Full sequences with attention mask and the position ids generation used (counting real tokens only)."""
    ids = torch.cat([prompt_ids_BP, response_ids_BR], dim=1)
    mask = torch.cat([prompt_mask_BP, response_mask_BR], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def response_logprobs(model, prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR,
                      temperature: float, with_entropy: bool = False, impl: str = "reference"):
    """log p(response token) [B, R] under `model` at the sampling temperature (and the entropy [B, R] of
    each next-token distribution when asked), computed in fp32. `impl` other than 'reference' computes them
    from the last hidden states and the head weight in chunks (llmstack.kernels.linear_logprobs), never
    holding the [B, R, V] logits."""
    ids, mask, positions = join(prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR)
    start = prompt_ids_BP.shape[1] - 1
    if impl != "reference":
        hidden = final_hidden_states(model, input_ids=ids, attention_mask=mask, position_ids=positions,
                                     use_cache=False)[:, start:start + response_ids_BR.shape[1]]
        return through_head(model, lambda weight, bias, h, r: linear_logprobs(
            h, weight, r, bias, temperature=temperature, with_entropy=with_entropy, impl=impl), hidden, response_ids_BR)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logits = logits[:, start:start + response_ids_BR.shape[1]].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, response_ids_BR.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def response_values(value_model, prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR) -> torch.Tensor:
    """V [B, R]: the value head at the position that predicts each response token."""
    ids, mask, positions = join(prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR)
    out = value_model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    start = prompt_ids_BP.shape[1] - 1
    hidden = out.hidden_states[-1][:, start:start + response_ids_BR.shape[1]]
    return apply_head(getattr(value_model, "module", value_model).score, hidden).squeeze(-1).float()
