"""The PPO benchmark's parts that need neither TRL 1.12's environment nor the shared data: one spec mapped
to both trainers' settings, the shared set-up (identical weights and prompt rows for both sides), the step
clock and the results table."""

import dataclasses
import json
import math
from dataclasses import fields

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments

from benchmarks.ppo import prepare
from benchmarks.ppo.clock import Clock
from benchmarks.ppo.report import Spread, behaviour_table, contender_summary, speed_table, target_line
from benchmarks.ppo.spec import Work, llmstack_overrides, trl_kwargs
from llmstack.config import PPOConfig, load_config
from llmstack.data.batching import ShuffledBatches
from llmstack.models.causal_lm import load_tokenizer
from llmstack.trainers.ppo import build_models, load_prompts

WORK = Work(rollout=6, minibatch=3, epochs=3, new_tokens=20, temperature=0.9, lr=2e-5, adam_betas=(0.8, 0.99),
            weight_decay=0.01, kl_coef=0.1, kl_estimator="k3", clip=0.3, value_clip=0.4, gamma=0.99, lam=0.9,
            max_prompt_tokens=40, steps=5, seed=3)
# TRL 1.12's PPOConfig fields beyond transformers.TrainingArguments that the mapping may use
TRL_PPO_FIELDS = {"num_mini_batches", "total_episodes", "local_rollout_forward_batch_size", "num_sample_generations",
                  "response_length", "stop_token", "temperature", "missing_eos_penalty", "num_ppo_epochs",
                  "whiten_rewards", "kl_coef", "kl_estimator", "cliprange", "cliprange_value", "gamma", "lam"}


def llmstack_config(work: Work) -> PPOConfig:
    return load_config(PPOConfig, None, llmstack_overrides(work, "policy", "reward", "prompts.jsonl", "out"))


def test_the_spec_becomes_these_llmstack_settings():
    cfg = llmstack_config(WORK)
    p, t, r = cfg.ppo, cfg.train, cfg.rollout
    assert (cfg.seed, cfg.model.name_or_path, cfg.reward_model.name_or_path, cfg.value_model.name_or_path,
            cfg.data.train, cfg.data.max_prompt_length) == (3, "policy", "reward", "reward", "prompts.jsonl", 40)
    assert (t.max_steps, t.batch_size, t.lr, t.schedule, t.warmup_steps, t.weight_decay, t.adam_betas,
            t.max_grad_norm, t.precision, t.grad_accum) == (5, 3, 2e-5, "constant", 0, 0.01, [0.8, 0.99], 0.0,
                                                           "fp32", 1)
    assert (r.batch_size, p.epochs, p.clip, p.value_clip, p.value_lr, p.gamma, p.lam) == \
        (6, 3, 0.3, 0.4, 2e-5, 0.99, 0.9)
    assert (p.kl_estimator, p.kl_in, p.kl_coef, p.kl_target) == ("k3", "reward", 0.1, None)
    assert (r.max_new_tokens, r.temperature, r.top_p, p.missing_eos_penalty) == (20, 0.9, 1.0, None)
    assert (p.normalize_rewards, p.reward_clip, p.whiten_advantages, p.ptx_coef) == (False, None, True, 0.0)
    assert not cfg.lora.enabled
    assert r.engine == "auto"


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_each_engine_contender_differs_from_the_default_run_in_its_engine_alone(engine):
    default = llmstack_overrides(WORK, "policy", "reward", "prompts.jsonl", "out")
    named = llmstack_overrides(WORK, "policy", "reward", "prompts.jsonl", "out", engine)
    assert [o for o in named if o not in default] == [f"rollout.engine={engine}"]
    assert load_config(PPOConfig, None, named).rollout.engine == engine


def test_the_spec_becomes_these_trl_settings():
    expected = dict(output_dir="out", seed=3, per_device_train_batch_size=6, gradient_accumulation_steps=1,
                    num_mini_batches=2, local_rollout_forward_batch_size=6, total_episodes=30, num_ppo_epochs=3,
                    response_length=20, temperature=0.9, stop_token="eos", learning_rate=2e-5,
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, adam_beta1=0.8,
                    adam_beta2=0.99, kl_coef=0.1, kl_estimator="k3", cliprange=0.3, cliprange_value=0.4,
                    gamma=0.99, lam=0.9, whiten_rewards=False, missing_eos_penalty=None, bf16=False, fp16=False,
                    gradient_checkpointing=False, num_sample_generations=0, logging_steps=1, save_strategy="no",
                    report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    assert trl_kwargs(WORK, "out") == expected
    training_arguments = {f.name for f in fields(TrainingArguments)}
    assert set(expected) <= training_arguments | TRL_PPO_FIELDS


def test_both_settings_describe_the_same_batches():
    """TRL 1.12 derives its batch sizes from its settings (PPOTrainer.__init__); they must equal llmstack's."""
    cfg, kw = llmstack_config(WORK), trl_kwargs(WORK, "out")
    local_batch = kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"]  # prompts per rollout
    mini_batch = local_batch // kw["num_mini_batches"]  # sequences per optimiser step
    total_batches = math.ceil(kw["total_episodes"] / local_batch)  # PPO steps
    assert (local_batch, mini_batch, total_batches) == (cfg.rollout.batch_size, cfg.train.batch_size,
                                                        cfg.train.max_steps)
    # no accumulation: each minibatch is one forward/backward and one optimiser step, and one rollout
    # generates every prompt in one batch
    assert kw["per_device_train_batch_size"] == local_batch == kw["local_rollout_forward_batch_size"]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Work)])
def test_every_setting_reaches_both_trainers(name):
    changed = {"rollout": 12, "minibatch": 6, "adam_betas": (0.7, 0.9), "kl_estimator": "k1"}
    other = dataclasses.replace(WORK, **{name: changed[name] if name in changed else getattr(WORK, name) + 1})
    moved_llmstack = llmstack_overrides(other, "p", "r", "d", "o") != llmstack_overrides(WORK, "p", "r", "d", "o")
    moved_trl = trl_kwargs(other, "o") != trl_kwargs(WORK, "o")
    # TRL gets the prompts as token rows already cut by llmstack's loader
    assert (moved_llmstack, moved_trl) == (True, name != "max_prompt_tokens")


