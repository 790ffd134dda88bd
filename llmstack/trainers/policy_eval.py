"""Before/after measurements of a policy on the built-in task: sample answers to fresh questions from a model
and its reference, then read them with the reward model, the gold rubric and the KL between the two.

The PPO stage's own metrics follow one rollout at a time (a few dozen answers, noisy); these numbers come
from the same fresh questions for every model compared, so before and after differ only by the training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from llmstack.data import synthetic
from llmstack.data.chat import ensure_chat_template
from llmstack.models.causal_lm import load_causal_lm, load_tokenizer
from llmstack.models.generation import HFGenerator
from llmstack.rl.rollout import join, response_logprobs, response_mask
from llmstack.trainers.reward import load_reward_model, sequence_scores


@dataclass
class PolicyReading:
    """Means over the sampled answers; shares of the rubric's verdicts; the sample count."""

    gold: float
    reward_model: float
    kl: float
    right: float
    polite: float
    rude: float
    padded: float
    malformed: float
    answers: int


def _left_padded(tokenizer, conversations, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"] for c in conversations]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def read_policy(policy_dir: str, reference_dir: str, reward_dir: str, questions: list[list[dict]], *,
                samples: int, temperature: float, max_new_tokens: int, seed: int,
                batch: int = 64) -> PolicyReading:
    """Sample `samples` answers per question from the policy at `temperature` (as PPO samples them) and read
    each one: gold reward, reward-model score, and log pi(answer) - log ref(answer) summed over its tokens,
    whose mean over samples from pi is the KL(pi || ref) per answer."""
    tokenizer = load_tokenizer(policy_dir)
    ensure_chat_template(tokenizer)
    policy, reference = load_causal_lm(policy_dir).eval(), load_causal_lm(reference_dir).eval()
    scorer = load_reward_model(reward_dir, tokenizer, seed).eval()
    generate = HFGenerator(max_new_tokens, temperature, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    conversations = [c for c in questions for _ in range(samples)]
    gold, scores, kls, verdicts = [], [], [], []
    for start in range(0, len(conversations), batch):
        chunk = conversations[start:start + batch]
        prompt_ids, prompt_mask = _left_padded(tokenizer, chunk, "cpu")
        response_ids = generate(policy, prompt_ids, prompt_mask)
        mask, _ = response_mask(response_ids, tokenizer.eos_token_id)
        logp, _ = response_logprobs(policy, prompt_ids, prompt_mask, response_ids, mask, temperature)
        ref_logp, _ = response_logprobs(reference, prompt_ids, prompt_mask, response_ids, mask, temperature)
        kls += ((logp - ref_logp) * mask).sum(-1).tolist()
        ids, full_mask, _ = join(prompt_ids, prompt_mask, response_ids, mask)
        scores += sequence_scores(scorer, ids, full_mask).tolist()
        for conversation, row, m in zip(chunk, response_ids, mask):
            answer = tokenizer.decode(row[m.bool()], skip_special_tokens=True)
            question = conversation[-1]["content"]
            gold.append(synthetic.gold_reward(question, answer))
            verdicts.append(synthetic.judge(question, answer))
    n = len(gold)
    styles = Counter(v["style"] for v in verdicts if v)
    return PolicyReading(gold=sum(gold) / n, reward_model=sum(scores) / n, kl=sum(kls) / n,
                         right=sum(bool(v and v["right"]) for v in verdicts) / n,
                         polite=styles["polite"] / n, rude=styles["rude"] / n,
                         padded=sum(bool(v and v["padded"]) for v in verdicts) / n,
                         malformed=sum(v is None for v in verdicts) / n, answers=n)
