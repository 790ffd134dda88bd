"""Weight dtypes, attention implementation and the resolved precision: what each model is loaded in, and what
the run records."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from llmstack.config import PPOConfig, load_config
from llmstack.models.causal_lm import build_from_preset, load_causal_lm, weight_dtype
from llmstack.models.reward_model import load_reward_model
from llmstack.trainers.base import cpu_has_bf16, resolve_precision
from llmstack.trainers.ppo import build_models
from helpers import tiny_chat_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_chat_policy(tmp_path_factory.mktemp("precision"))


def test_weight_dtype_keeps_fp32_masters_for_trained_models_and_the_compute_dtype_for_frozen_ones():
    assert weight_dtype("auto", "bf16", frozen=False) == torch.float32
    assert weight_dtype("auto", "bf16", frozen=True) == torch.bfloat16
    assert weight_dtype("auto", "fp32", frozen=True) == torch.float32
    assert weight_dtype("bf16", "fp32", frozen=False) == torch.bfloat16  # pure bf16, as asked


def dtypes(models, reward_model) -> dict:
    found = {"policy": models.policy, "reference": models.reference, "value": models.value, "reward": reward_model}
    return {name: {p.dtype for p in m.parameters()} for name, m in found.items() if m is not None}


def test_ppo_loads_the_reward_model_in_the_compute_dtype_and_the_reference_like_the_policy(tmp_path, policy):
    path, tokenizer = policy
    cfg = load_config(PPOConfig, None, [f"output_dir={tmp_path}", f"model.name_or_path={path}",
                                        f"reward_model.name_or_path={path}"])
    bf16 = dtypes(*build_models(cfg, tokenizer, "bf16"))
    assert bf16 == {"policy": {torch.float32}, "reference": {torch.float32}, "value": {torch.float32},
                    "reward": {torch.bfloat16}}
    assert set(map(frozenset, dtypes(*build_models(cfg, tokenizer, "fp32")).values())) == {frozenset({torch.float32})}
    cfg.model.dtype = "bf16"
    assert set(map(frozenset, dtypes(*build_models(cfg, tokenizer, "bf16")).values())) == {frozenset({torch.bfloat16})}


def test_a_bf16_frozen_model_holds_the_rounded_fp32_weights(policy):
    path, tokenizer = policy
    full, half = load_causal_lm(str(path)), load_causal_lm(str(path), dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_hugging_face_config(policy, impl):
    path, tokenizer = policy
    assert load_causal_lm(str(path), attn_implementation=impl).config._attn_implementation == impl
    assert load_reward_model(str(path), tokenizer, 0, attn_implementation=impl).config._attn_implementation == impl
    assert build_from_preset("llama-1m", tokenizer, 64, 0, attn_implementation=impl).config._attn_implementation == impl


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 {}\nbugs\t\t: none\n"


def test_auto_precision_is_bf16_only_where_the_hardware_multiplies_bf16():
    assert cpu_has_bf16(CPUINFO.format("avx512f avx512_bf16")) and cpu_has_bf16(CPUINFO.format("amx_bf16"))
    assert not cpu_has_bf16(CPUINFO.format("avx512f"))
    assert resolve_precision("auto", cuda=False, cpuinfo=CPUINFO.format("avx512_bf16")) == "bf16"
    assert resolve_precision("auto", cuda=False, cpuinfo=CPUINFO.format("avx512f")) == "fp32"
    assert resolve_precision("fp32", cuda=False, cpuinfo=CPUINFO.format("avx512_bf16")) == "fp32"


def test_the_record_holds_the_resolved_precision_and_what_each_model_was_loaded_in(tmp_path, policy):
    from llmstack.config import RewardConfig
    from llmstack.trainers.reward import reward

    path, _ = policy
    cfg = load_config(RewardConfig, None, [
        f"output_dir={tmp_path / 'rm'}", f"model.name_or_path={path}", "data.train=synthetic:40",
        "data.max_length=48", "train.batch_size=4", "train.max_steps=2", "train.eval_every=0",
        "train.precision=auto", "model.attn_implementation=eager"])
    reward(cfg)
    precision = json.loads((tmp_path / "rm/record.json").read_text())["precision"]
    assert precision["train_precision"] == "auto" and precision["compute"] == resolve_precision("auto")
    assert precision["weights"] == {"model": "float32"} and precision["attn_implementation"] == {"model": "eager"}
    # the backbone was saved by hand, not by an llmstack run: an outside checkpoint, at RewardConfig's 1e-5
    learning_rate = json.loads((tmp_path / "rm/record.json").read_text())["learning_rate"]
    assert learning_rate == {"lr": 1e-5, "weight_decay": 0.1, "starts_from_outside_checkpoint": True}


def test_by_default_a_run_takes_bf16_where_the_cpu_has_it_and_records_both(tmp_path, policy, monkeypatch):
    """The default is `auto`; tests/conftest.py shows every test a CPU without bf16, so here one with it."""
    from llmstack.config import RewardConfig
    from llmstack.trainers import base
    from llmstack.trainers.reward import reward

    assert RewardConfig().train.precision == "auto"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format("avx512f avx512_bf16"))
    monkeypatch.setattr(base, "CPUINFO", cpuinfo)
    path, _ = policy
    reward(load_config(RewardConfig, None, [
        f"output_dir={tmp_path / 'rm'}", f"model.name_or_path={path}", "data.train=synthetic:40",
        "data.max_length=48", "train.batch_size=4", "train.max_steps=2", "train.eval_every=0"]))
    precision = json.loads((tmp_path / "rm/record.json").read_text())["precision"]
    assert (precision["train_precision"], precision["compute"]) == ("auto", "bf16")


def test_every_tiny_config_pins_fp32_so_the_built_in_task_reads_the_same_on_every_cpu():
    def train_sections(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "train" and isinstance(value, dict):
                    yield value
                yield from train_sections(value)

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "tiny").glob("*.yaml"))
    found = {path.name: [t.get("precision") for t in train_sections(yaml.safe_load(path.read_text()))]
             for path in configs}
    assert found["pipeline.yaml"] == ["fp32"] * 6
    assert all(precisions == ["fp32"] for name, precisions in found.items()
               if name not in ("pipeline.yaml", "curate.yaml")), found


def test_a_from_scratch_learning_rate_on_an_outside_checkpoint_is_warned_about_and_recorded(tmp_path):
    from llmstack.trainers.base import learning_rate_facts

    hub = learning_rate_facts("sft", "HuggingFaceTB/SmolLM2-135M-Instruct", 1e-3, 0.1)
    assert hub["starts_from_outside_checkpoint"] and "train.lr=0.001" in hub["warning"]
    assert "warning" not in learning_rate_facts("sft", "HuggingFaceTB/SmolLM2-135M-Instruct", 2e-5, 0.0)
    run_model = tmp_path / "pretrain/model"  # an llmstack run's model/: the tiny path trains at 1e-3 on purpose
    run_model.mkdir(parents=True)
    (tmp_path / "pretrain/record.json").write_text(json.dumps({"stage": "pretrain"}))
    ours = learning_rate_facts("sft", str(run_model), 1e-3, 0.1)
    assert not ours["starts_from_outside_checkpoint"] and "warning" not in ours


@pytest.mark.parametrize("precision, head", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_fused_training_loss_runs_the_head_in_the_compute_dtype_in_training_and_evaluation(
        tmp_path, monkeypatch, precision, head):
    """The stock LM head runs inside the model's forward, under the run's autocast; the fused loss applies the
    head outside it, on fp32 hidden states (the residual stream), so it must be given the autocast itself, in
    the training step as in the held-out evaluation."""
    from llmstack.config import PretrainConfig
    from llmstack.kernels import linear_cross_entropy
    from llmstack.trainers.pretrain import pretrain

    seen = []
    dtype_of = linear_cross_entropy.compute_dtype
    monkeypatch.setattr(linear_cross_entropy, "compute_dtype", lambda *t: seen.append(dtype_of(*t)) or seen[-1])
    pretrain(load_config(PretrainConfig, None, [
        f"output_dir={tmp_path}", "model.preset=llama-1m", "model.vocab_size=300", "data.train=synthetic:200",
        "data.block_size=32", "train.batch_size=4", "train.max_steps=2", "train.eval_every=2",
        "train.eval_batches=1", "train.warmup_steps=0", f"train.precision={precision}", "kernels=auto"]))
    assert len(seen) >= 3  # two training steps and an evaluation batch
    assert set(seen) == {head}
