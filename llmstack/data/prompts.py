"""Prompts for RL: prompt-only records -> prompts -> left-padded token rows, rendered as the reward model
renders them (`llmstack.data.formats.prompt_ids`), the form a rollout engine continues.

Shape legend: N prompts, P prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmstack.data.formats import ChatFields, iter_prompt_records, prompt_ids
from llmstack.data.sources import DataError, synthetic_count


@dataclass
class PromptRows:
    input_ids: torch.Tensor  # [N, P] left-padded
    attention_mask: torch.Tensor  # [N, P]
    index: torch.Tensor  # [N] position in the prompt set

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> dict:
        """Rows `index`, left-padded to their own longest prompt: the set is padded to its longest, and a
        batch of short prompts would otherwise carry that padding through generation and every scoring and
        update pass (GSM8K at a 256-token limit: ~70 real tokens of 256). A row's positions count its real
        tokens only, so its answer and log-probabilities do not depend on the padding in front of it."""
        mask = self.attention_mask[index]
        start = int(mask.reshape(-1, mask.shape[-1]).any(0).long().argmax())  # the first column any row uses
        return {"input_ids": self.input_ids[index][..., start:], "attention_mask": mask[..., start:],
                "index": self.index[index]}


def load_prompt_set(spec: str, fields: ChatFields, seed: int) -> tuple[list, dict[str, list]]:
    """(the prompts of prompt-only records: text, a conversation, or `{messages}`, the conversation so far
    (`llmstack.data.formats`); every other field by name, one value per prompt, None where a record lacks
    it), or of 'synthetic[:N]' (the built-in questions, seeded by `seed`, with no other fields)."""
    n_synthetic = synthetic_count(spec)
    if n_synthetic is not None:
        from llmstack.data.synthetic import rl_prompts

        return rl_prompts(n_synthetic, seed), {}
    prompts, others = [], []
    for prompt, rest in iter_prompt_records(spec, fields):
        prompts.append(prompt)
        others.append(rest)
    if not prompts:
        raise DataError(f"{spec}: holds no prompts; give {{'{fields.prompt}'}} or {{'{fields.messages}'}} records")
    names = list(dict.fromkeys(name for rest in others for name in rest))
    return prompts, {name: [rest.get(name) for rest in others] for name in names}


def left_padded(tokenizer, prompts: list, max_length: int | None = None) -> PromptRows:
    """Each prompt rendered by `prompt_ids` (the reward model's rendering), keeping its last `max_length`
    tokens, left-padded to the longest."""
    ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    if max_length is not None:
        ids = [x[-max_length:] for x in ids]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):], mask[row, width - len(x):] = torch.tensor(x), 1
    return PromptRows(input_ids, mask, torch.arange(len(ids)))
