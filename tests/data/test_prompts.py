"""Prompt rows for RL: a batch is left-padded to its own longest prompt, not the prompt set's."""

import torch

from llmstack.data.prompts import PromptRows

PAD = 0


def test_a_batch_of_rows_keeps_only_the_padding_its_longest_prompt_needs():
    prompts = [[7, 8], [1, 2, 3, 4, 5], [9, 10, 11]]
    width = 5
    rows = PromptRows(torch.tensor([[PAD] * (width - len(p)) + p for p in prompts]),
                      torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]), torch.arange(3))
    short = rows.rows(torch.tensor([2, 0]))
    assert short["input_ids"].tolist() == [[9, 10, 11], [PAD, 7, 8]]
    assert short["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert short["index"].tolist() == [2, 0]
    whole = rows.rows(torch.tensor([0, 1]))
    assert whole["input_ids"].tolist() == [[PAD, PAD, PAD, 7, 8], [1, 2, 3, 4, 5]]
