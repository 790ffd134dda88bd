"""What every contender process shares: the Trainer-side optimiser settings taken from llmstack's defaults, a
per-step clock, llmstack's batch order, and the one JSON line of results each process prints."""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from benchmarks.memory import peak_rss_mib
from llmstack.config import TrainConfig
from llmstack.data.batching import ShuffledBatches

SEED = 0


@dataclass
class Steps:
    """Per optimiser step: wall seconds, real (non-padding) tokens in the input, the positions the model ran
    over (tokens plus padding), the examples (pairs, conversations) and the training loss."""

    seconds: list[float]
    tokens: list[int]
    losses: list[float]
    positions: list[int] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # further results of the run as a whole (e.g. its wall time)


class Clock(TrainerCallback):
    """Wall time of every Trainer step, from the start of the first to the end of each."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.stamps:
            self.stamps.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def trainer_arguments(config_class, out: str, batch: int, steps: int, lr: float, warmup: int,
                      precision: str = "fp32", **overrides):
    """`config_class` (TrainingArguments or a TRL config) with llmstack's optimiser defaults, one log row per
    step, no checkpoints, the CPU, `precision` (fp32, or bf16 autocast over fp32 weights as llmstack's
    `train.precision=bf16` does), and llmstack's batches read in order unless `overrides` say otherwise."""
    defaults = TrainConfig()
    settings = dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                    warmup_steps=warmup, weight_decay=defaults.weight_decay, adam_beta1=defaults.adam_betas[0],
                    adam_beta2=defaults.adam_betas[1], max_grad_norm=defaults.max_grad_norm, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, seed=SEED, dataloader_num_workers=0,
                    train_sampling_strategy="sequential", bf16=precision == "bf16")
    return config_class(**{**settings, **overrides})


# The Trainer's default schedule, linear decay from the peak to 0 over the run with no warm-up, is one that
# llmstack's `linear` schedule reproduces exactly with min_lr_ratio 0, so every update uses the same rate.
TRAINER_SCHEDULE = dict(lr_scheduler_type="linear")
LLMSTACK_SCHEDULE = ["train.schedule=linear", "train.min_lr_ratio=0", "train.warmup_steps=0"]
# how the TRL comparisons align the two trainers, in the words of their tables
ALIGNED_SETTINGS = (
    "{steps} steps (rates are medians over the steps after the first {warmup}), {precision}, lr {lr:g} decaying linearly "
    "to 0 without warm-up (the Trainer's default, which llmstack's `linear` schedule with `min_lr_ratio=0` "
    "matches exactly), llmstack's AdamW settings in both, no gradient checkpointing in either (TRL's default "
    "would turn it on), {repeats} repeats each, interleaved, every contender in its own process"
)


class _Indices:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def rows(self, index: torch.Tensor) -> list[int]:
        return index.tolist()


def tokenizer_texts(texts, extra: str | None):
    """`texts`, then the documents of `extra` (a file or folder) when given: a few thousand conversations hold
    too few distinct words for a 32k vocabulary, which is what the comparisons are meant to run at."""
    from llmstack.data import sources

    yield from texts
    if extra:
        yield from sources.iter_documents(extra)


def also(extra: str | None) -> str:
    """How a table names the extra tokenizer text."""
    return f" and `{Path(extra).name}`" if extra else ""


def write_split(items: list, fraction: float, to_record: Callable, data: Path) -> int:
    """`data`/train.jsonl and held_out.jsonl, each item held out or not by its index (seeded); the number
    held out."""
    from llmstack.data.text import is_held_out

    split = {"train": [], "held_out": []}
    for index, item in enumerate(items):
        split["held_out" if is_held_out(index, fraction, SEED) else "train"].append(item)
    data.mkdir(exist_ok=True)
    for name, part in split.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(to_record(x)) + "\n" for x in part))
    return len(split["held_out"])


def dealing_order(n_rows: int, batch: int, steps: int) -> list[int]:
    """Row indices in the order llmstack's sampler deals `steps` batches of `batch` out of `n_rows` rows, so
    a Trainer reading its dataset in order sees the same batches."""
    dealt = ShuffledBatches(_Indices(n_rows), batch, 0, 1, SEED)
    return [i for _, rows in zip(range(steps), dealt) for i in rows]


def llmstack_steps(out: str, **fields) -> Steps:
    """Seconds, losses and the tokens llmstack counted for every step, from its metrics (logged every step);
    `fields` replace any of them."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    seen = [0] + [r["tokens_seen"] for r in rows]
    counted = [b - a for a, b in zip(seen, seen[1:])]
    return Steps(**{"seconds": [n / r["tokens_per_s"] for n, r in zip(counted, rows)], "tokens": counted,
                    "losses": [r["loss"] for r in rows], **fields})


def trainer_steps(trainer, clock: Clock, out: str, **fields) -> Steps:
    """Train, save the model to OUT/model, and return seconds, losses and the real tokens TRL logs
    (`num_tokens`) for every step; `fields` replace any of them."""
    trainer.train()
    trainer.save_model(str(Path(out) / "model"))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    seen = [0] + [h.get("num_tokens", 0) for h in logged]
    return Steps(**{"seconds": clock.seconds(), "tokens": [int(b - a) for a, b in zip(seen, seen[1:])],
                    "losses": [h["loss"] for h in logged], **fields})


def _median_rate(amounts: list[int], seconds: list[float], warmup: int) -> float:
    rates = [a / s for a, s in zip(amounts, seconds)]
    return statistics.median(rates[warmup:] or rates)


def main(argv: list[str], contenders: dict[str, Callable], quality: Callable[[str, str, str, int], dict]) -> None:
    """Run contender NAME of `contenders` in PRECISION (fp32 | bf16) and print its results, the training loss of
    every step among them, as one JSON line; `quality(init, data, model_dir, seq)` scores the saved model after
    the peak memory has been read."""
    name, init, data, out, seq, batch, steps, warmup, precision = argv
    seq, batch, steps, warmup = int(seq), int(batch), int(steps), int(warmup)
    run = contenders[name](init, data, out, seq, batch, steps, precision=precision)
    # other work on the machine slows every contender it overlaps; the table shows how much there was
    load = os.getloadavg()[0]
    result = {"load": load, "tokens_per_s": _median_rate(run.tokens, run.seconds, warmup),
              "peak_rss_mib": peak_rss_mib(),
              "first_loss": run.losses[0], "last_loss": run.losses[-1],
              "tokens_per_step": statistics.median(run.tokens), "losses": run.losses}
    if run.items:
        result["items_per_s"] = _median_rate(run.items, run.seconds, warmup)
    if run.positions:
        result["padding_share"] = 1 - sum(run.tokens) / sum(run.positions)
        result["positions_per_step"] = statistics.median(run.positions)
    result.update(run.extra)
    result.update(quality(init, data, str(Path(out) / "model"), seq))
    print(json.dumps(result))
