"""Seeded sampling: every row draws from its own seed, and the draws follow the model's distribution."""

import math

import pytest
import torch

from llmstack.data.chat import ensure_chat_template
from llmstack.data.synthetic import corpus
from llmstack.data.text import train_tokenizer
from llmstack.models.causal_lm import build_from_preset
from llmstack.models.engines.hf import HFEngine, SeededSampling
from llmstack.rl.rollout import SamplingSettings
from llmstack.rl.sampling import row_seeds, uniform_noise


def frequencies(logits: torch.Tensor, n: int, processors=()) -> torch.Tensor:
    """How often each token wins the seeded Gumbel-max over `n` rows with distinct seeds."""
    scores = logits.expand(n, -1).clone()
    for warp in processors:
        scores = warp(None, scores)
    chosen = SeededSampling(row_seeds(7, 3, torch.arange(n)), 0)(torch.zeros(n, 0, dtype=torch.long), scores).argmax(-1)
    return torch.bincount(chosen, minlength=logits.shape[-1]).double() / n


def test_noise_is_uniform_and_columns_are_uncorrelated():
    u = uniform_noise(torch.arange(64), 0, 20_000)
    assert 0 < u.min() and u.max() < 1
    z = (u.mean(1) - 0.5) / math.sqrt(1 / 12 / u.shape[1])  # each row's mean, standardised
    assert z.abs().max() < 5 and 0.7 < z.std() < 1.3
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 0.01


def test_seeded_draws_follow_the_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 40_000
    seen = frequencies(probs.log(), n)
    # binomial standard error per token; 5 sigma keeps the test stable while catching a wrong sampler
    assert ((seen - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt()).all(), seen


def test_top_p_removes_the_tail_and_renormalises_the_nucleus():
    from transformers import TopPLogitsWarper

    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    seen = frequencies(probs.log(), 40_000, [TopPLogitsWarper(0.8)])
    nucleus = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0], dtype=torch.float64) / 0.9
    assert seen[3:].sum() == 0
    # five binomial standard deviations at the widest (p = 1/2) for 40,000 draws: a seeded draw, and a tail
    # that was not renormalised away would be 0.056 off
    assert torch.allclose(seen, nucleus, atol=5 * (0.25 / 40_000) ** 0.5), seen


def test_draws_depend_on_seed_and_step_only():
    keys = row_seeds(0, 0, torch.tensor([5, 9]))
    assert torch.equal(uniform_noise(keys[:1], 2, 50), uniform_noise(keys, 2, 50)[:1])
    assert not torch.equal(uniform_noise(keys, 2, 50), uniform_noise(keys, 3, 50))
    assert not torch.equal(row_seeds(0, 0, torch.tensor([5])), row_seeds(0, 1, torch.tensor([5])))
    assert not torch.equal(row_seeds(0, 0, torch.tensor([5])), row_seeds(1, 0, torch.tensor([5])))


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_tokenizer(corpus(100), 256)
    ensure_chat_template(tokenizer)
    return build_from_preset("llama-1m", tokenizer, 128, seed=0).eval(), tokenizer


def test_a_response_is_the_same_alone_or_batched_with_other_prompts(tiny):
    model, tokenizer = tiny
    tokenizer.padding_side = "left"
    prompts = ["what is two plus two", "say hello", "a much longer prompt that forces the others to be padded"]
    engine = HFEngine(SamplingSettings(12, 1.0, 0.95), tokenizer.eos_token_id, tokenizer.pad_token_id)
    engine.load_weights(model)
    seeds = row_seeds(0, 4, torch.arange(3))

    def sample(rows):
        enc = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True)
        return engine.generate(enc["input_ids"], enc["attention_mask"], seeds[rows])

    together = sample([0, 1, 2])
    for i in range(3):
        alone = sample([i])
        assert torch.equal(alone[0], together[i, :alone.shape[1]]), f"prompt {i} sampled differently when batched"
    other_step = engine.generate(*tokenizer(prompts[:1], return_tensors="pt").values(), row_seeds(0, 5, torch.arange(1)))
    assert not torch.equal(other_step[0], together[0, :other_step.shape[1]])
