"""One contender of a comparison, run alone in this process (see run.py); prints one JSON line of results.

    python -m benchmarks.contenders NAME INIT_DIR DATA OUT_DIR SEQ BATCH STEPS WARMUP
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from llmstack.config import TrainConfig
from llmstack.data import text
from llmstack.data.batching import ShuffledBatches
from llmstack.losses import causal_lm_loss_sum, count_targets
from llmstack.models.causal_lm import load_causal_lm, load_tokenizer

LR, WARMUP_STEPS, SEED, HELD_OUT_FRACTION = 3e-4, 2, 0, 0.05


def blocks(init: str, data: str, seq: int):
    """The same (train, held-out) packed blocks for every contender: llmstack's packing of `data`."""
    return text.pack_corpus(data, load_tokenizer(init), seq, HELD_OUT_FRACTION, SEED)


@torch.no_grad()
def held_out_loss(model_dir: str, held_out, limit: int = 16) -> float:
    model = load_causal_lm(model_dir).eval()
    ids, labels = held_out.input_ids[:limit], held_out.labels[:limit]
    total = sum(float(causal_lm_loss_sum(model(input_ids=ids[i:i + 4]).logits, labels[i:i + 4]))
                for i in range(0, len(ids), 4))
    return total / count_targets(labels)


def llmstack_run(init, data, out, seq, batch, steps) -> tuple[list[float], list[float]]:
    from llmstack.config import PretrainConfig, load_config
    from llmstack.trainers.pretrain import pretrain

    cfg = load_config(PretrainConfig, None, [
        f"output_dir={out}", f"model.name_or_path={init}", f"data.train={data}", f"data.block_size={seq}",
        f"data.eval_fraction={HELD_OUT_FRACTION}", f"seed={SEED}", f"train.batch_size={batch}",
        f"train.max_steps={steps}", f"train.lr={LR}", f"train.warmup_steps={WARMUP_STEPS}", "train.log_every=1",
        "train.eval_every=0", f"train.save_every={steps}", "train.precision=fp32", "train.keep_last=1"])
    pretrain(cfg)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows], [r["loss"] for r in rows]


def hf_trainer_run(init, data, out, seq, batch, steps) -> tuple[list[float], list[float]]:
    """A plain `transformers.Trainer` causal-LM run with llmstack's optimiser settings."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    train, _ = blocks(init, data, seq)
    # the rows in the order llmstack's sampler deals them, read sequentially: both contenders see the same
    # batches, so their losses can be compared step by step
    ordered = [b for _, b in zip(range(steps), ShuffledBatches(train, batch, 0, 1, SEED))]
    dataset = Dataset.from_dict({"input_ids": torch.cat([b["input_ids"] for b in ordered]).tolist(),
                                 "labels": torch.cat([b["labels"] for b in ordered]).tolist()})
    defaults = TrainConfig()
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                             warmup_steps=WARMUP_STEPS, lr_scheduler_type="cosine",
                             weight_decay=defaults.weight_decay, adam_beta1=defaults.adam_betas[0],
                             adam_beta2=defaults.adam_betas[1], max_grad_norm=defaults.max_grad_norm,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=SEED,
                             dataloader_num_workers=0, train_sampling_strategy="sequential")
    trainer = Trainer(model=load_causal_lm(init), args=args, train_dataset=dataset, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(Path(out) / "model"))
    speeds = [batch * seq / (b - a) for a, b in zip(stamps, stamps[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return speeds, losses


CONTENDERS = {"llmstack": llmstack_run, "hf-trainer": hf_trainer_run}


def main(argv: list[str]) -> None:
    name, init, data, out, seq, batch, steps, warmup = argv
    seq, batch, steps, warmup = int(seq), int(batch), int(steps), int(warmup)
    speeds, losses = CONTENDERS[name](init, data, out, seq, batch, steps)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _, held_out = blocks(init, data, seq)
    print(json.dumps({"tokens_per_s": statistics.median(speeds[warmup:] or speeds), "peak_rss_mib": peak_mib,
                      "first_loss": losses[0], "last_loss": losses[-1],
                      "held_out_loss": held_out_loss(str(Path(out) / "model"), held_out)}))


if __name__ == "__main__":
    main(sys.argv[1:])
