"""Rollout: sample responses to left-padded prompts, and recompute their log-probabilities.

Shape legend: B sequences, P prompt tokens (left-padded), R response tokens (right-padded), V vocabulary.

Generation sits behind `Generator`, so a faster engine can replace Hugging Face `generate` without touching
the PPO loop; what the loop needs back is only the response token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from llmstack.kernels import final_hidden_states, lm_head_params
from llmstack.kernels.linear_logprobs import linear_logprobs


class Generator(Protocol):
    def __call__(self, model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor) -> torch.Tensor:
        """Response token ids [B, R] (anything after a response's first EOS is ignored)."""


@dataclass
class HFGenerator:
    """`model.generate` with the KV cache, sampling at `temperature` with nucleus `top_p`."""

    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_id: int
    pad_token_id: int

    @torch.no_grad()
    def __call__(self, model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor) -> torch.Tensor:
        out = model.generate(input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP, do_sample=True,
                             temperature=self.temperature, top_p=self.top_p, top_k=0,
                             max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_token_id,
                             pad_token_id=self.pad_token_id, use_cache=True)
        return out[:, prompt_ids_BP.shape[1]:]


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
        weight, bias = lm_head_params(model)
        return linear_logprobs(hidden, weight, response_ids_BR, bias, temperature=temperature,
                               with_entropy=with_entropy, impl=impl)
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
    return getattr(value_model, "module", value_model).score(hidden).squeeze(-1).float()
