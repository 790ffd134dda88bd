"""Sampling responses with Hugging Face `generate` (the `llmstack.rl.rollout.Generator` PPO uses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopPLogitsWarper)

from llmstack.rl.sampling import gumbel_noise


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


class SeededSampling(LogitsProcessor):
    """Adds Gumbel(0, 1) noise drawn from each row's own seed; the argmax of log-probabilities plus Gumbel
    noise is a sample from that distribution, so greedy decoding after this processor samples. Tokens a
    warper removed (score -inf) stay impossible."""

    def __init__(self, seeds_B: torch.Tensor, prompt_length: int):
        self.seeds_B, self.prompt_length = seeds_B, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # counted from the end of the padded prompt, so padding does not shift a row's stream
        return scores.float() + gumbel_noise(self.seeds_B, input_ids.shape[1] - self.prompt_length, scores.shape[-1])
