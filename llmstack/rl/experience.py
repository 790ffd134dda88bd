"""The experience batch of one rollout: prompts, sampled responses, and what scoring adds to them.

Shape legend: B sequences on this process, P prompt tokens (left-padded), R response tokens (right-padded).
A response counts up to and including its first EOS; anything an engine produced after it is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Experience:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R] 1 on each response's tokens, its EOS included
    ended: torch.Tensor  # [B] whether the response has an EOS (else it was cut at the length limit)
    index: torch.Tensor  # [B] each row's prompt, as an index into the prompt set
    logp: torch.Tensor | None = None  # [B, R] under the policy at rollout time (the "old" policy)
    ref_logp: torch.Tensor | None = None  # [B, R] under the reference
    values: torch.Tensor | None = None  # [B, R] the critic's, where there is one
    raw_scores: torch.Tensor | None = None  # [B] the reward sources' weighted sum
    source_scores: dict | None = None  # name -> [B] each reward source's own scores
    scores: torch.Tensor | None = None  # [B] after normalisation, the missing-EOS penalty and clipping
    kl: torch.Tensor | None = None  # [B, R] per-token KL estimate, 0 on padding
    advantages: torch.Tensor | None = None  # [B, R]
    returns: torch.Tensor | None = None  # [B, R]

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def response_args(self, idx=slice(None)) -> tuple[torch.Tensor, ...]:
        """(prompt ids, prompt mask, response ids, response mask) of rows `idx`, as the log-probability and
        value functions take them."""
        return self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.mask[idx]


def response_mask(response_ids_BR: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R] covering each response up to and including its first EOS, ended [B]: whether it had one)."""
    is_eos = response_ids_BR == eos_token_id
    ended = is_eos.any(-1)
    first = torch.where(ended, is_eos.float().argmax(-1),
                        torch.full_like(ended, response_ids_BR.shape[1], dtype=torch.long))
    positions = torch.arange(response_ids_BR.shape[1], device=response_ids_BR.device)
    return (positions[None, :] <= first[:, None]).long(), ended


def join(prompt_ids_BP, prompt_mask_BP, response_ids_BR, response_mask_BR):
    """Full sequences [B, P + R] with attention mask and the position ids generation used (counting real
    tokens only, so a left-padded row is seen exactly as it is alone)."""
    ids = torch.cat([prompt_ids_BP, response_ids_BR], dim=1)
    mask = torch.cat([prompt_mask_BP, response_mask_BR], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions
