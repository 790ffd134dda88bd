"""Reward modelling: rankings -> Bradley-Terry loss over every pair of each ranking -> a scalar score head.

The model is an `AutoModelForSequenceClassification` with one label on any causal-LM backbone. The score
is read at the last real token (found from the attention mask, so left and right padding agree). After
training, the mean and standard deviation of the scores on the held-out responses are stored in the
model's config (`reward_mean`, `reward_std`) so PPO can normalise rewards.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForSequenceClassification

from llmstack.config import RewardConfig
from llmstack.data import batching, sources
from llmstack.data.agreement import annotator_statistics, format_table
from llmstack.data.chat import ensure_chat_template
from llmstack.data.preference import IMPORTERS, PAD_SEGMENT, build_preference_rows, shared_prompt_mask
from llmstack.data.text import is_held_out
from llmstack.kernels import apply_head
from llmstack.losses import ranking_loss_sum
from llmstack.models import causal_lm
from llmstack.trainers.base import log
from llmstack.trainers.run import open_run
from llmstack.trainers.stage import run_supervised_stage
from llmstack.trainers.supervised import LoopResult, SupervisedObjective, to_device
from llmstack.tracking.record import find_parent

CALIBRATION_BINS = 10


def sequence_scores(model, input_ids_RT: torch.Tensor, attention_mask_RT: torch.Tensor) -> torch.Tensor:
    """[R] scores at each sequence's last real token. Goes through the (possibly distributed) model's own
    forward so DDP/FSDP hooks run, then applies the score head to the chosen positions only."""
    # positions count real tokens only, so a left-padded sequence is seen exactly as it is alone
    positions_RT = (attention_mask_RT.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids_RT, attention_mask=attention_mask_RT, position_ids=positions_RT,
                output_hidden_states=True)
    hidden = out.hidden_states[-1]
    columns = torch.arange(input_ids_RT.shape[1], device=input_ids_RT.device)
    last = (columns * attention_mask_RT).argmax(-1)
    head = getattr(model, "module", model).score
    return apply_head(head, hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def group_scores(model, batch: dict) -> torch.Tensor:
    """[N, K] scores of every response of every ranking, from one forward pass over the shared-prompt rows
    (`PreferenceRows`): each score is the one `sequence_scores` gives prompt + response alone (padding
    responses get 0)."""
    mask = shared_prompt_mask(batch["segment_ids"])
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                output_hidden_states=True)
    hidden_NTH = out.hidden_states[-1]
    rows = torch.arange(hidden_NTH.shape[0], device=hidden_NTH.device)[:, None]
    head = getattr(model, "module", model).score
    scores = apply_head(head, hidden_NTH[rows, batch["last_index"]]).squeeze(-1).float()
    return scores.masked_fill(batch["ranks"] < 0, 0.0)


def reward_objective(use_margins: bool, center_coef: float) -> SupervisedObjective:
    def loss_sum(model, batch: dict) -> torch.Tensor:
        margins = batch["margins"] if use_margins else None
        return ranking_loss_sum(group_scores(model, batch), batch["ranks"], margins, center_coef)

    return SupervisedObjective(loss_sum=loss_sum, count_targets=lambda b: len(b["ranks"]),
                               count_tokens=lambda b: int((b["segment_ids"] != PAD_SEGMENT).sum()))


def load_reward_model(name_or_path: str, tokenizer, seed: int, trust_remote_code: bool = False):
    """A one-label sequence classifier; a new score head starts small, N(0, 1/(hidden+1)) as in Ziegler et
    al. 2019, so early rewards are near zero and the backbone's features dominate the first updates."""
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=torch.float32,
                                                               trust_remote_code=trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if not any(a.endswith("ForSequenceClassification") for a in getattr(model.config, "architectures", None) or []):
        generator = torch.Generator().manual_seed(seed)
        hidden = model.score.weight.shape[1]
        with torch.no_grad():
            model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) / math.sqrt(hidden + 1))
    return model