def test_the_spec_refuses_a_rollout_that_does_not_split_into_minibatches():
    with pytest.raises(ValueError, match="whole minibatches"):
        Work(rollout=8, minibatch=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo-bench")
    text = root / "text.txt"
    text.write_text(" ".join(f"The fox number {i} sees the owl near the river." for i in range(300)))
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as fh:
        for i in range(12):
            fh.write(json.dumps(f"Where is fox {i}?" + " Tell me more." * (i % 4)) + "\n")
    work = Work(rollout=4, minibatch=2, steps=3, max_prompt_tokens=64, seed=1)
    prepare.preset_models(root / "setup", "llama-1m", 300, text, 64, work.seed)
    prepare.prompt_rows(work, root / "setup", prompts)
    return root / "setup", work


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_both_sides_load_identical_models(setup):
    directory, work = setup
    cfg = load_config(PPOConfig, None, llmstack_overrides(work, str(directory / "policy"), str(directory / "reward"),
                                                          str(directory / "prompts.jsonl"), "out"))
    # llmstack's own loader, with a seed that would draw a different head if it drew one at all
    cfg = dataclasses.replace(cfg, seed=cfg.seed + 7)
    models, reward_model = build_models(cfg, load_tokenizer(str(directory / "policy")))
    policy, reference, value = models.policy, models.reference, models.value
    trl_policy = AutoModelForCausalLM.from_pretrained(directory / "policy", dtype=torch.float32)
    trl_reward = AutoModelForSequenceClassification.from_pretrained(directory / "reward", num_labels=1,
                                                                    dtype=torch.float32)
    assert _same_weights(policy, trl_policy) and _same_weights(reference, trl_policy)
    assert _same_weights(reward_model, trl_reward) and _same_weights(value, trl_reward)
    # the reward model is the policy's backbone under a drawn (not zero) scalar head
    assert all(torch.equal(trl_policy.model.state_dict()[k], v) for k, v in trl_reward.model.state_dict().items())
    assert trl_reward.score.weight.shape == (1, trl_policy.config.hidden_size)
    assert trl_reward.score.weight.abs().sum() > 0


def test_trl_reads_the_prompt_rows_llmstack_deals(setup):
    directory, work = setup
    tokenizer = load_tokenizer(str(directory / "policy"))
    cfg = load_config(PPOConfig, None, llmstack_overrides(work, str(directory / "policy"), str(directory / "reward"),
                                                          str(directory / "prompts.jsonl"), "out"))
    rows, _, _ = load_prompts(cfg, tokenizer)
    dealt = [b for _, b in zip(range(work.steps), ShuffledBatches(rows, work.rollout, 0, 1, work.seed))]
    queries = json.loads((directory / "queries.json").read_text())
    # TRL's loader takes `rollout` rows at a time, in order: each batch is the rows llmstack deals in that step,
    # at that step's width
    trl_batches = [torch.tensor(queries[i:i + work.rollout]) for i in range(0, len(queries), work.rollout)]
    assert len(trl_batches) == len(dealt) and len({b.shape[1] for b in trl_batches}) > 1
    for theirs, ours in zip(trl_batches, dealt):
        assert torch.equal(theirs, ours["input_ids"])
        # TRL's attention mask (every id but the pad id) is llmstack's
        assert torch.equal((theirs != tokenizer.pad_token_id).long(), ours["attention_mask"])
    assert sorted(torch.cat([b["index"] for b in dealt]).tolist()) == list(range(work.rollout * work.steps))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert Work.load(directory / "work.json") == work


def test_the_clock_splits_each_step_into_its_phases():
    ticks, cpu = iter([0.0, 1.0, 1.5, 10.0, 12.0, 13.0, 20.0, 22.0]), iter([0.0, 15.0, 36.0])
    clock = Clock(now=lambda: next(ticks), cpu=lambda: next(cpu))
    generate = clock.generation(lambda n: [0] * n, lambda out, n: (len(out), n / 2))
    score = clock.scoring_end(lambda: None)
    for n in (4, 6):
        generate(n)
        score()
    generate(8)
    assert clock.steps() == {"step_s": [10.0, 10.0], "step_cpu_s": [15.0, 21.0], "generation_s": [1.0, 2.0],
                             "scoring_s": [0.5, 1.0], "update_s": [8.5, 7.0], "generated_tokens": [4, 6],
                             "response_length": [2.0, 3.0]}


def run(step, generation=None, tokens=None, reward=None, kl=None, peak=100.0):
    n = len(step)
    return {"step_s": step, "step_cpu_s": step, "generation_s": generation or [s / 2 for s in step],
            "scoring_s": [0.0] * n,
            "update_s": [s / 2 for s in step], "generated_tokens": tokens or [100] * n, "response_length": [32] * n,
            "reward": reward or [0.0] * (n + 1), "kl": kl or [0.0] * (n + 1), "peak_rss_mib": peak, "load": 2.0}


def test_each_number_is_the_median_over_repeats_of_each_runs_median_after_warmup():
    repeats = [run([9.0, 2.0, 4.0, 3.0], generation=[5.0, 0.1, 0.2, 0.3], reward=[1.0, 2.0, 3.0, 6.0, 8.0], peak=50),
               run([9.0, 5.0, 5.0, 6.0], generation=[5.0, 0.4, 0.4, 0.4], reward=[0.0] * 5, peak=70),
               run([1.0, 7.0, 8.0, 9.0], generation=[0.0, 0.9, 0.9, 0.9], reward=[1.0] * 5, peak=60)]
    summary = contender_summary(repeats, warmup=1)
    assert summary["step_s"] == Spread(5.0, 3.0, 8.0)  # run medians 3, 5, 8
    assert summary["ms_per_token"] == Spread(4.0, 2.0, 9.0)  # medians of 1-2-3, 4-4-4, 9-9-9 ms per token
    assert summary["reward"] == Spread(1.0, 0.0, 4.0)  # means over all steps: 4, 0, 1
    assert summary["peak_rss_mib"].median == 60


def test_the_table_shows_spread_ratio_and_behaviour_per_step():
    results = {"llmstack": [run([9.0, 2.0, 4.0]), run([9.0, 4.0, 4.0])],
               "trl-1.12": [run([9.0, 8.0, 8.0], kl=[0.5, 0.25, 0.0, 1.0]), run([9.0, 8.0, 8.0])]}
    table = "\n".join(speed_table(results, 1, "trl-1.12"))
    assert "| llmstack | 3.50 (3.00-4.00) | 0.44x |" in table
    assert "| trl-1.12 | 8.00 (8.00-8.00) | 1.00x |" in table
    assert target_line(results, 1, "llmstack", "trl-1.12", 0.5).endswith("= 0.44 (target <= 0.5: met).")
    rows = behaviour_table(results)
    assert rows[0] == "| step | llmstack reward | trl-1.12 reward | llmstack KL | trl-1.12 KL |"
    assert rows[2] == "| 1 | 0.0000 | 0.0000 | 0.0000 | 0.2500 |"  # median of 0.5 and 0.0
    assert len(rows) == 2 + 4


def test_too_few_steps_for_the_warmup_is_an_error():
    with pytest.raises(ValueError, match="run more steps"):
        contender_summary([run([1.0, 2.0])], warmup=2)
