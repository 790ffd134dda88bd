"""RL in bf16 measures what it claims: under CPU bf16 autocast, a policy and a reference with the same weights
give a KL of exactly 0 and the first minibatch's ratio is exactly 1, for the stock and fused log-probability
paths and for both kinds of reference (a separate copy, the LoRA policy with its adapter disabled); DPO's
saved reference log-probabilities equal the policy's at its first step; the health metrics say so, and the
warnings about a KL target within the noise and about answers cut without EOS name the keys to change."""

import json
import logging

import pytest
import torch
from accelerate import Accelerator

from llmstack.config import DPOConfig, PPOConfig, load_config
from llmstack.kernels import KernelPlan
from llmstack.kernels.linear_logprobs import reference as logprobs_spec
from llmstack.models.causal_lm import load_causal_lm
from llmstack.models.engines.hf import HFEngine
from llmstack.models.forward import token_logprobs
from llmstack.models.heads import final_hidden_states, lm_head_params
from llmstack.models.lora import prepare_for_training
from llmstack.rl.experience import join
from llmstack.rl.reward_functions import FunctionReward
from llmstack.rl.rewards import RewardInputs, RewardNormaliser
from llmstack.trainers import distributed
from llmstack.trainers.dpo import dpo
from llmstack.trainers.ppo import load_prompts, ppo, settings_of, warn_if_kl_target_in_noise
from llmstack.trainers.rl_phases import RLModels, generate, score, update

from helpers import metric_rows, tiny_chat_policy

PLANS = {"stock": KernelPlan("reference", "cpu", "reference", swap_modules=False),
         "fused": KernelPlan("fused", "cpu", "chunked", swap_modules=False)}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_chat_policy(tmp_path_factory.mktemp("bf16"))


def rl_config(tmp_path, path, *extra):
    return load_config(PPOConfig, None, [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={path}", "data.train=synthetic:32",
        "reward_funcs=[length_penalty]", "ppo.estimator=rloo", "ppo.kl_in=reward", "ppo.kl_target=null",
        "rollout.samples_per_prompt=2", "rollout.batch_size=4", "rollout.max_new_tokens=12", "train.batch_size=4",
        "train.lr=1e-3", "train.precision=bf16", *extra])


