"""PPO on tiny models: invariants at the first step, where the reward lands, resume, and the run directory."""

import json
import math
import os
import signal

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification

import llmstack.trainers.ppo as ppo_module

from llmstack.config import PPOConfig, load_config
from llmstack.data.chat import ensure_chat_template
from llmstack.data.synthetic import corpus, instructions
from llmstack.data.text import train_tokenizer
from llmstack.kernels import resolve
from llmstack.models.causal_lm import build_from_preset, load_causal_lm, save_model
from llmstack.models.engines.hf import HFEngine
from llmstack.models.forward import token_logprobs
from llmstack.models.reward_model import RewardModelScores, load_reward_model, sequence_scores
from llmstack.rl.advantages import last_token_index
from llmstack.rl.experience import response_mask
from llmstack.rl.rewards import RewardInputs, RewardNormaliser
from llmstack.rl.rollout import SamplingSettings
from llmstack.tracking.metrics import MetricsLog
from llmstack.trainers import distributed
from llmstack.trainers.ppo import load_prompts, ppo, settings_of
from llmstack.trainers.rl_phases import RLModels, generate, score

from helpers import assert_close_sums, lora_parameter_count, metric_rows  # noqa: E402  (tests/trainers)

REFERENCE = resolve("reference", "cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo-models")
    tokenizer = train_tokenizer(corpus(200) + [m["content"] for c in instructions(200) for m in c], 384)
    ensure_chat_template(tokenizer)
    save_model(build_from_preset("llama-1m", tokenizer, 256, seed=0), tokenizer, root / "policy")
    save_model(load_reward_model(str(root / "policy"), tokenizer, seed=1), tokenizer, root / "reward")
    return root / "policy", root / "reward", tokenizer


def config(tmp_path, models, name, *overrides):
    policy, rm, _ = models
    return load_config(PPOConfig, None, [
        f"output_dir={tmp_path / name}", f"model.name_or_path={policy}", f"reward_model.name_or_path={rm}",
        "data.train=synthetic:64", "train.max_steps=4", "train.batch_size=4", "train.lr=1e-3", "train.save_every=2",
        "rollout.batch_size=8", "rollout.max_new_tokens=8", "ppo.kl_target=null", "samples_per_step=2", *overrides])


def test_policy_equal_to_reference_gives_zero_kl_and_unit_first_ratio(tmp_path, models):
    policy_path, rm_path, tokenizer = models
    cfg = config(tmp_path, models, "x", "ppo.kl_estimator=k3")
    acc = Accelerator(cpu=True)
    policy, reference = load_causal_lm(str(policy_path)), load_causal_lm(str(policy_path)).eval()
    reward_model = load_reward_model(str(rm_path), tokenizer, 0).eval()
    value = load_reward_model(str(rm_path), tokenizer, 0)
    rows, _, _ = load_prompts(cfg, tokenizer)
    engine = HFEngine(SamplingSettings(8, 1.0), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    exp = generate(acc, engine, policy, rows.rows(torch.arange(8)), 0, 0)
    inputs = RewardInputs(exp, [None] * len(exp), lambda e: [])
    exp = score(acc, exp, RLModels(policy, reference, value), inputs, [(RewardModelScores(reward_model), 1.0)],
                RewardNormaliser(True, None), 0.1, settings_of(cfg)[1], REFERENCE)
    assert torch.equal(exp.logp, exp.ref_logp) and exp.kl.abs().sum() == 0
    again, _ = token_logprobs(policy, *exp.response_args(torch.arange(4)), 1.0, REFERENCE)
    assert torch.equal(torch.exp(again - exp.logp[:4]), torch.ones_like(again))


def test_score_is_read_at_the_last_response_token_under_left_padding_and_early_eos(models):
    _, rm_path, tokenizer = models
    reward_model = load_reward_model(str(rm_path), tokenizer, 0).eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_ids = torch.tensor([[pad, pad, 5, 6], [7, 8, 9, 10]])
    prompt_mask = (prompt_ids != pad).long()
    responses = torch.tensor([[11, eos, 12, 13], [14, 15, 16, 17]])  # early EOS; no EOS (cut at max length)
    mask, ended = response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]
    assert last_token_index(mask).tolist() == [1, 3]
    with torch.no_grad():
        joined = sequence_scores(reward_model, torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, mask], 1))
        alone = [sequence_scores(reward_model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
                 for seq in ([5, 6, 11, eos], [7, 8, 9, 10, 14, 15, 16, 17])]
    torch.testing.assert_close(joined, torch.cat(alone), rtol=1e-5, atol=1e-6)


PTX = ("ppo.ptx_coef=0.5", "data.ptx=synthetic:50")


@pytest.mark.parametrize("extra", [(), PTX], ids=["ppo", "ppo-ptx"])
def test_interrupted_ppo_resumes_to_the_same_policy(tmp_path, models, monkeypatch, extra):
    whole = ppo(config(tmp_path, models, "whole", *extra))
    original = MetricsLog.log

    def log(self, step, row):
        original(self, step, row)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "log", log)
        stopped = ppo(config(tmp_path, models, "split", *extra))
    assert stopped.status == "interrupted" and stopped.state.step == 3
    resumed = ppo(config(tmp_path, models, "split", *extra))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    rows = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    keep = ("loss", "reward", "kl", "value_loss")
    assert [{k: r[k] for k in keep} for r in rows("split")] == [{k: r[k] for k in keep} for r in rows("whole")]
    out = tmp_path / "whole"
    assert (out / "value_model" / "model.safetensors").is_file() and (out / "samples.jsonl").is_file()
    assert json.loads((out / "record.json").read_text())["status"] == "finished"


