"""Rollout engines behind `llmstack.rl.rollout.RolloutEngine`, chosen by name (`rollout.engine`).

Adding an engine is one new module here with a class taking `(SamplingSettings, eos_token_id, pad_token_id)`,
its name in `ENGINES`, and the same name in the config's choices (`llmstack.config.schema.RolloutConfig`);
tests/test_architecture.py checks that the two lists agree. Engines are imported only when built, so an
engine's optional dependency is needed only by the runs that choose it.
"""

from __future__ import annotations

import importlib

from llmstack.rl.rollout import RolloutEngine, SamplingSettings

# name -> "module:class"
ENGINES = {"hf": "llmstack.models.engines.hf:HFEngine"}


def build_engine(name: str, sampling: SamplingSettings, eos_token_id: int, pad_token_id: int) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"rollout engine {name!r} is not one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(sampling, eos_token_id, pad_token_id)