@torch.no_grad()
def preference_metrics(acc, model, batches) -> dict:
    """Held-out pairwise accuracy (ties excluded), mean reward margin, and expected calibration error of
    sigmoid(s_i - s_j) as the probability that i is preferred."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3 + 3 * CALIBRATION_BINS, device=acc.device, dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, acc.device)
        scores, ranks = group_scores(model, batch), batch["ranks"]
        valid = ranks >= 0
        better = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
        diff = (scores[:, :, None] - scores[:, None, :])[better]
        sums[0] += len(diff)
        sums[1] += (diff > 0).sum()
        sums[2] += diff.sum()
        # calibration over both orientations of each pair, so confidence spans [0, 1]
        prob = torch.cat([torch.sigmoid(diff), torch.sigmoid(-diff)])
        outcome = torch.cat([torch.ones_like(diff), torch.zeros_like(diff)])
        bins = (prob * CALIBRATION_BINS).long().clamp(max=CALIBRATION_BINS - 1)
        for b in range(CALIBRATION_BINS):
            sums[3 + 3 * b] += (bins == b).sum()
            sums[4 + 3 * b] += prob[bins == b].sum()
            sums[5 + 3 * b] += outcome[bins == b].sum()
    model.train(was_training)
    sums = acc.reduce(sums, "sum")
    if sums[0] == 0:
        return {}
    counts, conf, hits = sums[3::3], sums[4::3], sums[5::3]
    ece = float(((conf - hits).abs()).sum() / counts.sum())
    return {"eval_accuracy": float(sums[1] / sums[0]), "eval_margin": float(sums[2] / sums[0]),
            "eval_ece": ece, "eval_pairs": int(sums[0])}


@torch.no_grad()
def score_statistics(acc, model, batches) -> tuple[float, float]:
    """Mean and standard deviation of the scores of every response in `batches` (all processes)."""
    model.eval()
    sums = torch.zeros(3, device=acc.device, dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, acc.device)
        scores = group_scores(model, batch)[batch["ranks"] >= 0].double()
        sums += torch.stack([torch.tensor(float(len(scores)), device=acc.device, dtype=torch.float64),
                             scores.sum(), (scores ** 2).sum()])
    sums = acc.reduce(sums, "sum")
    mean = float(sums[1] / sums[0])
    return mean, math.sqrt(max(float(sums[2] / sums[0]) - mean ** 2, 0.0))


def load_groups(cfg: RewardConfig) -> tuple[list, list]:
    read = IMPORTERS[cfg.data.format]
    groups = list(read(cfg.data.train))
    if cfg.data.eval:
        return groups, list(read(cfg.data.eval))
    train, held_out = [], []
    for index, group in enumerate(groups):
        (held_out if is_held_out(index, cfg.data.eval_fraction, cfg.seed) else train).append(group)
    return train, held_out


def reward(cfg: RewardConfig) -> LoopResult | None:
    """Train (or resume) a reward model as configured; returns None when the run was already finished."""
    run = open_run(cfg, "reward")
    if run.finished:
        return None
    acc, d, m = run.accelerator, cfg.data, cfg.model
    tokenizer = causal_lm.load_tokenizer(m.tokenizer or m.name_or_path, None, m.trust_remote_code)
    ensure_chat_template(tokenizer)
    train_groups, held_groups = load_groups(cfg)
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
    model = load_reward_model(m.name_or_path, tokenizer, cfg.seed, m.trust_remote_code)
    objective = reward_objective(cfg.use_margins, cfg.center_coef)

    def held_out():
        return batching.eval_batches(held_rows, cfg.train.batch_size, acc.process_index, acc.num_processes)

    def metrics(model, step: int) -> dict:
        return preference_metrics(acc, model, held_out()) if held_rows else {}

    def store_normalisation(model) -> dict:
        reference = held_out() if held_rows else batching.eval_batches(
            train_rows, cfg.train.batch_size, acc.process_index, acc.num_processes)
        mean, std = score_statistics(acc, model, reference)
        model.config.reward_mean, model.config.reward_std = mean, std
        return {"reward_mean": mean, "reward_std": std}

    record = {"inputs": {"train": sources.describe_source(d.train),
                         **({"eval": sources.describe_source(d.eval)} if d.eval else {})},
              "parent": find_parent(m.name_or_path),
              "data": {"train": train_rows.stats, "held_out": held_rows.stats if held_rows else None,
                       "format": d.format},
              "annotators": agreement}
    return run_supervised_stage(run, model, tokenizer, batches, objective, d.max_length,
                                held_out if held_rows else None, record, after_eval=metrics,
                                before_save=store_normalisation)
