"""The rollout seam: a generation engine turns prompts into responses, and `rollout` builds the experience.

An engine is anything with the `RolloutEngine` shape; `llmstack.models.engines` holds the implementations
and their registry, and the RL loop picks one by name (`rollout.engine`). What every engine must honour:

- one seed per row: a row's draws depend on its seed alone (not on the other rows of its batch, its
  process, or its padding), so a run samples the same responses on 1 or N processes and after a resume;
- left-padded prompts in, right-padded response ids out, stopping a row at `eos_token_id` (anything after
  a row's first EOS is ignored) and padding with `pad_token_id`;
- `load_weights(model)` before each rollout: the engine must sample from these weights, whether it reads
  the module directly or copies the weights into an engine of its own.

Shape legend: B sequences, P prompt tokens, R response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from llmstack.rl.experience import Experience, response_mask


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled; log-probabilities are later recomputed at the same temperature."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0


class RolloutEngine(Protocol):
    eos_token_id: int
    pad_token_id: int

    def load_weights(self, model: torch.nn.Module) -> None:
        """Sample from `model`'s current weights from now on (called before every rollout)."""

    def generate(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
                 seeds_B: torch.Tensor | None) -> torch.Tensor:
        """Response token ids [B, R]; rows sampled from their own seeds (torch's generator when None)."""


def rollout(engine: RolloutEngine, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
            index_B: torch.Tensor, seeds_B: torch.Tensor | None) -> Experience:
    """Sample one response per prompt row and mark where each ends."""
    responses_BR = engine.generate(prompt_ids_BP, prompt_mask_BP, seeds_B)
    mask_BR, ended_B = response_mask(responses_BR, engine.eos_token_id)
    return Experience(prompt_ids_BP, prompt_mask_BP, responses_BR, mask_BR, ended_B, index_B)
