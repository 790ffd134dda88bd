"""GRPO (the RL loop with the group estimator) on a tiny model: reward functions see the decoded completions
and the prompt records' columns, no value model exists, the group-size rule, exact resume."""

import dataclasses
import json
import math

import pytest
import torch
from accelerate import Accelerator

from llmstack.config import ConfigError, GRPOConfig, load_config
from llmstack.kernels import KernelPlan
from llmstack.models.causal_lm import load_causal_lm
from llmstack.models.engines.hf import HFEngine
from llmstack.models.forward import token_logprobs
from llmstack.rl.reward_functions import FunctionReward
from llmstack.rl.rewards import RewardInputs, RewardNormaliser
from llmstack.trainers import distributed, rl_phases
from llmstack.trainers.ppo import load_prompts, ppo, settings_of
from llmstack.trainers.rl_phases import RLModels, generate, needs_old_logp_pass, score, token_kl, update

from helpers import metric_rows, stop_at_step, tiny_chat_policy  # noqa: E402  (tests/trainers)

SEEN = []


def echo_reward(prompts, completions, answer, **columns):
    """Records what it is given; scores by length so that groups differ."""
    SEEN.append({"prompts": prompts, "completions": completions, "answer": answer, "columns": columns})
    return [float(len(c) % 5) for c in completions]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    policy, tokenizer = tiny_chat_policy(root)
    with open(root / "prompts.jsonl", "w") as fh:
        for i in range(16):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"Question {i}: what is one plus {i}?"}],
                                 "answer": f"#### {i + 1}", "id": i}) + "\n")
    return root, policy, tokenizer


def config(root, name, *extra):
    return load_config(GRPOConfig, None, [
        f"output_dir={root / name}", f"model.name_or_path={root / 'policy'}", f"data.train={root / 'prompts.jsonl'}",
        "train.max_steps=4", "train.batch_size=8", "train.lr=1e-3", "train.save_every=2", "train.log_every=1",
        "rollout.batch_size=4", "rollout.max_new_tokens=8", "reward_funcs=[answer_format]", "samples_per_step=8",
        *extra])


def test_reward_functions_receive_decoded_completions_and_the_records_columns(setup):
    root, _, _ = setup
    SEEN.clear()
    ppo(config(root, "columns", "train.max_steps=1"), reward_funcs={"echo": echo_reward})
    call = SEEN[0]
    assert len(call["completions"]) == 16  # 4 prompts x 4 samples
    # every row's columns belong to its own prompt, and a group's 4 rows share one prompt
    for prompt, answer, row_id in zip(call["prompts"], call["answer"], call["columns"]["id"]):
        asked = int(prompt[0]["content"].split(":")[0].removeprefix("Question "))
        assert (asked, answer) == (row_id, f"#### {row_id + 1}")
    assert all(len({str(p) for p in call["prompts"][g:g + 4]}) == 1 for g in range(0, 16, 4))
    # the completions are the text the run decoded: the samples file holds the same strings
    samples = [json.loads(x) for x in (root / "columns" / "samples.jsonl").read_text().splitlines()]
    assert [s["response"] for s in samples] == call["completions"][:8]
    row = metric_rows(root / "columns")[0]
    assert row["reward/echo"] == pytest.approx(sum(len(c) % 5 for c in call["completions"]) / 16)
    assert row["reward"] == pytest.approx(row["reward/echo"] + row["reward/answer_format"])


def test_grpo_trains_without_a_value_model(setup, device):
    """On each device with the kernels' default (on CUDA: the Triton kernels compiled, the modules swapped)."""
    root, policy, _ = setup
    result = ppo(config(root, f"critic-free-{device}"))
    out = root / f"critic-free-{device}"
    assert not (out / "value_model").exists()
    rows = metric_rows(out)
    assert "value_loss" not in rows[0] and "explained_variance" not in rows[0]
    record = json.loads((out / "record.json").read_text())
    assert record["stage"] == "grpo"
    assert (record["kernels"]["device"], record["kernels"]["path"]) == \
        (device, "triton" if device == "cuda" else "chunked")
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert any(not torch.equal(a.cpu(), b) for a, b in zip(result.model.state_dict().values(),
                                                            load_policy(policy).state_dict().values()))


def load_policy(path):
    return load_causal_lm(str(path))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_one_sample_per_prompt_is_refused_for_group_estimators(setup, estimator):
    root, _, _ = setup
    kl = ["ppo.kl_in=loss"] if estimator == "grpo" else ["ppo.kl_in=reward"]
    cfg = config(root, f"g1-{estimator}", f"ppo.estimator={estimator}", "rollout.samples_per_prompt=1", *kl)
    with pytest.raises(ConfigError, match=f"{estimator} estimator needs a group size .* at least 2, got 1"):
        ppo(cfg)


def test_interrupted_grpo_resumes_to_the_same_policy(setup, monkeypatch):
    root, _, _ = setup
    whole = ppo(config(root, "whole"))
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        stopped = ppo(config(root, "split"))
    assert stopped.status == "interrupted" and stopped.state.step == 3
    resumed = ppo(config(root, "split"))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    keep = ("loss", "reward", "kl", "entropy")
    assert [{k: r[k] for k in keep} for r in metric_rows(root / "split")] == \
        [{k: r[k] for k in keep} for r in metric_rows(root / "whole")]


PLANS = {"stock": KernelPlan("reference", "cpu", "reference", swap_modules=False),
         "fused": KernelPlan("fused", "cpu", "chunked", swap_modules=False)}


def one_step(root, tokenizer, plan, old_logp_pass: bool, *extra):
    """One GRPO step through the phases on a fresh copy of the policy, with the scoring pass of the old
    log-probabilities on or off: (the experience, the update's metrics, the weights after the step)."""
    cfg = config(root, "phases", "train.batch_size=16", *extra)
    acc = Accelerator(cpu=True)
    policy = load_causal_lm(str(root / "policy"))
    policy, optimizer = acc.prepare(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3))
    reference = distributed.prepare_frozen(acc, load_causal_lm(str(root / "policy")))
    models = RLModels(policy, reference, None)
    sampling, scoring, updating = settings_of(cfg)
    rows, _, _ = load_prompts(cfg, tokenizer)
    engine = HFEngine(sampling, tokenizer.eos_token_id, tokenizer.pad_token_id)
    exp = generate(acc, engine, policy, rows.rows(torch.arange(4)), cfg.seed, 0, group_size=4)
    # every answer runs to the length limit here: score the token ids, which differ within a group
    inputs = RewardInputs(exp, [None] * len(exp), lambda e: [str(int(r.sum()) % 7) for r in e.response_ids])
    ids = FunctionReward(lambda prompts, completions: [float(c) for c in completions], "ids")
    exp = score(acc, exp, models, inputs, [(ids, 1.0)], RewardNormaliser(False, None), cfg.ppo.kl_coef,
                dataclasses.replace(scoring, old_logp_pass=old_logp_pass), plan)
    stats = update(acc, exp, models, [optimizer], [], cfg.ppo.kl_coef, updating, 0, plan)
    if exp.kl is None:
        exp.kl = token_kl(exp, cfg.ppo.kl_estimator)
    return exp, stats, {k: v.clone() for k, v in policy.state_dict().items()}


@pytest.mark.parametrize("path", ["stock", "fused"])
def test_old_logprobs_from_the_update_pass_train_exactly_like_a_separate_scoring_pass(setup, path):
    """One epoch of one minibatch: the update's pass runs on the very weights the scoring pass would, and the
    same weights give the same log-probabilities bit for bit, so skipping the scoring pass changes nothing:
    not the old log-probabilities, the KL, the advantages, the logged metrics, nor the weights it leaves."""
    root, _, tokenizer = setup
    cfg = config(root, "phases", "train.batch_size=16")
    assert not needs_old_logp_pass(cfg.ppo.epochs, cfg.train.batch_size,
                                   cfg.rollout.batch_size * cfg.rollout.samples_per_prompt, False)
    separate = one_step(root, tokenizer, PLANS[path], True)
    skipped = one_step(root, tokenizer, PLANS[path], False)
    (exp_a, stats_a, weights_a), (exp_b, stats_b, weights_b) = separate, skipped
    assert torch.equal(exp_a.response_ids, exp_b.response_ids) and exp_a.mask.sum() > 16
    assert exp_a.scores.std() > 0, "the groups' scores must differ for the update to move the policy"
    for field in ("logp", "ref_logp", "kl", "advantages"):
        assert torch.equal(getattr(exp_a, field), getattr(exp_b, field)), field
    # policy == reference at the first step: KL exactly 0, and the first ratio exactly 1 (nothing clipped)
    assert exp_b.kl.abs().sum() == 0 and stats_b["logprob_gap"] == 0.0 and stats_b["clip_fraction"] == 0.0
    assert stats_a == stats_b
    start = load_causal_lm(str(root / "policy")).state_dict()
    moved = [k for k in weights_a if not torch.equal(weights_a[k], start[k])]
    assert moved, "the step must have changed the weights for the comparison to mean anything"
    for name, weight in weights_a.items():
        assert torch.equal(weight, weights_b[name]), name


