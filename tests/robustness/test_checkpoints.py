"""Checkpoints as an attacker or a careless copy leaves them: a planted pickle never runs, a tampered
checkpoint is skipped for the last good one (or the run stops and says what to do), and a resumed run either
applies a changed setting and records it, or refuses it and changes nothing."""

import hashlib
import importlib.util
import json
import pathlib
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llmstack.config import ConfigError, PretrainConfig, load_config
from llmstack.tracking.metrics import MetricsLog
from llmstack.trainers import checkpoint, distributed
from llmstack.trainers.checkpoint import MANIFEST, Checkpointer, checkpoint_problem, file_sha256
from llmstack.trainers.pretrain import pretrain

TINY = ["model.preset=llama-1m", "model.vocab_size=384", "data.train=synthetic:200", "data.block_size=32",
        "train.batch_size=2", "train.lr=3e-3", "train.schedule=constant", "train.warmup_steps=0",
        "train.log_every=1", "train.eval_every=0", "train.save_every=2", "train.max_steps=6"]


def config(run_dir, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [*TINY, f"output_dir={run_dir}", *overrides])


class Crash(Exception):
    """Stands for a process that died between two steps."""


def crash_after(monkeypatch, step: int):
    """The next run dies during the step after `step` (so after `step`'s checkpoint, when one is due)."""
    original = MetricsLog.log

    def log(self, at, row):
        original(self, at, row)
        if at == step + 1:
            raise Crash(f"died in step {at}")

    monkeypatch.setattr(MetricsLog, "log", log)


def crashed_run(tmp_path, monkeypatch, step: int = 4, name: str = "run", *overrides: str) -> pathlib.Path:
    """A run directory holding the checkpoints up to `step` (every 2 steps) and no model."""
    out = tmp_path / name
    with monkeypatch.context() as patch:
        crash_after(patch, step)
        with pytest.raises(Crash):
            pretrain(config(out, *overrides))
    return out


def snapshot(run_dir: pathlib.Path) -> dict:
    """Every file's hash, but the lock's: each run, refused or not, writes its own pid and host there."""
    from llmstack.tracking.run_dir import LOCK_FILE

    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def payload(marker: pathlib.Path) -> bytes:
    """A pickle that creates `marker` when anything unpickles it."""

    class Touch:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    return pickle.dumps(Touch())


def rewrite_manifest(ckpt: pathlib.Path) -> None:
    """What an attacker who can write the directory can also do: make the manifest describe the new files."""
    files = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"format": checkpoint.FORMAT, "files": files}))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    out = crashed_run(tmp_path, monkeypatch, step=2)
    marker = tmp_path / "pickle-ran"
    (out / "checkpoints/step-00000002/custom_checkpoint_0.pkl").write_bytes(payload(marker))
    before = snapshot(out)
    with pytest.warns(UserWarning, match=r"step-00000002: custom_checkpoint_0.pkl is not one of the files written"):
        with pytest.raises(ConfigError, match=r"no usable checkpoint .*move .*checkpoints aside"):
            pretrain(config(out))
    assert not marker.exists()
    assert snapshot(out) == before


def test_a_pickle_behind_a_rewritten_manifest_is_still_never_unpickled(tmp_path, monkeypatch):
    """Verification passes (the manifest was rewritten too), so the files are read: each reader takes only
    tensors or JSON, and the pickle fails to load instead of running."""
    marker = tmp_path / "pickle-ran"
    for name in ("optimizer-0.safetensors", "rng-0.json", "trainer_state.json", "optimizer-0.json"):
        out = crashed_run(tmp_path, monkeypatch, 2, name.replace(".", "-"))
        ckpt = out / "checkpoints/step-00000002"
        (ckpt / name).write_bytes(payload(marker))
        rewrite_manifest(ckpt)
        assert checkpoint_problem(ckpt) is None
        with pytest.raises(Exception) as failed:
            pretrain(config(out))
        assert not isinstance(failed.value, Crash)
        assert not marker.exists(), f"a pickle in {name} ran"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_the_reader_given_to_deepspeed_builds_tensors_and_its_records_only(tmp_path):
    """DeepSpeed's files are torch.save archives; the reader llmstack gives its engine refuses anything else."""
    marker = tmp_path / "pickle-ran"
    archive = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "hook": _Touch(marker)}, archive)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        distributed.load_tensors_only(str(archive))
    assert not marker.exists()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save({"loss_scaler": LossScaler(1.0), "fp32": [torch.arange(3.0)]}, archive)
    loaded = distributed.load_tensors_only(str(archive))
    assert isinstance(loaded["loss_scaler"], LossScaler) and torch.equal(loaded["fp32"][0], torch.arange(3.0))


class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _last_ckpt(out):
    return out / "checkpoints/step-00000004"


TAMPERING = {
    "a changed byte": lambda c: _flip_byte(c / "model-0.safetensors"),
    "a missing file": lambda c: (c / "rng-0.json").unlink(),
    "an extra file": lambda c: (c / "random_states_0.pkl").write_bytes(b"\x80\x04K\x01."),
    "a truncated file": lambda c: (c / "optimizer-0.safetensors").write_bytes(
        (c / "optimizer-0.safetensors").read_bytes()[:100]),
}
NAMED = {"a changed byte": "model-0.safetensors has changed", "a missing file": "rng-0.json is missing",
         "an extra file": "random_states_0.pkl is not one of the files written",
         "a truncated file": "optimizer-0.safetensors has 100 bytes"}


