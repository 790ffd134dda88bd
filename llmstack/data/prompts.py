"""Prompts for RL: records -> conversations -> left-padded token rows with the chat template's generation
header, the form a rollout engine continues.

Shape legend: N prompts, P prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmstack.data.sources import DataError, iter_records, synthetic_count


@dataclass
class PromptRows:
    input_ids: torch.Tensor  # [N, P] left-padded
    attention_mask: torch.Tensor  # [N, P]
    index: torch.Tensor  # [N] position in the prompt set

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> dict:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "index": self.index[index]}


def load_conversations(spec: str, prompt_field: str, messages_field: str, seed: int) -> list[list[dict]]:
    """Prompt conversations of `{prompt}` (text or messages) or `{messages}` records, or 'synthetic[:N]' (the
    built-in questions, seeded by `seed`)."""
    n_synthetic = synthetic_count(spec)
    if n_synthetic is not None:
        from llmstack.data.synthetic import rl_prompts

        return rl_prompts(n_synthetic, seed)
    conversations = []
    for where, record in iter_records(spec):
        value = record.get(messages_field, record.get(prompt_field)) if isinstance(record, dict) else None
        if value is None:
            raise DataError(f"{where}: missing field '{prompt_field}' or '{messages_field}'")
        conversations.append([{"role": "user", "content": value}] if isinstance(value, str) else value)
    return conversations


def left_padded(tokenizer, conversations: list[list[dict]], max_length: int | None = None) -> PromptRows:
    """Each conversation rendered with the generation header and tokenised (keeping its last `max_length`
    tokens), left-padded to the longest."""
    encoded = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in encoded]
    if max_length is not None:
        ids = [x[-max_length:] for x in ids]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):], mask[row, width - len(x):] = torch.tensor(x), 1
    return PromptRows(input_ids, mask, torch.arange(len(ids)))
