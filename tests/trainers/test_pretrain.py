"""Pretraining end to end on tiny models: the run directory contract, the loop's invariants, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmstack.trainers.pretrain as pretrain_mod
from llmstack.config import PretrainConfig, load_config
from llmstack.tracking.metrics import MetricsLog
from llmstack.trainers.base import NonFiniteLossError
from llmstack.trainers.checkpoint import Checkpointer, checkpoint_problem
from llmstack.trainers.pretrain import pretrain

from helpers import assert_same_params, assert_same_updates, initial_params, params  # noqa: E402  (tests/trainers)

TINY = ["model.preset=llama-1m", "model.vocab_size=384", "data.train=synthetic:300", "data.block_size=32",
        "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_batches=4"]


def config(tmp_path, name: str, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [*TINY, f"output_dir={tmp_path / name}", *overrides])


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretraining_writes_the_run_directory_and_lowers_perplexity(tmp_path):
    cfg = config(tmp_path, "run", "train.max_steps=80", "train.eval_every=40", "train.save_every=40",
                 "train.report_to=[tensorboard]")
    result = pretrain(cfg)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "record.json", "MODEL_CARD.md", "model", "checkpoints"):
        assert (out / name).exists(), name
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 81))
    assert all({"loss", "ppl", "tokens_per_s", "lr", "mfu"} <= r.keys() for r in rows)
    assert rows[0]["ppl"] == pytest.approx(math.exp(rows[0]["loss"]))
    assert rows[0]["lr"] == pytest.approx(3e-3 / 2)  # first warm-up step of 2
    assert list((out / "pretrain").rglob("events.out.tfevents.*")), "tensorboard was asked for"
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "finished"
    before, after = record["metrics"]["initial_eval_ppl"], record["metrics"]["final_eval_ppl"]
    # an untrained model is near-uniform over the vocabulary; 80 steps must cut that by more than half
    assert before > 0.8 * 384 and after < 0.5 * before
    assert rows[-1]["eval_ppl"] == pytest.approx(after)

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert_same_params(params(model), params(result.model))
    ids = tokenizer("three plus four is", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)

    assert pretrain(cfg) is None, "a finished run must not be redone"
    assert metric_rows(out) == rows


def test_accumulation_gives_the_same_update_as_a_larger_batch(tmp_path):
    common = ("train.max_steps=4", "train.eval_every=0", "train.save_every=100", "train.max_grad_norm=1.0")
    big = pretrain(config(tmp_path, "b4", "train.batch_size=4", "train.grad_accum=1", *common))
    small = pretrain(config(tmp_path, "b1", "train.batch_size=1", "train.grad_accum=4", *common))
    assert_same_updates(initial_params(tmp_path / "b4"), params(big.model), params(small.model))
    losses = lambda run: [r["loss"] for r in metric_rows(tmp_path / run)]
    assert losses("b4") == pytest.approx(losses("b1"), rel=1e-5)
    # the tolerance tells real differences apart: the same run with a 10% smaller learning rate fails it
    other = pretrain(config(tmp_path, "other", "train.batch_size=4", "train.lr=2.7e-3", *common))
    with pytest.raises(AssertionError, match="updates differ"):
        assert_same_updates(initial_params(tmp_path / "b4"), params(big.model), params(other.model))


def _interrupt_at(monkeypatch, step: int, action):
    original = MetricsLog.log

    def log(self, at, row):
        original(self, at, row)
        if at == step:
            action()

    monkeypatch.setattr(MetricsLog, "log", log)


RESUME = ("train.max_steps=10", "train.save_every=3", "train.eval_every=5", "train.warmup_steps=3")


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    reference = pretrain(config(tmp_path, "whole", *RESUME))
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
        stopped = pretrain(config(tmp_path, "split", *RESUME))
    assert stopped.status == "interrupted" and stopped.state.step == 5 and stopped.signum == signal.SIGTERM
    assert (tmp_path / "split/checkpoints/step-00000005").is_dir()
    assert not (tmp_path / "split/model").exists()
    resumed = pretrain(config(tmp_path, "split", *RESUME))
    assert resumed.status == "finished"
    assert_same_params(params(reference.model), params(resumed.model), rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]
    assert strip(metric_rows(tmp_path / "split")) == strip(metric_rows(tmp_path / "whole"))


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, monkeypatch):
    reference = pretrain(config(tmp_path, "whole", *RESUME))

    def crash():
        raise KeyboardInterrupt("simulated hard kill")

    with monkeypatch.context() as patch:
        _interrupt_at(patch, 8, crash)
        with pytest.raises(KeyboardInterrupt):
            pretrain(config(tmp_path, "crashed", *RESUME))
    assert Checkpointer(tmp_path / "crashed", None, 2).latest().name == "step-00000006"
    resumed = pretrain(config(tmp_path, "crashed", *RESUME))
    assert_same_params(params(reference.model), params(resumed.model), rtol=0, atol=0)
    assert [r["step"] for r in metric_rows(tmp_path / "crashed")] == list(range(1, 11))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pretrain_mod.lm_loss_sum

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] == 5 else loss

    monkeypatch.setattr(pretrain_mod, "lm_loss_sum", poisoned)
    cfg = config(tmp_path, "nan", "train.max_steps=10", "train.save_every=2", "train.eval_every=0")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5.*step-00000004 is intact"):
        pretrain(cfg)
    out = tmp_path / "nan"
    last = Checkpointer(out, None, 2).latest()
    assert last.name == "step-00000004" and checkpoint_problem(last) is None
    weights = load_file(next(last.glob("model*.safetensors")))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((out / "record.json").read_text())["status"].startswith("failed: the training loss is nan")
    assert not (out / "model").exists()


@pytest.mark.slow
def test_sigterm_to_a_real_process_saves_exits_128_plus_signal_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, f"output_dir={out}", "train.schedule=constant", "train.warmup_steps=0", "train.eval_every=0",
            "train.save_every=1000"]
    script = Path(__file__).resolve().parents[2] / "recipes/pretrain.py"
    proc = subprocess.Popen([sys.executable, str(script), *args, "train.max_steps=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(metric_rows(out)) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped_at = metric_rows(out)[-1]["step"]
    assert f"interrupted at step {stopped_at}" in err
    assert Checkpointer(out, None, 2).latest().name == f"step-{stopped_at:08d}"
    assert json.loads((out / "record.json").read_text())["status"] == "interrupted"

    resumed = pretrain(load_config(PretrainConfig, None, [*args, f"train.max_steps={stopped_at + 2}"]))
    assert resumed.status == "finished"
    assert [r["step"] for r in metric_rows(out)] == list(range(1, stopped_at + 3))


def test_fused_loss_trains_like_the_stock_logits(tmp_path):
    """kernels=auto (on CPU: the chunked loss from hidden states, never the full logits) against
    kernels=reference (stock logits + cross-entropy), same seed and data: every logged step's loss and the
    final weights agree to float rounding."""
    steps = ("train.max_steps=6", "train.log_every=1", "train.eval_every=0", "train.warmup_steps=2")
    stock = pretrain(config(tmp_path, "reference", *steps, "kernels=reference"))
    fused = pretrain(config(tmp_path, "auto", *steps, "kernels=auto"))
    assert json.loads((tmp_path / "auto/record.json").read_text())["kernels"]["path"] == "chunked"
    stock_losses = [r["loss"] for r in metric_rows(tmp_path / "reference")]
    fused_losses = [r["loss"] for r in metric_rows(tmp_path / "auto")]
    assert len(stock_losses) == 6 and fused_losses == pytest.approx(stock_losses, rel=1e-5)
    # Adam divides each gradient by its own scale, so rounding-level gradient differences on near-zero
    # entries move weights by up to ~1e-5 here; a wrong loss would move them by the order of lr (3e-3)
    assert_same_params(params(stock.model), params(fused.model), rtol=0, atol=1e-4)
