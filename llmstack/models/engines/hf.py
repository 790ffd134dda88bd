"""The reference rollout engine: Hugging Face `generate` with its KV cache, on the policy module itself.

It reads the policy's current weights directly (`load_weights` keeps a reference, no copy). Given one seed
per row, each row's draws come from that seed alone (`SeededSampling`): a response then does not depend on
which other prompts share its batch or process, nor on the padding, so a run samples the same responses on
1 or N processes and after a resume. Without seeds, torch's global generator.
"""

from __future__ import annotations

import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopPLogitsWarper)

from llmstack.rl.rollout import SamplingSettings
from llmstack.rl.sampling import gumbel_noise


class HFEngine:
    """`model.generate` sampling at `temperature` with nucleus `top_p`, from per-row seeds."""

    def __init__(self, sampling: SamplingSettings, eos_token_id: int, pad_token_id: int):
        self.sampling, self.eos_token_id, self.pad_token_id = sampling, eos_token_id, pad_token_id
        self.model: torch.nn.Module | None = None

    def load_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
                 seeds_B: torch.Tensor | None = None) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("HFEngine.generate before load_weights: give the engine the policy first")
        model, s = self.model, self.sampling
        limits = dict(max_new_tokens=s.max_new_tokens, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                      use_cache=True)
        was_training = model.training
        model.eval()
        try:
            if seeds_B is None:
                out = model.generate(input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP, **limits, do_sample=True,
                                     temperature=s.temperature, top_p=s.top_p, top_k=0)
            else:
                warpers = [TemperatureLogitsWarper(s.temperature)]
                if s.top_p < 1.0:
                    warpers.append(TopPLogitsWarper(s.top_p))
                sampling = SeededSampling(seeds_B.to(prompt_ids_BP.device), prompt_ids_BP.shape[1])
                # greedy decoding over Gumbel-perturbed scores is sampling (the Gumbel-max trick)
                out = model.generate(input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP,
                                     logits_processor=LogitsProcessorList([*warpers, sampling]),
                                     generation_config=_plain_greedy(model, limits))
        finally:
            model.train(was_training)
        return out[:, prompt_ids_BP.shape[1]:]


def _plain_greedy(model, limits: dict) -> GenerationConfig:
    """The model's generation settings without any sampling parameter, greedy, with `limits`: the seeded
    path supplies its own sampling, and generate() would otherwise add the model's defaults (a top_k of 50,
    say) in front of it."""
    kept = {k: v for k, v in model.generation_config.to_dict().items()
            if k not in ("temperature", "top_p", "top_k", "min_p", "typical_p", "do_sample", "repetition_penalty")}
    return GenerationConfig.from_dict({**kept, **limits, "do_sample": False})


class SeededSampling(LogitsProcessor):
    """Adds Gumbel(0, 1) noise drawn from each row's own seed; the argmax of log-probabilities plus Gumbel
    noise is a sample from that distribution, so greedy decoding after this processor samples. Tokens a
    warper removed (score -inf) stay impossible."""

    def __init__(self, seeds_B: torch.Tensor, prompt_length: int):
        self.seeds_B, self.prompt_length = seeds_B, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # counted from the end of the padded prompt, so padding does not shift a row's stream
        return scores.float() + gumbel_noise(self.seeds_B, input_ids.shape[1] - self.prompt_length, scores.shape[-1])


@torch.no_grad()
def greedy_reply(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The model's greedy answer to one prompt's token ids (for samples and evaluation, where one
    deterministic answer per prompt is wanted)."""
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
