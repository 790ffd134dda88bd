"""Held-out measures the training loops take at every evaluation: the token-mean loss (and perplexity) of a
supervised objective, and a reward model's pairwise accuracy, margin and calibration on held-out rankings.

Every measure is reduced over all processes: each process passes its own share of the held-out batches.

Shape legend: N rankings, K responses per ranking.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from llmstack.data.batching import to_device

CALIBRATION_BINS = 10


@torch.no_grad()
def heldout_loss(acc, model, batches: Iterable[dict], loss_sum: Callable, count_targets: Callable,
                 max_batches: int, perplexity: bool) -> dict:
    """Token-mean held-out loss over every process's share of `batches` (at most `max_batches` each; 0: all),
    and its perplexity when the loss is a next-token cross-entropy."""
    model.eval()
    total = torch.zeros((), device=acc.device, dtype=torch.float64)
    count = torch.zeros((), device=acc.device, dtype=torch.float64)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = to_device(batch, acc.device)
        with acc.autocast():
            total += loss_sum(model, batch).double()
        count += count_targets(batch)
    model.train()
    total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
    if count.item() == 0:
        return {}
    loss = (total / count).item()
    return {"eval_loss": loss, **({"eval_ppl": math.exp(min(loss, 80.0))} if perplexity else {})}


@torch.no_grad()
def preference_metrics(acc, model, batches: Iterable[dict], scores: Callable) -> dict:
    """Held-out pairwise accuracy (ties excluded), mean reward margin, and expected calibration error of
    sigmoid(s_i - s_j) as the probability that i is preferred. `scores(model, batch)` gives [N, K] scores
    of the batch's rankings, whose `ranks` [N, K] are 0 for the best, -1 for padding."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3 + 3 * CALIBRATION_BINS, device=acc.device, dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, acc.device)
        scores_NK, ranks_NK = scores(model, batch), batch["ranks"]
        valid = ranks_NK >= 0
        better = valid[:, :, None] & valid[:, None, :] & (ranks_NK[:, :, None] < ranks_NK[:, None, :])
        diff = (scores_NK[:, :, None] - scores_NK[:, None, :])[better]
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
def score_statistics(acc, model, batches: Iterable[dict], scores: Callable) -> tuple[float, float]:
    """Mean and standard deviation of the scores of every response in `batches` (all processes)."""
    model.eval()
    sums = torch.zeros(3, device=acc.device, dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, acc.device)
        values = scores(model, batch)[batch["ranks"] >= 0].double()
        sums += torch.stack([torch.tensor(float(len(values)), device=acc.device, dtype=torch.float64),
                             values.sum(), (values ** 2).sum()])
    sums = acc.reduce(sums, "sum")
    mean = float(sums[1] / sums[0])
    return mean, math.sqrt(max(float(sums[2] / sums[0]) - mean ** 2, 0.0))
