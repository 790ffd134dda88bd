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
from llmstack.losses import count_targets, ppo_policy_loss_sum, value_loss_sum
from llmstack.models.forward import lm_loss_sum, token_logprobs, token_values
from llmstack.models.lora import adapters_disabled
from llmstack.rl.advantages import masked_mean_var
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
    kl_in_reward: bool  # the KL penalty goes into the per-token reward (else it is a loss term)
    missing_eos_penalty: float | None
    reward_clip: float | None
    gamma: float
    lam: float
    whiten_advantages: bool


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


def generate(acc, engine: RolloutEngine, policy, prompts: dict, seed: int, step: int) -> Experience:
    """Sample responses, each from its own seed (run seed, step, prompt index), so the rollout is the same on
    any number of processes. Under ZeRO-3 or FSDP the policy's parameters are gathered once for the whole
    rollout, not once per generated token."""
    prompt_ids, prompt_mask = prompts["input_ids"].to(acc.device), prompts["attention_mask"].to(acc.device)
    with distributed.full_model(acc, policy) as model:
        engine.load_weights(model)
        return rollout(engine, prompt_ids, prompt_mask, prompts["index"], row_seeds(seed, step, prompts["index"]))


@torch.no_grad()
def score(acc, exp: Experience, models: RLModels, inputs: RewardInputs, sources: list, normaliser: RewardNormaliser,
          kl_coef: float, settings: ScoreSettings, kernels: KernelPlan) -> Experience:
    """Fill in everything the update needs: old and reference log-probabilities, values, scores, the per-token
    KL, and advantages and returns from the estimator."""
    s = settings
    exp.logp, _ = token_logprobs(models.policy, *exp.response_args(), s.temperature, kernels)
    if models.reference is None:
        with adapters_disabled(models.policy):
            exp.ref_logp, _ = token_logprobs(models.policy, *exp.response_args(), s.temperature, kernels)
    else:
        exp.ref_logp, _ = token_logprobs(models.reference, *exp.response_args(), s.temperature, kernels)
    exp.values = token_values(models.value, *exp.response_args()) * exp.mask
    exp.raw_scores, _ = combined(sources, inputs)
    scores = normaliser(exp.raw_scores.clone(), acc.gather)
    if s.missing_eos_penalty is not None:
        scores = scores - s.missing_eos_penalty * (~exp.ended).float()
    if s.reward_clip is not None:
        scores = scores.clamp(-s.reward_clip, s.reward_clip)
    exp.scores = scores
    exp.kl = KL_ESTIMATORS[s.kl_estimator](exp.logp, exp.ref_logp) * exp.mask
    estimate = EstimatorSettings(kl_coef=kl_coef if s.kl_in_reward else 0.0, gamma=s.gamma, lam=s.lam,
                                 whiten=s.whiten_advantages)
    exp.advantages, exp.returns = ESTIMATORS[s.estimator].fn(scores, exp.kl, exp.mask, exp.values, estimate,
                                                             lambda t: acc.reduce(t, "sum"))
    return exp


