"""The phases of an RL step, as plain functions over small settings objects: `generate` (an engine answers a
batch of prompts), `score` (log-probabilities under the policy and the reference, values, reward sources,
per-token rewards, advantages) and `update` (epochs of clipped policy and value updates over minibatches of
the rollout). PPO (`trainers/ppo.py`) is setup plus a loop over these.

Loss aggregation: every token-level loss is summed over the minibatch's response tokens and divided by the
number of response tokens in that minibatch across all processes (a global token mean).

Shape legend: B rollout sequences on this process, R response tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

from llmstack.kernels import KernelPlan
from llmstack.losses import count_targets, ppo_policy_loss_tokens, value_loss_sum
from llmstack.models.forward import lm_loss_sum, token_logprobs, token_values
from llmstack.models.lora import adapters_disabled
from llmstack.rl.advantages import masked_mean_var
from llmstack.rl.aggregation import aggregate, global_counts
from llmstack.rl.estimators import ESTIMATORS, EstimatorSettings
from llmstack.rl.experience import Experience
from llmstack.rl.kl import KL_ESTIMATORS
from llmstack.rl.rewards import RewardInputs, RewardNormaliser, combined
from llmstack.rl.rollout import RolloutEngine, rollout
from llmstack.rl.sampling import row_seeds
from llmstack.trainers import distributed
from llmstack.trainers.base import NonFiniteLossError

# A metric read off the decoded rollout and logged beside the losses, e.g. the built-in task's gold reward:
# (prompts, completions) -> one value per response.
MetricFn = Callable[[list, list[str]], list[float]]


@dataclass
class RLModels:
    """The roles of an RL run. `reference` None: the policy with its adapters disabled (LoRA). `value` None:
    no critic."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    value: torch.nn.Module | None


@dataclass(frozen=True)
class ScoreSettings:
    estimator: str  # the advantage estimator's name in llmstack.rl.estimators.ESTIMATORS
    temperature: float  # the sampling temperature, at which log-probabilities are recomputed
    kl_estimator: str  # k1 | k2 | k3 (llmstack.rl.kl)
    kl_in_reward: bool  # the KL penalty goes into the reward (else it is a loss term)
    missing_eos_penalty: float | None
    reward_clip: float | None
    gamma: float
    lam: float
    whiten_advantages: bool
    group_size: int = 1  # answers per prompt, consecutive rows
    scale_by_std: bool = True
    old_logp_pass: bool = True  # score the rollout under the policy here (else the update's pass supplies it)


@dataclass(frozen=True)
class UpdateSettings:
    epochs: int
    minibatch_size: int
    clip: float
    value_clip: float
    temperature: float
    kl_estimator: str
    kl_in_loss: bool
    max_grad_norm: float
    seed: int
    ptx_coef: float = 0.0
    loss_aggregation: str = "token_mean"  # llmstack.rl.aggregation's modes
    max_new_tokens: int = 1  # the rollout's limit, Dr. GRPO's constant


def needs_old_logp_pass(epochs: int, minibatch_size: int, rollout_rows: int, kl_in_reward: bool) -> bool:
    """Whether the "old" (rollout-time) log-probabilities need a scoring pass of their own. They do not when
    the update takes exactly one optimiser step per rollout (one epoch, one minibatch of all `rollout_rows`
    rows on this process) and the advantages do not read the KL: then the update's own pass runs on the
    rollout's weights, and its detached log-probabilities are, by the one-road rule of
    `llmstack.models.forward`, the numbers the scoring pass would compute, bit for bit. After a first
    optimiser step the policy has moved, and a KL in the reward is needed before the update starts."""
    return epochs > 1 or minibatch_size < rollout_rows or kl_in_reward


