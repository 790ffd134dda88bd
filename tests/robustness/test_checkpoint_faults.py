"""Fault injection: a pretraining run that checkpoints every step is killed with SIGKILL again and again, at
seeded random points (between steps, at a random moment, half-way through writing a checkpoint file, before
and after the manifest, before old checkpoints are pruned), resumed each time, and must end bit-identical to
a run never interrupted: the same weights and the same metrics at every step.

Each run is a child process forked from a server that has already imported llmstack (multiprocessing's
forkserver), so a restart costs the run's own set-up, not a fresh interpreter's imports."""

import json
import multiprocessing
import os
import random
import signal
import threading
import warnings

import pytest
from safetensors.torch import load_file

from llmstack.config import PretrainConfig, load_config

SEED = 1234
KILLS = 12
MAX_STEPS = 2 * KILLS  # each kill lands at most two steps past the last checkpoint, so the run cannot end first
TINY = ["model.preset=llama-1m", "model.vocab_size=384", "data.train=synthetic:200", "data.block_size=32",
        "train.batch_size=2", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=5",
        "train.eval_batches=1", "train.save_every=1", f"train.max_steps={MAX_STEPS}",
        "train.peak_tflops=1"]  # a stated peak: each restart would measure it again
SITES = ("after-step", "moment", "mid-file", "before-manifest", "after-manifest", "before-prune")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(site: str, step: int, delay: float) -> None:
    """Make this process SIGKILL itself at `site` of step `step` (child side)."""
    from llmstack.tracking.metrics import MetricsLog
    from llmstack.trainers import checkpoint

    current = {"step": 0}
    log_row = MetricsLog.log

    def log(self, at, row):
        log_row(self, at, row)
        current["step"] = at
        if at == step and site == "after-step":
            _die()
        if at == step and site == "moment":
            threading.Timer(delay, _die).start()

    MetricsLog.log = log
    saving = lambda: current["step"] == step  # noqa: E731  (a checkpoint is written after its step's row)
    save_file, write_json, prune = checkpoint.save_file, checkpoint._write_json, checkpoint.Checkpointer._prune

    def half_written(tensors, path, **kwargs):
        save_file(tensors, path, **kwargs)
        if saving() and site == "mid-file":
            os.truncate(path, os.path.getsize(path) // 2)
            _die()

    def json_then(path, data):
        if saving() and path.name == checkpoint.MANIFEST and site == "before-manifest":
            _die()
        write_json(path, data)
        if saving() and path.name == checkpoint.MANIFEST and site == "after-manifest":
            _die()

    def prune_then(self):
        if saving() and site == "before-prune":
            _die()
        prune(self)

    checkpoint.save_file, checkpoint._write_json, checkpoint.Checkpointer._prune = half_written, json_then, prune_then


def _train(overrides: list, kill: tuple | None) -> None:
    from llmstack.trainers.pretrain import pretrain

    if kill is not None:
        _arm(*kill)
    pretrain(load_config(PretrainConfig, None, overrides))


def _run(ctx, out, kill=None) -> int:
    child = ctx.Process(target=_train, args=([*TINY, f"output_dir={out}"], kill))
    child.start()
    child.join(timeout=300)
    return child.exitcode


def _resumable_step(out) -> int:
    from llmstack.trainers.checkpoint import Checkpointer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latest = Checkpointer(out, None, 2).latest()
    return int(latest.name.split("-")[1]) if latest else 0


def _rows(out) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_to_the_uninterrupted_run(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["llmstack.trainers.pretrain", __name__])
    assert _run(ctx, tmp_path / "whole") == 0

    rng = random.Random(SEED)
    sites = [SITES[i % len(SITES)] for i in range(KILLS)]
    rng.shuffle(sites)
    out, landed = tmp_path / "killed", []
    for site in sites:
        done = _resumable_step(out)
        step = done + 1 + rng.randint(0, 1)
        assert _run(ctx, out, (site, step, rng.uniform(0.0, 0.3))) == -signal.SIGKILL, f"{site} at step {step}"
        landed.append((site, step, _resumable_step(out)))
    assert _run(ctx, out) == 0, landed

    assert len(landed) >= 10 and {site for site, _, _ in landed} == set(SITES)
    # a kill while a checkpoint was being written left the previous one as the place to resume from
    assert any(site == "mid-file" and after == step - 1 for site, step, after in landed), landed
    whole, resumed = load_file(tmp_path / "whole/model/model.safetensors"), load_file(out / "model/model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all((whole[k] == resumed[k]).all() and whole[k].dtype == resumed[k].dtype for k in whole)
    assert _rows(out) == _rows(tmp_path / "whole")
    assert [r["step"] for r in _rows(out)] == list(range(1, MAX_STEPS + 1))
