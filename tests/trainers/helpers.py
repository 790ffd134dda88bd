"""Shared by the trainer tests (imported by name: pytest puts this folder on sys.path)."""

import torch
from transformers import AutoTokenizer

import llmstack.trainers.pretrain as pretrain_mod
from llmstack.config import PretrainConfig, load_config


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=f"parameter {key} differs", **tol)


def initial_params(run_dir) -> dict:
    """The weights a preset run started from (same seed, same tokenizer)."""
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    return params(pretrain_mod.prepare_model(cfg, AutoTokenizer.from_pretrained(run_dir / "model")))


def assert_same_updates(init: dict, a: dict, b: dict, rel: float = 1e-3):
    """Two trainings from `init` moved every tensor the same way, up to fp32 summation order: Adam divides
    by sqrt(v), which turns rounding differences of tiny gradients into visible ones, so the check is on
    the size of the update rather than an absolute tolerance on the weights."""
    for key in init:
        step_a, step_b = a[key] - init[key], b[key] - init[key]
        assert step_a.norm() > 0, f"{key} did not train"
        assert (step_a - step_b).norm() <= rel * step_a.norm(), f"{key}: updates differ"


def assert_close_sums(got: torch.Tensor, expected: torch.Tensor, n_terms: int) -> None:
    """Two computations of the same sums in different orders (another batching, another kernel): round-off
    of n terms grows like a random walk, about eps * sqrt(n) of the magnitudes summed, so an element may
    differ by 4 * eps(dtype) * sqrt(n_terms) of the tensor's largest value. `n_terms` is the longest chain
    of summed terms behind an element (e.g. tokens x the widest layer), not a number tuned to one machine."""
    tolerance = 4 * torch.finfo(expected.dtype).eps * n_terms ** 0.5
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=tolerance * max(scale, 1e-30))


def lora_parameter_count(config, rank: int) -> int:
    """LoRA weights by hand for adapters on every linear layer of each Llama decoder layer: r x (in + out)
    per adapted layer."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return config.num_hidden_layers * sum(rank * (a + b) for a, b in shapes.values())


def tiny_chat_policy(root) -> tuple:
    """A fresh llama-1m with a chat-templated byte-level BPE trained on the built-in task's texts, saved as
    a run's model/ would be; (path, tokenizer)."""
    from llmstack.data.chat import ensure_chat_template
    from llmstack.data.synthetic import corpus, instructions, preferences
    from llmstack.data.text import train_tokenizer
    from llmstack.models.causal_lm import build_from_preset, save_model

    texts = corpus(200) + [m["content"] for c in instructions(200) for m in c]
    tokenizer = train_tokenizer(texts + [r for p in preferences(50) for r in p["responses"]], 384)
    ensure_chat_template(tokenizer)
    save_model(build_from_preset("llama-1m", tokenizer, 256, seed=0), tokenizer, root / "policy")
    return root / "policy", tokenizer


def metric_rows(run) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stop_at_step(monkeypatch, step: int) -> None:
    """Send this process SIGTERM right after `step`'s metrics are logged, as a scheduler would."""
    import os
    import signal

    from llmstack.tracking.metrics import MetricsLog

    original = MetricsLog.log

    def log(self, at, row):
        original(self, at, row)
        if at == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "log", log)


def reward_backbone(root) -> tuple:
    """A fresh llama-1m (128-token context) with a byte-level BPE trained on the built-in stories and ranked
    answers, saved at root/model as a reward stage's starting checkpoint; (path, tokenizer)."""
    from llmstack.data.synthetic import corpus, preferences
    from llmstack.data.text import train_tokenizer
    from llmstack.models.causal_lm import build_from_preset, save_model

    texts = corpus(200) + [r for rec in preferences(50) for r in rec["responses"]]
    tokenizer = train_tokenizer(texts, 384)
    save_model(build_from_preset("llama-1m", tokenizer, 128, seed=0), tokenizer, root / "model")
    return root / "model", tokenizer
