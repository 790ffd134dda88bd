"""Two real processes (DDP over gloo): parameters stay identical across ranks, and training on a global batch
split over 2 processes matches 1 process on the same global batch."""

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llmstack.cli import STAGES
from llmstack.config import PretrainConfig, load_config
from llmstack.data.chat import ensure_chat_template
from llmstack.models.causal_lm import load_tokenizer, save_model
from llmstack.trainers.pretrain import pretrain
from llmstack.trainers.reward import load_reward_model

from helpers import assert_same_updates, initial_params, params  # noqa: E402  (tests/trainers)

REPO = Path(__file__).resolve().parents[2]
COMMON = ["model.preset=llama-1m", "model.vocab_size=384", "data.train=synthetic:300", "data.block_size=32",
          "train.lr=3e-3", "train.warmup_steps=2", "train.max_steps=6", "train.log_every=1", "train.eval_every=3",
          "train.eval_batches=2", "train.save_every=3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(tmp_path, stage: str, out: Path, *overrides: str, launcher: str = "cpu-2proc.yaml") -> str:
    """Run `stage` in 2 processes; assert a real 2-process group with identical parameters on both ranks."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "configs/accelerate" / launcher), "--main_process_port", str(free_port()),
           str(REPO / "tests/trainers/two_process_stage.py"), stage, str(out), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2, "the launcher must start two processes in one process group"
    assert ranks["max_abs_diff_across_ranks"] == 0.0
    assert "world size 2" in proc.stderr
    return proc.stderr


ENGINES = [pytest.param("cpu-2proc.yaml", id="ddp"),
           pytest.param("cpu-2proc-zero2.yaml", id="zero2",
                        marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                 reason="deepspeed is not installed (extra [deepspeed])"))]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ENGINES)
def test_two_process_training_keeps_ranks_identical_and_matches_one_process(tmp_path, launcher):
    out = tmp_path / "two"
    stderr = launch_two(tmp_path, "pretrain", out, *COMMON, "train.batch_size=2", launcher=launcher)
    assert ("(DEEPSPEED)" in stderr) == ("zero" in launcher)

    single = pretrain(load_config(PretrainConfig, None, [f"output_dir={tmp_path / 'one'}", *COMMON,
                                                         "train.batch_size=4"]))
    ddp_weights = load_file(out / "model" / "model.safetensors")
    init = initial_params(tmp_path / "one")
    shared = {k: v for k, v in init.items() if k in ddp_weights}
    assert_same_updates(shared, params(single.model), ddp_weights)
    ddp_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    one_rows = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ddp_rows] == pytest.approx([r["loss"] for r in one_rows], rel=1e-5)
    assert ddp_rows[-1]["eval_loss"] == pytest.approx(one_rows[-1]["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_process_ppo_keeps_policies_identical(tmp_path):
    pretrained = tmp_path / "one"
    pretrain(load_config(PretrainConfig, None, [f"output_dir={pretrained}", *COMMON, "train.batch_size=4"]))
    tokenizer = load_tokenizer(str(pretrained / "model"))
    ensure_chat_template(tokenizer)
    save_model(load_reward_model(str(pretrained / "model"), tokenizer, seed=1), tokenizer, tmp_path / "rm")
    launch_two(tmp_path, "ppo", tmp_path / "ppo", f"model.name_or_path={pretrained / 'model'}",
               f"reward_model.name_or_path={tmp_path / 'rm'}", "data.train=synthetic:32", "train.max_steps=2",
               "train.batch_size=2", "ppo.rollout_batch=4", "ppo.max_new_tokens=6")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    pretrain(load_config(PretrainConfig, None, [f"output_dir={root / 'pre'}", *COMMON, "train.batch_size=4"]))
    tokenizer = load_tokenizer(str(root / "pre" / "model"))
    ensure_chat_template(tokenizer)
    return root / "pre" / "model"


FINE_TUNE = {"sft": ["data.train=synthetic:64", "data.max_length=64"],
             "reward": ["data.train=synthetic:40", "data.max_length=64"]}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ENGINES)
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_fine_tuning_on_two_processes_matches_one_process(tmp_path, pretrained, stage, launcher):
    common = [f"model.name_or_path={pretrained}", *FINE_TUNE[stage], "train.max_steps=4", "train.warmup_steps=1",
              "train.log_every=1", "train.eval_every=0", "train.save_every=4", "train.lr=1e-3"]
    launch_two(tmp_path, stage, tmp_path / "two", *common, "train.batch_size=2", launcher=launcher)
    config_cls, target = STAGES[stage]
    module, func = target.split(":")
    getattr(importlib.import_module(module), func)(
        load_config(config_cls, None, [f"output_dir={tmp_path / 'one'}", *common, "train.batch_size=4"]))
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")}
    assert len(rows["one"]) == 4
    assert [r["loss"] for r in rows["two"]] == pytest.approx([r["loss"] for r in rows["one"]], rel=1e-4)
