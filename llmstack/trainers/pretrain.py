"""Causal-LM pretraining: raw text -> tokenizer -> packed blocks -> next-token loss, on the shared loop."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmstack.config import PretrainConfig
from llmstack.data import batching, sources, text
from llmstack.kernels import KernelPlan
from llmstack.losses import count_targets
from llmstack.models import causal_lm
from llmstack.models.forward import lm_loss_sum
from llmstack.models.fused import apply_kernels
from llmstack.trainers.base import compute_precision, log
from llmstack.trainers.loop import LoopResult
from llmstack.trainers.run import Run, open_run
from llmstack.trainers.stage import run_supervised_stage
from llmstack.trainers.supervised import SupervisedObjective
from llmstack.tracking.record import find_parent
from llmstack.tracking.run_dir import owns_output_dir


def lm_objective(kernels: KernelPlan) -> SupervisedObjective:
    return SupervisedObjective(loss_sum=lambda model, batch: lm_loss_sum(model, batch["labels"], kernels,
                                                                         input_ids=batch["input_ids"]),
                               count_targets=lambda b: count_targets(b["labels"]), perplexity=True)


def prepare_tokenizer(cfg: PretrainConfig, run: Run):
    """The configured tokenizer, the model's own, or (for a preset) one trained on the corpus and kept in the
    run directory so a resumed run and every process use exactly the same one."""
    m = cfg.model
    if m.tokenizer or m.name_or_path:
        return causal_lm.load_tokenizer(m.tokenizer or m.name_or_path, None if m.tokenizer else m.gguf_file,
                                        m.trust_remote_code)
    saved = run.dir / "tokenizer"
    acc = run.accelerator
    if acc.is_main_process and not saved.is_dir():
        log.info(f"pretrain: training a {m.vocab_size}-token byte-level BPE tokenizer on {cfg.data.train}")
        tokenizer = text.train_tokenizer(sources.iter_documents(cfg.data.train, cfg.data.text_field), m.vocab_size)
        tokenizer.save_pretrained(saved)
    acc.wait_for_everyone()
    return causal_lm.load_tokenizer(str(saved))


def prepare_data(cfg: PretrainConfig, tokenizer, rank: int, world: int):
    """Training batches (in memory or streamed) and held-out blocks."""
    d, batch_size = cfg.data, cfg.train.batch_size
    fraction = 0.0 if d.eval else d.eval_fraction
    if d.streaming:
        train = batching.StreamingBatches(d.train, tokenizer, d.block_size, batch_size, rank, world, fraction,
                                          cfg.seed, d.text_field)
        held_out = (text.load_blocks(d.eval, tokenizer, d.block_size, d.text_field) if d.eval else
                    _first_eval_blocks(cfg, tokenizer, limit=max(1, cfg.train.eval_batches) * batch_size * world))
        return train, held_out, {"streaming": True}
    train_blocks, held_out = text.pack_corpus(d.train, tokenizer, d.block_size, fraction, cfg.seed, d.text_field)
    if d.eval:
        held_out = text.load_blocks(d.eval, tokenizer, d.block_size, d.text_field)
    train = batching.ShuffledBatches(train_blocks, batch_size, rank, world, cfg.seed)
    return train, held_out, {"train_blocks": len(train_blocks), "eval_blocks": len(held_out),
                             "train_tokens": len(train_blocks) * d.block_size}


def _first_eval_blocks(cfg: PretrainConfig, tokenizer, limit: int) -> text.PackedBlocks:
    """Held-out blocks from the start of a streamed corpus: the same `is_held_out` split the training
    stream skips, read only until `limit` blocks are found."""
    d = cfg.data
    ids, labels = [], []
    for index, (block_ids, block_labels) in enumerate(
            text.packed_blocks(d.train, tokenizer, d.block_size, d.text_field)):
        if text.is_held_out(index, d.eval_fraction, cfg.seed):
            ids.append(block_ids)
            labels.append(block_labels)
            if len(ids) >= limit:
                break
    if not ids:
        raise sources.DataError(f"data.train={d.train!r} gave no held-out block with data.eval_fraction="
                         f"{d.eval_fraction}; raise it or set data.eval")
    return text.PackedBlocks(torch.tensor(ids), torch.tensor(labels))


def prepare_model(cfg: PretrainConfig, tokenizer, compute: str = "fp32"):
    """The model to train, its weights in `model.dtype` for the run's compute precision `compute`."""
    m = cfg.model
    dtype = causal_lm.weight_dtype(m.dtype, compute, frozen=False)
    if m.name_or_path:
        if m.preset:
            log.info(f"pretrain: continuing pretraining of {m.name_or_path} (model.preset is not used)")
        model = causal_lm.load_causal_lm(m.name_or_path, m.gguf_file, m.trust_remote_code, dtype=dtype,
                                         attn_implementation=m.attn_implementation)
    else:
        model = causal_lm.build_from_preset(m.preset, tokenizer, cfg.data.block_size, cfg.seed, dtype,
                                            m.attn_implementation)
    causal_lm.check_vocab(model, tokenizer)
    return model


@owns_output_dir
def pretrain(cfg: PretrainConfig, callbacks=()) -> LoopResult | None:
    """Train (or resume) a causal LM as configured; returns None when the run directory was already finished."""
    run = open_run(cfg, "pretrain", callbacks)
    if run.finished:
        return None
    acc = run.accelerator
    if not cfg.model.name_or_path:  # before a tokenizer is trained for it
        causal_lm.preset_config(cfg.model.preset, cfg.model.vocab_size, cfg.data.block_size)
    tokenizer = prepare_tokenizer(cfg, run)
    batches, held_out, data_facts = prepare_data(cfg, tokenizer, acc.process_index, acc.num_processes)
    model = prepare_model(cfg, tokenizer, compute_precision(acc))
    kernels = apply_kernels(model, cfg.kernels, acc.device)
    train = cfg.train

    def held_out_batches():
        return batching.eval_batches(held_out, train.batch_size, acc.process_index, acc.num_processes)

    parent, curation = _parent(cfg)
    record = {"inputs": _inputs(cfg), "parent": parent,
              "parents": {"data" if curation else "model": parent},
              "data": {**data_facts, "tokenizer": _tokenizer_facts(cfg, tokenizer), **curation},
              "kernels": kernels.summary()}
    return run_supervised_stage(run, model, tokenizer, batches, lm_objective(kernels.plan), cfg.data.block_size,
                                held_out_batches, record)


def _parent(cfg: PretrainConfig) -> tuple[dict | None, dict]:
    """The run this one continues: the model's, or for a model trained from scratch the curation run that
    wrote its data, whose counts then travel into this record (and so into the model card)."""
    if cfg.model.name_or_path:
        return find_parent(cfg.model.name_or_path), {}
    link = find_parent(cfg.data.train)
    if not link.get("run_dir"):
        return None, {}
    data = json.loads((Path(link["run_dir"]) / "record.json").read_text()).get("data", {})
    return link, ({"curation": data} if link.get("stage") == "curate" else {})


def _inputs(cfg: PretrainConfig) -> dict:
    inputs = {"train": sources.describe_source(cfg.data.train)}
    if cfg.data.eval:
        inputs["eval"] = sources.describe_source(cfg.data.eval)
    return inputs


def _tokenizer_facts(cfg: PretrainConfig, tokenizer) -> dict:
    origin = cfg.model.tokenizer or cfg.model.name_or_path
    how = f"loaded from {origin}" if origin else f"byte-level BPE trained on {cfg.data.train}"
    return {"source": how, "vocab_size": len(tokenizer), "saved_in": str(Path(cfg.output_dir) / "model")}
