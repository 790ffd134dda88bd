"""REPORT.md for a pipeline on the built-in task: does each stage improve on the previous one?

Numbers come from the stages' records and metrics, plus three measurements only the built-in task allows,
because it has a gold rubric: answer accuracy before and after SFT, the reward model's agreement with the
rubric next to the annotators' own, and the gold reward under PPO with and without the KL penalty.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from llmstack.data import synthetic
from llmstack.data.chat import ensure_chat_template
from llmstack.data.preference import render
from llmstack.models.causal_lm import load_causal_lm, load_tokenizer
from llmstack.trainers.reward import load_reward_model, sequence_scores

N_QUESTIONS = 100


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


@torch.no_grad()
def answer_accuracy(model_dir: Path, questions: list[list[dict]], max_new_tokens: int = 24) -> float:
    """Share of greedy answers that restate the asked numbers with their right sum (gold reward > 0)."""
    tokenizer = load_tokenizer(str(model_dir))
    ensure_chat_template(tokenizer)
    model = load_causal_lm(str(model_dir)).eval()
    right = 0
    for conversation in questions:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        right += synthetic.gold_reward(conversation[-1]["content"], answer) > 0
    return right / len(questions)


def _gold_pairs(record: dict):
    """(i, j) pairs of a preference record whose gold rewards differ, i the gold winner."""
    question = record["prompt"][-1]["content"]
    gold = [synthetic.gold_reward(question, r) for r in record["responses"]]
    return [(i, j) if gold[i] > gold[j] else (j, i)
            for i, j in itertools.combinations(range(len(gold)), 2) if gold[i] != gold[j]]


@torch.no_grad()
def gold_agreement(reward_dir: Path, seed: int) -> tuple[float, float]:
    """(reward model, annotators): the share of gold-ordered answer pairs each puts in the gold order, on
    fresh built-in rankings."""
    tokenizer = load_tokenizer(str(reward_dir / "model"))
    ensure_chat_template(tokenizer)
    model = load_reward_model(str(reward_dir / "model"), tokenizer, seed).eval()
    records = synthetic.preferences(N_QUESTIONS, seed=seed + 7919)
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


def _first_last(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    return f"{values[0]:.3f} → {values[-1]:.3f}" if values else "n/a"


def write_report(root: Path, cfg) -> str:
    pre, sft, rm, ppo_dir, no_kl = (root / n for n in ("pretrain", "sft", "reward", "ppo", "ppo-no-kl"))
    pm, sm, rmm = _record(pre)["metrics"], _record(sft)["metrics"], _record(rm)["metrics"]
    questions = synthetic.rl_prompts(N_QUESTIONS, seed=cfg.seed + 104729)
    acc_before, acc_after = answer_accuracy(pre / "model", questions), answer_accuracy(sft / "model", questions)
    rm_gold, annotator_gold = gold_agreement(rm, cfg.seed)
    alpha = _record(rm)["annotators"]["krippendorff_alpha"]
    lines = ["# Pipeline report", "", f"Pipeline directory `{root}`; every stage's lineage is in its `record.json`.",
             "", "| stage | measure | before → after |", "|---|---|---|",
             f"| pretrain | held-out perplexity | {pm['initial_eval_ppl']:.2f} → {pm['final_eval_ppl']:.2f} |",
             f"| SFT | held-out answer loss | {sm['initial_eval_loss']:.3f} → {sm['final_eval_loss']:.3f} |",
             f"| SFT | answer accuracy on {N_QUESTIONS} new questions (greedy) | {acc_before:.1%} → {acc_after:.1%} |",
             f"| reward | held-out pairwise accuracy vs the annotators | {rmm['initial_eval_accuracy']:.1%} → "
             f"{rmm['final_eval_accuracy']:.1%} |"]
    ppo_rows = _metrics(ppo_dir)
    lines += [f"| PPO | reward-model score | {_first_last(ppo_rows, 'reward')} |",
              f"| PPO | gold reward | {_first_last(ppo_rows, 'gold_reward')} |",
              f"| PPO | KL to the reference (nats per answer) | {_first_last(ppo_rows, 'kl')} |", "",
              "## Reward model and the gold rubric", "",
              f"On fresh built-in rankings, the reward model orders {rm_gold:.1%} of the gold-ordered answer pairs "
              f"as the rubric does; the simulated annotators it learned from order {annotator_gold:.1%} of them so "
              f"(their Krippendorff's alpha with each other: {alpha if alpha is None else round(alpha, 3)}).", ""]
    if no_kl.is_dir():
        rows = _metrics(no_kl)
        lines += ["## Without the KL penalty", "",
                  "| run | reward-model score | gold reward | KL |", "|---|---|---|---|",
                  f"| KL penalty on | {_first_last(ppo_rows, 'reward')} | {_first_last(ppo_rows, 'gold_reward')} | "
                  f"{_first_last(ppo_rows, 'kl')} |",
                  f"| KL penalty off | {_first_last(rows, 'reward')} | {_first_last(rows, 'gold_reward')} | "
                  f"{_first_last(rows, 'kl')} |", ""]
    text = "\n".join(lines) + "\n"
    (root / "REPORT.md").write_text(text)
    return text
