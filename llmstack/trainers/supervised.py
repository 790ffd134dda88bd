"""The one supervised step, shared by pretraining, SFT and reward modelling.

The stages differ only in how a batch becomes a loss: a `SupervisedObjective` gives the summed loss of a
micro-batch and the number of targets it holds. The step divides every micro-batch's sum by the number of
targets in the whole global batch (all micro-batches on all processes), so one update is the same whether the
global batch arrives as 1 x 8, 8 x 1 or 2 processes x 4. The loop around the steps is `loop.run_loop`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from accelerate import Accelerator

from llmstack.config import TrainConfig
from llmstack.data.batching import to_device
from llmstack.trainers.base import NonFiniteLossError
from llmstack.trainers.loop import LoopState, StepReport


@dataclass
class SupervisedObjective:
    """How a stage turns a batch (a dict of tensors on the device) into a loss."""

    loss_sum: Callable[[torch.nn.Module, dict], torch.Tensor]
    count_targets: Callable[[dict], int]
    count_tokens: Callable[[dict], int] = lambda batch: batch["input_ids"].numel()
    perplexity: bool = False  # the loss is a token-mean cross-entropy, so exp(loss) means something
    # values measured while computing losses, logged once with the step they were measured in (their maximum
    # over processes), e.g. DPO's step-1 health: {} when there is nothing new
    health: Callable[[], dict[str, float]] | None = None


def optimizer_step(acc: Accelerator, model, optimizer, scheduler, micro_batches: list[dict],
                   objective: SupervisedObjective, max_grad_norm: float, step: int) -> tuple[float, float | None, float]:
    """One update from `micro_batches`; returns the global-batch mean loss, the pre-clip gradient norm and the
    learning rate the update used."""
    n_local = sum(objective.count_targets(b) for b in micro_batches)
    n_global = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum").item())
    if n_global == 0:
        raise ValueError(f"step {step + 1}: the global batch holds no training targets (every label is masked)")
    # accelerate divides by the accumulation count and DDP averages over processes; undo both so the
    # gradient is that of (sum of token losses) / (targets in the global batch).
    scale = acc.num_processes * len(micro_batches) / n_global
    total = torch.zeros((), device=acc.device)
    for batch in micro_batches:
        with acc.accumulate(model):
            # the run's autocast over the whole loss, not only the model's forward (which accelerate wraps): a
            # head applied outside the forward (the fused loss, a score head) then runs in the compute dtype as
            # it would inside it, and as the held-out evaluation runs it
            with acc.autocast():
                loss_sum = objective.loss_sum(model, to_device(batch, acc.device))
            acc.backward(loss_sum * scale)
            total += loss_sum.detach().float()
    loss = acc.reduce(total, "sum").item() / n_global
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"the training loss is {loss} at step {step + 1}; the update was not applied")
    grad_norm = None
    if max_grad_norm > 0:
        grad_norm = float(acc.clip_grad_norm_(model.parameters(), max_grad_norm))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, lr


@dataclass
class Window:
    """Accumulates per-step values between two log points."""

    losses: list = field(default_factory=list)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def summary(self) -> dict:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return {"loss": sum(self.losses) / len(self.losses), "tokens_per_s": self.tokens / seconds}


def supervised_step(acc: Accelerator, model, optimizer, scheduler, batches, objective: SupervisedObjective,
                    train: TrainConfig, evaluate: Callable[[int], dict] | None, flops_per_token: float,
                    peak_flops: float) -> Callable[[LoopState], StepReport]:
    """The step function `loop.run_loop` calls: one update on the next `train.grad_accum` micro-batches,
    with the logging row at log steps and the held-out measures at evaluation steps."""
    micro_batches: Iterator[dict] = iter(batches)
    window = Window()

    def step(state: LoopState) -> StepReport:
        nonlocal window
        micro = [next(micro_batches) for _ in range(train.grad_accum)]
        loss, grad_norm, lr = optimizer_step(acc, model, optimizer, scheduler, micro, objective,
                                             train.max_grad_norm, state.step)
        state.step += 1
        step_tokens = sum(objective.count_tokens(b) for b in micro) * acc.num_processes
        state.tokens_seen += step_tokens
        state.last_loss = loss
        window.losses.append(loss)
        window.tokens += step_tokens
        last = state.step == train.max_steps
        row = {}
        if state.step % train.log_every == 0 or last:
            row = window.summary()
            if objective.perplexity:
                row["ppl"] = math.exp(min(row["loss"], 80.0))
            row["lr"] = lr
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak_flops * acc.num_processes)
            row["tokens_seen"] = state.tokens_seen
            window = Window()
        health = objective.health() if objective.health is not None else {}
        if health:
            values = acc.gather(torch.tensor([list(health.values())], device=acc.device, dtype=torch.float64))
            row = {"loss": loss, **row, **dict(zip(health, values.amax(0).tolist()))}
        evaluated = None
        if evaluate is not None and train.eval_every and (state.step % train.eval_every == 0 or last):
            state.last_eval = evaluated = evaluate(state.step)
            row = {"loss": loss, **row, **state.last_eval}
        return StepReport(row, {"loss": loss, **{k: row[k] for k in ("tokens_per_s", "mfu") if k in row}}, evaluated)

    return step