def test_ptx_mixes_a_pretraining_loss_into_the_policy_update(tmp_path, models):
    plain = ppo(config(tmp_path, models, "plain", "train.max_steps=2"))
    mixed = ppo(config(tmp_path, models, "mixed", "train.max_steps=2", *PTX))
    rows = [json.loads(x) for x in (tmp_path / "mixed/metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["ptx_loss"] < 20 for r in rows)
    first_plain = json.loads((tmp_path / "plain/metrics.jsonl").read_text().splitlines()[0])
    assert rows[0]["reward"] == first_plain["reward"]  # same rollout: the mix only changes the update
    assert not torch.equal(plain.model.model.embed_tokens.weight, mixed.model.model.embed_tokens.weight)


def test_ptx_without_data_is_refused(models):
    from llmstack.config import ConfigError

    with pytest.raises(ConfigError, match="'ppo.ptx_coef' > 0 needs 'data.ptx'"):
        load_config(PPOConfig, None, ["model.name_or_path=a", "reward_model.name_or_path=b", "ppo.ptx_coef=1"])


def test_fused_logprobs_match_the_stock_logits_on_left_padded_rollouts(tmp_path, models):
    """PPO's log-probabilities and entropies from hidden states in chunks (kernels=auto on CPU) against the
    stock full-logits path: values and the gradient they send into the model."""
    policy_path, _, tokenizer = models
    questions = ["What is two plus three?", "The owl asks: what is two plus three, and what is one plus one?",
                 "Sum?", "What is nine minus four?"] * 2
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    rows, _, _ = load_prompts(config(tmp_path, models, "x", f"data.train={tmp_path / 'prompts.jsonl'}"), tokenizer)
    assert (rows.attention_mask == 0).any(-1).sum() == 6, "six of the eight prompts are left-padded"
    policy = load_causal_lm(str(policy_path))
    engine = HFEngine(SamplingSettings(8, 0.7), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    exp = generate(Accelerator(cpu=True), engine, policy, rows.rows(torch.arange(8)), 0, 0)
    out = {}
    for kernels in ("reference", "auto"):  # on CPU, auto is the chunked torch path
        policy.zero_grad()
        logp, entropy = token_logprobs(policy, *exp.response_args(), 0.7, resolve(kernels, "cpu"), with_entropy=True)
        ((logp + 0.1 * entropy) * exp.mask).sum().backward()
        out[kernels] = logp, entropy, {n: p.grad.clone() for n, p in policy.named_parameters()}
    torch.testing.assert_close(out["auto"][0], out["reference"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["auto"][1], out["reference"][1], rtol=1e-5, atol=1e-5)
    for name, grad in out["reference"][2].items():
        torch.testing.assert_close(out["auto"][2][name], grad, rtol=1e-4, atol=1e-5)  # fp32 sums, other order


def test_lora_policy_uses_its_base_model_as_the_reference(tmp_path, models):
    """With LoRA the reference is the policy with the adapter disabled: at the first rollout (adapter B = 0)
    policy and reference are the same function, so the KL is exactly 0; after an update it is not, which
    it could not be if the 'reference' followed the adapter. The saved model is merged and loads plainly."""
    result = ppo(config(tmp_path, models, "lora", "lora.enabled=true", "lora.r=4", "train.max_steps=3",
                        "train.log_every=1", "ppo.kl_coef=0.1"))
    rows = [json.loads(x) for x in (tmp_path / "lora/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] != 0.0
    merged = load_causal_lm(str(tmp_path / "lora/model"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = load_causal_lm(str(models[0]))
    assert any(not torch.equal(a, b) for a, b in zip(merged.parameters(), base.parameters()))
    assert result.status == "finished"


def test_lora_under_a_sharded_layout_is_refused_with_what_to_launch_instead(tmp_path, models, monkeypatch):
    monkeypatch.setattr(distributed, "layout", lambda acc: "zero3")
    with pytest.raises(ValueError, match="lora.enabled is not supported under the zero3 layout.*DDP or DeepSpeed ZeRO-2"):
        ppo(config(tmp_path, models, "lora", "lora.enabled=true"))


def test_value_lora_trains_only_the_value_adapters_and_head_and_saves_value_model(tmp_path, models, monkeypatch):
    """value_lora: the critic's backbone stays bit for bit as loaded, its adapters and value head move, the
    value loss stays finite; value_model/ holds the adapters (merge=false) or a plain model (the default)
    that scores as the trained critic. The policy trains whole and says so in the record."""
    policy_path, rm_path, tokenizer = models
    prepared = []
    original = ppo_module.prepare_for_training
    monkeypatch.setattr(ppo_module, "prepare_for_training", lambda m, lora, gc: prepared.append(original(m, lora, gc))
                        or prepared[-1])
    value_lora = ["value_lora.enabled=true", "value_lora.r=4", "train.max_steps=2"]
    ppo(config(tmp_path, models, "adapters", *value_lora, "value_lora.merge=false"))
    value = prepared[-1].eval()
    start = load_reward_model(str(rm_path), tokenizer, 0)
    trained = dict(value.named_parameters())
    for name, param in start.named_parameters():
        if not name.startswith("score."):
            peft_name = next(n for n in trained if n.endswith(name.replace(".weight", ".base_layer.weight"))
                             or n.endswith(name))
            assert torch.equal(trained[peft_name], param), f"base value weight {name} changed"
    head = value.base_model.model.score
    assert torch.equal(head.original_module.weight, start.score.weight)
    assert not torch.equal(head.modules_to_save["default"].weight, start.score.weight), "value head did not train"
    assert all(not torch.all(p == 0) for n, p in trained.items() if "lora_B" in n), "an adapter did not train"
    losses = [r["value_loss"] for r in metric_rows(tmp_path / "adapters") if "value_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    record = json.loads((tmp_path / "adapters/record.json").read_text())
    full_value, full_policy = (sum(p.numel() for p in m.parameters())
                               for m in (start, load_causal_lm(str(policy_path))))
    value_facts = record["models"]["value_model"]
    assert value_facts["trainable_parameters"] == lora_parameter_count(start.config, 4) + start.score.weight.numel()
    assert value_facts["trainable_parameters"] < 0.15 * full_value and value_facts["lora"]["r"] == 4
    assert record["models"]["policy"]["trainable_parameters"] == full_policy and "lora" not in record["models"]["policy"]

    ids = torch.tensor([[5, 17, 40, 41, 9, tokenizer.eos_token_id]])
    mask = torch.ones_like(ids)
    n_terms = ids.shape[1] * start.config.intermediate_size
    assert (tmp_path / "adapters/value_model/adapter_config.json").is_file()
    with torch.no_grad():
        ours = sequence_scores(value, ids, mask)
        assert_close_sums(sequence_scores(load_reward_model(str(tmp_path / "adapters/value_model"), tokenizer, 3),
                                          ids, mask), ours, n_terms)
    ppo(config(tmp_path, models, "merged", *value_lora))
    assert [r.get("value_loss") for r in metric_rows(tmp_path / "merged")] == \
        [r.get("value_loss") for r in metric_rows(tmp_path / "adapters")]
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged/value_model").eval()
    assert not any("lora" in n for n, _ in stock.named_parameters())
    with torch.no_grad():
        assert_close_sums(stock(input_ids=ids, attention_mask=mask).logits.squeeze(-1), ours, n_terms)