@pytest.mark.parametrize("path", ["stock", "fused"])
@pytest.mark.parametrize("lora", [False, True], ids=["separate reference", "lora reference"])
def test_identical_policy_and_reference_give_zero_kl_and_a_unit_first_ratio_in_bf16(tmp_path, policy, path, lora):
    model_path, tokenizer = policy
    cfg = rl_config(tmp_path, model_path, f"lora.enabled={str(lora).lower()}", "lora.r=4")
    plan = PLANS[path]
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    model = prepare_for_training(load_causal_lm(str(model_path)), cfg.lora, gradient_checkpointing=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model, optimizer = acc.prepare(model, optimizer)
    reference = None if lora else distributed.prepare_frozen(acc, load_causal_lm(str(model_path)))
    models = RLModels(model, reference, None)
    rows, _, _ = load_prompts(cfg, tokenizer)
    engine = HFEngine(settings_of(cfg)[0], tokenizer.eos_token_id, tokenizer.pad_token_id)
    exp = generate(acc, engine, model, rows.rows(torch.arange(4)), 0, 0, group_size=2)
    inputs = RewardInputs(exp, [None] * len(exp), lambda e: [str(int(m.sum())) for m in e.mask])
    length = FunctionReward(lambda prompts, completions: [float(c) for c in completions], "length")
    exp = score(acc, exp, models, inputs, [(length, 1.0)], RewardNormaliser(False, None), 0.1, settings_of(cfg)[1],
                plan)
    assert exp.mask.sum() > 10
    assert torch.equal(exp.logp, exp.ref_logp) and exp.kl.abs().sum() == 0
    # the first minibatch, through the update's pass (gradients on, the minibatch's own shape)
    first = torch.arange(4)
    logp, _ = token_logprobs(model, *exp.response_args(first), 1.0, plan, with_entropy=True)
    assert logp.requires_grad
    assert torch.equal(torch.exp(logp.detach() - exp.logp[first]), torch.ones_like(logp))
    stats = update(acc, exp, models, [optimizer], [], 0.1, settings_of(cfg)[2], 0, plan)
    assert stats["logprob_gap"] == 0.0 and stats["clip_fraction"] == 0.0


def test_log_probabilities_take_an_fp32_head_on_both_paths_under_bf16_autocast(policy):
    """Under bf16 autocast the stock path used to read the model's bf16 logits, the fused one fp32 ones, so
    the two differed by bf16 rounding of the logits. Now both equal the fp32 spec on the same hidden states,
    up to the fused path's chunked summation in fp32."""
    model_path, tokenizer = policy
    model = load_causal_lm(str(model_path)).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    response = torch.randint(10, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = {name: token_logprobs(model, prompt, torch.ones_like(prompt), response, torch.ones_like(response), 0.7,
                                    plan)[0] for name, plan in PLANS.items()}
        ids, mask, positions = join(prompt, torch.ones_like(prompt), response, torch.ones_like(response))
        hidden = final_hidden_states(model, input_ids=ids, attention_mask=mask, position_ids=positions)
    weight, _ = lm_head_params(model)
    expected, _ = logprobs_spec(hidden[:, 3:-1].float(), weight.float(), response, temperature=0.7)
    assert torch.equal(got["stock"], expected)
    # chunked log-sum-exp over V logits in fp32: a few ulps of the largest |logp|
    scale = float(expected.detach().abs().max())
    tolerance = 4 * torch.finfo(torch.float32).eps * model.config.vocab_size ** 0.5 * scale
    torch.testing.assert_close(got["fused"], expected, rtol=0, atol=tolerance)
    # the bf16-rounded head this replaced is visibly different: the check above could fail
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_head = torch.log_softmax(model.lm_head(hidden[:, 3:-1]).float() / 0.7, -1)
    assert (bf16_head.gather(-1, response[..., None]).squeeze(-1) - expected).abs().max() > 10 * tolerance


def test_a_ppo_run_in_bf16_logs_a_zero_noise_floor_at_step_one(tmp_path, policy):
    model_path, _ = policy
    ppo(rl_config(tmp_path, model_path, "train.max_steps=2", "train.log_every=2", "ppo.kl_target=6"))
    first = metric_rows(tmp_path / "run")[0]
    assert first["step"] == 1
    assert first["health/kl_identical"] == 0.0 and first["health/logprob_gap"] == 0.0
    record = json.loads((tmp_path / "run/record.json").read_text())
    assert record["health"] == {"health/kl_identical": 0.0, "health/logprob_gap": 0.0}
    assert record["precision"]["compute"] == "bf16"


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_kl_target_within_the_noise_is_warned_about():
    noisy = {"health/kl_identical": 0.12, "health/logprob_gap": 0.004}  # floor max(0.12, 0.004 x 48) = 0.192
    collect = Collect()
    logging.getLogger("llmstack").addHandler(collect)
    try:
        warn_if_kl_target_in_noise(noisy, 6.0, mean_length=48)  # 31x above the floor
        assert collect.messages == []
        warn_if_kl_target_in_noise(noisy, 1.0, mean_length=48)
    finally:
        logging.getLogger("llmstack").removeHandler(collect)
    assert len(collect.messages) == 1 and "ppo.kl_target=1.0" in collect.messages[0]
    assert "0.192 nats" in collect.messages[0]


@pytest.mark.parametrize("lora", [False, True], ids=["saved reference", "lora reference"])
def test_dpo_in_bf16_starts_with_the_reference_equal_to_the_policy(tmp_path, policy, lora):
    model_path, _ = policy
    dpo(load_config(DPOConfig, None, [
        f"output_dir={tmp_path / 'dpo'}", f"model.name_or_path={model_path}", "data.train=synthetic:24",
        "data.max_length=64", "train.max_steps=1", "train.batch_size=4", "train.eval_every=0",
        "train.log_every=5", "dpo.kl_prompts=0", "train.precision=bf16", f"lora.enabled={str(lora).lower()}",
        "lora.r=4"]))
    first = metric_rows(tmp_path / "dpo")[0]
    assert first["step"] == 1 and first["health/logprob_gap"] == 0.0
    # every pair starts at the DPO loss of a zero margin, ln 2 (the mean over the batch)
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_most_answers_cut_without_eos_are_warned_about_naming_the_keys():
    from llmstack.trainers.ppo import warn_if_answers_cut

    collect = Collect()
    logging.getLogger("llmstack").addHandler(collect)
    try:
        assert not warn_if_answers_cut(0.5, 32, None) and collect.messages == []
        assert warn_if_answers_cut(0.25, 32, None)
        assert warn_if_answers_cut(0.0, 32, 1.0)
    finally:
        logging.getLogger("llmstack").removeHandler(collect)
    assert "75% of the answers" in collect.messages[0] and "rollout.max_new_tokens=32" in collect.messages[0]
    assert "ppo.missing_eos_penalty" in collect.messages[0]
    assert "ppo.missing_eos_penalty" not in collect.messages[1]  # already set: only the length can change
