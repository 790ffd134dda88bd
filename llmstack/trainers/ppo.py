"""PPO with a KL penalty against the SFT model: its own loop, readable top to bottom.

Every step: `generate` (the policy answers a batch of prompts), `score` (log-probabilities under the policy
and the frozen reference, values, reward-model scores, per-token rewards, advantages), `update` (a few
epochs of clipped policy and value updates over minibatches of that rollout). Four roles: the policy and
the value model train; the reference (a frozen copy of the SFT policy) and the reward model do not.

Loss aggregation: every token-level loss is summed over the minibatch's response tokens and divided by the
number of response tokens in that minibatch across all processes (a global token mean).

Shape legend: B rollout sequences on this process, P prompt tokens, R response tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from llmstack.config import PPOConfig
from llmstack.data import batching, synthetic
from llmstack.data.sources import synthetic_count
from llmstack.data.chat import ensure_chat_template
from llmstack.data.formats import ChatFields, iter_prompts, prompt_ids
from llmstack.data.text import pack_corpus
from llmstack.losses import count_targets, ppo_policy_loss_sum, value_loss_sum
from llmstack.models import causal_lm
from llmstack.models.generation import HFGenerator
from llmstack.rl.advantages import RunningMoments, gae, masked_mean_var, token_rewards, whiten
from llmstack.rl.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from llmstack.rl.rollout import response_logprobs, response_mask, response_values
from llmstack.rl.sampling import row_seeds
from llmstack.trainers import distributed
from llmstack.trainers.base import NonFiniteLossError, StopOnSignal, build_optimizer, build_scheduler, log
from llmstack.trainers.lm_loss import lm_loss_sum, use_kernels
from llmstack.trainers.reward import load_reward_model, sequence_scores
from llmstack.trainers.run import close_run, open_run, resume
from llmstack.trainers.sft import apply_lora
from llmstack.trainers.supervised import LoopResult, LoopState
from llmstack.tracking.progress import Progress
from llmstack.tracking.record import find_parent


@dataclass
class PromptRows:
    input_ids: torch.Tensor  # [N, P] left-padded
    attention_mask: torch.Tensor  # [N, P]
    index: torch.Tensor  # [N] position in `questions`

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> dict:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "index": self.index[index]}


def load_prompts(cfg: PPOConfig, tokenizer) -> tuple[PromptRows, list[list[dict]]]:
    """Prompt conversations, rendered with the generation header and left-padded."""
    d = cfg.data
    n_synthetic = synthetic_count(d.train)
    if n_synthetic is not None:
        conversations = synthetic.rl_prompts(n_synthetic, cfg.seed)
    else:
        conversations = list(iter_prompts(d.train, ChatFields(messages=d.messages_field, prompt=d.prompt_field)))
    ids = [prompt_ids(tokenizer, c)[-d.max_prompt_length:] for c in conversations]
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, length - len(x):], mask[row, length - len(x):] = torch.tensor(x), 1
    return PromptRows(input_ids, mask, torch.arange(len(ids))), conversations


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def build_models(cfg: PPOConfig, tokenizer):
    m = cfg.model
    policy = _no_dropout(causal_lm.load_causal_lm(m.name_or_path, m.gguf_file, m.trust_remote_code))
    # Under LoRA the reference is the policy with its adapter switched off: no second copy of the weights
    reference = None if cfg.lora.enabled else \
        _no_dropout(causal_lm.load_causal_lm(m.name_or_path, m.gguf_file, m.trust_remote_code)).eval()
    policy = apply_lora(policy, cfg.lora, gradient_checkpointing=False)
    reward_model = _no_dropout(load_reward_model(cfg.reward_model.name_or_path, tokenizer, cfg.seed)).eval()
    value_path = cfg.value_model.name_or_path or cfg.reward_model.name_or_path
    value = _no_dropout(load_reward_model(value_path, tokenizer, cfg.seed))
    for frozen in (reference, reward_model):
        if frozen is not None:
            frozen.requires_grad_(False)
    return policy, reference, reward_model, value


@dataclass
class Experience:
    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R]
    ended: torch.Tensor  # [B] response has an EOS
    index: torch.Tensor  # [B] prompt ids
    logp: torch.Tensor | None = None  # [B, R] at rollout time (the "old" policy)
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [B] reward-model scores after normalisation/penalty/clip
    raw_scores: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # [B, R] per-token KL estimate
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def response_args(self, idx=slice(None)):
        return self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.mask[idx]


def generate(acc, policy, prompts: dict, generator: HFGenerator, seed: int, step: int) -> Experience:
    """Sample responses, each from its own seed (run seed, step, prompt index), so the rollout is the same on
    any number of processes. Under ZeRO-3 or FSDP the policy's parameters are gathered once for the whole
    rollout, not once per generated token."""
    prompt_ids, prompt_mask = prompts["input_ids"].to(acc.device), prompts["attention_mask"].to(acc.device)
    with distributed.full_model(acc, policy) as model:
        was_training = model.training
        model.eval()
        responses = generator(model, prompt_ids, prompt_mask, row_seeds(seed, step, prompts["index"]))
        model.train(was_training)
    mask, ended = response_mask(responses, generator.eos_token_id)
    return Experience(prompt_ids, prompt_mask, responses, mask, ended, prompts["index"])


@torch.no_grad()
def score(acc, exp: Experience, policy, reference, reward_model, value, kl_coef: float, cfg: PPOConfig,
          moments: RunningMoments, impl: str = "reference") -> Experience:
    """Fill in everything the update needs: old and reference log-probabilities, values, scores, per-token
    rewards, advantages and returns."""
    p = cfg.ppo
    exp.logp, _ = response_logprobs(policy, *exp.response_args(), p.temperature, impl=impl)
    if reference is None:
        with acc.unwrap_model(policy).disable_adapter():
            exp.ref_logp, _ = response_logprobs(policy, *exp.response_args(), p.temperature, impl=impl)
    else:
        exp.ref_logp, _ = response_logprobs(reference, *exp.response_args(), p.temperature, impl=impl)
    exp.values = response_values(value, *exp.response_args()) * exp.mask
    ids = torch.cat([exp.prompt_ids, exp.response_ids], 1)
    attention = torch.cat([exp.prompt_mask, exp.mask], 1)
    exp.raw_scores = sequence_scores(reward_model, ids, attention)
    scores = exp.raw_scores.clone()
    if p.normalize_rewards:
        config = reward_model.config
        mean, std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
        if mean is None:
            moments.update(acc.gather(scores))
            mean, std = moments.mean, moments.std
        scores = (scores - mean) / max(std, 1e-6)
    if p.missing_eos_penalty is not None:
        scores = scores - p.missing_eos_penalty * (~exp.ended).float()
    if p.reward_clip is not None:
        scores = scores.clamp(-p.reward_clip, p.reward_clip)
    exp.scores = scores
    exp.kl = KL_ESTIMATORS[p.kl_estimator](exp.logp, exp.ref_logp) * exp.mask
    rewards = token_rewards(scores, exp.kl, exp.mask, kl_coef if p.kl_in == "reward" else 0.0)
    exp.advantages, exp.returns = gae(rewards, exp.values, exp.mask, p.gamma, p.lam)
    if p.whiten_advantages:
        exp.advantages = whiten(exp.advantages, exp.mask, lambda t: acc.reduce(t, "sum"))
    return exp


def ptx_loss(acc, policy, ptx_batches, coef: float, impl: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """(the term to add to this process's policy loss: coef x the global token-mean next-token loss of one
    pretraining batch, scaled like the policy loss; that global loss, for the logs)."""
    batch = {k: v.to(acc.device) for k, v in next(ptx_batches).items()}
    n_tokens = acc.reduce(torch.tensor(float(count_targets(batch["labels"])), device=acc.device), "sum").clamp(min=1)
    loss_sum = lm_loss_sum(policy, batch["labels"], impl, input_ids=batch["input_ids"])
    return coef * loss_sum * acc.num_processes / n_tokens, acc.reduce(loss_sum.detach().double(), "sum") / n_tokens


def update(acc, exp: Experience, policy, value, optimizers, schedulers, kl_coef: float, cfg: PPOConfig,
           step: int, ptx_batches=None, impl: str = "reference") -> dict:
    """`ppo.epochs` passes over the rollout in shuffled minibatches of `train.batch_size`; with PPO-ptx each
    minibatch's policy gradient also gets `ppo.ptx_coef` times a pretraining batch's loss gradient."""
    p, train = cfg.ppo, cfg.train
    ptx_total, ptx_count = 0.0, 0
    order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    losses = torch.zeros(2, device=acc.device, dtype=torch.float64)  # global sums: policy, value
    local = torch.zeros(4, device=acc.device, dtype=torch.float64)  # clipped, approx KL, entropy, tokens
    for _ in range(p.epochs):
        for idx in torch.randperm(len(exp.mask), generator=order).split(train.batch_size):
            idx = idx.to(acc.device)
            mask = exp.mask[idx]
            n_tokens = acc.reduce(mask.sum().double(), "sum").clamp(min=1)
            # DDP averages gradients over processes; scaling by N / global tokens makes it a global token mean
            scale = acc.num_processes / n_tokens
            logp, entropy = response_logprobs(policy, *exp.response_args(idx), p.temperature, with_entropy=True,
                                              impl=impl)
            policy_loss, stats = ppo_policy_loss_sum(logp, exp.logp[idx], exp.advantages[idx], mask, p.clip)
            if p.kl_in == "loss":
                policy_loss = policy_loss + kl_coef * (KL_ESTIMATORS[p.kl_estimator](logp, exp.ref_logp[idx]) * mask).sum()
            values = response_values(value, *exp.response_args(idx))
            v_loss = value_loss_sum(values, exp.values[idx], exp.returns[idx], mask, p.value_clip)
            global_sums = acc.reduce(torch.stack([policy_loss.detach(), v_loss.detach()]).double(), "sum")
            if not torch.isfinite(global_sums).all():
                raise NonFiniteLossError(f"the PPO losses are {(global_sums / n_tokens).tolist()} at step "
                                         f"{step + 1}; the update was not applied")
            policy_objective = policy_loss * scale
            if ptx_batches is not None:
                ptx_term, ptx_value = ptx_loss(acc, policy, ptx_batches, p.ptx_coef, impl)
                policy_objective = policy_objective + ptx_term
                ptx_total += float(ptx_value)
                ptx_count += 1
            # one backward per model and minibatch: under DeepSpeed each backward is also that engine's step
            distributed.backward(acc, policy, policy_objective)
            distributed.backward(acc, value, v_loss * scale)
            for model, optimizer in zip((policy, value), optimizers):
                if train.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), train.max_grad_norm)
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


def rollout_metrics(acc, exp: Experience, conversations, kl_coef: float, tokenizer, gold: bool) -> dict:
    gathered = lambda t: acc.gather(t.contiguous()).double()  # noqa: E731
    lengths = gathered(exp.mask.sum(-1))
    v_mean, v_var = masked_mean_var(exp.returns - exp.values, exp.mask, lambda t: acc.reduce(t, "sum"))
    r_mean, r_var = masked_mean_var(exp.returns, exp.mask, lambda t: acc.reduce(t, "sum"))
    out = {"reward": float(gathered(exp.raw_scores).mean()), "reward_normalised": float(gathered(exp.scores).mean()),
           "kl": float(gathered(exp.kl.sum(-1)).mean()), "kl_coef": kl_coef,
           "response_length": float(lengths.mean()), "eos_rate": float(gathered(exp.ended.float()).mean()),
           "explained_variance": float(1 - v_var / r_var.clamp(min=1e-8))}
    if gold:
        values = torch.tensor([synthetic.gold_reward(conversations[int(i)][-1]["content"], text)
                               for i, text in zip(exp.index, decode(tokenizer, exp))], device=acc.device)
        out["gold_reward"] = float(gathered(values).mean())
    return out


def decode(tokenizer, exp: Experience) -> list[str]:
    return [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(exp.response_ids, exp.mask)]


def write_samples(run, exp: Experience, conversations, tokenizer, step: int, n: int) -> None:
    if not run.accelerator.is_main_process or n == 0:
        return
    with open(run.dir / "samples.jsonl", "a") as fh:
        for i, text in enumerate(decode(tokenizer, exp)[:n]):
            fh.write(json.dumps({"step": step, "prompt": conversations[int(exp.index[i])], "response": text,
                                 "score": float(exp.raw_scores[i]), "kl": float(exp.kl[i].sum())}) + "\n")


def ppo(cfg: PPOConfig) -> LoopResult | None:
    """Train (or resume) a policy with PPO; returns None when the run directory was already finished."""
    run = open_run(cfg, "ppo")
    if run.finished:
        return None
    acc, p, train = run.accelerator, cfg.ppo, cfg.train
    if cfg.lora.enabled and distributed.is_sharded(acc):
        raise ValueError(f"ppo: lora.enabled is not supported under the {distributed.layout(acc)} layout; LoRA's "
                         "trainable weights are small, so launch it with DDP or DeepSpeed ZeRO-2 instead")
    tokenizer = causal_lm.load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    ensure_chat_template(tokenizer)
    prompt_rows, conversations = load_prompts(cfg, tokenizer)
    prompts = batching.ShuffledBatches(prompt_rows, p.rollout_batch, acc.process_index, acc.num_processes, cfg.seed)
    policy, reference, reward_model, value = build_models(cfg, tokenizer)
    kernels = [use_kernels(m, cfg.kernels, acc.device) for m in (policy, reference) if m is not None][0]
    optimizers = [build_optimizer(policy, train.lr, train.adam_betas, train.weight_decay),
                  build_optimizer(value, p.value_lr, train.adam_betas, train.weight_decay)]
    # one model per prepare: DeepSpeed builds an engine per model, FSDP2 shards one model at a time
    policy, optimizers[0] = acc.prepare(policy, optimizers[0])
    value, optimizers[1] = acc.prepare(value, optimizers[1])
    # on the prepared optimisers, which under ZeRO offload are DeepSpeed's CPU Adam (see stage.py)
    schedulers = [build_scheduler(o, train.schedule, train.warmup_steps, train.max_steps, train.min_lr_ratio)
                  for o in optimizers]
    reference = distributed.prepare_frozen(acc, reference) if reference is not None else None
    reward_model = distributed.prepare_frozen(acc, reward_model)
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target is not None
              else FixedKLController(p.kl_coef))
    moments = RunningMoments()
    for obj in (*schedulers, kl_ctl, moments):
        acc.register_for_checkpointing(obj)
    generator = HFGenerator(p.max_new_tokens, p.temperature, p.top_p, tokenizer.eos_token_id, tokenizer.pad_token_id)
    gold = synthetic_count(cfg.data.train) is not None
    ptx = None
    if p.ptx_coef > 0:
        blocks, _ = pack_corpus(cfg.data.ptx, tokenizer, cfg.data.max_prompt_length + p.max_new_tokens, 0.0, cfg.seed)
        ptx = batching.ShuffledBatches(blocks, train.batch_size, acc.process_index, acc.num_processes, cfg.seed)

    def restore(saved: dict, prompt_batches) -> LoopState:
        prompt_batches.load_state_dict(saved["data"])
        if ptx is not None:
            ptx.load_state_dict(saved["ptx"])
        return LoopState(step=saved["step"])

    def checkpoint_state() -> dict:
        return {"data": prompts.state_dict(), **({"ptx": ptx.state_dict()} if ptx is not None else {})}

    state = resume(run, prompts, restore) or LoopState()
    ptx_batches = iter(ptx) if ptx is not None else None
    if run.record is not None:
        run.record.update(parent=find_parent(cfg.model.name_or_path), inputs={"prompts": {"spec": cfg.data.train},
                          "reward_model": find_parent(cfg.reward_model.name_or_path)},
                          data={"prompts": len(prompt_rows)}, resumed_from_step=state.step or None,
                          kernels=kernels.summary())
        run.record.save()
    log.info(f"ppo: {len(prompt_rows)} prompts; {p.rollout_batch} per process x {acc.num_processes} processes "
             f"per step, {p.epochs} epochs of minibatches of {train.batch_size}")
    batches, progress, result = iter(prompts), Progress(train.max_steps, state.step, acc.is_main_process, "ppo"), None
    with StopOnSignal() as stop:
        while state.step < train.max_steps:
            timer = time.perf_counter()
            exp = generate(acc, policy, next(batches), generator, cfg.seed, state.step)
            t_gen = time.perf_counter()
            exp = score(acc, exp, policy, reference, reward_model, value, kl_ctl.coef, cfg, moments, kernels.loss_impl)
            t_score = time.perf_counter()
            stats = update(acc, exp, policy, value, optimizers, schedulers, kl_ctl.coef, cfg, state.step, ptx_batches,
                           kernels.loss_impl)
            t_update = time.perf_counter()
            metrics = rollout_metrics(acc, exp, conversations, kl_ctl.coef, tokenizer, gold)
            kl_ctl.update(metrics["kl"], p.rollout_batch * acc.num_processes)
            state.step += 1
            state.last_loss = stats["loss"]
            if state.step % train.log_every == 0 or state.step == train.max_steps:
                tokens = int(acc.reduce(exp.mask.sum(), "sum"))
                run.metrics.log(state.step, {**stats, **metrics, "time_generate": t_gen - timer,
                                             "time_score": t_score - t_gen, "time_update": t_update - t_score,
                                             "tokens_per_s": tokens / (t_update - timer)})
                write_samples(run, exp, conversations, tokenizer, state.step, cfg.samples_per_step)
                state.last_eval = metrics
            progress.update(state.step, reward=metrics["reward"], kl=metrics["kl"])
            if stop.requested(acc):
                run.checkpointer.save(state.step, checkpoint_state())
                result = LoopResult("interrupted", state, stop.signum or 15)
                break
            if state.step % train.save_every == 0 or state.step == train.max_steps:
                run.checkpointer.save(state.step, checkpoint_state())
    progress.close()
    result = result or LoopResult("finished", state)
    if result.status == "finished":
        value_state = acc.get_state_dict(value)  # every process takes part: sharded layouts gather it
        if acc.is_main_process:
            causal_lm.save_model(acc.unwrap_model(value), tokenizer, run.dir / "value_model", state_dict=value_state)
    summary = {"steps": state.step, **{f"final_{k}": v for k, v in state.last_eval.items()},
               "final_kl_coef": kl_ctl.coef}
    result.model = close_run(run, policy, tokenizer, result.status, summary,
                             merge_adapters=cfg.lora.enabled and cfg.lora.merge)
    return result

