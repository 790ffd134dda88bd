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
from llmstack.data.prompts import left_padded
from llmstack.kernels import resolve
from llmstack.models.causal_lm import load_causal_lm, load_tokenizer
from llmstack.models.engines import build_engine
from llmstack.models.forward import token_logprobs
from llmstack.models.reward_model import load_reward_model, sequence_scores
from llmstack.rl.experience import join
from llmstack.rl.rollout import SamplingSettings, rollout


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


@torch.no_grad()
def read_policy(policy_dir: str, reference_dir: str, reward_dir: str, questions: list[list[dict]], *,
                samples: int, sampling: SamplingSettings, engine: str, seed: int, batch: int = 64) -> PolicyReading:
    """Sample `samples` answers per question from the policy as RL samples them (`sampling`, through the
    rollout engine named `engine`) and read each one: gold reward, reward-model score, and
    log pi(answer) - log ref(answer) summed over its tokens, whose mean over samples from pi is the
    KL(pi || ref) per answer."""
    tokenizer = load_tokenizer(policy_dir)
    ensure_chat_template(tokenizer)
    policy, reference = load_causal_lm(policy_dir).eval(), load_causal_lm(reference_dir).eval()
    scorer = load_reward_model(reward_dir, tokenizer, seed).eval()
    generator = build_engine(engine, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id)
    generator.load_weights(policy)
    kernels = resolve("reference", "cpu")
    torch.manual_seed(seed)
    conversations = [c for c in questions for _ in range(samples)]
    gold, scores, kls, verdicts = [], [], [], []
    for start in range(0, len(conversations), batch):
        chunk = conversations[start:start + batch]
        rows = left_padded(tokenizer, chunk)
        exp = rollout(generator, rows.input_ids, rows.attention_mask, rows.index, None)
        logp, _ = token_logprobs(policy, *exp.response_args(), sampling.temperature, kernels)
        ref_logp, _ = token_logprobs(reference, *exp.response_args(), sampling.temperature, kernels)
        kls += ((logp - ref_logp) * exp.mask).sum(-1).tolist()
        ids, full_mask, _ = join(*exp.response_args())
        scores += sequence_scores(scorer, ids, full_mask).tolist()
        for conversation, row, m in zip(chunk, exp.response_ids, exp.mask):
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
