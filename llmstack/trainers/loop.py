"""The tail every training loop shares, written once: step until `train.max_steps`, log, show progress with
an ETA, honour SIGTERM/SIGINT, checkpoint on cadence, and stop cleanly on a non-finite loss.

A loop supplies one function that advances the run by a single step (`step(state) -> StepReport`) and one
that gives the data positions a checkpoint must hold; `run_loop` does the rest, identically for the
supervised stages and for RL. What a checkpoint holds besides the trained models, optimisers, schedules and
generators (`checkpoint.Checkpointer`) is `LoopState`'s fields plus the loop's own (`extra_state()`), as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmstack.trainers.base import NonFiniteLossError, StopOnSignal, log
from llmstack.trainers.callbacks import RunInfo
from llmstack.trainers.run import COMPLETED, Run
from llmstack.tracking.progress import Progress


@dataclass
class LoopState:
    """Everything besides model, optimiser, scheduler and RNG that a checkpoint must hold to resume exactly."""

    step: int = 0
    tokens_seen: int = 0
    initial_eval: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    last_loss: float | None = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, saved: dict) -> LoopState:
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


@dataclass
class LoopResult:
    status: str  # "finished", "stopped" (a callback asked) or "interrupted" (a signal)
    state: LoopState
    signum: int | None = None
    model: torch.nn.Module | None = None  # the trained model, unwrapped from DDP/FSDP, on every process
    reason: str | None = None  # why a callback stopped the run

    @property
    def completed(self) -> bool:
        """The run ended with a saved model/: it finished, or a callback stopped it."""
        return self.status in COMPLETED


@dataclass
class StepReport:
    """What one step hands the loop tail: the metrics row to log at this step (empty: nothing this step), the
    values for the progress line, and the held-out measures when the step evaluated."""

    row: dict = field(default_factory=dict)
    progress: dict = field(default_factory=dict)
    evaluated: dict | None = None


def run_loop(run: Run, state: LoopState, step: Callable[[LoopState], StepReport],
             extra_state: Callable[[], dict]) -> LoopResult:
    """Call `step` until `train.max_steps`; each call advances `state.step` by one.

    Returns "interrupted" after SIGTERM/SIGINT and "stopped" when a callback asked (a checkpoint was written
    at the end of that step either way), "finished" otherwise. A non-finite loss raises NonFiniteLossError:
    the update was not applied, the record says the run failed and why, and the message names the last good
    checkpoint and what to change.
    """
    acc, train = run.accelerator, run.cfg.train
    progress = Progress(train.max_steps, state.step, acc.is_main_process, desc=run.stage)
    run.callbacks("on_train_begin", RunInfo(run.stage, run.dir, state.step, train.max_steps, acc.num_processes,
                                            acc.is_main_process))

    def save() -> None:
        path = run.checkpointer.save(state.step, {**state.state_dict(), **extra_state()})
        run.callbacks("on_save", state.step, path)

    try:
        with StopOnSignal() as stop:
            while state.step < train.max_steps:
                report = step(state)
                if report.row:
                    run.metrics.log(state.step, report.row)
                progress.update(state.step, **report.progress)
                reason = run.callbacks("on_step_end", state.step, report.row or {"loss": state.last_loss})
                if report.evaluated is not None:
                    reason = run.callbacks("on_evaluate", state.step, report.evaluated) or reason
                signalled, asked = stop.requested(acc, asked=reason is not None)
                if signalled or asked:
                    save()
                    if signalled:
                        return LoopResult("interrupted", state, stop.signum or 15)
                    return LoopResult("stopped", state, reason=reason or "a callback on another process")
                if state.step % train.save_every == 0 or state.step == train.max_steps:
                    save()
    except NonFiniteLossError as err:
        last = run.checkpointer.latest()
        where = f"the last good checkpoint {last} is intact" if last else "no checkpoint had been written yet"
        if run.record is not None:
            run.record.finish(f"failed: {err}")
        raise NonFiniteLossError(f"{err}. Stopped: {where}. Lower train.lr, raise train.warmup_steps or use "
                                 f"train.precision=fp32, then re-run the same command to resume.") from err
    finally:
        progress.close()
    return LoopResult("finished", state)


def resume(run: Run, restore_extra: Callable[[dict], None]) -> LoopState | None:
    """Load the newest valid checkpoint into the prepared objects and return its loop state, after
    `restore_extra(saved)` has put the loop's own positions back; None when there is no checkpoint."""
    path = run.checkpointer.latest()
    if path is None:
        # a run that died before its first checkpoint starts over: its old rows must not stay in front
        run.metrics.truncate_after(0)
        return None
    saved = run.checkpointer.load(path)
    run.metrics.truncate_after(saved["step"])
    restore_extra(saved)
    if run.record is not None and run.checkpointer.changes:
        run.record.update(config_changes=run.checkpointer.changes)
    log.info(f"{run.stage}: resuming from {path} (step {saved['step']})")
    return LoopState.from_state_dict(saved)
