"""The `pretrain` comparison's contenders, each run alone in this process (see run.py); prints one JSON line
of results.

    python -m benchmarks.contenders NAME INIT_DIR DATA OUT_DIR SEQ BATCH STEPS WARMUP PRECISION
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks import common
from llmstack.data import text
from llmstack.losses import causal_lm_loss_sum, count_targets
from llmstack.models.causal_lm import load_causal_lm, load_tokenizer

LR, WARMUP_STEPS, SEED, HELD_OUT_FRACTION = 3e-4, 2, common.SEED, 0.05

DESCRIPTION = (
    "Work: preset {preset}, vocabulary {vocabulary:,} (a byte-level BPE trained on the corpus, {vocab:,} asked "
    "for), {batch} x {seq} tokens per step, {steps} steps (tokens/s is the "
    "median over steps after the first {warmup}), {precision}, {repeats} repeats each, every contender in its own "
    "process from the same initial weights and the same packed blocks. Peak memory: the process's resident-set "
    "high-water mark. Quality: mean next-token loss on the same held-out blocks after training. MFU: tokens/s x "
    "the model's training FLOPs per token (6N + 12LHT) over this machine's measured {precision} matmul peak "
    "({peak_gflops:,.0f} GFLOP/s, {threads} threads)."
)

NOTES = """Notes:
- Both follow a cosine schedule after the same warm-up, but llmstack's decays to `train.min_lr_ratio` x lr
  and the Trainer's to 0, so the later updates differ and so do the held-out losses; the first step, before
  any update, gives the same loss to the last printed digit.
- MFU counts the same FLOPs per token for both, so the MFU ratio is the tokens/s ratio.
- Where the time goes (`py-spy record -r 50`, 10 steps each, 2026-12-01): both run the same model code and
  the same matmuls, the vocabulary projection included (42% of the step's FLOPs at 32k tokens and hidden size
  384). llmstack computes the projection and the cross-entropy together in chunks of 1,024 tokens, forward
  and backward of the head in one pass (1.16 s a step), then the body's forward (0.60 s) and backward
  (1.20 s); it never writes the [8, 512, 32000] fp32 logits and their gradient (0.5 GiB each) to memory. The
  Trainer's model forward (0.97 s), loss (0.16 s) and backward (2.05 s) include those tensors. The gain is
  their memory traffic, not arithmetic: it grows with the vocabulary (1.15x at a 21.6k vocabulary on the
  same machine)."""


def prepare(args, work: Path) -> dict:
    """Once for all contenders: the tokenizer and the initial weights, saved where each process loads them."""
    from llmstack.data import sources
    from llmstack.models.causal_lm import build_from_preset, save_model

    tokenizer = text.train_tokenizer(sources.iter_documents(args.data), args.vocab)
    save_model(build_from_preset(args.preset, tokenizer, args.seq, seed=SEED), tokenizer, work / "init")
    return {"data": args.data, "vocabulary": len(tokenizer)}


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


def llmstack_run(init, data, out, seq, batch, steps, precision="fp32") -> common.Steps:
    from llmstack.config import PretrainConfig, load_config
    from llmstack.trainers.pretrain import pretrain

    cfg = load_config(PretrainConfig, None, [
        f"output_dir={out}", f"model.name_or_path={init}", f"data.train={data}", f"data.block_size={seq}",
        f"data.eval_fraction={HELD_OUT_FRACTION}", f"seed={SEED}", f"train.batch_size={batch}",
        f"train.max_steps={steps}", f"train.lr={LR}", f"train.warmup_steps={WARMUP_STEPS}", "train.log_every=1",
        "train.eval_every=0", f"train.save_every={steps}", f"train.precision={precision}", "train.keep_last=1"])
    pretrain(cfg)
    return common.llmstack_steps(out)


def hf_trainer_run(init, data, out, seq, batch, steps, precision="fp32") -> common.Steps:
    """A plain `transformers.Trainer` causal-LM run with llmstack's optimiser settings."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    train, _ = blocks(init, data, seq)
    # the rows in the order llmstack's sampler deals them, read sequentially: both contenders see the same
    # batches, so their losses can be compared step by step
    order = common.dealing_order(len(train), batch, steps)
    dataset = Dataset.from_dict({"input_ids": train.input_ids[order].tolist(), "labels": train.labels[order].tolist()})
    clock = common.Clock()
    args = common.trainer_arguments(TrainingArguments, out, batch, steps, LR, WARMUP_STEPS,
                                    precision=precision, lr_scheduler_type="cosine")
    trainer = Trainer(model=load_causal_lm(init), args=args, train_dataset=dataset, callbacks=[clock])
    return common.trainer_steps(trainer, clock, out, tokens=[batch * seq] * steps)


def quality(init: str, data: str, model_dir: str, seq: int) -> dict:
    return {"held_out_loss": held_out_loss(model_dir, blocks(init, data, seq)[1])}


CONTENDERS = {"llmstack": llmstack_run, "hf-trainer": hf_trainer_run}


if __name__ == "__main__":
    common.main(sys.argv[1:], CONTENDERS, quality)
