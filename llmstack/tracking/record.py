"""The run record (record.json): what went in, what came out, and under what code.

A stage that starts from another run's `model/` links to that run's record (path and sha256), so a final
model carries its lineage back to the raw text (`llmstack.tracking.lineage`); the model card is written from
the record by `llmstack.tracking.card`. Everything here that writes is for the main process only.

Decisions:
- A resumed run keeps one record: each process lifetime is a "session" (start, end, status, wall time),
  earlier sessions are carried over from the record on disk, and `wall_time_s` is their sum. A session
  that was running when the record was last saved and never finished is marked "crashed".
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import llmstack
from llmstack.config import objects
from llmstack.tracking.energy import combine
from llmstack.tracking.lineage import portable_link


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, obj) -> None:
    """Serialise first, then write a temp file beside `path`, fsync and rename: a crash or a value JSON
    cannot encode leaves the previous file whole and no temp file behind."""
    path = Path(path)
    text = json.dumps(obj, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _git(src: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict:
    """Versions of llmstack and its main dependencies, plus the git commit of llmstack's own checkout."""
    import accelerate
    import torch
    import transformers

    out = {"llmstack": llmstack.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "python": platform.python_version()}
    src = Path(llmstack.__file__).resolve().parent.parent
    # An installed llmstack inside someone else's repository (a venv in a project) must not report that
    # repository's commit, so the checkout's top level has to be llmstack's own source root.
    top = _git(src, "rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == src:
        commit = _git(src, "rev-parse", "HEAD")
        status = _git(src, "status", "--porcelain", "--untracked-files=no")
        if commit:
            out["git_commit"] = commit
        if status is not None:
            out["git_dirty"] = bool(status)
    return out


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a valid run record ({err})") from err


def find_parent(model_path: str | None) -> dict | None:
    """Link to the run that produced `model_path` when it is an llmstack run's `model/` directory (its parent
    holds record.json); a model given in Python by its class, parameter count and weights hash; any other path
    or a Hub name as given."""
    if model_path is None:
        return None
    if objects.is_memory(model_path):
        return {"model": model_path, **objects.describe(model_path)}
    path = Path(model_path)
    record = path.resolve().parent / "record.json"
    if path.is_dir() and record.is_file():
        data = _read_record(record)
        return {"run_dir": str(record.parent), "stage": data.get("stage"), "record_sha256": file_sha256(record)}
    return {"model": model_path}


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo's "model name" on Linux (platform.processor() is often empty
    there), the platform's answer elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _accelerators() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        return ["mps"]
    return []


def reset_peak_memory() -> None:
    """Start this process's memory high-water marks afresh, so that a stage run after another in the same
    process (the pipeline) reports its own peak. Linux resets the resident peak through /proc/self/clear_refs;
    where that cannot be written the peak stays the process's."""
    import torch

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Memory high-water marks since `reset_peak_memory`, in MiB: this process's resident host memory (what a
    CPU run costs) and, on CUDA, the most tensor memory allocated on its device."""
    import resource

    import torch

    try:
        status = Path("/proc/self/status").read_text()
        rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak = {"peak_rss_mib": round(rss_kib / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


class RunRecord:
    """record.json of one run. Create it on the main process only; `save()` after each change, so even a
    crashed run leaves a record, and `finish(status)` at the end."""

    def __init__(self, run_dir: str | Path, stage: str, config: dict, inputs: dict, parent: dict | None):
        self.path = Path(run_dir) / "record.json"
        self._started = time.time()
        earlier = _read_record(self.path).get("sessions", []) if self.path.is_file() else []
        for session in earlier:
            if session.get("status") == "running":
                session["status"] = "crashed"
        self.session = {"started": _stamp(self._started), "status": "running", "wall_time_s": 0.0}
        self.data = {"stage": stage, "status": "running", "started": (earlier or [self.session])[0]["started"],
                     "wall_time_s": 0.0, "sessions": [*earlier, self.session], "parent": None,
                     "inputs": {}, "config": config, "code": code_version(),
                     "host": {"hostname": socket.gethostname(), "run_dir": str(Path(run_dir).resolve()),
                              "platform": platform.platform(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
                              "accelerators": _accelerators()}}
        self.update(parent=parent, inputs=inputs)

    def update(self, **sections) -> None:
        """Set sections; a dict section already present is merged key by key, anything else is replaced.
        Links to other runs (in `parent`, `parents` and `inputs`) are kept relative to this run's directory."""
        for name, value in sections.items():
            if name == "parent":
                value = portable_link(value, self.path.parent)
            elif name in ("parents", "inputs") and isinstance(value, dict):
                value = {k: portable_link(v, self.path.parent) if isinstance(v, dict) else v for k, v in value.items()}
            old = self.data.get(name)
            self.data[name] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value

    def set_compute(self, world_size: int, **facts) -> None:
        """Processes taking part and what they ran on (e.g. device, peak_flops_per_device, peak_source)."""
        self.update(compute={"world_size": world_size, **facts})

    def add_energy(self, reading: dict) -> None:
        """This session's energy (`EnergyMeter.stop()`); the record's `energy` is every session's together."""
        self.session["energy"] = reading
        self.data["energy"] = combine([s.get("energy") or {"unmeasured": f"session {s.get('started')} recorded no "
                                                           "energy"} for s in self.data["sessions"]])

    def save(self) -> None:
        self.session["wall_time_s"] = round(time.time() - self._started, 3)
        self.data["wall_time_s"] = round(sum(s.get("wall_time_s", 0.0) for s in self.data["sessions"]), 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)

    def finish(self, status: str) -> None:
        """`status`: "finished", "interrupted" or "failed: <reason>"."""
        ended = _stamp(time.time())
        self.session.update(status=status, ended=ended)
        self.data.update(status=status, ended=ended)
        self.save()

    @staticmethod
    def load(run_dir: str | Path) -> dict:
        return _read_record(Path(run_dir) / "record.json")


