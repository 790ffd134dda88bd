"""Resumable checkpoints, written and read by llmstack itself, with nothing on any load path that can
unpickle: a file planted in a checkpoint can stop a resume, never run.

One checkpoint is `checkpoints/step-NNNNNNNN/`:

    trainer_state.json          loop state, data positions, RL controllers and reward statistics, each
                                schedule's position, the settings trained with, changes made on resume
    rng-R.json                  process R's random generators (Python, NumPy, torch CPU and CUDA)
    model-I.safetensors         trained model I (FSDP2: model-I-rank-R, each process its shard), with
    optimizer-I.safetensors     its optimiser's tensors, and their layout in
    optimizer-I.json
    deepspeed-I/                under DeepSpeed, the engine's own files instead (model and optimiser, possibly
                                partitioned); read back with torch.load(weights_only=True), which builds
                                tensors and plain containers only
    manifest.json               sha256 and size of every file above, written last

A checkpoint is written into `.tmp-step-N` and renamed into place once whole. Before anything is read, the
manifest is checked: a missing, changed or unexpected file makes the checkpoint unusable, and the newest
usable one is taken instead, with a warning naming the file.

Resuming compares the run's settings with those the checkpoint was trained with. Settings that only steer
the schedule, evaluation, saving or logging may change, and are applied from the resumed step and listed in
`config_changes`; any other change would make the resumed run something no single configuration describes,
and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast
from safetensors.torch import load_file, save_file

from llmstack.config import ConfigError
from llmstack.trainers import distributed
from llmstack.trainers.base import log

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
FORMAT = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HASH_CHUNK = 1 << 20

# Settings a resumed run may change. The schedule keys are applied to the restored optimiser through its
# rebuilt schedule; the others decide only when the loop evaluates, saves or logs, and what it reports.
CHANGEABLE = ("train.lr", "ppo.value_lr", "train.max_steps", "train.schedule", "train.warmup_steps",
              "train.min_lr_ratio", "train.eval_every", "train.eval_batches", "train.save_every",
              "train.log_every", "train.keep_last", "train.report_to", "train.peak_tflops", "output_dir",
              "samples_per_step", "sample_prompts", "sample_max_new_tokens", "metrics")


@dataclass
class Trained:
    """One trained model with the optimiser and schedule that update it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: the trained models, their optimisers
    and schedules (`register`), every process's random generators, and the loop's state given to `save`."""

    def __init__(self, run_dir: str | Path, accelerator: Accelerator | None, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.trained: list[Trained] = []
        self.settings: dict | None = None  # the run's flattened config, saved with every checkpoint
        self.changes: list[dict] = []  # settings changed on resume, each at the step it took effect
        self._chosen: tuple[Path | None] | None = None

    def register(self, model, optimizer, scheduler) -> None:
        """Checkpoint `model` (as prepared), `optimizer` and `scheduler` (built on the prepared optimiser)."""
        self.trained.append(Trained(model, optimizer, scheduler))

    # -- writing ------------------------------------------------------------------------------------------

    def save(self, step: int, state: dict) -> Path:
        """Write the checkpoint of `step` holding `state` (JSON); every process must call this."""
        acc = self.accelerator
        self._chosen = None
        tmp, final = self.root / f".tmp-step-{step:08d}", self.root / f"step-{step:08d}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        for index, trained in enumerate(self.trained):
            _save_trained(acc, index, trained, tmp)
        _write_json(tmp / f"rng-{acc.process_index}.json", _rng_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            full = {"format": FORMAT, "step": step, **state,
                    "schedules": [t.scheduler.last_epoch for t in self.trained],
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "world_size": acc.num_processes, "layout": distributed.layout(acc),
                    "settings": self.settings, "config_changes": self.changes}
            _write_json(tmp / STATE_FILE, full)
            _write_json(tmp / MANIFEST, {"format": FORMAT, "files": _describe_files(tmp)})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for path in self._step_dirs()[self.keep_last:]:
            shutil.rmtree(path, ignore_errors=True)

    def _step_dirs(self) -> list[Path]:
        """Checkpoint directories by name, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    # -- choosing -----------------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest checkpoint that passes verification; skipped ones are named in a warning. None when
        there is none at all; ConfigError when there are checkpoints but none is usable (starting over would
        bury them under new ones). Decided on the main process, for all, once between saves."""
        if self._chosen is None:
            self._chosen = (self._agree(*self._verify_newest()),)
        return self._chosen[0]

    def _verify_newest(self) -> tuple[Path | None, str | None]:
        """(the newest usable checkpoint, or why there is none although checkpoints exist)."""
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return None, None
        for partial in self.root.glob(".tmp-step-*") if self.root.is_dir() else []:
            warnings.warn(f"ignoring {partial}: a checkpoint whose write did not finish", stacklevel=4)
        problems = []
        for path in self._step_dirs():
            problem = checkpoint_problem(path)
            if problem is None:
                return path, None
            problems.append(f"{path.name}: {problem}")
            warnings.warn(f"ignoring checkpoint {path}: {problem}; falling back to an older one", stacklevel=4)
        if problems:
            return None, (f"no usable checkpoint in {self.root} ({'; '.join(problems)}). Restore the named "
                          f"files, or move {self.root} aside to train this run again from the start")
        return None, None

    def _agree(self, chosen: Path | None, problem: str | None) -> Path | None:
        """The main process's verdict on every process: a step number travels (-1 none, -2 none usable)."""
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            code = int(chosen.name.split("-")[1]) if chosen else -2 if problem else -1
            code = int(broadcast(torch.tensor([code], device=acc.device))[0])
            chosen = self.root / f"step-{code:08d}" if code >= 0 else None
            if code == -2 and problem is None:
                problem = f"no usable checkpoint in {self.root} (the main process names the problem)"
        if problem is not None:
            raise ConfigError(problem)
        return chosen

    # -- resuming -----------------------------------------------------------------------------------------

    def check_resume(self, config: dict) -> None:
        """Compare the run's settings (`config`, nested) with those of the checkpoint it will resume from:
        refuse a change that cannot apply to a resumed run (ConfigError naming each key with its old and new
        value), and keep the others as changes at the checkpoint's step. Call before anything is written."""
        self.settings = flat_settings(config)
        path = self.latest()
        if path is None:
            return
        saved = json.loads((path / STATE_FILE).read_text())
        acc, step = self.accelerator, saved["step"]
        if (saved["world_size"], saved["layout"]) != (acc.num_processes, distributed.layout(acc)):
            raise ConfigError(
                f"{path} was written by {saved['world_size']} processes ({saved['layout']}); this run has "
                f"{acc.num_processes} ({distributed.layout(acc)}). Launch it as before, or give another output_dir")
        before = saved["settings"]
        changed = {k: (before.get(k), v) for k, v in self.settings.items() if before.get(k) != v}
        changed.update({k: (v, None) for k, v in before.items() if k not in self.settings})
        refused = {k: c for k, c in changed.items() if k not in CHANGEABLE}
        if refused:
            listed = "; ".join(f"'{k}' was {a!r}, now {b!r}" for k, (a, b) in sorted(refused.items()))
            raise ConfigError(f"{path} was trained with other settings: {listed}. These cannot change when a "
                              f"run resumes: set them back, or give another output_dir to start a new run")
        self.changes = list(saved["config_changes"])
        for key, (old, new) in sorted(changed.items()):
            log.warning(f"config key '{key}' changed since this run started: {old!r} -> {new!r}; applied from "
                        f"step {step}")
            self.changes.append({"step": step, "key": key, "from": old, "to": new})

    def load(self, path: Path) -> dict:
        """Restore the registered models, optimisers and schedules and this process's generators from `path`
        (verified by `latest`); returns the saved state. The schedules continue from the saved step with the
        run's current settings (see `check_resume`)."""
        acc = self.accelerator
        state = json.loads((path / STATE_FILE).read_text())
        if state["scaler"] is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        for index, trained in enumerate(self.trained):
            _load_trained(acc, index, trained, path)
            _continue_schedule(trained, state["schedules"][index])
        _set_rng_state(json.loads((path / f"rng-{acc.process_index}.json").read_text()))
        return state


