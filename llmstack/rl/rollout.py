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
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from llmstack.kernels import apply_head, final_hidden_states, through_head
from llmstack.kernels.linear_logprobs import linear_logprobs


class Generator(Protocol):
    def __call__(self, model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor) -> torch.Tensor:
        """Response token ids [B, R] (anything after a response's first EOS is ignored)."""


@dataclass
class HFGenerator:
    """`model.generate` with the KV cache, sampling at `temperature` with nucleus `top_p`.

    Given one seed per row, each row's draws come from that seed alone (`SeededSampling`): a response then
    does not depend on which other prompts share its batch or process, nor on the padding, so a run samples
    the same responses on 1 or N processes and after a resume. Without seeds, torch's global generator."""

    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_id: int
    pad_token_id: int

    @torch.no_grad()
    def __call__(self, model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
                 seeds_B: torch.Tensor | None = None) -> torch.Tensor:
        common = dict(input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP, max_new_tokens=self.max_new_tokens,
                      eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, use_cache=True)
        if seeds_B is None:
            out = model.generate(**common, do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:
            warpers = [TemperatureLogitsWarper(self.temperature)]
            if self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(self.top_p))
            sampling = SeededSampling(seeds_B.to(prompt_ids_BP.device), prompt_ids_BP.shape[1])
            # greedy decoding over Gumbel-perturbed scores is sampling (the Gumbel-max trick)
            out = model.generate(**common, do_sample=False, logits_processor=LogitsProcessorList([*warpers, sampling]),
                                 generation_config=_plain_greedy(model))
        return out[:, prompt_ids_BP.shape[1]:]


def _plain_greedy(model) -> GenerationConfig:
    """The model's generation settings without any sampling parameter: the seeded path supplies its own,
    and generate() would otherwise add the model's defaults (a top_k of 50, say) in front of them."""
    return GenerationConfig.from_dict({k: v for k, v in model.generation_config.to_dict().items()
                                       if k not in ("temperature", "top_p", "top_k", "min_p", "typical_p",
                                                    "do_sample", "repetition_penalty")})


_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts signed integers arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser (Steele, Lea and Flood 2014): a bijection of 64-bit integers whose outputs for
    consecutive inputs pass statistical tests of randomness. int64 products wrap, as the algorithm needs."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_noise(keys_B: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """U(0, 1) [B, n] in float64, a pure function of (key, step, column): counter-based, so it is the same
    for a row whatever else is computed, on any device."""
    row = _mix(keys_B.long() * _GOLDEN + _mix(torch.full_like(keys_B, step, dtype=torch.long) + 1))
    bits = _mix(row[:, None] + _GOLDEN * torch.arange(1, n + 1, device=keys_B.device))
    return (_shr(bits, 11).double() + 0.5) * 2.0 ** -53


def row_seeds(seed: int, step: int, index_B: torch.Tensor) -> torch.Tensor:
    """One sampling seed per (run seed, step, prompt index)."""
    run = _mix(torch.full_like(index_B, seed, dtype=torch.long) * _GOLDEN + step + 1)
    return _mix(run + (index_B.long() + 1) * _GOLDEN)


class SeededSampling(LogitsProcessor):
    """Adds Gumbel(0, 1) noise drawn from each row's own seed; the argmax of log-probabilities plus Gumbel
    noise is a sample from that distribution, so greedy decoding after this processor samples. Tokens a
    warper removed (score -inf) stay impossible."""

    def __init__(self, seeds_B: torch.Tensor, prompt_length: int):
        self.seeds_B, self.prompt_length = seeds_B, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # counted from the end of the padded prompt, so padding does not shift a row's stream
        noise = uniform_noise(self.seeds_B, input_ids.shape[1] - self.prompt_length, scores.shape[-1])
        gumbel = -torch.log(-torch.log(noise))
        return scores.float() + gumbel.float()


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
