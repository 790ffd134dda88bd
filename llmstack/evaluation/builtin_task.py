"""The built-in task's judge: its hidden gold rubric (`llmstack.data.synthetic.gold_reward`, which the
simulated annotators follow) as a metric or reward function, and the measures only a task with a gold
rubric allows: answer accuracy, and a reward model's agreement with the rubric next to the annotators' own.

`gold_reward` has the reward-function shape, f(prompts, completions, **columns) -> one number per
completion, so an RL run logs it by naming it (`metrics: [llmstack.evaluation.builtin_task:gold_reward]`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from llmstack.data import synthetic
from llmstack.data.chat import ensure_chat_template
from llmstack.data.formats import prompt_ids
from llmstack.data.preference import render
from llmstack.models.causal_lm import load_causal_lm, load_tokenizer
from llmstack.models.engines.hf import greedy_reply
from llmstack.models.reward_model import load_reward_model, sequence_scores


def _question(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def gold_reward(prompts: list, completions: list[str], **columns) -> list[float]:
    """The rubric's reward of each completion to its prompt (a built-in question, as text or a conversation):
    1.5 right / 0.5 wrong, +0.3 polite, -0.3 rude, -0.1 padded, 0 for text that is no answer."""
    return [synthetic.gold_reward(_question(p), c) for p, c in zip(prompts, completions)]


@torch.no_grad()
def answer_accuracy(model_dir: Path | str, questions: list[list[dict]], max_new_tokens: int = 24,
                    gguf_file: str | None = None) -> float:
    """Share of greedy answers that restate the asked numbers with their right result, in any style."""
    tokenizer = load_tokenizer(str(model_dir), gguf_file)
    ensure_chat_template(tokenizer)
    model = load_causal_lm(str(model_dir), gguf_file).eval()
    right = 0
    for conversation in questions:
        verdict = synthetic.judge(conversation[-1]["content"],
                                  greedy_reply(model, tokenizer, prompt_ids(tokenizer, conversation), max_new_tokens))
        right += bool(verdict and verdict["right"])
    return right / len(questions)


def _gold_pairs(record: dict):
    """(i, j) pairs of a preference record whose gold rewards differ, i the gold winner."""
    question = record["prompt"][-1]["content"]
    gold = [synthetic.gold_reward(question, r) for r in record["responses"]]
    return [(i, j) if gold[i] > gold[j] else (j, i)
            for i, j in itertools.combinations(range(len(gold)), 2) if gold[i] != gold[j]]


@torch.no_grad()
def gold_agreement(reward_dir: Path, n_questions: int, seed: int) -> tuple[float, float]:
    """(reward model, annotators): the share of gold-ordered answer pairs each puts in the gold order, on
    fresh built-in rankings."""
    tokenizer = load_tokenizer(str(reward_dir / "model"))
    ensure_chat_template(tokenizer)
    model = load_reward_model(str(reward_dir / "model"), tokenizer, seed).eval()
    records = synthetic.preferences(n_questions, seed=seed + 7919)
    model_hits = annotator_hits = total = 0
    for record in records:
        ids = [render(tokenizer, record["prompt"], r) for r in record["responses"]]
        scores = [float(sequence_scores(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))) for x in ids]
        position = {index: tier for tier, index in enumerate(record["ranking"])}
        for winner, loser in _gold_pairs(record):
            model_hits += scores[winner] > scores[loser]
            annotator_hits += position[winner] < position[loser]
            total += 1
    return model_hits / total, annotator_hits / total
