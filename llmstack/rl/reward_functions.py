"""Reward functions as reward sources: any Python callable `f(prompts, completions, **columns) -> list[float]`,
and the built-in ones.

A function receives the decoded completions (text, as the policy wrote them), their prompts (text or a
conversation, as the prompt records hold them) and every other column of the prompt records by name, one
value per completion, as TRL's online trainers call theirs. In a config it is named by import path
('package.module:function') or by a built-in's name:

    numeric_match   1 when the completion's final number equals the reference answer's (GSM8K's
                    '#### 72' form, else the last number of each), else 0; reads the column `answer`
    answer_format   1 when the completion ends with a '#### <number>' line (GSM8K's answer format), else 0
    length_penalty  -(response tokens) / rollout.max_new_tokens: 0 for an empty answer, -1 at the limit

Design decisions:
- A function's output is checked (one number per completion, finite or None) and a bad one stops the run
  naming the function, the row and the value, rather than training on garbage.
- None (TRL's "this function does not apply to this row") scores 0 here: the weighted sum must be defined
  for every row.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch

from llmstack.rl.rewards import RewardInputs, import_callable

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_number(text: str) -> float | None:
    """The number after the last '####' when there is one (GSM8K's answer line), else the last number in the
    text; thousands separators and a trailing full stop are ignored. None when the text holds no number."""
    marked = _FINAL.findall(text)
    found = marked or _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def numeric_match(prompts: list, completions: list[str], answer: list | None = None, **columns) -> list[float]:
    """1.0 where the completion's final number equals the reference answer's (column `answer`), else 0.0."""
    if answer is None:
        raise ValueError("reward function numeric_match needs the prompt records' 'answer' field (the reference "
                         f"answer); the records have: {', '.join(columns) or 'no other fields'}")
    scores = []
    for completion, reference in zip(completions, answer):
        expected = final_number(str(reference)) if reference is not None else None
        got = final_number(completion)
        scores.append(float(expected is not None and got is not None and math.isclose(got, expected)))
    return scores


def answer_format(prompts: list, completions: list[str], **columns) -> list[float]:
    """1.0 where the completion's last non-empty line is '#### <number>', else 0.0."""
    def last_line(text: str) -> str:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""
    return [float(_FINAL.fullmatch(last_line(c)) is not None) for c in completions]


class LengthPenalty:
    """-(response tokens) / max_new_tokens: longer answers score lower, linearly, reaching -1 at the limit."""

    name = "length_penalty"

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        return -inputs.exp.mask.sum(-1).float() / self.max_new_tokens


class FunctionReward:
    """A Python reward function as a reward source (`llmstack.rl.rewards.RewardSource`)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        values = self.fn(inputs.prompts, inputs.completions, **inputs.columns)
        if not isinstance(values, (list, tuple)) or len(values) != len(inputs.completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"reward function {self.name} returned {got} values for {len(inputs.completions)} "
                             "completions; it must return one number per completion")
        scores = []
        for row, value in enumerate(values):
            if value is None:
                value = 0.0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward function {self.name} returned {value!r} for completion {row}; it must "
                                 "return finite numbers (or None where it does not apply)")
            scores.append(float(value))
        return torch.tensor(scores, dtype=torch.float32, device=inputs.exp.response_ids.device)


BUILTIN = {"numeric_match": numeric_match, "answer_format": answer_format}


def reward_function(spec: str, max_new_tokens: int, key: str = "reward_funcs"):
    """The reward source named `spec` in a config: a built-in's name or a function's import path."""
    if spec == "length_penalty":
        return LengthPenalty(max_new_tokens)
    if spec in BUILTIN:
        return FunctionReward(BUILTIN[spec], spec)
    return FunctionReward(import_callable(spec, key), spec.rpartition(":")[2])
