"""Callbacks: user code called at the points of a run that matter, able to stop it.

    class StopWhenRight(Callback):
        def on_step_end(self, step, metrics):
            if metrics.get("gold_reward", 0) > 1.6:
                return "gold reward reached 1.6"    # a reason: the run stops after this step

A hook that returns something true (best, a string saying why) stops the run at the end of the current step:
the run then writes a checkpoint, saves `model/`, and closes its record with status `stopped` and the
reason, exactly as a finished run closes (and, like a finished run, it is not redone by the same command).
Every process calls the hooks with the same metrics (reduced over processes), and the run stops when any
process asks. The trackers (tensorboard, wandb) are callbacks too (`TrackerCallback`), not a special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunInfo:
    stage: str
    run_dir: Path
    start_step: int  # 0, or the step a resumed run continues from
    max_steps: int
    world_size: int
    is_main_process: bool


class Callback:
    """Override the hooks you need; each may return a reason to stop (any true value stops)."""

    def on_train_begin(self, info: RunInfo):
        """Before the first step of this process's run (after a resume, at the restored step)."""

    def on_step_end(self, step: int, metrics: dict):
        """After each optimiser step: the step's logged metrics, or at least its loss when it logs nothing."""

    def on_log(self, step: int, row: dict):
        """After a row was written to metrics.jsonl (every `train.log_every` steps and at evaluations)."""

    def on_evaluate(self, step: int, metrics: dict):
        """After each held-out evaluation, with its measures."""

    def on_save(self, step: int, checkpoint: Path):
        """After a checkpoint was written (and renamed into place)."""

    def on_train_end(self, status: str, metrics: dict):
        """After the run closed: status finished, stopped or interrupted; the run's summary metrics."""


class TrackerCallback(Callback):
    """Every row written to metrics.jsonl, to accelerate's trackers (`train.report_to`), numbers only."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def on_log(self, step: int, row: dict):
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            self.accelerator.log(numbers, step=step)


class Callbacks:
    """The run's callbacks, called in order; `stop reason` is the first true value a hook returned."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def __call__(self, hook: str, *args) -> str | None:
        reason = None
        for callback in self.callbacks:
            answer = getattr(callback, hook)(*args)
            if answer and reason is None:
                reason = answer if isinstance(answer, str) else f"{type(callback).__name__}.{hook} asked to stop"
        return reason