def flat_settings(tree: dict, prefix: str = "") -> dict:
    """{'train.lr': 3e-4, ...}: every setting by its dotted key, as JSON keeps it."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return out


# ---------------------------------------------------------------------------------------------------------
# Verification


def file_sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256; with `sync`, its data is also on disk before the hash is returned."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def _describe_files(root: Path) -> dict:
    """Every file's size and hash, each synced first (some writers, safetensors' and DeepSpeed's, do not), so
    the manifest never describes data still only in memory."""
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": file_sha256(p, sync=True)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint, or None when its files are exactly those its manifest lists,
    each with the size and content hash written."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["format"] != FORMAT:
            return f"{MANIFEST} is of format {manifest['format']}, this llmstack reads {FORMAT}"
    except FileNotFoundError:
        return f"{MANIFEST} is missing (the save did not complete, or an older llmstack wrote it)"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    unexpected = sorted(present - files.keys())
    if unexpected:
        return f"{unexpected[0]} is not one of the files written (nothing in it was read)"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} has changed since it was written (sha256 differs)"
    return None


# ---------------------------------------------------------------------------------------------------------
# Models and optimisers


def _save_trained(acc: Accelerator, index: int, trained: Trained, tmp: Path) -> None:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        # ZeRO keeps fp32 master weights and optimiser state partitioned inside the engine; its own writer
        # saves them, and `_load_trained` reads them back without unpickling
        distributed.save_engine(trained.model, tmp / f"deepspeed-{index}")
        return
    per_rank = distributed.layout(acc) == "fsdp"
    if not (per_rank or acc.is_main_process):
        return
    suffix = f"-rank-{acc.process_index}" if per_rank else ""
    module = acc.unwrap_model(trained.model)
    weights, aliases = _unique(module.state_dict())
    save_file(weights, tmp / f"model-{index}{suffix}.safetensors", metadata={"aliases": json.dumps(aliases)})
    tensors: dict[str, torch.Tensor] = {}
    layout = _split(trained.optimizer.state_dict(), tensors, "optimizer")
    save_file({k: _local(v).contiguous() for k, v in tensors.items()},
              tmp / f"optimizer-{index}{suffix}.safetensors")
    _write_json(tmp / f"optimizer-{index}{suffix}.json", layout)


def _load_trained(acc: Accelerator, index: int, trained: Trained, path: Path) -> None:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        distributed.load_engine(trained.model, path / f"deepspeed-{index}")
        return
    suffix = f"-rank-{acc.process_index}" if distributed.layout(acc) == "fsdp" else ""
    model_file = path / f"model-{index}{suffix}.safetensors"
    weights = _with_aliases(model_file)
    current = acc.unwrap_model(trained.model).state_dict()
    if weights.keys() != current.keys():
        missing, extra = sorted(current.keys() - weights.keys()), sorted(weights.keys() - current.keys())
        raise ConfigError(f"{model_file} does not fit the model being trained (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}): resume with the model the run started with")
    with torch.no_grad():
        for name, tensor in current.items():
            _local(tensor).copy_(weights[name])
    layout = json.loads((path / f"optimizer-{index}{suffix}.json").read_text())
    tensors = load_file(path / f"optimizer-{index}{suffix}.safetensors", device="cpu")
    saved = _join(layout, tensors)
    trained.optimizer.load_state_dict(_as_sharded_like(saved, trained.optimizer))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly FSDP2-sharded) tensor, sharing its storage."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _unique(state: dict) -> tuple[dict, dict]:
    """Tensors stored once each (tied weights share storage, which safetensors refuses) and the names that
    alias a stored one."""
    unique, aliases, seen, storages = {}, {}, {}, set()
    for name, tensor in state.items():
        local = _local(tensor).detach()
        storage = local.untyped_storage().data_ptr()
        key = (storage, local.storage_offset(), tuple(local.shape), local.dtype)
        if key in seen and local.numel():
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # a different view of storage already stored (a fused weight's slice) is written as a copy of its own
        unique[name] = local.cpu().clone() if storage in storages and local.numel() else local.cpu().contiguous()
        storages.add(storage)
    return unique, aliases


def _with_aliases(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    weights = load_file(file, device="cpu")
    weights.update({name: weights[target] for name, target in aliases.items()})
    return weights


def _split(obj, tensors: dict, path: str):
    """`obj` as JSON, its tensors moved to `tensors` under dotted names (dict keys keep their type)."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach()
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[k, _split(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def _join(layout: dict, tensors: dict):
    (kind, value), = layout.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _join(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_join(v, tensors) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "value":
        return value
    raise ValueError(f"unknown entry {kind!r} in an optimiser layout")


def _as_sharded_like(saved: dict, optimizer) -> dict:
    """Optimiser state read as local tensors, made FSDP2 DTensors again where the parameter they belong to
    is one (moments are sharded like their parameter; the step count is not)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in saved["state"].items():
        param = params[index]
        if not hasattr(param, "device_mesh"):
            continue
        from torch.distributed.tensor import DTensor

        for key, value in entries.items():
            if torch.is_tensor(value) and value.shape == param.to_local().shape and value.dim() > 0:
                entries[key] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                                  shape=param.shape, stride=param.stride(), run_check=False)
    return saved


def _continue_schedule(trained: Trained, step: int) -> None:
    """Put the schedule at `step` with the run's current peak rate and shape (the optimiser's restored
    groups carry the rate of the step saved, which a changed train.lr must not keep)."""
    scheduler = trained.scheduler
    scheduler.last_epoch, scheduler._step_count = step, step + 1
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, base, rate in zip(trained.optimizer.param_groups, scheduler.base_lrs, rates):
        group["initial_lr"], group["lr"] = base, rate
    scheduler._last_lr = rates


# ---------------------------------------------------------------------------------------------------------
# Random generators


def _rng_state() -> dict:
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, data) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