def ptx_loss(acc, policy, ptx_batches, coef: float, kernels: KernelPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(the term to add to this process's policy loss: coef x the global token-mean next-token loss of one
    pretraining batch, scaled like the policy loss; that global loss, for the logs)."""
    batch = {k: v.to(acc.device) for k, v in next(ptx_batches).items()}
    n_tokens = acc.reduce(torch.tensor(float(count_targets(batch["labels"])), device=acc.device), "sum").clamp(min=1)
    loss_sum = lm_loss_sum(policy, batch["labels"], kernels, input_ids=batch["input_ids"])
    return coef * loss_sum * acc.num_processes / n_tokens, acc.reduce(loss_sum.detach().double(), "sum") / n_tokens


def _minibatch_losses(acc, exp: Experience, idx, models: RLModels, kl_coef: float, s: UpdateSettings,
                      kernels: KernelPlan):
    """(policy loss sum, value loss sum, the policy loss's statistics, entropy [b, R]) of rows `idx`."""
    mask = exp.mask[idx]
    logp, entropy = token_logprobs(models.policy, *exp.response_args(idx), s.temperature, kernels,
                                   with_entropy=True)
    policy_loss, stats = ppo_policy_loss_sum(logp, exp.logp[idx], exp.advantages[idx], mask, s.clip)
    if s.kl_in_loss:
        policy_loss = policy_loss + kl_coef * (KL_ESTIMATORS[s.kl_estimator](logp, exp.ref_logp[idx]) * mask).sum()
    values = token_values(models.value, *exp.response_args(idx))
    v_loss = value_loss_sum(values, exp.values[idx], exp.returns[idx], mask, s.value_clip)
    return policy_loss, v_loss, stats, entropy


def update(acc, exp: Experience, models: RLModels, optimizers, schedulers, kl_coef: float, settings: UpdateSettings,
           step: int, kernels: KernelPlan, ptx_batches=None) -> dict:
    """`epochs` passes over the rollout in shuffled minibatches; with PPO-ptx each minibatch's policy gradient
    also gets `ptx_coef` times a pretraining batch's loss gradient. Returns the step's update metrics."""
    s = settings
    ptx_total, ptx_count = 0.0, 0
    order = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    losses = torch.zeros(2, device=acc.device, dtype=torch.float64)  # global sums: policy, value
    local = torch.zeros(4, device=acc.device, dtype=torch.float64)  # clipped, approx KL, entropy, tokens
    for _ in range(s.epochs):
        for idx in torch.randperm(len(exp), generator=order).split(s.minibatch_size):
            idx = idx.to(acc.device)
            mask = exp.mask[idx]
            n_tokens = acc.reduce(mask.sum().double(), "sum").clamp(min=1)
            # DDP averages gradients over processes; scaling by N / global tokens makes it a global token mean
            scale = acc.num_processes / n_tokens
            policy_loss, v_loss, stats, entropy = _minibatch_losses(acc, exp, idx, models, kl_coef, s, kernels)
            global_sums = acc.reduce(torch.stack([policy_loss.detach(), v_loss.detach()]).double(), "sum")
            if not torch.isfinite(global_sums).all():
                raise NonFiniteLossError(f"the PPO losses are {(global_sums / n_tokens).tolist()} at step "
                                         f"{step + 1}; the update was not applied")
            policy_objective = policy_loss * scale
            if ptx_batches is not None:
                ptx_term, ptx_value = ptx_loss(acc, models.policy, ptx_batches, s.ptx_coef, kernels)
                policy_objective = policy_objective + ptx_term
                ptx_total += float(ptx_value)
                ptx_count += 1
            # one backward per model and minibatch: under DeepSpeed each backward is also that engine's step
            distributed.backward(acc, models.policy, policy_objective)
            distributed.backward(acc, models.value, v_loss * scale)
            for model, optimizer in zip((models.policy, models.value), optimizers):
                if s.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses += global_sums
            local += torch.stack([stats["clipped_tokens"].double(), stats["approx_kl_sum"].double(),
                                  (entropy.detach().double() * mask).sum(), mask.sum().double()])
    for scheduler in schedulers:
        scheduler.step()
    local = acc.reduce(local, "sum")
    tokens = local[3].clamp(min=1)
    out = {"loss": float(losses[0] / tokens), "value_loss": float(losses[1] / tokens),
           "clip_fraction": float(local[0] / tokens), "approx_kl": float(local[1] / tokens),
           "entropy": float(local[2] / tokens)}
    if ptx_count:
        out["ptx_loss"] = ptx_total / ptx_count
    return out


def rollout_metrics(acc, exp: Experience, inputs: RewardInputs, kl_coef: float, metrics: dict[str, MetricFn]) -> dict:
    """The rollout's reward, KL, lengths and the critic's explained variance over all processes, and each
    extra metric's mean over the decoded responses."""
    gathered = lambda t: acc.gather(t.contiguous()).double()  # noqa: E731
    lengths = gathered(exp.mask.sum(-1))
    v_mean, v_var = masked_mean_var(exp.returns - exp.values, exp.mask, lambda t: acc.reduce(t, "sum"))
    r_mean, r_var = masked_mean_var(exp.returns, exp.mask, lambda t: acc.reduce(t, "sum"))
    out = {"reward": float(gathered(exp.raw_scores).mean()), "reward_normalised": float(gathered(exp.scores).mean()),
           "kl": float(gathered(exp.kl.sum(-1)).mean()), "kl_coef": kl_coef,
           "response_length": float(lengths.mean()), "eos_rate": float(gathered(exp.ended.float()).mean()),
           "explained_variance": float(1 - v_var / r_var.clamp(min=1e-8))}
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
