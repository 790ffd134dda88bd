"""Reward models trained through LoRA adapters: only the adapters and the score head move, the merged model
scores in stock transformers as in llmstack, the unmerged adapters load with peft and in llmstack's own
loader, QLoRA where bitsandbytes runs, and resume."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from llmstack.config import ConfigError, RewardConfig, load_config
from llmstack.models.reward_model import load_reward_model, sequence_scores, statistics
from llmstack.trainers.reward import reward

from helpers import (assert_close_sums, lora_parameter_count, metric_rows, reward_backbone,  # noqa: E402
                     stop_at_step)  # (tests/trainers)

peft = pytest.importorskip("peft")
RANK = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return reward_backbone(tmp_path_factory.mktemp("backbone"))


def config(tmp_path, path, name, *overrides):
    return load_config(RewardConfig, None, [
        f"output_dir={tmp_path / name}", f"model.name_or_path={path}", "data.train=synthetic:40",
        "data.max_length=48", "train.batch_size=4", "train.max_steps=4", "train.lr=1e-2", "train.warmup_steps=0",
        "train.eval_every=0", "train.log_every=1", "lora.enabled=true", f"lora.r={RANK}", *overrides])


def batch(tokenizer):
    """Two right-padded answers ending in EOS, as the data gives them."""
    seqs = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
            for t in ("Two plus two is four.", "Well, let me think. Two plus two is nine, or so.")]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def test_only_adapters_and_score_head_train_and_both_saves_score_as_llmstack(tmp_path, backbone):
    path, tokenizer = backbone
    start = load_reward_model(str(path), tokenizer, seed=0)  # the stage's start: backbone + seeded score head
    adapters = reward(config(tmp_path, path, "adapters", "lora.merge=false"))

    trained = dict(adapters.model.named_parameters())
    for name, param in start.named_parameters():
        if name.startswith("score."):
            continue
        peft_name = next(n for n in trained if n.endswith(name.replace(".weight", ".base_layer.weight"))
                         or n.endswith(name))
        assert torch.equal(trained[peft_name], param), f"base weight {name} changed"
    head = adapters.model.base_model.model.score
    assert torch.equal(head.original_module.weight, start.score.weight)
    assert not torch.equal(head.modules_to_save["default"].weight, start.score.weight), "score head did not train"
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    assert len(lora_b) == start.config.num_hidden_layers * len(TARGETS)
    assert all(not torch.all(p == 0) for p in lora_b), "an adapter did not train"
    assert {n for n, p in trained.items() if p.requires_grad} == {n for n in trained if "lora_" in n or
                                                                   "modules_to_save" in n}

    record = json.loads((tmp_path / "adapters/record.json").read_text())
    full = sum(p.numel() for p in start.parameters())
    expected = lora_parameter_count(start.config, RANK) + start.score.weight.numel()
    assert record["model"]["trainable_parameters"] == expected
    assert expected < 0.15 * full
    assert record["model"]["lora"] == {"r": RANK, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS,
                                       "load_in_4bit": False, "merge": False}

    out = tmp_path / "adapters/model"
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    ids, mask = batch(tokenizer)
    n_terms = ids.shape[1] * start.config.intermediate_size
    with torch.no_grad():
        ours = sequence_scores(adapters.model.eval(), ids, mask)
        with_peft = peft.PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), out).eval()
        assert_close_sums(with_peft(input_ids=ids, attention_mask=mask).logits.squeeze(-1), ours, n_terms)
        # transformers' own peft integration: the base model from adapter_config.json, then the adapters
        direct = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
        assert_close_sums(direct(input_ids=ids, attention_mask=mask).logits.squeeze(-1), ours, n_terms)
        loaded = load_reward_model(str(out), tokenizer, seed=5).eval()  # the seed must not redraw the head
        assert_close_sums(sequence_scores(loaded, ids, mask), ours, n_terms)
    assert statistics(loaded) == pytest.approx((record["metrics"]["reward_mean"], record["metrics"]["reward_std"]))

    merged = reward(config(tmp_path, path, "merged", "lora.merge=true"))
    assert [r["loss"] for r in metric_rows(tmp_path / "merged")] == \
        [r["loss"] for r in metric_rows(tmp_path / "adapters")]
    assert not (tmp_path / "merged/model/adapter_config.json").exists()
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged/model").eval()
    assert not any("lora" in n for n, _ in stock.named_parameters())
    with torch.no_grad():
        hf_scores = stock(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert_close_sums(hf_scores, sequence_scores(merged.model.eval(), ids, mask), n_terms)
        assert_close_sums(hf_scores, ours, n_terms)


def test_an_adapter_directory_without_its_base_is_refused_with_what_to_do(tmp_path, backbone):
    path, tokenizer = backbone
    reward(config(tmp_path, path, "adapters", "lora.merge=false", "train.max_steps=1"))
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "adapters/model", moved)
    adapter_config = json.loads((moved / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ConfigError, match=r"holds LoRA adapters whose base model .*gone.* cannot be loaded; "
                                          r"save the reward model merged \(reward stage lora.merge=true\)"):
        load_reward_model(str(moved), tokenizer, seed=0)


def test_qlora_reward_model_trains_adapters_and_head_over_a_4bit_backbone(tmp_path, backbone):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'llmstack[lora]')")
    path, tokenizer = backbone
    result = reward(config(tmp_path, path, "qlora", "lora.load_in_4bit=true", "lora.merge=false"))
    inner = result.model.base_model.model
    assert type(inner.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert type(inner.score.modules_to_save["default"]).__name__ == "Linear"  # the head stays whole
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metric_rows(tmp_path / "qlora"))
    loaded = load_reward_model(str(tmp_path / "qlora/model"), tokenizer, seed=0)
    assert not any("lora" in n for n, _ in loaded.named_parameters())


def test_interrupted_lora_reward_run_resumes_to_the_same_adapters(tmp_path, backbone, monkeypatch):
    path, _ = backbone
    whole = reward(config(tmp_path, path, "whole", "lora.merge=false"))
    with monkeypatch.context() as patch:
        stop_at_step(patch, 2)
        stopped = reward(config(tmp_path, path, "split", "lora.merge=false"))
    assert stopped.status == "interrupted"
    resumed = reward(config(tmp_path, path, "split", "lora.merge=false"))
    assert [r["loss"] for r in metric_rows(tmp_path / "split")] == [r["loss"] for r in metric_rows(tmp_path / "whole")]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_ppo_takes_an_unmerged_reward_model_as_its_reward_and_value_model(tmp_path, backbone):
    from llmstack.config import PPOConfig
    from llmstack.trainers.ppo import ppo

    path, tokenizer = backbone
    reward(config(tmp_path, path, "adapters", "lora.merge=false", "train.max_steps=2"))
    adapters = tmp_path / "adapters/model"
    result = ppo(load_config(PPOConfig, None, [
        f"output_dir={tmp_path / 'ppo'}", f"model.name_or_path={path}", f"reward_model.name_or_path={adapters}",
        "data.train=synthetic:16", "train.max_steps=1", "train.batch_size=4", "rollout.batch_size=4",
        "rollout.max_new_tokens=4", "samples_per_step=0"]))
    assert result.status == "finished"
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ppo/value_model")
    assert not any("lora" in n for n, _ in value.named_parameters())
    # the reward statistics travelled with the adapters into the models PPO loaded from them
    assert value.config.reward_mean == pytest.approx(json.loads(
        (tmp_path / "adapters/record.json").read_text())["metrics"]["reward_mean"])
