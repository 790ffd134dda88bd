"""Causal-LM pretraining: raw text -> tokenizer -> packed blocks -> next-token loss, on the shared loop."""

from __future__ import annotations

from pathlib import Path

import torch

from llmstack.config import PretrainConfig
from llmstack.data import batching, sources, text
from llmstack.losses import causal_lm_loss_sum, count_targets
from llmstack.models import causal_lm
from llmstack.trainers.base import NonFiniteLossError, batch_arithmetic, build_optimizer, build_scheduler, log
from llmstack.trainers.run import Run, close_run, open_run, resume
from llmstack.trainers.supervised import (LoopResult, LoopState, SupervisedObjective, evaluate_loss,
                                          restore_loop_state, train_supervised)
from llmstack.tracking.mfu import peak_flops, transformer_flops_per_token
from llmstack.tracking.record import find_parent


def _lm_loss_sum(model, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    return causal_lm_loss_sum(logits, batch["labels"])


LM_OBJECTIVE = SupervisedObjective(loss_sum=_lm_loss_sum, count_targets=lambda b: count_targets(b["labels"]),
                                   perplexity=True)


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
    """Held-out blocks from the start of a streamed corpus: the same `is_eval_block` split the training
    stream skips, read only until `limit` blocks are found."""
    d = cfg.data
    docs = text.tokenize_documents(tokenizer, sources.iter_documents(d.train, d.text_field))
    ids, labels = [], []
    for index, (block_ids, block_labels) in enumerate(
            text.pack_blocks(docs, d.block_size, tokenizer.eos_token_id, tokenizer.pad_token_id)):
        if text.is_eval_block(index, d.eval_fraction, cfg.seed):
            ids.append(block_ids)
            labels.append(block_labels)
            if len(ids) >= limit:
                break
    if not ids:
        raise ValueError(f"data.train={d.train!r} gave no held-out block with data.eval_fraction="
                         f"{d.eval_fraction}; raise it or set data.eval")
    return text.PackedBlocks(torch.tensor(ids), torch.tensor(labels))


def prepare_model(cfg: PretrainConfig, tokenizer):
    m = cfg.model
    if m.name_or_path:
        if m.preset:
            log.info(f"pretrain: continuing pretraining of {m.name_or_path} (model.preset is not used)")
        model = causal_lm.load_causal_lm(m.name_or_path, m.gguf_file, m.trust_remote_code)
    else:
        model = causal_lm.build_from_preset(m.preset, tokenizer, cfg.data.block_size, cfg.seed)
    causal_lm.check_vocab(model, tokenizer)
    return model


def pretrain(cfg: PretrainConfig) -> LoopResult | None:
    """Train (or resume) a causal LM as configured; returns None when the run directory was already finished."""
    run = open_run(cfg, "pretrain")
    if run.finished:
        return None
    acc, train = run.accelerator, cfg.train
    tokenizer = prepare_tokenizer(cfg, run)
    batches, held_out, data_facts = prepare_data(cfg, tokenizer, acc.process_index, acc.num_processes)
    model = prepare_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"pretrain: {type(model).__name__} with {n_params / 1e6:.2f}M parameters, "
             f"vocabulary {len(tokenizer)}")
    log.info(f"pretrain: {batch_arithmetic(train.batch_size, train.grad_accum, acc.num_processes, cfg.data.block_size)}")
    mc = model.config
    flops_per_token = transformer_flops_per_token(causal_lm.matmul_params(model), mc.num_hidden_layers,
                                                  mc.hidden_size, cfg.data.block_size)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[train.precision]
    peak, peak_source = peak_flops(acc.device, dtype, train.peak_tflops * 1e12 if train.peak_tflops else None)
    log.info(f"pretrain: MFU against {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")

    optimizer = build_optimizer(model, train.lr, train.adam_betas, train.weight_decay)
    scheduler = build_scheduler(optimizer, train.schedule, train.warmup_steps, train.max_steps, train.min_lr_ratio)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)

    def evaluate() -> dict:
        held_batches = batching.eval_batches(held_out, train.batch_size, acc.process_index, acc.num_processes)
        return evaluate_loss(acc, model, held_batches, LM_OBJECTIVE, train.eval_batches)

    state = resume(run, batches, restore_loop_state)
    if state is None:
        state = LoopState(initial_eval=evaluate() if train.eval_every else {})
        log.info(f"pretrain: untrained model held-out {_fmt(state.initial_eval)}")
    if run.record is not None:
        run.record.update(inputs=_inputs(cfg), parent=find_parent(cfg.model.name_or_path),
                          data={**data_facts, "tokenizer": _tokenizer_facts(cfg, tokenizer)},
                          model={"class": type(acc.unwrap_model(model)).__name__, "parameters": n_params},
                          resumed_from_step=state.step or None,
                          compute={"world_size": acc.num_processes, "device": str(acc.device),
                                   "peak_flops_per_device": peak, "peak_source": peak_source})
        run.record.save()
    try:
        result = train_supervised(acc, model, optimizer, scheduler, batches, LM_OBJECTIVE, train, state,
                                  run.checkpointer, run.metrics, evaluate, flops_per_token, peak)
    except NonFiniteLossError as err:
        last = run.checkpointer.latest()
        where = f"the last good checkpoint {last} is intact" if last else "no checkpoint had been written yet"
        if run.record is not None:
            run.record.finish(f"failed: {err}")
        raise NonFiniteLossError(f"{err}. Stopped: {where}. Lower train.lr, raise train.warmup_steps or use "
                                 f"train.precision=fp32, then re-run the same command to resume.") from err
    close_run(run, model, tokenizer, result.status, _summary(result.state))
    result.model = acc.unwrap_model(model)
    if result.status == "finished":
        log.info(f"pretrain: held-out {_fmt(state.initial_eval)} before, {_fmt(state.last_eval)} after")
    return result


def _fmt(ev: dict) -> str:
    return f"loss {ev['eval_loss']:.4f} / perplexity {ev['eval_ppl']:.2f}" if ev else "(no held-out data)"


def _summary(state: LoopState) -> dict:
    out = {"steps": state.step, "tokens_seen": state.tokens_seen, "train_loss": state.last_loss}
    out.update({f"initial_{k}": v for k, v in state.initial_eval.items()})
    out.update({f"final_{k}": v for k, v in state.last_eval.items()})
    return out


def _inputs(cfg: PretrainConfig) -> dict:
    inputs = {"train": sources.describe_source(cfg.data.train)}
    if cfg.data.eval:
        inputs["eval"] = sources.describe_source(cfg.data.eval)
    return inputs


def _tokenizer_facts(cfg: PretrainConfig, tokenizer) -> dict:
    origin = cfg.model.tokenizer or cfg.model.name_or_path
    how = f"loaded from {origin}" if origin else f"byte-level BPE trained on {cfg.data.train}"
    return {"source": how, "vocab_size": len(tokenizer), "saved_in": str(Path(cfg.output_dir) / "model")}