@pytest.mark.parametrize("extra, separate", [
    ((), False),
    (("ppo.epochs=2",), True),  # the second epoch's old log-probabilities are not the moved policy's
    (("train.batch_size=8",), True),  # two optimiser steps in one epoch: likewise for the second minibatch
])
def test_the_scoring_pass_of_old_logprobs_runs_unless_one_optimiser_step_takes_the_rollout(setup, monkeypatch,
                                                                                           extra, separate):
    """Counted in a real run: the log-probability passes without gradients are the reference's, plus the
    policy's own scoring pass where it is needed."""
    root, _, _ = setup
    no_grad_passes = []
    real = rl_phases.token_logprobs

    def counted(*args, **kwargs):
        if not torch.is_grad_enabled():
            no_grad_passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rl_phases, "token_logprobs", counted)
    name = "passes-" + ("-".join(extra) or "one-step")
    ppo(config(root, name, "train.batch_size=16", "train.max_steps=1", *extra))
    assert len(no_grad_passes) == (2 if separate else 1)
    row = metric_rows(root / name)[0]
    assert row["health/kl_identical"] == 0.0 and row["health/logprob_gap"] == 0.0 and row["kl"] == 0.0


def test_an_update_without_old_logprobs_refuses_more_than_one_optimiser_step(setup):
    root, _, tokenizer = setup
    cfg = config(root, "phases", "ppo.epochs=2")
    exp = type("Rollout", (), {"logp": None, "__len__": lambda self: 16})()
    with pytest.raises(ValueError, match="old_logp_pass"):
        update(Accelerator(cpu=True), exp, None, [], [], 0.0, settings_of(cfg)[2], 0, PLANS["stock"])


def test_a_rollout_samples_the_same_answers_without_the_prompt_sets_padding(setup):
    """Rows trimmed to their batch's longest prompt sample the answers they sample padded to the whole set's
    longest (positions count real tokens, and each row's draws come from its own seed), with the same
    log-probabilities up to fp32 summation order over the masked positions."""
    root, _, tokenizer = setup
    cfg = config(root, "padding")
    rows, _, _ = load_prompts(cfg, tokenizer)
    batch = torch.tensor([1, 0, 2, 3])  # the four shortest questions: one digit each
    trimmed = rows.rows(batch)
    padded = {"input_ids": rows.input_ids[batch], "attention_mask": rows.attention_mask[batch], "index": batch}
    assert trimmed["input_ids"].shape[1] < padded["input_ids"].shape[1]
    acc, policy = Accelerator(cpu=True), load_causal_lm(str(root / "policy"))
    engine = HFEngine(settings_of(cfg)[0], tokenizer.eos_token_id, tokenizer.pad_token_id)
    plan = PLANS["stock"]
    logp = {}
    for name, prompts in (("trimmed", trimmed), ("padded", padded)):
        exp = generate(acc, engine, policy, prompts, cfg.seed, 0, group_size=2)
        with torch.no_grad():
            logp[name] = exp.response_ids, token_logprobs(policy, *exp.response_args(), 1.0, plan)[0] * exp.mask
    assert torch.equal(logp["trimmed"][0], logp["padded"][0])
    scale = float(logp["padded"][1].abs().max())
    torch.testing.assert_close(logp["trimmed"][1], logp["padded"][1], rtol=0,
                               atol=8 * torch.finfo(torch.float32).eps * scale)
