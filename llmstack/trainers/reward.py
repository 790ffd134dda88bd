"""Reward modelling: rankings -> Bradley-Terry loss over every pair of each ranking -> a scalar score head.

The model is a one-label `AutoModelForSequenceClassification` on any causal-LM backbone
(`llmstack.models.reward_model`). A ranking's responses share one row that holds their prompt once
(`llmstack.data.preference.PreferenceRows`), so the prompt is computed once for all of them. After training,
the mean and standard deviation of the scores on the held-out responses are stored in the model's config
(`reward_mean`, `reward_std`) so RL can normalise rewards. With LoRA the adapters go on the backbone and the
score head trains whole (`llmstack.models.lora.prepare_for_training`).
"""

from __future__ import annotations

import torch

from llmstack.config import RewardConfig
from llmstack.data import batching, sources
from llmstack.data.agreement import annotator_statistics, format_table
from llmstack.data.chat import ensure_chat_template
from llmstack.data.label_studio import annotation_facts
from llmstack.data.preference import PAD_SEGMENT, build_preference_rows, load_groups, shared_prompt_mask
from llmstack.evaluation.heldout import preference_metrics, score_statistics
from llmstack.losses import ranking_loss_sum
from llmstack.models import causal_lm
from llmstack.models.lora import prepare_for_training
from llmstack.models.reward_model import load_reward_model, scores_at
from llmstack.trainers.base import compute_precision, log
from llmstack.trainers.loop import LoopResult
from llmstack.trainers.run import open_run
from llmstack.trainers.stage import run_supervised_stage
from llmstack.trainers.supervised import SupervisedObjective
from llmstack.tracking.record import find_parent
from llmstack.tracking.run_dir import owns_output_dir


def group_scores(model, batch: dict) -> torch.Tensor:
    """[N, K] scores of every response of every ranking, from one forward pass over the shared-prompt rows:
    each score is the one `sequence_scores` gives prompt + response alone (padding responses get 0)."""
    scores_NK = scores_at(model, batch["input_ids"], shared_prompt_mask(batch["segment_ids"]),
                          batch["position_ids"], batch["last_index"])
    return scores_NK.masked_fill(batch["ranks"] < 0, 0.0)


def reward_objective(use_margins: bool, center_coef: float) -> SupervisedObjective:
    def loss_sum(model, batch: dict) -> torch.Tensor:
        margins = batch["margins"] if use_margins else None
        return ranking_loss_sum(group_scores(model, batch), batch["ranks"], margins, center_coef)

    return SupervisedObjective(loss_sum=loss_sum, count_targets=lambda b: len(b["ranks"]),
                               count_tokens=lambda b: int((b["segment_ids"] != PAD_SEGMENT).sum()))


@owns_output_dir
def reward(cfg: RewardConfig, callbacks=()) -> LoopResult | None:
    """Train (or resume) a reward model as configured; returns None when the run was already finished."""
    run = open_run(cfg, "reward", callbacks)
    if run.finished:
        return None
    acc, d, m = run.accelerator, cfg.data, cfg.model
    tokenizer = causal_lm.load_tokenizer(m.tokenizer or m.name_or_path, None, m.trust_remote_code)
    ensure_chat_template(tokenizer)
    train_groups, held_groups = load_groups(d.train, d.eval, d.format, d.eval_fraction, cfg.seed)
    agreement = annotator_statistics(train_groups + held_groups)
    if agreement["annotators"]:
        log.info("reward: annotators\n" + format_table(agreement))
    train_rows = build_preference_rows(train_groups, tokenizer, d.max_length)
    held_rows = build_preference_rows(held_groups, tokenizer, d.max_length) if held_groups else None
    log.info(f"reward: {len(train_rows)} training rankings, {len(held_rows) if held_rows else 0} held out "
             f"({train_rows.stats['truncated_responses']} responses cut to {d.max_length} tokens; each prompt "
             f"computed once for all its responses, {train_rows.stats['sharing_factor']:.2f}x fewer tokens)")
    batches = batching.ShuffledBatches(train_rows, cfg.train.batch_size, acc.process_index, acc.num_processes,
                                       cfg.seed)
    model = load_reward_model(m.name_or_path, tokenizer, cfg.seed, m.trust_remote_code,
                              causal_lm.weight_dtype(m.dtype, compute_precision(acc), frozen=False),
                              m.attn_implementation, cfg.lora.load_in_4bit)
    model = prepare_for_training(model, cfg.lora, cfg.gradient_checkpointing)
    objective = reward_objective(cfg.use_margins, cfg.center_coef)

    def held_out():
        return batching.eval_batches(held_rows, cfg.train.batch_size, acc.process_index, acc.num_processes)

    def metrics(model, step: int) -> dict:
        return preference_metrics(acc, model, held_out(), group_scores) if held_rows else {}

    def store_normalisation(model) -> dict:
        reference = held_out() if held_rows else batching.eval_batches(
            train_rows, cfg.train.batch_size, acc.process_index, acc.num_processes)
        mean, std = score_statistics(acc, model, reference, group_scores)
        model.config.reward_mean, model.config.reward_std = mean, std
        return {"reward_mean": mean, "reward_std": std}

    record = {"inputs": {"train": sources.describe_source(d.train),
                         **({"eval": sources.describe_source(d.eval)} if d.eval else {})},
              "parent": find_parent(m.name_or_path), "parents": {"backbone": find_parent(m.name_or_path)},
              "data": {"train": train_rows.stats, "held_out": held_rows.stats if held_rows else None,
                       "format": d.format},
              "annotators": agreement, "annotation": annotation_facts(d.train)}
    return run_supervised_stage(run, model, tokenizer, batches, objective, d.max_length,
                                held_out if held_rows else None, record, after_eval=metrics,
                                merge_adapters=cfg.lora.enabled and cfg.lora.merge, before_save=store_normalisation)
