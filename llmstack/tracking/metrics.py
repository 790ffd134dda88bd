"""metrics.jsonl: one JSON object per logging step, forwarded to accelerate's trackers as well."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_names(report_to: list[str]) -> list[str]:
    """Validate `train.report_to`; a tracker whose package is missing fails now, not after hours of training."""
    for name in report_to:
        if name not in TRACKERS:
            raise ValueError(f"train.report_to: unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"train.report_to includes {name!r} but the {TRACKERS[name]} package is not "
                             "installed; run `pip install 'llmstack[tracking]'` or remove it from report_to")
    return list(report_to)


def _plain(value):
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


class MetricsLog:
    """Appends rows to `path` (main process only) and passes them to `trackers(metrics, step)`.

    Each row is flushed at once so a crash loses nothing already logged.
    """

    def __init__(self, path: Path, is_main: bool, trackers: Callable[[dict, int], None] | None = None):
        self.path = Path(path)
        self.is_main = is_main
        self.trackers = trackers

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step`: a run resumed from the checkpoint at `step` logs them again."""
        if not self.is_main or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    @staticmethod
    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