def generate(acc, engine: RolloutEngine, policy, prompts: dict, seed: int, step: int,
             group_size: int = 1) -> Experience:
    """Sample `group_size` responses per prompt (a group: consecutive rows), each from its own seed (run
    seed, step, sample id), so the rollout is the same on any number of processes. Under ZeRO-3 or FSDP the
    policy's parameters are gathered once for the whole rollout, not once per generated token."""
    prompt_ids = prompts["input_ids"].repeat_interleave(group_size, 0).to(acc.device)
    prompt_mask = prompts["attention_mask"].repeat_interleave(group_size, 0).to(acc.device)
    index = prompts["index"].repeat_interleave(group_size, 0)
    sample_ids = index * group_size + torch.arange(group_size).repeat(len(prompts["index"]))
    with distributed.full_model(acc, policy) as model:
        engine.load_weights(model)
        return rollout(engine, prompt_ids, prompt_mask, index, row_seeds(seed, step, sample_ids))


@torch.no_grad()
def score(acc, exp: Experience, models: RLModels, inputs: RewardInputs, sources: list, normaliser: RewardNormaliser,
          kl_coef: float, settings: ScoreSettings, kernels: KernelPlan) -> Experience:
    """Fill in everything the update needs: old and reference log-probabilities, values, scores, the per-token
    KL, and advantages and returns from the estimator. Every model runs under the run's autocast: the trained
    ones get it from `accelerator.prepare`, the frozen reference does not, and a reference computed in another
    precision than the policy reads precision noise as KL. Without `old_logp_pass` (`needs_old_logp_pass`),
    `exp.logp` and `exp.kl` stay None for `update` to fill in, and the estimator, which then does not read the
    KL, gets zeros."""
    s = settings
    with acc.autocast():
        if s.old_logp_pass:
            exp.logp, _ = token_logprobs(models.policy, *exp.response_args(), s.temperature, kernels)
        if models.reference is None:
            with adapters_disabled(models.policy):
                exp.ref_logp, _ = token_logprobs(models.policy, *exp.response_args(), s.temperature, kernels)
        else:
            exp.ref_logp, _ = token_logprobs(models.reference, *exp.response_args(), s.temperature, kernels)
        if models.value is not None:
            exp.values = token_values(models.value, *exp.response_args()) * exp.mask
        exp.raw_scores, exp.source_scores = combined(sources, inputs)
    scores = normaliser(exp.raw_scores.clone(), acc.gather)
    if s.missing_eos_penalty is not None:
        scores = scores - s.missing_eos_penalty * (~exp.ended).float()
    if s.reward_clip is not None:
        scores = scores.clamp(-s.reward_clip, s.reward_clip)
    exp.scores = scores
    if s.old_logp_pass:
        exp.kl = token_kl(exp, s.kl_estimator)
    estimate = EstimatorSettings(group_size=s.group_size, kl_coef=kl_coef if s.kl_in_reward else 0.0, gamma=s.gamma,
                                 lam=s.lam, scale_by_std=s.scale_by_std, whiten=s.whiten_advantages)
    kl_BR = exp.kl if exp.kl is not None else torch.zeros_like(exp.ref_logp)
    exp.advantages, exp.returns = ESTIMATORS[s.estimator].fn(scores, kl_BR, exp.mask, exp.values, estimate,
                                                             lambda t: acc.reduce(t, "sum"))
    return exp


def token_kl(exp: Experience, kl_estimator: str) -> torch.Tensor:
    """The per-token KL estimate [B, R] of the rollout's policy to the reference, 0 on padding."""
    return KL_ESTIMATORS[kl_estimator](exp.logp, exp.ref_logp) * exp.mask


