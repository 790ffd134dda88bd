"""Two real processes over gloo, under every layout a launcher config can choose (DDP, DeepSpeed ZeRO-2,
ZeRO-3, ZeRO-3 with CPU offload, FSDP2): the world is really 2 processes, ranks hold identical parameters
(gathered where sharded), training on a global batch split over 2 processes matches 1 process on the same
global batch, the consolidated model/ reloads in one process to the same logits, and an interrupted run
resumes to exactly the uninterrupted one."""

import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmstack.cli import STAGES
from llmstack.config import PretrainConfig, load_config
from llmstack.data.chat import ensure_chat_template
from llmstack.models.causal_lm import load_causal_lm, load_tokenizer, save_model
from llmstack.trainers.pretrain import pretrain
from llmstack.models.reward_model import load_reward_model

from helpers import assert_same_updates, initial_params, params  # noqa: E402  (tests/trainers)

REPO = Path(__file__).resolve().parents[2]
COMMON = ["model.preset=llama-1m", "model.vocab_size=384", "data.train=synthetic:300", "data.block_size=32",
          "train.lr=3e-3", "train.warmup_steps=2", "train.max_steps=6", "train.log_every=1", "train.eval_every=3",
          "train.eval_batches=2", "train.save_every=3"]
LAUNCHERS = {"ddp": "cpu-2proc.yaml", "zero2": "cpu-2proc-zero2.yaml", "zero3": "cpu-2proc-zero3.yaml",
             "zero3-offload": "cpu-2proc-zero3-offload.yaml", "fsdp": "cpu-2proc-fsdp.yaml"}
NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (extra [deepspeed])")


def layouts(*names: str) -> list:
    return [pytest.param(n, id=n, marks=[NEEDS_DEEPSPEED] if "zero" in n else []) for n in names]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(layout: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO / "configs/accelerate" / LAUNCHERS[layout]), *options]


def read_ranks(out: Path) -> dict:
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world_size"] == 2, "the launcher must start two processes in one process group"
    assert ranks["max_abs_diff_across_ranks"] == 0.0
    return ranks


