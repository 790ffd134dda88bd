"""The fast rollout engine: a preallocated static KV cache, the prompts prefilled once, and a plain decoding
loop of one forward per token, on the policy module itself.

What it leaves out of `model.generate`: the generation-config merging, the logits-processor and
stopping-criteria machinery, and the growing cache (a dynamic cache concatenates every layer's keys and
values at every step, so a long answer copies its whole cache once per token). The model's own forward does
the work, writing transformers' `StaticCache` in place; every decoding step has the same input shapes
(one token per row, the attention mask of the whole cache), which is what lets CUDA graphs replay it.

What it keeps from `generate`, so the two agree token for token: positions from the attention mask
(`cumsum - 1`), the prompt's logits taken at its last position only, rows that reached EOS continued with
the pad token, and the loop stopping when every row has ended. Sampling is `HFEngine`'s: the same
temperature and nucleus warpers, then the row's own Gumbel noise (`llmstack.rl.sampling.gumbel_noise`) at the
same step count, so a row's answer depends on its seed alone, on 1 or N processes and after a resume.

It reads the policy's weights directly (`load_weights` keeps a reference, no copy), so a LoRA policy
(peft) samples with its adapters, and a sharded one is gathered once per rollout by the caller. On CUDA the
one-token step is compiled (`torch.compile` "reduce-overhead": CUDA graphs) and the cache length rounded up
to a multiple of `CUDA_CACHE_BLOCK` so that a new prompt length rarely means a new graph. On CPU it runs
eager: there a step is ~70-75% fp32 matrix products that compiling does not change
(benchmarks/results/generation.md has the profile), and compiling costs a 2-core machine minutes.
"""

from __future__ import annotations

import inspect

import torch
from transformers import StaticCache, TemperatureLogitsWarper, TopPLogitsWarper

from llmstack.rl.rollout import SamplingSettings
from llmstack.rl.sampling import gumbel_noise

CUDA_CACHE_BLOCK = 256


class StaticEngine:
    """Sampling at `temperature` with nucleus `top_p` from per-row seeds (greedy with `greedy=True`) over a
    static KV cache. `compile`: compile the decoding step (default: on CUDA only)."""

    def __init__(self, sampling: SamplingSettings, eos_token_id: int, pad_token_id: int, *, greedy: bool = False,
                 compile: bool | None = None):
        self.sampling, self.eos_token_id, self.pad_token_id = sampling, eos_token_id, pad_token_id
        self.greedy, self.compile = greedy, compile
        self.model: torch.nn.Module | None = None
        self._cache, self._compiled = None, None

    def load_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:  # a cache and a compiled step belong to one module
            self._cache, self._compiled = None, None
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
                 seeds_B: torch.Tensor | None = None) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("StaticEngine.generate before load_weights: give the engine the policy first")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._decode(prompt_ids_BP, prompt_mask_BP, seeds_B)
        finally:
            self.model.train(was_training)

    def _decode(self, prompt_ids_BP, prompt_mask_BP, seeds_B) -> torch.Tensor:
        (B, P), R, device = prompt_ids_BP.shape, self.sampling.max_new_tokens, prompt_ids_BP.device
        compiled = self.compile if self.compile is not None else device.type == "cuda"
        L = -(-(P + R) // CUDA_CACHE_BLOCK) * CUDA_CACHE_BLOCK if compiled else P + R
        cache, cache_key = self._cache_for(B, L), _cache_argument(self.model)
        mask_BL = torch.zeros(B, L, dtype=torch.long, device=device)
        mask_BL[:, :P], mask_BL[:, P:P + R] = prompt_mask_BP, 1
        position_BP = (mask_BL[:, :P].cumsum(-1) - 1).masked_fill(mask_BL[:, :P] == 0, 0)
        # the prefill runs eager: its shape changes with every batch of prompts
        logits_BV = self.model(input_ids=prompt_ids_BP, attention_mask=mask_BL[:, :P], position_ids=position_BP,
                               use_cache=True, logits_to_keep=1, **{cache_key: cache}).logits[:, -1]
        step = self._compiled_step() if compiled else self.model
        choose = self._chooser(seeds_B, device)
        out_BR = torch.full((B, R), self.pad_token_id, dtype=torch.long, device=device)
        ended_B = torch.zeros(B, dtype=torch.bool, device=device)
        position_B1 = position_BP[:, -1:] + 1
        for t in range(R):
            token_B = choose(logits_BV.float(), t).masked_fill(ended_B, self.pad_token_id)
            out_BR[:, t] = token_B
            ended_B |= token_B == self.eos_token_id
            if t == R - 1 or bool(ended_B.all()):
                return out_BR[:, :t + 1]
            logits_BV = step(input_ids=token_B[:, None], attention_mask=mask_BL, position_ids=position_B1 + t,
                             use_cache=True, **{cache_key: cache}).logits[:, -1]
        return out_BR

    def _cache_for(self, batch: int, length: int) -> StaticCache:
        """The cache of the last rollout, emptied, when the shapes agree (CUDA graphs keep its addresses)."""
        key = (batch, length)
        if self._cache is None or self._cache[0] != key:
            self._cache = key, StaticCache(config=_base(self.model).config, max_cache_len=length)
        else:
            self._cache[1].reset()
        return self._cache[1]

    def _compiled_step(self):
        if self._compiled is None:
            self._compiled = torch.compile(self.model, mode="reduce-overhead", fullgraph=False)
        return self._compiled

    def _chooser(self, seeds_B: torch.Tensor | None, device: torch.device):
        """next token [B] from fp32 logits [B, V] at decoding step t (0 for an answer's first token)."""
        if self.greedy:
            return lambda logits_BV, t: logits_BV.argmax(-1)
        s = self.sampling
        warpers = [TemperatureLogitsWarper(s.temperature)] + ([TopPLogitsWarper(s.top_p)] if s.top_p < 1.0 else [])

        def warped(logits_BV):
            for warp in warpers:  # neither warper reads the ids it is given
                logits_BV = warp(None, logits_BV)
            return logits_BV

        if seeds_B is None:
            return lambda logits_BV, t: torch.multinomial(warped(logits_BV).softmax(-1), 1)[:, 0]
        seeds_B = seeds_B.to(device)
        # the Gumbel-max trick, as HFEngine's SeededSampling: argmax(scores + row noise) samples softmax(scores)
        return lambda logits_BV, t: (warped(logits_BV) + gumbel_noise(seeds_B, t, logits_BV.shape[-1])).argmax(-1)


def supports_static_cache(model) -> bool:
    """Whether transformers marks the model's architecture as running with a static cache under compile (the
    flag `generate` reads before it compiles)."""
    return bool(getattr(_base(model), "_can_compile_fullgraph", False))


def _base(model):
    """The Hugging Face model under a peft wrapper (the one whose config and forward signature count)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_argument(model) -> str:
    """The name the model's forward gives its cache (`past_key_values`, renamed `cache` in transformers 5.24)."""
    return "cache" if "cache" in inspect.signature(_base(model).forward).parameters else "past_key_values"
