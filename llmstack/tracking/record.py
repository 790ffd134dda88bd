"""The run record (record.json) and the model card: what went in, what came out, and under what code.

A stage that starts from another run's `model/` links to that run's record (path and sha256), so a final
model carries its lineage back to the raw text. Everything here that writes is for the main process only.

Decisions:
- A resumed run keeps one record: each process lifetime is a "session" (start, end, status, wall time),
  earlier sessions are carried over from the record on disk, and `wall_time_s` is their sum. A session
  that was running when the record was last saved and never finished is marked "crashed".
- The model card is generated from the record alone, so it never claims more than the record holds.
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


def _accelerators() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        return ["mps"]
    return []


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
                     "wall_time_s": 0.0, "sessions": [*earlier, self.session], "parent": parent,
                     "inputs": inputs, "config": config, "code": code_version(),
                     "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                              "cpus": os.cpu_count(), "accelerators": _accelerators()}}

    def update(self, **sections) -> None:
        """Set sections; a dict section already present is merged key by key, anything else is replaced."""
        for name, value in sections.items():
            old = self.data.get(name)
            self.data[name] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value

    def set_compute(self, world_size: int, **facts) -> None:
        """Processes taking part and what they ran on (e.g. device, peak_flops_per_device, peak_source)."""
        self.update(compute={"world_size": world_size, **facts})

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


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _ancestors(record: dict, limit: int = 20) -> list[str]:
    """One line per earlier run, oldest first, read from the parents' own records where they still exist."""
    lines, parent, seen = [], record.get("parent"), set()
    while parent and len(lines) < limit:
        if "run_dir" not in parent:
            lines.append(f"`{parent.get('model')}` (weights from outside llmstack)")
            break
        path = Path(parent["run_dir"]) / "record.json"
        if parent["run_dir"] in seen:  # records that link in a circle: each run is listed once
            break
        if not path.is_file():
            lines.append(f"`{parent.get('stage')}` run `{parent['run_dir']}` (record no longer on disk)")
            break
        seen.add(parent["run_dir"])
        earlier = _read_record(path)
        data = ", ".join(f"`{s.get('spec', s)}`" if isinstance(s, dict) else f"`{s}`"
                         for s in earlier.get("inputs", {}).values()) or "no recorded inputs"
        lines.append(f"`{earlier.get('stage')}` run `{parent['run_dir']}` on {data} "
                     f"(record sha256 `{parent.get('record_sha256', '?')[:16]}`)")
        parent = earlier.get("parent")
    return lines[::-1]


def _data_lines(record: dict) -> list[str]:
    inputs = record.get("inputs") or {}
    lines = ["## Training data", ""]
    lines += ["| input | source | files and sha256 |", "|---|---|---|"] if inputs else ["No inputs were recorded."]
    for role, source in inputs.items():
        source = source if isinstance(source, dict) else {"spec": source}
        files = source.get("files")
        detail = "<br>".join(f"`{f['path']}` ({_fmt(f.get('bytes', '?'))} bytes) `{f['sha256']}`" for f in files) \
            if files else ", ".join(f"{k}={v}" for k, v in source.items() if k != "spec") or "-"
        lines.append(f"| {role} | `{source.get('spec')}` | {detail} |")
    facts = record.get("data")
    return lines + ["", *_bullets(facts)] if facts else lines


def _bullets(facts: dict, depth: int = 0) -> list[str]:
    lines = []
    for key, value in facts.items():
        nested = isinstance(value, dict) and bool(value)
        lines.append(f"{'  ' * depth}- {key}" + ("" if nested else f": {_fmt(value)}"))
        lines += _bullets(value, depth + 1) if nested else []
    return lines


SETUP_KEYS = ("seed", "model.name_or_path", "model.preset", "data.block_size", "data.max_length", "train.max_steps",
              "train.batch_size", "train.grad_accum", "train.lr", "train.schedule", "train.warmup_steps",
              "train.weight_decay", "train.max_grad_norm", "train.precision", "lora.enabled")


