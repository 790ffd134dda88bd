"""Supervised fine-tuning: conversations -> answer-only labels -> packed rows -> the shared loop.

Packed rows hold several conversations; `position_ids` restart for each and a block-diagonal causal mask
keeps attention inside each, so packing changes the speed, not the objective. With LoRA only the adapters
train (peft, `llmstack.models.lora`), and the result is saved merged into the base weights or as adapters alone.
"""

from __future__ import annotations

import json

import torch

from llmstack.config import SFTConfig
from llmstack.data import batching, chat, sources
from llmstack.data.formats import prompt_ids
from llmstack.data.text import is_held_out
from llmstack.kernels import KernelPlan
from llmstack.losses import count_targets
from llmstack.models import causal_lm
from llmstack.models.engines.hf import greedy_reply
from llmstack.models.forward import lm_loss_sum
from llmstack.models.fused import apply_kernels
from llmstack.models.lora import prepare_for_training
from llmstack.trainers.base import compute_precision, log
from llmstack.trainers.loop import LoopResult
from llmstack.trainers.run import open_run
from llmstack.trainers.stage import run_supervised_stage
from llmstack.trainers.supervised import SupervisedObjective
from llmstack.tracking.record import find_parent
from llmstack.tracking.run_dir import owns_output_dir


def _sft_loss_sum(model, batch: dict, kernels: KernelPlan) -> torch.Tensor:
    # Flash-attention kernels take no dense mask: transformers finds the example boundaries from the
    # restarting position ids and runs the varlen kernel (CUDA only; the mask path is the tested one).
    mask = None if causal_lm.uses_varlen_attention(model) else chat.block_causal_mask(batch["segment_ids"])
    return lm_loss_sum(model, batch["labels"], kernels, input_ids=batch["input_ids"],
                       position_ids=batch["position_ids"], attention_mask=mask)


def sft_objective(kernels: KernelPlan) -> SupervisedObjective:
    return SupervisedObjective(loss_sum=lambda model, batch: _sft_loss_sum(model, batch, kernels),
                               count_targets=lambda b: count_targets(b["labels"]), perplexity=True)


def load_conversations(cfg: SFTConfig) -> tuple[list, list]:
    d = cfg.data
    fields = chat.ChatFields(d.messages_field, d.prompt_field, d.completion_field)
    conversations = _some(chat.iter_examples(d.train, fields), d.train)
    if d.eval:
        return conversations, _some(chat.iter_examples(d.eval, fields), d.eval)
    train, held_out = [], []
    for index, conversation in enumerate(conversations):
        (held_out if is_held_out(index, d.eval_fraction, cfg.seed) else train).append(conversation)
    return train, held_out


def _some(examples, spec: str) -> list:
    found = list(examples)
    if not found:
        raise sources.DataError(f"{spec}: holds no SFT examples; give {{'messages'}}, {{'text'}} or "
                                "{'prompt', 'completion'} records")
    return found


def sample_writer(run, tokenizer, conversations: list, n: int, max_new_tokens: int):
    """Greedy answers to the first `n` held-out prompts at every evaluation, appended to samples.jsonl."""
    prompts = chat.sample_prompts(conversations, n)

    def write(model, step: int) -> dict:
        if not prompts or not run.accelerator.is_main_process:
            return {}
        with open(run.dir / "samples.jsonl", "a") as fh:
            for messages, reference in prompts:
                answer = greedy_reply(model, tokenizer, prompt_ids(tokenizer, messages), max_new_tokens)
                fh.write(json.dumps({"step": step, "prompt": messages, "reference": reference,
                                     "generated": answer}) + "\n")
        return {}

    return write


@owns_output_dir
def sft(cfg: SFTConfig, callbacks=()) -> LoopResult | None:
    """Fine-tune (or resume) as configured; returns None when the run directory was already finished."""
    run = open_run(cfg, "sft", callbacks)
    if run.finished:
        return None
    acc, d, m = run.accelerator, cfg.data, cfg.model
    tokenizer = causal_lm.load_tokenizer(m.tokenizer or m.name_or_path, None if m.tokenizer else m.gguf_file,
                                         m.trust_remote_code)
    template_added = chat.ensure_chat_template(tokenizer)
    if template_added:
        log.info("sft: the tokenizer has no chat template; using llmstack's default (saved with the model)")
    train_conv, held_conv = load_conversations(cfg)
    encode = lambda convs: [chat.tokenize_example(tokenizer, c) for c in convs]  # noqa: E731
    train_rows = chat.build_rows(encode(train_conv), d.max_length, tokenizer.pad_token_id, d.packing, d.overlong)
    held_rows = chat.build_rows(encode(held_conv), d.max_length, tokenizer.pad_token_id, d.packing, d.overlong) \
        if held_conv else None
    log.info(f"sft: {train_rows.stats['examples']} training conversations in {len(train_rows)} rows "
             f"(fill {train_rows.stats['fill']:.0%}; {train_rows.stats['dropped_overlong']} dropped, "
             f"{train_rows.stats['truncated']} truncated at {d.max_length} tokens)")
    batches = batching.ShuffledBatches(train_rows, cfg.train.batch_size, acc.process_index, acc.num_processes,
                                       cfg.seed)
    model = causal_lm.load_causal_lm(m.name_or_path, m.gguf_file, m.trust_remote_code, cfg.lora.load_in_4bit,
                                     causal_lm.weight_dtype(m.dtype, compute_precision(acc), frozen=False),
                                     m.attn_implementation)
    causal_lm.check_vocab(model, tokenizer)
    model = prepare_for_training(model, cfg.lora, cfg.gradient_checkpointing)
    kernels = apply_kernels(model, cfg.kernels, acc.device)

    def held_out():
        return batching.eval_batches(held_rows, cfg.train.batch_size, acc.process_index, acc.num_processes)

    record = {"inputs": {"train": sources.describe_source(d.train),
                         **({"eval": sources.describe_source(d.eval)} if d.eval else {})},
              "parent": find_parent(m.name_or_path), "parents": {"model": find_parent(m.name_or_path)},
              "data": {"train": train_rows.stats, "held_out": held_rows.stats if held_rows else None,
                       "chat_template": "llmstack default" if template_added else "the tokenizer's own"},
              "kernels": kernels.summary()}
    samples = sample_writer(run, tokenizer, held_conv, cfg.sample_prompts, cfg.sample_max_new_tokens)
    return run_supervised_stage(run, model, tokenizer, batches, sft_objective(kernels.plan), d.max_length,
                                held_out if held_rows else None, record, after_eval=samples,
                                merge_adapters=cfg.lora.enabled and cfg.lora.merge)