def _flip_byte(file: pathlib.Path) -> None:
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data: the file still parses, only the hash can tell
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(TAMPERING))
def test_a_tampered_checkpoint_falls_back_to_the_last_good_one(tmp_path, monkeypatch, damage):
    out = crashed_run(tmp_path, monkeypatch, step=4)
    TAMPERING[damage](_last_ckpt(out))
    with pytest.warns(UserWarning, match=rf"ignoring checkpoint .*step-00000004: {NAMED[damage]}"):
        assert Checkpointer(out, None, 2).latest().name == "step-00000002"


def test_resuming_from_the_fallback_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    whole = pretrain(config(tmp_path / "whole"))
    out = crashed_run(tmp_path, monkeypatch, step=4)
    _flip_byte(_last_ckpt(out) / "model-0.safetensors")
    with pytest.warns(UserWarning, match="step-00000004: model-0.safetensors has changed"):
        resumed = pretrain(config(out))
    assert resumed.status == "finished"
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda run: [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
                        for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(out) == rows(tmp_path / "whole")


def test_nothing_unpickles_while_a_run_resumes(tmp_path, monkeypatch):
    out = crashed_run(tmp_path, monkeypatch, step=2)
    real_load = torch.load

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was asked to load something")

    def only_tensors(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)

    with monkeypatch.context() as patch:
        for name in ("load", "loads", "Unpickler"):
            patch.setattr(pickle, name, refuse)
        patch.setattr(torch, "load", only_tensors)
        assert pretrain(config(out)).status == "finished"


def test_a_changed_learning_rate_is_applied_from_the_resumed_step_and_recorded(tmp_path, monkeypatch):
    """Adam's update is the learning rate times a direction that depends only on the optimiser state and the
    gradient; from the same checkpoint, step 3 at a third of the rate must move every weight a third as far
    (to float32 rounding: a few eps of the update plus the eps of the weight lost in the subtraction)."""
    crashed = crashed_run(tmp_path, monkeypatch, step=2)
    shutil.copytree(crashed, tmp_path / "same")
    start = load_file(crashed / "checkpoints/step-00000002/model-0.safetensors")
    changed = pretrain(config(crashed, "train.max_steps=3", "train.lr=1e-3"))
    same = pretrain(config(tmp_path / "same", "train.max_steps=3"))
    eps = torch.finfo(torch.float32).eps
    end_changed, end_same = changed.model.state_dict(), same.model.state_dict()
    for key, w0 in start.items():
        step_changed, step_same = end_changed[key] - w0, end_same[key] - w0
        assert step_same.abs().max() > 0, key
        torch.testing.assert_close(step_changed * 3, step_same, rtol=8 * eps, atol=8 * eps * w0.abs().max().item())

    rows = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 3e-3), (2, 3e-3), (3, 1e-3)]
    record = json.loads((crashed / "record.json").read_text())
    assert record["config"]["train"]["lr"] == 1e-3
    assert {"step": 2, "key": "train.lr", "from": 3e-3, "to": 1e-3} in record["config_changes"]
    assert {"step": 2, "key": "train.max_steps", "from": 6, "to": 3} in record["config_changes"]
    same_changes = json.loads((tmp_path / "same/record.json").read_text())["config_changes"]
    assert sorted(c["key"] for c in same_changes) == ["output_dir", "train.max_steps"]


def test_changes_stay_recorded_across_a_second_resume(tmp_path, monkeypatch):
    out = crashed_run(tmp_path, monkeypatch, 2)
    with monkeypatch.context() as patch:
        crash_after(patch, 4)
        with pytest.raises(Crash):
            pretrain(config(out, "train.lr=1e-3"))
    pretrain(config(out, "train.lr=1e-3", "train.log_every=2"))
    record = json.loads((out / "record.json").read_text())
    assert record["config_changes"] == [{"step": 2, "key": "train.lr", "from": 3e-3, "to": 1e-3},
                                        {"step": 4, "key": "train.log_every", "from": 1, "to": 2}]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 3e-3), (2, 3e-3), (3, 1e-3), (4, 1e-3), (6, 1e-3)]


@pytest.mark.parametrize("change", ["seed=1", "model.vocab_size=512", "train.batch_size=4", "data.block_size=16",
                                    "data.train=synthetic:300", "train.grad_accum=2", "train.weight_decay=0.0"])
def test_a_setting_that_cannot_change_on_resume_is_refused_and_nothing_changes(tmp_path, monkeypatch, change):
    out = crashed_run(tmp_path, monkeypatch, 2)
    before = snapshot(out)
    key, value = change.split("=")
    old = dict(item.split("=") for item in TINY).get(key, {"seed": "0", "train.grad_accum": "1",
                                                          "train.weight_decay": "0.1"}.get(key))
    with pytest.raises(ConfigError, match=rf"'{key}' was '?{old}'?, now '?{value}'?.*set them back, or give "
                                          r"another output_dir"):
        pretrain(config(out, change, "train.lr=1e-3"))
    assert snapshot(out) == before


def test_tied_and_sliced_weights_are_stored_once_or_apart_and_read_back_exactly(tmp_path):
    """safetensors refuses tensors that share memory: a tied weight is stored once and named again on
    reading; a slice of another stored tensor's memory is stored as its own copy."""
    fused = torch.arange(12.0).reshape(4, 3)
    embed = torch.randn(5, 3)
    state = {"embed.weight": embed, "head.weight": embed, "fused.weight": fused, "q.weight": fused[:2],
             "k.weight": fused[2:]}
    unique, aliases = checkpoint._unique(state)
    assert aliases == {"head.weight": "embed.weight"}
    checkpoint.save_file(unique, tmp_path / "m.safetensors", metadata={"aliases": json.dumps(aliases)})
    read = checkpoint._with_aliases(tmp_path / "m.safetensors")
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
