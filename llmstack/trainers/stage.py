"""What every supervised stage does around the loop: size the work, build the optimiser, resume, evaluate
before training, keep the record, and close the run. A stage supplies the model, the batches and the
objective; `run_supervised_stage` does the rest.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from llmstack.evaluation.heldout import heldout_loss
from llmstack.models import causal_lm
from llmstack.trainers import distributed
from llmstack.trainers.base import (batch_arithmetic, build_optimizer, build_scheduler, compute_precision,
                                    learning_rate_facts, log)
from llmstack.trainers.loop import LoopResult, LoopState, resume, run_loop
from llmstack.trainers.run import Run, close_run, model_facts, precision_facts
from llmstack.trainers.supervised import SupervisedObjective, supervised_step
from llmstack.tracking.mfu import peak_flops, transformer_flops_per_token

def _fmt(ev: dict) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in ev.items()) if ev else "(no held-out data)"


def _summary(state: LoopState) -> dict:
    out = {"steps": state.step, "tokens_seen": state.tokens_seen, "train_loss": state.last_loss}
    out.update({f"initial_{k}": v for k, v in state.initial_eval.items()})
    out.update({f"final_{k}": v for k, v in state.last_eval.items()})
    return out


def _throughput_facts(run: Run, model, seq_len: int) -> tuple[float, float, str]:
    acc, train = run.accelerator, run.cfg.train
    mc = model.config
    flops_per_token = transformer_flops_per_token(causal_lm.matmul_params(model), mc.num_hidden_layers,
                                                  mc.hidden_size, seq_len)
    override = train.peak_tflops * 1e12 if train.peak_tflops else None
    peak, source = peak_flops(acc.device, causal_lm.DTYPES[compute_precision(acc)], override)
    log.info(f"{run.stage}: MFU against {peak / 1e12:.2f} TFLOP/s per device ({source})")
    return flops_per_token, peak, source


def run_supervised_stage(run: Run, model, tokenizer, batches, objective: SupervisedObjective, seq_len: int,
                         held_out: Callable[[], Iterable[dict]] | None, record: dict,
                         after_eval: Callable[[torch.nn.Module, int], dict] | None = None,
                         merge_adapters: bool = False,
                         before_save: Callable[[torch.nn.Module], dict] | None = None) -> LoopResult:
    """Train `model` on `batches` to `train.max_steps` with checkpoints and evaluation; returns the result
    with the trained model. `held_out()` gives this process's held-out micro-batches; `after_eval(model,
    step)` may add metrics (e.g. generated samples) to every evaluation, and gets the model with whole
    parameters even under a sharded layout, so one process may generate alone; `before_save(model)` runs once
    training has finished, may change what is saved, and returns facts for the record."""
    acc, train = run.accelerator, run.cfg.train
    trained = model_facts(run, model, getattr(run.cfg, "lora", None))
    log.info(f"{run.stage}: {type(model).__name__} with {trained['parameters'] / 1e6:.2f}M parameters "
             f"({trained['trainable_parameters'] / 1e6:.2f}M trainable), vocabulary {len(tokenizer)}")
    log.info(f"{run.stage}: {batch_arithmetic(train.batch_size, train.grad_accum, acc.num_processes, seq_len)}")
    flops_per_token, peak, peak_source = _throughput_facts(run, model, seq_len)

    optimizer = build_optimizer(model, train.lr, train.adam_betas, train.weight_decay, train.optimizer)
    model, optimizer = acc.prepare(model, optimizer)
    # after prepare: under ZeRO offload accelerate swaps in DeepSpeed's CPU Adam, and a schedule built on the
    # optimiser given to prepare would set learning rates nothing reads
    scheduler = build_scheduler(optimizer, train.schedule, train.warmup_steps, train.max_steps, train.min_lr_ratio)
    run.checkpointer.register(model, optimizer, scheduler)

    def evaluate(step: int = 0) -> dict:
        metrics = heldout_loss(acc, model, held_out(), objective.loss_sum, objective.count_targets,
                               train.eval_batches, objective.perplexity) if held_out else {}
        if after_eval is not None:
            with distributed.full_model(acc, model) as whole:
                metrics.update(after_eval(whole, step))
        return metrics

    state = resume(run, lambda saved: batches.load_state_dict(saved["data"]))
    if state is None:
        state = LoopState(initial_eval=evaluate() if train.eval_every else {})
        log.info(f"{run.stage}: before training, held-out {_fmt(state.initial_eval)}")
    if run.record is not None:
        facts = {"precision": precision_facts(run, model=model),
                 "learning_rate": learning_rate_facts(run.stage, run.cfg.model.name_or_path, train.lr,
                                                      train.weight_decay)}
        run.record.update(**{**facts, **record},
                          resumed_from_step=state.step or None,
                          model=trained)
        run.record.set_compute(acc.num_processes, device=str(acc.device), peak_flops_per_device=peak,
                               peak_source=peak_source)
        run.record.save()
    step = supervised_step(acc, model, optimizer, scheduler, batches, objective, train, evaluate, flops_per_token,
                           peak)
    result = run_loop(run, state, step, lambda: {"data": batches.state_dict()})
    summary = _summary(result.state)
    if result.completed and before_save is not None:
        summary.update(before_save(acc.unwrap_model(model)))
    result.model = close_run(run, model, tokenizer, result.status, summary, merge_adapters, result.reason)
    if result.completed:
        log.info(f"{run.stage}: held-out {_fmt(state.initial_eval)} before, {_fmt(state.last_eval)} after")
    return result
