"""metrics.jsonl: one JSON object per logging step, forwarded to accelerate's trackers as well.

Decisions:
- Floats are written with 7 significant digits: float32 training values carry no more, and the file stays
  readable. Trackers receive the same rounded values, so the file and the dashboards agree.
- Non-finite floats are written as the strings "nan"/"inf"/"-inf": bare NaN is not JSON, and strict readers
  (jq, browsers) would reject the whole file because of one bad step. Trackers get only numbers.
- A hard kill can tear the last line. Readers skip a torn final line; a malformed line anywhere else is an
  error naming the file and line, because it means the file was damaged, not interrupted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

# tracker name (accelerate's `log_with`) -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_names(report_to: list[str]) -> list[str]:
    """Validate `train.report_to`; a tracker whose package is missing fails now, not after hours of training."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"train.report_to: unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"train.report_to includes {name!r} but the {TRACKERS[name]!r} package is not "
                             f"installed; run `pip install 'llmstack[tracking]'` (or `pip install "
                             f"{TRACKERS[name]}`), or remove {name!r} from train.report_to")
    return list(dict.fromkeys(names))


def _plain(value):
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else str(value)
    return value


def _parse(path: Path) -> list[dict]:
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: the write was cut short by a kill
                break
            raise ValueError(f"{path}, line {number}: not a JSON object ({err.msg})") from err
    return rows


class MetricsLog:
    """Appends rows to `path` (main process only) and passes them to `trackers(metrics, step)`, e.g.
    `accelerator.log`. Each row is written and the file closed at once, so a crash loses nothing logged."""

    def __init__(self, path: Path, is_main: bool, trackers: Callable[[dict, int], None] | None = None):
        self.path = Path(path)
        self.is_main = is_main
        self.trackers = trackers

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            self.trackers(numbers, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (and a torn last line): a run resumed from the checkpoint at `step`
        logs those steps again, and must not leave duplicates or rows from a future that never happened."""
        if not self.is_main or not self.path.is_file():
            return
        kept = [row for row in _parse(self.path) if row["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as fh:
            fh.write("".join(json.dumps(row) + "\n" for row in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    @staticmethod
    def read(path: Path) -> list[dict]:
        return _parse(Path(path))
