"""Gradient checkpointing in PPO (policy and value model) and in reward modelling: recomputing activations in
the backward pass gives the same losses and the same trained weights as keeping them (no dropout, so the
recomputed forward is the same computation)."""

import pytest
import torch

import llmstack.models.lora as lora_module
from llmstack.config import PPOConfig, RewardConfig, load_config
from llmstack.models.causal_lm import save_model
from llmstack.models.reward_model import load_reward_model
from llmstack.trainers.ppo import ppo
from llmstack.trainers.reward import reward

from helpers import assert_close_sums, metric_rows, tiny_chat_policy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpointing")
    path, tokenizer = tiny_chat_policy(root)
    save_model(load_reward_model(str(path), tokenizer, seed=1), tokenizer, root / "reward")
    return path, root / "reward"


def same_losses(a_rows, b_rows, keys, n_terms):
    for key in keys:
        a = torch.tensor([row[key] for row in a_rows if key in row], dtype=torch.float64)
        b = torch.tensor([row[key] for row in b_rows if key in row], dtype=torch.float64)
        assert len(a) == len(b) > 0, key
        assert_close_sums(a.float(), b.float(), n_terms)


@pytest.mark.slow
def test_ppo_with_checkpointed_policy_and_value_trains_as_without(tmp_path, models, monkeypatch):
    policy, rm = models
    checkpointed = []
    original = lora_module.checkpoint_activations
    monkeypatch.setattr(lora_module, "checkpoint_activations", lambda m: checkpointed.append(m) or original(m))

    def run(name, *extra):
        return ppo(load_config(PPOConfig, None, [
            f"output_dir={tmp_path / name}", f"model.name_or_path={policy}", f"reward_model.name_or_path={rm}",
            "data.train=synthetic:32", "train.max_steps=2", "train.batch_size=4", "train.lr=1e-3",
            "rollout.batch_size=8", "rollout.max_new_tokens=8", "ppo.kl_target=null", "samples_per_step=0", *extra]))

    plain, saving = run("plain"), run("checkpointed", "gradient_checkpointing=true")
    assert saving.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    assert [type(m).__name__ for m in checkpointed] == ["LlamaForCausalLM", "LlamaForSequenceClassification"]
    n_terms = 8 * 24 * plain.model.config.intermediate_size
    same_losses(metric_rows(tmp_path / "plain"), metric_rows(tmp_path / "checkpointed"), ["loss", "value_loss"],
                n_terms)
    trained, start = saving.model.state_dict(), plain.model.state_dict()
    for key, value in start.items():
        assert_close_sums(trained[key], value, n_terms)


@pytest.mark.slow
def test_reward_model_with_checkpointing_trains_as_without(tmp_path, models):
    policy, _ = models

    def run(name, *extra):
        return reward(load_config(RewardConfig, None, [
            f"output_dir={tmp_path / name}", f"model.name_or_path={policy}", "data.train=synthetic:40",
            "data.max_length=48", "train.batch_size=4", "train.max_steps=3", "train.lr=1e-3", "train.log_every=1",
            "train.eval_every=0", *extra]))

    plain, saving = run("plain"), run("checkpointed", "gradient_checkpointing=true")
    assert saving.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    n_terms = 4 * 3 * 48 * plain.model.config.intermediate_size
    same_losses(metric_rows(tmp_path / "plain"), metric_rows(tmp_path / "checkpointed"), ["loss"], n_terms)
    for key, value in plain.model.state_dict().items():
        assert_close_sums(saving.model.state_dict()[key], value, n_terms)


def state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def test_adamw_8bit_keeps_a_quarter_of_the_state_and_trains(models):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'llmstack[lora]')")
    from llmstack.models.causal_lm import load_causal_lm
    from llmstack.trainers.base import build_optimizer

    path, _ = models
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    losses, sizes = {}, {}
    for kind in ("adamw", "adamw_8bit"):
        model = load_causal_lm(str(path))
        optimizer = build_optimizer(model, 3e-3, [0.9, 0.95], 0.0, kind)
        losses[kind] = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[kind].append(float(loss.detach()))
        sizes[kind] = state_bytes(optimizer)
        n_small = sum(p.numel() for p in model.parameters() if p.numel() < 4096)  # kept in fp32 by bitsandbytes
        n_params = sum(p.numel() for p in model.parameters())
    assert sizes["adamw"] == 8 * n_params  # two fp32 moments per parameter
    # two 1-byte moments for the large tensors, two fp32 ones for the small, plus a few fp32 block scales
    assert 2 * n_params <= sizes["adamw_8bit"] - 6 * n_small <= 2.1 * n_params
    assert losses["adamw_8bit"][-1] < losses["adamw_8bit"][0] and losses["adamw"][-1] < losses["adamw"][0]