def ptx_loss(acc, policy, ptx_batches, coef: float, kernels: KernelPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(the term to add to this process's policy loss: coef x the global token-mean next-token loss of one
    pretraining batch, scaled like the policy loss; that global loss, for the logs)."""
    batch = {k: v.to(acc.device) for k, v in next(ptx_batches).items()}
    n_tokens = acc.reduce(torch.tensor(float(count_targets(batch["labels"])), device=acc.device), "sum").clamp(min=1)
    with acc.autocast():  # as the supervised step computes the same loss
        loss_sum = lm_loss_sum(policy, batch["labels"], kernels, input_ids=batch["input_ids"])
    return coef * loss_sum * acc.num_processes / n_tokens, acc.reduce(loss_sum.detach().double(), "sum") / n_tokens


def _policy_loss(acc, exp: Experience, idx, models: RLModels, kl_coef: float, s: UpdateSettings,
                 kernels: KernelPlan):
    """(this process's share of the minibatch's global policy loss, its statistics, entropy [b, R], the
    pass's detached log-probabilities [b, R]). Without old log-probabilities (`exp.logp` None) this pass's
    own are the old ones."""
    mask = exp.mask[idx]
    logp, entropy = token_logprobs(models.policy, *exp.response_args(idx), s.temperature, kernels,
                                   with_entropy=True)
    old = exp.logp[idx] if exp.logp is not None else logp.detach()
    loss_bR, stats = ppo_policy_loss_tokens(logp, old, exp.advantages[idx], mask, s.clip)
    stats["logprob_gap"] = ((logp.detach() - old).abs() * mask).max()
    if s.kl_in_loss:
        loss_bR = loss_bR + kl_coef * KL_ESTIMATORS[s.kl_estimator](logp, exp.ref_logp[idx]) * mask
    counts = global_counts(mask, s.max_new_tokens, lambda t: acc.reduce(t, "sum"))
    return aggregate(loss_bR, mask, s.loss_aggregation, counts), stats, entropy, logp.detach()


def _value_share(acc, exp: Experience, idx, value, clip: float) -> torch.Tensor:
    """This process's share of the minibatch's global token-mean clipped value loss."""
    mask = exp.mask[idx]
    n_tokens = acc.reduce(mask.sum().double(), "sum").clamp(min=1)
    values = token_values(value, *exp.response_args(idx))
    return value_loss_sum(values, exp.values[idx], exp.returns[idx], mask, clip) / n_tokens


def update(acc, exp: Experience, models: RLModels, optimizers, schedulers, kl_coef: float, settings: UpdateSettings,
           step: int, kernels: KernelPlan, ptx_batches=None) -> dict:
    """`epochs` passes over the rollout in shuffled minibatches; with PPO-ptx each minibatch's policy gradient
    also gets `ptx_coef` times a pretraining batch's loss gradient; the value model (when there is one) takes
    a clipped value step on the same minibatch. Returns the step's update metrics, with `logprob_gap`: the
    largest |log p| difference between the first minibatch's update pass and the rollout's (`score`) pass over
    the same tokens and weights, over all processes (0 when both passes compute alike).

    A rollout scored without its old log-probabilities (`needs_old_logp_pass` False) must be one minibatch of
    one epoch; its first pass supplies them, and they are left in `exp.logp` (`exp.kl` is then `token_kl`'s
    to compute)."""
    s = settings
    from_update = exp.logp is None
    if from_update and (s.epochs != 1 or s.minibatch_size < len(exp)):
        raise ValueError(f"the rollout has no old log-probabilities, but the update takes {s.epochs} epoch(s) of "
                         f"minibatches of {s.minibatch_size} over {len(exp)} rows: score it with old_logp_pass")
    ptx_total, n_minibatches, gap = 0.0, 0, None
    order = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    losses = torch.zeros(2, device=acc.device, dtype=torch.float64)  # global values summed over minibatches
    local = torch.zeros(4, device=acc.device, dtype=torch.float64)  # clipped, approx KL, entropy, tokens
    trained = [m for m in (models.policy, models.value) if m is not None]
    for _ in range(s.epochs):
        for idx in torch.randperm(len(exp), generator=order).split(s.minibatch_size):
            idx = idx.to(acc.device)
            mask = exp.mask[idx]
            policy_share, stats, entropy, logp = _policy_loss(acc, exp, idx, models, kl_coef, s, kernels)
            if from_update:
                exp.logp = torch.empty_like(logp).index_copy_(0, idx, logp)
            if gap is None:
                gap = stats["logprob_gap"]
            objectives = [policy_share]
            if models.value is not None:
                objectives.append(_value_share(acc, exp, idx, models.value, s.value_clip))
            global_losses = acc.reduce(torch.stack([o.detach().double() for o in objectives]), "sum")
            if not torch.isfinite(global_losses).all():
                raise NonFiniteLossError(f"the RL losses are {global_losses.tolist()} at step {step + 1}; the "
                                         "update was not applied")
            if ptx_batches is not None:
                ptx_term, ptx_value = ptx_loss(acc, models.policy, ptx_batches, s.ptx_coef, kernels)
                objectives[0] = objectives[0] + ptx_term / acc.num_processes
                ptx_total += float(ptx_value)
            # DDP averages gradients over processes: each process's share x N gives the global loss's gradient.
            # One backward per model and minibatch: under DeepSpeed each backward is also that engine's step.
            for model, objective in zip(trained, objectives):
                distributed.backward(acc, model, objective * acc.num_processes)
            for model, optimizer in zip(trained, optimizers):
                if s.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses[:len(objectives)] += global_losses
            n_minibatches += 1
            local += torch.stack([stats["clipped_tokens"].double(), stats["approx_kl_sum"].double(),
                                  (entropy.detach().double() * mask).sum(), mask.sum().double()])
    for scheduler in schedulers:
        scheduler.step()
    local = acc.reduce(local, "sum")
    tokens = local[3].clamp(min=1)
    out = {"loss": float(losses[0] / n_minibatches), "clip_fraction": float(local[0] / tokens),
           "approx_kl": float(local[1] / tokens), "entropy": float(local[2] / tokens),
           "logprob_gap": float(acc.gather(gap.double().reshape(1)).max())}
    if models.value is not None:
        out["value_loss"] = float(losses[1] / n_minibatches)
    if ptx_batches is not None:
        out["ptx_loss"] = ptx_total / n_minibatches
    return out


def noise_floor(acc, exp: Experience, logprob_gap: float) -> dict:
    """Step-1 health of a run whose policy and reference are still the same weights: `health/kl_identical`,
    the mean over responses of sum_t |log pi - log ref| (what precision noise alone adds to a sequence's KL;
    exactly 0 when both are computed alike), and `health/logprob_gap`, the rollout-vs-update difference
    (`update`), also per token."""
    per_sequence = acc.gather(((exp.logp - exp.ref_logp).abs() * exp.mask).sum(-1).contiguous()).double()
    return {"health/kl_identical": float(per_sequence.mean()), "health/logprob_gap": logprob_gap}


def rollout_metrics(acc, exp: Experience, inputs: RewardInputs, kl_coef: float, metrics: dict[str, MetricFn]) -> dict:
    """The rollout's reward (and each reward source's, when there are several), KL, lengths and, with a critic,
    its explained variance, over all processes; and each extra metric's mean over the decoded responses."""
    gathered = lambda t: acc.gather(t.contiguous()).double()  # noqa: E731
    lengths = gathered(exp.mask.sum(-1))
    out = {"reward": float(gathered(exp.raw_scores).mean()), "reward_normalised": float(gathered(exp.scores).mean()),
           "kl": float(gathered(exp.kl.sum(-1)).mean()), "kl_coef": kl_coef,
           "response_length": float(lengths.mean()), "eos_rate": float(gathered(exp.ended.float()).mean())}
    if exp.source_scores and len(exp.source_scores) > 1:
        out.update({f"reward/{name}": float(gathered(values).mean()) for name, values in exp.source_scores.items()})
    if exp.values is not None:
        v_mean, v_var = masked_mean_var(exp.returns - exp.values, exp.mask, lambda t: acc.reduce(t, "sum"))
        r_mean, r_var = masked_mean_var(exp.returns, exp.mask, lambda t: acc.reduce(t, "sum"))
        out["explained_variance"] = float(1 - v_var / r_var.clamp(min=1e-8))
    for name, metric in metrics.items():
        values = torch.tensor(metric(inputs.prompts, inputs.completions), device=acc.device, dtype=torch.float64)
        out[name] = float(gathered(values).mean())
    return out


def write_samples(path, exp: Experience, inputs: RewardInputs, step: int, n: int) -> None:
    """The first `n` rows of this rollout appended to `path` (samples.jsonl): prompt, response, score, KL."""
    with open(path, "a") as fh:
        for i, text in enumerate(inputs.completions[:n]):
            fh.write(json.dumps({"step": step, "prompt": inputs.prompts[i], "response": text,
                                 "score": float(exp.raw_scores[i]), "kl": float(exp.kl[i].sum())}) + "\n")
