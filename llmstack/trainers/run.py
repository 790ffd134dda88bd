"""A run's life: open the run directory (or notice it is finished) and close it with a model, a record and a
model card (resuming is `llmstack.trainers.loop.resume`). Every stage calls these in the same order, so every
run directory looks the same:

    config.yaml  metrics.jsonl  record.json  model/  checkpoints/  MODEL_CARD.md
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from llmstack.config import save_config, to_dict
from llmstack.models.causal_lm import numel, save_model
from llmstack.models.heads import unwrap
from llmstack.models.lora import has_adapters, merged
from llmstack.trainers.base import compute_precision, describe_world, log, make_accelerator, setup_logging
from llmstack.trainers.checkpoint import Checkpointer
from llmstack.trainers.callbacks import Callbacks, TrackerCallback
from llmstack.tracking.energy import EnergyMeter
from llmstack.tracking.metrics import MetricsLog, tracker_names
from llmstack.tracking.card import write_model_card
from llmstack.tracking.record import RunRecord, peak_memory, reset_peak_memory
from llmstack.tracking.run_dir import read_run_record


# statuses of a run that ended with a model/: trained to train.max_steps, or stopped early by a callback
COMPLETED = ("finished", "stopped")


@dataclass
class Run:
    """Handles a stage needs while it trains; `finished` runs need nothing more."""

    cfg: object
    stage: str
    dir: Path
    accelerator: Accelerator
    checkpointer: Checkpointer
    metrics: MetricsLog
    record: RunRecord | None
    finished: bool = False
    energy: EnergyMeter = field(default_factory=EnergyMeter)
    callbacks: Callbacks = field(default_factory=Callbacks)


def open_run(cfg, stage: str, callbacks=()) -> Run:
    """Set up the accelerator and the run directory; a run already finished there is reported, not redone.
    `callbacks` (`llmstack.trainers.callbacks.Callback`) are called through the run, after the trackers'."""
    train = cfg.train
    trackers = tracker_names(train.report_to)
    out = Path(cfg.output_dir)
    acc = make_accelerator(train.precision, train.grad_accum, trackers, str(out), train.batch_size, train.max_grad_norm)
    setup_logging(acc.is_main_process)
    log.info(f"{stage}: {describe_world(acc)}")
    checkpointer = Checkpointer(out, acc, train.keep_last)
    hooks = Callbacks([*([TrackerCallback(acc)] if trackers else []), *callbacks])
    metrics = MetricsLog(out / "metrics.jsonl", acc.is_main_process, lambda row, step: hooks("on_log", step, row))
    done = finished_record(out, stage)
    if done is not None:
        log.info(f"{stage}: {out} holds a completed run (record.json status '{done['status']}'); nothing to do. "
                 f"Use another output_dir to train again.")
        return Run(cfg, stage, out, acc, checkpointer, metrics, None, finished=True, callbacks=hooks)
    # on every process, before anything is written: a refused change leaves the run directory as it was
    checkpointer.check_resume(to_dict(cfg))
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.wait_for_everyone()
    if trackers:
        acc.init_trackers(stage, config=_flat(to_dict(cfg)))
    set_seed(cfg.seed)
    reset_peak_memory()
    record = RunRecord(out, stage, to_dict(cfg), inputs={}, parent=None) if acc.is_main_process else None
    # each process of the run computes on its own cores; those on this machine count towards its power
    here = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
    run = Run(cfg, stage, out, acc, checkpointer, metrics, record, callbacks=hooks,
              energy=EnergyMeter(power_watts=train.power_watts, processes=here))
    run.energy.start()
    return run


def precision_facts(run: Run, **models) -> dict:
    """record.json's account of precision: `train.precision` as asked and as resolved on this machine, and
    each model's weight dtype and attention implementation as loaded (read off the models themselves)."""
    facts = {"train_precision": run.cfg.train.precision, "compute": compute_precision(run.accelerator),
             "model_dtype": run.cfg.model.dtype, "weights": {}, "attn_implementation": {}}
    for name, model in models.items():
        if model is None:
            continue
        inner = unwrap(model)
        facts["weights"][name] = str(next(inner.parameters()).dtype).removeprefix("torch.")
        facts["attn_implementation"][name] = getattr(inner.config, "_attn_implementation", None)
    return facts


def model_facts(run: Run, model, lora=None) -> dict:
    """record.json's account of one trained model: its class as trained, all its parameters and those the
    optimiser updates, and, when it trains through adapters, the LoRA settings (`lora`, a
    `llmstack.config.LoraConfig`; absent without adapters)."""
    facts = {"class": type(run.accelerator.unwrap_model(model)).__name__,
             "parameters": sum(numel(p) for p in model.parameters()),
             "trainable_parameters": sum(numel(p) for p in model.parameters() if p.requires_grad)}
    if lora is not None and lora.enabled:
        facts["lora"] = {key: value for key, value in to_dict(lora).items() if key != "enabled"}
    return facts


def finished_record(run_dir: Path, stage: str) -> dict | None:
    """The record of the completed run in `run_dir`, or None. A record of another stage is refused: a
    directory holds one run, and a finished SFT run is no reward model."""
    record = read_run_record(run_dir, stage)
    if record is None or not (run_dir / "model").is_dir():
        return None
    return record if record.get("status") in COMPLETED else None


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if not isinstance(value, list) else str(value)
    return out


def close_run(run: Run, model, tokenizer, status: str, summary: dict, merge_adapters: bool = False,
              reason: str | None = None):
    """Save the final model (when the run completed: finished, or stopped by a callback) and the record;
    every process must call this. Returns the trained model unwrapped from its distributed wrapper (adapters
    merged when `merge_adapters`)."""
    acc = run.accelerator
    final = acc.unwrap_model(model)
    completed = status in COMPLETED
    if completed:
        if merge_adapters and has_adapters(final):
            final, state_dict = merged(final), None
        else:
            state_dict = acc.get_state_dict(model)
        if acc.is_main_process:
            save_model(final, tokenizer, run.dir / "model", state_dict=state_dict)
    acc.wait_for_everyone()
    if acc.is_main_process:
        run.record.update(metrics=summary, compute=peak_memory(), **({"stop_reason": reason} if reason else {}))
        run.record.add_energy(run.energy.stop())
        run.record.finish(status)
        if completed:
            write_model_card(run.dir, run.record.data)
    # Trackers only: accelerate's end_training would also tear down the process group, which the caller
    # (a pipeline running the next stage, a test comparing ranks) may still need.
    for tracker in acc.trackers:
        tracker.finish()
    run.callbacks("on_train_end", status, summary)
    if completed:
        why = f" (stopped: {reason})" if reason else ""
        log.info(f"{run.stage}: done{why}. Model in {run.dir / 'model'}, record in {run.dir / 'record.json'}")
    return final