def _setup_lines(config: dict) -> list[str]:
    def get(dotted: str):
        node = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    rows = [f"| `{key}` | {_fmt(get(key))} |" for key in SETUP_KEYS if get(key) is not None]
    return ["## Training set-up", "", "| key | value |", "|---|---|", *rows, "",
            "The full resolved configuration is in `config.yaml` and in `record.json`."]


def _results_lines(metrics: dict) -> list[str]:
    # the stages record held-out metrics as initial_<name> (before training) and final_<name> (after)
    paired = [k.removeprefix("final_") for k in metrics if k.startswith("final_") and f"initial_{k[6:]}" in metrics]
    lines = ["## Results", ""]
    if paired:
        lines += ["| held-out metric | before training | after training |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(metrics[f'initial_{k}'])} | {_fmt(metrics[f'final_{k}'])} |" for k in paired]
        lines.append("")
    shown = {f"{when}_{k}" for k in paired for when in ("initial", "final")}
    rest = {k: v for k, v in metrics.items() if k not in shown}
    if rest:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rest.items())]
    return lines if len(lines) > 2 else lines + ["No metrics were recorded."]


def _compute_line(record: dict) -> str:
    compute, sessions = record.get("compute", {}), len(record.get("sessions", []))
    accelerators = record.get("host", {}).get("accelerators")
    tokens = record.get("metrics", {}).get("tokens_seen")
    line = f"{compute.get('world_size', 1)} process(es) on `{compute.get('device', '?')}`"
    line += f" ({', '.join(accelerators)})" if accelerators else ""
    line += f", wall time {_duration(record.get('wall_time_s', 0.0))}"
    line += f" over {sessions} sessions (resumed)" if sessions > 1 else ""
    line += f", {_fmt(tokens)} training tokens." if tokens is not None else "."
    energy = record.get("energy")
    if not energy:
        return line
    if "unmeasured" in energy:
        return f"{line} Energy was not measured: {energy['unmeasured']}."
    joules = sum(energy.get(k, 0.0) for k in ("cpu_joules", "gpu_joules"))
    return f"{line} Energy: {joules / 3.6e6:.3g} kWh ({energy.get('source', '?')}; {energy.get('note', '')})."


def write_model_card(run_dir: str | Path, record: dict) -> None:
    """Write MODEL_CARD.md (main process only) from `record`, the content of record.json."""
    code, model = record.get("code", {}), record.get("model", {})
    stage = record.get("stage", "?")
    commit = f" (commit `{code['git_commit'][:12]}`{', modified' if code.get('git_dirty') else ''})" \
        if "git_commit" in code else ""
    lines = [f"# {Path(run_dir).resolve().name}: {stage} model", "",
             f"Trained by llmstack {code.get('llmstack', '?')}{commit}, stage `{stage}`. "
             f"Status **{record.get('status', '?')}**, ended {record.get('ended', '?')}.", ""]
    if model:
        trainable = model.get("trainable_parameters")
        lines += [f"Architecture `{model.get('class', '?')}` with {model.get('parameters', 0) / 1e6:.2f}M parameters"
                  + (f" ({trainable / 1e6:.2f}M trained)." if trainable is not None else "."), ""]
    ancestors = _ancestors(record)
    last = f"{len(ancestors) + 1}. this run: `{stage}`" if ancestors else "Trained from freshly initialised weights."
    lines += ["## Lineage", "", *(f"{i}. {line}" for i, line in enumerate(ancestors, 1)), last, ""]
    lines += [*_data_lines(record), "", *_setup_lines(record.get("config", {})), "",
              *_results_lines(record.get("metrics", {})), ""]
    lines += ["## Compute", "", _compute_line(record), "", "## Limitations", "",
              "This model was trained by llmstack on the data listed above only, and reproduces that data's content, "
              "gaps and biases. It has not been evaluated for safety, factuality or fitness for any particular use; "
              "the results above are the only evaluation it has had."]
    (Path(run_dir) / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
