"""Rollout engines behind `llmstack.rl.rollout.RolloutEngine`, chosen by name (`rollout.engine`).

- `hf`: Hugging Face `generate`, the reference every other engine is tested against.
- `static`: a static KV cache and a plain decoding loop on the policy module (`static.py`); the same tokens
  as `hf` (greedy and seeded), faster.
- `vllm`: vLLM colocated with training, the policy's weights pushed into it before each rollout (CUDA only,
  optional extra `llmstack[vllm]`; `vllm.py` says where it has been verified).
- `auto`: `static` for a model on CUDA whose architecture transformers marks as running with a static cache
  (`_can_compile_fullgraph`, the flag `generate` itself reads before compiling), where its decoding step
  compiles and replays as a CUDA graph; `hf` for the rest, CPU included: on CPU the products are nearly all
  of a decoding step in either engine (80%), and the static engine measured 1.14x `generate` on an idle
  2-core CPU (benchmarks/results/generation.md), a small win. It never picks `vllm`: that engine holds a second
  copy of the weights and its own memory, which a user asks for by name.

Adding an engine is one new module here with a class taking `(SamplingSettings, eos_token_id, pad_token_id)`,
its name in `ENGINES`, and the same name in the config's choices (`llmstack.config.schema.RolloutConfig`);
tests/test_architecture.py checks that the two lists agree. Engines are imported only when built, so an
engine's optional dependency is needed only by the runs that choose it.
"""

from __future__ import annotations

import importlib
import logging

import torch

from llmstack.rl.rollout import RolloutEngine, SamplingSettings

log = logging.getLogger(__name__)

# name -> "module:class"
ENGINES = {"auto": "llmstack.models.engines:AutoEngine", "hf": "llmstack.models.engines.hf:HFEngine",
           "static": "llmstack.models.engines.static:StaticEngine",
           "vllm": "llmstack.models.engines.vllm:VLLMEngine"}


def build_engine(name: str, sampling: SamplingSettings, eos_token_id: int, pad_token_id: int) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"rollout engine {name!r} is not one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(sampling, eos_token_id, pad_token_id)


class AutoEngine:
    """`static` where the model supports a static cache, `hf` otherwise; decided at the first
    `load_weights` (the model is not known before) and logged once."""

    def __init__(self, sampling: SamplingSettings, eos_token_id: int, pad_token_id: int):
        self.sampling, self.eos_token_id, self.pad_token_id = sampling, eos_token_id, pad_token_id
        self.chosen: str | None = None
        self._engine: RolloutEngine | None = None

    def load_weights(self, model: torch.nn.Module) -> None:
        if self._engine is None:
            from llmstack.models.engines.static import supports_static_cache

            self.chosen = "static" if on_cuda(model) and supports_static_cache(model) else "hf"
            log.info("rollout engine auto: %s (%s)", self.chosen, type(model).__name__)
            self._engine = build_engine(self.chosen, self.sampling, self.eos_token_id, self.pad_token_id)
        self._engine.load_weights(model)

    def generate(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
                 seeds_B: torch.Tensor | None = None) -> torch.Tensor:
        if self._engine is None:
            raise RuntimeError("AutoEngine.generate before load_weights: give the engine the policy first")
        return self._engine.generate(prompt_ids_BP, prompt_mask_BP, seeds_B)


def on_cuda(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"