def launch_two(stage: str, out: Path, *overrides: str, layout: str = "ddp", stop_at: int | None = None) -> dict:
    """Run `stage` in 2 processes under `layout`; assert a real 2-process group of that layout with identical
    (whole) parameters on both ranks. Launched from the repository root, as the README's commands are. fp32
    unless `overrides` say otherwise: the one-process runs they are compared with resolve `auto` to fp32 (see
    tests/conftest.py), which the launched processes, outside pytest, would not."""
    cmd = [*launcher(layout, "--main_process_port", str(free_port())),
           str(REPO / "tests/trainers/two_process_stage.py"), stage, str(out), "train.precision=fp32", *overrides]
    env = {**os.environ, **({"STOP_AT_STEP": str(stop_at)} if stop_at else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = read_ranks(out)
    assert ranks["sharded"] == (layout in ("zero3", "zero3-offload", "fsdp"))
    assert "world size 2" in proc.stderr and f"layout {layout.split('-')[0]}," in proc.stderr
    return ranks


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu") and not k.startswith("time_")}
            for r in rows]


def assert_reloads_to_the_same_logits(run: Path, reward: bool = False):
    """model/ written by the 2-process run loads in this one process and gives the logits the trained,
    still-distributed model gave on the same input."""
    probe = torch.load(run / "probe.pt")
    model = load_reward_model(str(run / "model"), load_tokenizer(str(run / "model")), 0) if reward \
        else load_causal_lm(str(run / "model"))
    with torch.no_grad():
        logits = model.eval()(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", layouts("ddp", "zero2"))
def test_pretraining_on_two_processes_matches_one_process(tmp_path, layout):
    out = tmp_path / "two"
    launch_two("pretrain", out, *COMMON, "train.batch_size=2", layout=layout)
    single = pretrain(load_config(PretrainConfig, None, [f"output_dir={tmp_path / 'one'}", *COMMON,
                                                         "train.batch_size=4"]))
    two_weights = load_file(out / "model" / "model.safetensors")
    init = initial_params(tmp_path / "one")
    shared = {k: v for k, v in init.items() if k in two_weights}
    assert_same_updates(shared, params(single.model), two_weights)
    two_rows, one_rows = metric_rows(out), metric_rows(tmp_path / "one")
    assert [r["loss"] for r in two_rows] == pytest.approx([r["loss"] for r in one_rows], rel=1e-5)
    assert two_rows[-1]["eval_loss"] == pytest.approx(one_rows[-1]["eval_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    pretrain(load_config(PretrainConfig, None, [f"output_dir={root / 'pre'}", *COMMON, "train.batch_size=4"]))
    tokenizer = load_tokenizer(str(root / "pre" / "model"))
    ensure_chat_template(tokenizer)
    reward_model = load_reward_model(str(root / "pre" / "model"), tokenizer, seed=1)
    # statistics as the reward stage stores them: PPO must normalise with these under every layout (a
    # DeepSpeed engine once hid them, and running statistics were used instead)
    reward_model.config.reward_mean, reward_model.config.reward_std = 0.25, 3.0
    save_model(reward_model, tokenizer, root / "rm")
    return root


FINE_TUNE = {"sft": ["data.train=synthetic:64", "data.max_length=64"],
             "reward": ["data.train=synthetic:40", "data.max_length=64"],
             "dpo": ["data.train=synthetic:40", "data.max_length=64", "dpo.kl_prompts=0"]}


def fine_tune_args(pretrained: Path, stage: str) -> list[str]:
    return [f"model.name_or_path={pretrained / 'pre' / 'model'}", *FINE_TUNE[stage], "train.max_steps=4",
            "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0", "train.save_every=2", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def one_process(pretrained, tmp_path_factory):
    """Each fine-tuning stage once in this process on the global batch the 2-process runs split."""
    runs = {}

    def run(stage: str) -> Path:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"one-{stage}") / "run"
            config_cls, target = STAGES[stage]
            module, func = target.split(":")
            getattr(importlib.import_module(module), func)(
                load_config(config_cls, None, [f"output_dir={out}", *fine_tune_args(pretrained, stage),
                                               "train.batch_size=4"]))
            runs[stage] = out
        return runs[stage]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("stage, layout", [("sft", "ddp"), ("reward", "ddp"), ("dpo", "ddp"), *[
    pytest.param(s, n, id=f"{s}-{n}", marks=NEEDS_DEEPSPEED) for s, n in (("sft", "zero2"), ("reward", "zero2"),
                                                                          ("sft", "zero3-offload"))]])
def test_fine_tuning_on_two_processes_matches_one_process(tmp_path, pretrained, one_process, stage, layout):
    launch_two(stage, tmp_path / "two", *fine_tune_args(pretrained, stage), "train.batch_size=2", layout=layout)
    rows = {"one": metric_rows(one_process(stage)), "two": metric_rows(tmp_path / "two")}
    assert len(rows["one"]) == 4
    assert [r["loss"] for r in rows["two"]] == pytest.approx([r["loss"] for r in rows["one"]], rel=1e-4)
    assert_reloads_to_the_same_logits(tmp_path / "two", reward=stage == "reward")


@pytest.mark.slow
@pytest.mark.parametrize("layout", layouts("zero3", "fsdp"))
def test_sharded_sft_matches_one_process_reloads_whole_and_resumes_exactly(tmp_path, pretrained, one_process, layout):
    args = [*fine_tune_args(pretrained, "sft"), "train.batch_size=2"]
    launch_two("sft", tmp_path / "whole", *args, layout=layout)
    whole = metric_rows(tmp_path / "whole")
    assert [r["loss"] for r in whole] == pytest.approx([r["loss"] for r in metric_rows(one_process("sft"))], rel=1e-4)
    assert_reloads_to_the_same_logits(tmp_path / "whole")

    stopped = launch_two("sft", tmp_path / "split", *args, layout=layout, stop_at=2)
    assert stopped["status"] == "interrupted" and not (tmp_path / "split" / "model").exists()
    assert [r["step"] for r in metric_rows(tmp_path / "split")] == [1, 2]
    resumed = launch_two("sft", tmp_path / "split", *args, layout=layout)
    assert resumed["status"] == "finished"
    assert without_timing(metric_rows(tmp_path / "split")) == without_timing(whole)
    a, b = load_file(tmp_path / "whole/model/model.safetensors"), load_file(tmp_path / "split/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


PPO = ["data.train=synthetic:32", "train.max_steps=3", "train.lr=1e-3", "rollout.max_new_tokens=6", "ppo.epochs=2",
       "ppo.kl_target=null", "train.save_every=3"]


# the static-cache engine under every layout, and the reference engine once
PPO_CASES = [*[pytest.param(p.values[0], "static", id=f"{p.id}-static", marks=p.marks)
               for p in layouts("ddp", "zero2", "zero3", "fsdp")], pytest.param("ddp", "hf", id="ddp-hf")]


@pytest.mark.slow
@pytest.mark.parametrize("layout, engine", PPO_CASES)
def test_ppo_on_two_processes_matches_one_process(tmp_path, pretrained, layout, engine):
    """Each process samples half of the rollout (seeded per prompt, so the same responses as one process,
    with either engine) and takes each epoch as one minibatch, so the global batch of every update is the
    1-process one. Under ZeRO-3 an interrupted run also resumes to exactly the uninterrupted one."""
    models = [f"model.name_or_path={pretrained / 'pre' / 'model'}", f"reward_model.name_or_path={pretrained / 'rm'}",
              f"rollout.engine={engine}"]
    launch_two("ppo", tmp_path / "two", *models, *PPO, "rollout.batch_size=4", "train.batch_size=4", layout=layout)
    config_cls, target = STAGES["ppo"]
    module, func = target.split(":")
    getattr(importlib.import_module(module), func)(load_config(config_cls, None, [
        f"output_dir={tmp_path / 'one'}", *models, *PPO, "rollout.batch_size=8", "train.batch_size=8"]))
    two, one = metric_rows(tmp_path / "two"), metric_rows(tmp_path / "one")
    assert len(two) == len(one) == 3
    for key in ("reward", "reward_normalised", "kl", "response_length", "loss", "value_loss", "approx_kl", "entropy"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-3, abs=1e-5), key
    assert one[-1]["kl"] != 0.0, "the policy must have moved for the comparison to mean anything"
    assert_reloads_to_the_same_logits(tmp_path / "two")
    if layout == "zero3":  # four DeepSpeed engines in one checkpoint: two trained, two frozen
        args = [*models, *PPO, "rollout.batch_size=4", "train.batch_size=4"]
        assert launch_two("ppo", tmp_path / "split", *args, layout=layout, stop_at=2)["status"] == "interrupted"
        assert launch_two("ppo", tmp_path / "split", *args, layout=layout)["status"] == "finished"
        assert without_timing(metric_rows(tmp_path / "split")) == without_timing(two)


GRPO = ["data.train=synthetic:32", "train.max_steps=3", "train.lr=1e-3", "rollout.max_new_tokens=6",
        "rollout.samples_per_prompt=2", "reward_funcs=[length_penalty]", "train.save_every=3"]


@pytest.mark.slow
def test_grpo_on_two_processes_matches_one_process(tmp_path, pretrained):
    """Each process samples whole groups (2 prompts x 2 answers) and takes them as one minibatch; one process
    takes the same 8 answers at once: every step's metrics agree."""
    model = f"model.name_or_path={pretrained / 'pre' / 'model'}"
    launch_two("grpo", tmp_path / "two", model, *GRPO, "rollout.batch_size=2", "train.batch_size=4")
    config_cls, target = STAGES["grpo"]
    module, func = target.split(":")
    getattr(importlib.import_module(module), func)(load_config(config_cls, None, [
        f"output_dir={tmp_path / 'one'}", model, *GRPO, "rollout.batch_size=4", "train.batch_size=8"]))
    two, one = metric_rows(tmp_path / "two"), metric_rows(tmp_path / "one")
    assert len(two) == len(one) == 3
    for key in ("reward", "kl", "response_length", "loss", "approx_kl", "entropy"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-3, abs=1e-5), key
    assert one[-1]["kl"] != 0.0, "the policy must have moved for the comparison to mean anything"


@pytest.mark.slow
def test_a_token_mean_split_unevenly_over_two_processes_is_the_global_token_mean(tmp_path):
    """Rank 0 holds 11 targets, rank 1 holds 2 (one of its micro-batches none at all): the loss and the
    update must be those of the mean over all 13 targets, computed here by hand in one process."""
    from token_mean_case import micro_batches, model_and_objective

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/cpu-2proc.yaml"),
           "--main_process_port", str(free_port()), str(REPO / "tests/trainers/two_process_token_mean.py"),
           str(tmp_path / "out.pt")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["world_size"] == 2

    model, objective = model_and_objective()
    batches = micro_batches(0) + micro_batches(1)
    total = sum(objective["loss_sum"](model, b) for b in batches)
    n = sum(objective["count_targets"](b) for b in batches)
    assert n == 13
    (total / n).backward()
    assert got["loss"] == pytest.approx(float(total / n), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["weights"][name], p.detach() - p.grad, rtol=1e-6, atol=1e-6)
    # the plain mean of per-process means would differ: the case is uneven enough to tell them apart
    per_rank = [sum(objective["loss_sum"](model, b) for b in micro_batches(r)) /
                sum(objective["count_targets"](b) for b in micro_batches(r)) for r in (0, 1)]
    assert abs(float(sum(per_rank) / 2) - got["loss"]) > 1e-3


@pytest.mark.slow
def test_the_multinode_launch_forms_one_group_across_machines(tmp_path, pretrained, one_process):
    """The README's multi-node command, as two machines of one process each on this host: the same command
    on both with its --machine_rank, meeting at --main_process_ip."""
    port = str(free_port())
    procs = [subprocess.Popen([*launcher("ddp", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                                         "--main_process_ip", "127.0.0.1", "--main_process_port", port),
                               str(REPO / "tests/trainers/two_process_stage.py"), "sft", str(tmp_path / "two"),
                               *fine_tune_args(pretrained, "sft"), "train.batch_size=2"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    read_ranks(tmp_path / "two")
    assert [r["loss"] for r in metric_rows(tmp_path / "two")] == \
        pytest.approx([r["loss"] for r in metric_rows(one_process("sft"))], rel=1e-4)
