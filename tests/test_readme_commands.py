"""Every shell command the README shows works verbatim on a fresh copy of the repository, in the order shown.

Commands run with small step overrides appended (the README's tiny configs are sized for minutes; the check
is that each command works, not how well it trains). Skipped, with the reason: `make run` and `make test`
(CI runs exactly these two on a clean clone), and the lines for GPU machines (CUDA launcher configs, real
models from configs/examples/), whose CPU twins do run.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# appended to a stage's command: a few steps of each, checkpoints and evaluation included
SMALL = {
    "pretrain": ["train.max_steps=4", "train.save_every=4", "train.eval_every=2", "train.eval_batches=1",
                 "data.train=synthetic:200"],
    # enough conversations that each of 2 processes holds a held-out row (ZeRO-3 and FSDP need every process
    # to run the same number of evaluation forwards)
    "sft": ["train.max_steps=4", "train.save_every=4", "train.eval_every=2", "train.eval_batches=1",
            "data.train=synthetic:400", "sample_prompts=1"],
    "reward": ["train.max_steps=4", "train.save_every=4", "train.eval_every=2", "train.eval_batches=1",
               "data.train=synthetic:60"],
    "dpo": ["train.max_steps=4", "train.save_every=4", "train.eval_every=2", "train.eval_batches=1",
            "data.train=synthetic:60", "dpo.kl_prompts=2", "dpo.kl_max_new_tokens=8"],
    "ppo": ["train.max_steps=2", "train.save_every=2", "rollout.batch_size=4", "rollout.max_new_tokens=8",
            "train.batch_size=4", "data.train=synthetic:32"],
    "grpo": ["train.max_steps=2", "train.save_every=2", "rollout.batch_size=2", "rollout.max_new_tokens=8",
             "train.batch_size=4", "data.train=synthetic:32"],
    "curate": ["data.train=synthetic-noisy:100"],
}
GPU_LAUNCHERS = re.compile(r"configs/accelerate/(?!cpu-)")


def readme_commands() -> list[str]:
    """The README's shell commands in order: each line of every ```bash block, continuations joined,
    trailing comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def skip_reason(command: str) -> str | None:
    if command.startswith("make "):
        return "CI runs `make run` and `make test` on a clean clone"
    if GPU_LAUNCHERS.search(command) or "configs/examples/" in command or "--num_machines" in command:
        return "a GPU machine's command; its CPU twin runs here"
    return None


def stage_of(command: str) -> str | None:
    config = re.search(r"configs/tiny/(\w+)\.yaml", command)
    if config and "--help" not in command:
        return config.group(1)
    return None


@pytest.mark.slow
def test_every_readme_command_works_on_a_fresh_copy_in_order(tmp_path):
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    env = {**os.environ, "PYTHONPATH": str(copy), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    ran, skipped = [], []
    for command in readme_commands():
        reason = skip_reason(command)
        if reason:
            skipped.append((command, reason))
            continue
        args = shlex.split(command)
        stage = stage_of(command)
        if args[0] == "accelerate":  # a free port per launch: launches follow each other quickly
            args[2:2] = ["--main_process_port", str(free_port())]
        small = SMALL.get(stage, [])
        if "train.eval_every=0" in args:  # the README's own setting wins over the test's evaluation cadence
            small = [item for item in small if not item.startswith("train.eval_every=")]
        proc = subprocess.run(args + small, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 8, f"too few README commands ran: {ran}; skipped: {skipped}"


def test_a_bare_launch_without_a_config_lists_every_missing_key_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "recipes/ppo.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for key in ("model.name_or_path", "reward_model.name_or_path", "value_model.name_or_path"):
        assert key in lines[0]
    assert "--config configs/tiny/ppo.yaml" in lines[0]
    # accelerate's launcher reports any non-zero exit of its child as its own CalledProcessError (exit 1,
    # with a traceback of the launcher itself); the recipe's message still comes once, as the same one line
    launched = subprocess.run([str(BIN / "accelerate"), "launch", "--num_processes", "1", "--cpu",
                               str(REPO / "recipes/ppo.py")], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=env)
    assert launched.returncode != 0
    ours = [line for line in launched.stderr.splitlines() if line.startswith("llmstack ppo:")]
    assert ours == lines, launched.stderr[-2000:]
    assert "recipes/ppo.py" not in launched.stderr.split("Traceback")[0].split("llmstack ppo:")[0]


def test_trl_argument_names_are_answered_with_ours_and_all_problems_come_at_once():
    from llmstack.config import ConfigError, SFTConfig, load_config

    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["learning_rate=1e-5", "per_device_train_batch_size=4", "train.lr=fast",
                                      "model.name_or_path=x", "train.batch_size=0"])
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert "here it is 'train.lr'" in problems[0] and "here it is 'train.batch_size'" in problems[1]
    assert "'train.lr'" in problems[2] and "train.batch_size" in problems[3]
    assert str(err.value).startswith("4 problems: (1) ")
