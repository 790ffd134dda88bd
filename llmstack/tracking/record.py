"""The run record (record.json) and the model card: what went in, what came out, and under what code.

A stage that starts from another run's `model/` links to that run's record, so a final model carries its
lineage back to the raw text.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path

import llmstack


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, obj) -> None:
    """Serialise first, then write a temp file and rename: a crash or a bad value never leaves a torn file."""
    path = Path(path)
    text = json.dumps(obj, indent=2)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def code_version() -> dict:
    import accelerate
    import torch
    import transformers

    out = {"llmstack": llmstack.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "python": platform.python_version()}
    src = Path(llmstack.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                                   capture_output=True, text=True, timeout=5)
            out["git_commit"] = commit.stdout.strip()
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def find_parent(model_path: str | None) -> dict | None:
    """Link to the run that produced `model_path` when it is an llmstack run's `model/` directory."""
    if model_path is None:
        return None
    record = Path(model_path).resolve().parent / "record.json"
    if Path(model_path).is_dir() and record.is_file():
        data = json.loads(record.read_text())
        return {"run_dir": str(record.parent), "stage": data.get("stage"), "record_sha256": file_sha256(record)}
    return {"model": model_path}


class RunRecord:
    """record.json of one run, saved whenever a section changes so even a crashed run leaves one."""

    def __init__(self, run_dir: str | Path, stage: str, config: dict, inputs: dict, parent: dict | None):
        self.path = Path(run_dir) / "record.json"
        self._started = time.time()
        self.data = {"stage": stage, "status": "running", "started": _stamp(self._started), "parent": parent,
                     "inputs": inputs, "config": config, "code": code_version(),
                     "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                              "cpus": os.cpu_count()}}

    def update(self, **sections) -> None:
        self.data.update(sections)

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def finish(self, status: str) -> None:
        now = time.time()
        self.data.update(status=status, ended=_stamp(now), wall_time_s=round(now - self._started, 3))
        self.save()

    @staticmethod
    def load(run_dir: str | Path) -> dict:
        return json.loads((Path(run_dir) / "record.json").read_text())


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(run_dir: str | Path, record: dict) -> None:
    """MODEL_CARD.md, generated from the record alone so it never claims more than the record holds."""
    model = record.get("model", {})
    lines = [f"# {record['stage']} model", "",
             f"Trained by llmstack {record['code']['llmstack']} (stage `{record['stage']}`), "
             f"status **{record['status']}**, finished {record.get('ended', '?')}.", ""]
    if model:
        lines += [f"Architecture: `{model.get('class', '?')}`, {model.get('parameters', 0) / 1e6:.2f}M parameters.", ""]
    parent = record.get("parent")
    lines += ["## Lineage", "", f"Started from: {json.dumps(parent) if parent else 'fresh weights'}.", ""]
    lines += ["## Training data", "", "| input | spec | files / fingerprint |", "|---|---|---|"]
    for role, source in record.get("inputs", {}).items():
        files = source.get("files")
        detail = "; ".join(f"`{f['path']}` sha256 `{f['sha256'][:16]}…`" for f in files) if files else \
            ", ".join(f"{k}={v}" for k, v in source.items() if k != "spec")
        lines.append(f"| {role} | `{source.get('spec')}` | {detail} |")
    train = record.get("config", {}).get("train", {})
    keys = ("max_steps", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "precision")
    lines += ["", "## Training set-up", "", "| key | value |", "|---|---|"]
    lines += [f"| train.{k} | {train[k]} |" for k in keys if k in train]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in record.get("metrics", {}).items()]
    compute = record.get("compute", {})
    lines += ["", "## Compute", "", f"{compute.get('world_size', 1)} process(es) on {compute.get('device', '?')}, "
              f"wall time {record.get('wall_time_s', 0):.0f} s.", "",
              "## Limitations", "",
              "This model learned only from the data listed above, and reproduces its content and biases. "
              "It has not been evaluated for safety, factuality or fitness for any particular use."]
    (Path(run_dir) / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
