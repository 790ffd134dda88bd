"""PPO with a KL penalty against the SFT model: setup, then a loop over the RL phases.

Every step: `generate` (the rollout engine answers a batch of prompts), `score` (log-probabilities under the
policy and the frozen reference, values, reward-model scores, per-token rewards, advantages), `update` (a few
epochs of clipped policy and value updates over minibatches of that rollout); the phases are plain functions
in `trainers/rl_phases.py`. With one optimiser step per rollout (GRPO's usual one epoch of one minibatch) the
policy's rollout-time log-probabilities come from the update's own pass, not a scoring pass of their own
(`needs_old_logp_pass`). Four roles: the policy and the value model train; the reference (a frozen copy of
the SFT policy, or the policy with its LoRA adapters disabled) and the reward model do not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from llmstack.config import ConfigError, PPOConfig, objects
from llmstack.data import batching
from llmstack.data.chat import ensure_chat_template
from llmstack.data.formats import ChatFields
from llmstack.data.prompts import PromptRows, left_padded, load_prompt_set
from llmstack.data.text import pack_corpus
from llmstack.models import causal_lm
from llmstack.models.engines import build_engine
from llmstack.models.fused import apply_kernels
from llmstack.models.lora import merged, prepare_for_training
from llmstack.models.reward_model import RewardModelScores, load_reward_model, statistics
from llmstack.rl.estimators import ESTIMATORS, check_group_size
from llmstack.rl.kl import AdaptiveKLController, FixedKLController
from llmstack.rl.reward_functions import FunctionReward, reward_function
from llmstack.rl.rewards import RewardInputs, RewardNormaliser, import_callable
from llmstack.rl.rollout import SamplingSettings
from llmstack.trainers import distributed
from llmstack.trainers.base import build_optimizer, build_scheduler, compute_precision, learning_rate_facts, log
from llmstack.trainers.loop import LoopResult, LoopState, StepReport, resume, run_loop
from llmstack.trainers.rl_phases import (MetricFn, RLModels, ScoreSettings, UpdateSettings, generate,
                                         needs_old_logp_pass, noise_floor, rollout_metrics, score, token_kl, update,
                                         write_samples)
from llmstack.trainers.run import Run, close_run, model_facts, open_run, precision_facts
from llmstack.tracking.record import find_parent
from llmstack.tracking.run_dir import owns_output_dir


def build_models(cfg: PPOConfig, tokenizer, compute: str = "fp32") -> tuple[RLModels, object]:
    """(the policy, reference and, for a critic, the value model; the reward model or None), loaded and not
    yet placed, for the run's compute precision `compute`.

    Weight dtypes (`model.dtype`, `causal_lm.weight_dtype`): the policy and the value model train, so they
    keep fp32 master weights under `auto`; the reward model is only scored and loads in the compute dtype.
    The reference is frozen too, but its log-probabilities are compared token by token with the policy's:
    held in the policy's dtype and run under the same autocast, identical weights give a KL of exactly 0,
    where a bf16 copy beside an fp32-master policy gives a KL of precision noise as large as the signal. Its
    memory is saved by LoRA (no copy at all) or by `model.dtype=bf16` (both in bf16)."""
    m = cfg.model
    trained = causal_lm.weight_dtype(m.dtype, compute, frozen=False)
    frozen = causal_lm.weight_dtype(m.dtype, compute, frozen=True)

    def policy_copy():
        return causal_lm.no_dropout(causal_lm.load_causal_lm(m.name_or_path, m.gguf_file, m.trust_remote_code,
                                                             dtype=trained, attn_implementation=m.attn_implementation))

    policy = policy_copy()
    # Under LoRA the reference is the policy with its adapter switched off: no second copy of the weights
    reference = None if cfg.lora.enabled else policy_copy().eval()
    policy = prepare_for_training(policy, cfg.lora, cfg.gradient_checkpointing)
    reward_model = None
    if cfg.reward_model.name_or_path:
        reward_model = causal_lm.no_dropout(load_reward_model(cfg.reward_model.name_or_path, tokenizer, cfg.seed,
                                                              dtype=frozen, attn_implementation=m.attn_implementation))
    value = None
    if ESTIMATORS[cfg.ppo.estimator].needs_critic:
        value_path = cfg.value_model.name_or_path or cfg.reward_model.name_or_path
        value = causal_lm.no_dropout(load_reward_model(value_path, tokenizer, cfg.seed, dtype=trained,
                                                       attn_implementation=m.attn_implementation,
                                                       load_in_4bit=cfg.value_lora.load_in_4bit))
        value = prepare_for_training(value, cfg.value_lora, cfg.gradient_checkpointing)
    for frozen in (reference, reward_model):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    return RLModels(policy, reference, value), reward_model


def load_prompts(cfg: PPOConfig, tokenizer) -> tuple[PromptRows, list, dict[str, list]]:
    """The prompt set as left-padded rows, its prompts (text or conversations; row `i` is prompt `i`), and
    the prompt records' other fields by name (what reward functions receive)."""
    d = cfg.data
    prompts, columns = load_prompt_set(d.train, ChatFields(messages=d.messages_field, prompt=d.prompt_field),
                                       cfg.seed)
    return left_padded(tokenizer, prompts, d.max_prompt_length), prompts, columns


def settings_of(cfg: PPOConfig) -> tuple[SamplingSettings, ScoreSettings, UpdateSettings]:
    r, p, train = cfg.rollout, cfg.ppo, cfg.train
    old_logp_pass = needs_old_logp_pass(p.epochs, train.batch_size, r.batch_size * r.samples_per_prompt,
                                        p.kl_in == "reward")
    return (SamplingSettings(r.max_new_tokens, r.temperature, r.top_p),
            ScoreSettings(p.estimator, r.temperature, p.kl_estimator, p.kl_in == "reward", p.missing_eos_penalty,
                          p.reward_clip, p.gamma, p.lam, p.whiten_advantages, r.samples_per_prompt, p.scale_by_std,
                          old_logp_pass),
            UpdateSettings(p.epochs, train.batch_size, p.clip, p.value_clip, r.temperature, p.kl_estimator,
                           p.kl_in == "loss", train.max_grad_norm, cfg.seed, p.ptx_coef, p.loss_aggregation,
                           r.max_new_tokens))


def reward_sources(cfg: PPOConfig, reward_model, functions: dict[str, Callable]) -> list[tuple[object, float]]:
    """(source, weight) pairs: the reward model first (when set), then `reward_funcs` in order, then the
    function objects given in Python (by name)."""
    sources = [RewardModelScores(reward_model)] if reward_model is not None else []
    sources += [FunctionReward(objects.lookup(spec), objects.describe(spec)["name"]) if objects.is_memory(spec)
                else reward_function(spec, cfg.rollout.max_new_tokens) for spec in cfg.reward_funcs]
    sources += [FunctionReward(fn, name) for name, fn in functions.items()]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"two reward sources share a name ({names}); each is logged by its name, so name them "
                          "apart")
    if not sources:
        raise ConfigError("no reward source: set 'reward_model.name_or_path' or 'reward_funcs', or pass reward "
                          "functions")
    if cfg.reward_weights and len(cfg.reward_weights) != len(sources):
        raise ConfigError(f"config key 'reward_weights' has {len(cfg.reward_weights)} weights for {len(sources)} "
                          "reward sources (the reward model first, then reward_funcs); give one per source or none")
    return list(zip(sources, cfg.reward_weights or [1.0] * len(sources)))


@dataclass
class PPOSetup:
    """Everything the loop uses, built once (`setup`)."""

    tokenizer: object
    prompt_rows: PromptRows
    conversations: list
    columns: dict
    prompts: batching.ShuffledBatches
    models: RLModels
    sources: list
    normaliser: RewardNormaliser
    engine: object
    kernels: object
    optimizers: list
    schedulers: list
    kl_ctl: object
    ptx: batching.ShuffledBatches | None
    precision: dict

    def checkpoint_state(self) -> dict:
        return {"data": self.prompts.state_dict(), "kl_controller": self.kl_ctl.state_dict(),
                "reward_normaliser": self.normaliser.state_dict(),
                **({"ptx": self.ptx.state_dict()} if self.ptx is not None else {})}

    def restore(self, saved: dict) -> None:
        self.prompts.load_state_dict(saved["data"])
        self.kl_ctl.load_state_dict(saved["kl_controller"])
        self.normaliser.load_state_dict(saved["reward_normaliser"])
        if self.ptx is not None:
            self.ptx.load_state_dict(saved["ptx"])


def setup(run: Run, cfg: PPOConfig, functions: dict[str, Callable]) -> PPOSetup:
    """Tokenizer, prompts, the models placed for the layout, reward sources, engine, optimisers, KL
    controller."""
    acc, p, train = run.accelerator, cfg.ppo, cfg.train
    try:
        check_group_size(p.estimator, cfg.rollout.samples_per_prompt, cfg.rollout.samples_per_prompt)
    except ValueError as err:
        raise ConfigError(f"config keys 'ppo.estimator' and 'rollout.samples_per_prompt': {err}") from err
    tokenizer = causal_lm.load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    ensure_chat_template(tokenizer)
    rows, conversations, columns = load_prompts(cfg, tokenizer)
    prompts = batching.ShuffledBatches(rows, cfg.rollout.batch_size, acc.process_index, acc.num_processes, cfg.seed)
    models, reward_model = build_models(cfg, tokenizer, compute_precision(acc))
    kernels = [apply_kernels(m, cfg.kernels, acc.device) for m in (models.policy, models.reference) if m is not None][0]
    # one model per prepare: DeepSpeed builds an engine per model, FSDP2 shards one model at a time
    models.policy, policy_optimizer = acc.prepare(
        models.policy, build_optimizer(models.policy, train.lr, train.adam_betas, train.weight_decay, train.optimizer))
    optimizers = [policy_optimizer]
    if models.value is not None:
        models.value, value_optimizer = acc.prepare(
            models.value, build_optimizer(models.value, p.value_lr, train.adam_betas, train.weight_decay,
                                          train.optimizer))
        optimizers.append(value_optimizer)
    # on the prepared optimisers, which under ZeRO offload are DeepSpeed's CPU Adam (see stage.py)
    schedulers = [build_scheduler(o, train.schedule, train.warmup_steps, train.max_steps, train.min_lr_ratio)
                  for o in optimizers]
    for model, optimizer, scheduler in zip((models.policy, models.value), optimizers, schedulers):
        run.checkpointer.register(model, optimizer, scheduler)
    if models.reference is not None:
        models.reference = distributed.prepare_frozen(acc, models.reference)
    # the reward model's stored statistics describe its own scores, so they apply when it is the only source;
    # read before placing: under DeepSpeed the frozen model becomes an engine whose .config is DeepSpeed's
    only_model = reward_model is not None and not cfg.reward_funcs and not functions
    normaliser = RewardNormaliser(p.normalize_rewards, statistics(reward_model) if only_model else None)
    if reward_model is not None:
        reward_model = distributed.prepare_frozen(acc, reward_model)
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target is not None
              else FixedKLController(p.kl_coef))
    engine = build_engine(cfg.rollout.engine, settings_of(cfg)[0], tokenizer.eos_token_id, tokenizer.pad_token_id)
    ptx = None
    if p.ptx_coef > 0:
        blocks, _ = pack_corpus(cfg.data.ptx, tokenizer, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                                0.0, cfg.seed)
        ptx = batching.ShuffledBatches(blocks, train.batch_size, acc.process_index, acc.num_processes, cfg.seed)
    precision = precision_facts(run, policy=models.policy, reference=models.reference, value_model=models.value,
                                reward_model=reward_model)
    return PPOSetup(tokenizer, rows, conversations, columns, prompts, models, reward_sources(cfg, reward_model, functions),
                    normaliser, engine, kernels, optimizers, schedulers, kl_ctl, ptx, precision)


def ppo_step(run: Run, cfg: PPOConfig, s: PPOSetup, metrics: dict[str, MetricFn]):
    """The step function `loop.run_loop` calls: generate, score, update, then the step's metrics."""
    acc, train = run.accelerator, cfg.train
    _, score_settings, update_settings = settings_of(cfg)
    batches, ptx_batches = iter(s.prompts), iter(s.ptx) if s.ptx is not None else None
    warned_cut = [False]  # once per run

    def decode(exp) -> list[str]:
        return [s.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                for ids, m in zip(exp.response_ids, exp.mask)]

    def step(state: LoopState) -> StepReport:
        timer = time.perf_counter()
        exp = generate(acc, s.engine, s.models.policy, next(batches), cfg.seed, state.step,
                       cfg.rollout.samples_per_prompt)
        t_gen = time.perf_counter()
        rows = [int(i) for i in exp.index]
        inputs = RewardInputs(exp, [s.conversations[i] for i in rows], decode,
                              {name: [values[i] for i in rows] for name, values in s.columns.items()})
        exp = score(acc, exp, s.models, inputs, s.sources, s.normaliser, s.kl_ctl.coef, score_settings, s.kernels.plan)
        t_score = time.perf_counter()
        stats = update(acc, exp, s.models, s.optimizers, s.schedulers, s.kl_ctl.coef, update_settings, state.step,
                       s.kernels.plan, ptx_batches)
        t_update = time.perf_counter()
        if exp.kl is None:  # the old log-probabilities came from the update's own pass
            exp.kl = token_kl(exp, cfg.ppo.kl_estimator)
        gap = stats.pop("logprob_gap")
        # before the first update of a fresh run the policy is the reference: what they differ by is noise
        health = noise_floor(acc, exp, gap) if state.step == 0 else {}
        rollout = rollout_metrics(acc, exp, inputs, s.kl_ctl.coef, metrics)
        if not warned_cut[0]:
            warned_cut[0] = warn_if_answers_cut(rollout["eos_rate"], cfg.rollout.max_new_tokens,
                                                cfg.ppo.missing_eos_penalty)
        s.kl_ctl.update(rollout["kl"], len(exp) * acc.num_processes)
        state.step += 1
        state.last_loss = stats["loss"]
        row = {}
        if health:
            warn_if_kl_target_in_noise(health, cfg.ppo.kl_target, float(exp.mask.sum(-1).float().mean()))
            row = {"loss": stats["loss"], **health}
            if run.record is not None:
                run.record.update(health=health)
        if state.step % train.log_every == 0 or state.step == train.max_steps:
            tokens = int(acc.reduce(exp.mask.sum(), "sum"))
            row = {**row, **stats, **rollout, "time_generate": t_gen - timer, "time_score": t_score - t_gen,
                   "time_update": t_update - t_score, "tokens_per_s": tokens / (t_update - timer)}
            if acc.is_main_process and cfg.samples_per_step:
                write_samples(run.dir / "samples.jsonl", exp, inputs, state.step, cfg.samples_per_step)
            state.last_eval = rollout
        return StepReport(row, {"reward": rollout["reward"], "kl": rollout["kl"]})

    return step


def warn_if_answers_cut(eos_rate: float, max_new_tokens: int, missing_eos_penalty: float | None) -> bool:
    """Warn (and return True) when most of a rollout's answers stopped at the length limit without EOS: a
    reward model trained on finished answers then scores positions it never saw in training."""
    if eos_rate >= 0.5:
        return False
    fix = "raise rollout.max_new_tokens" + ("" if missing_eos_penalty is not None else
                                             ", or set ppo.missing_eos_penalty to score cut answers down")
    log.warning(f"ppo: {1 - eos_rate:.0%} of the answers were cut at rollout.max_new_tokens={max_new_tokens} "
                f"without EOS, so their scores are read at positions the reward model was not trained on; {fix}")
    return True


def warn_if_kl_target_in_noise(health: dict, kl_target: float | None, mean_length: float) -> None:
    """Warn when the KL target (per sequence) is within 10x of the measured precision noise: the adaptive
    controller would then steer on noise. The noise is the larger of the KL between identical models and the
    rollout-vs-update gap over an average response."""
    floor = max(health["health/kl_identical"], health["health/logprob_gap"] * mean_length)
    log.info(f"ppo: precision noise floor {floor:.3g} nats per answer (health/kl_identical "
             f"{health['health/kl_identical']:.3g}, health/logprob_gap {health['health/logprob_gap']:.3g} per token)")
    if kl_target is not None and kl_target < 10 * floor:
        log.warning(f"ppo.kl_target={kl_target} is not well above the KL that precision noise alone gives here "
                    f"({floor:.3g} nats per answer between identical models): the controller would act on noise; "
                    "raise ppo.kl_target, or run train.precision=fp32")


def _named_metric(spec: str) -> tuple[str, MetricFn]:
    """(name, function) for a `metrics:` entry: an import path, or a function given in Python."""
    if objects.is_memory(spec):
        return objects.describe(spec)["name"], objects.lookup(spec)
    return spec.rpartition(":")[2], import_callable(spec, "metrics")


def _named_metrics(cfg: PPOConfig) -> dict[str, MetricFn]:
    """The functions the config names (metrics, reward_funcs), imported before any work so a misspelt one
    fails at start-up; returns the metrics by name."""
    try:
        for spec in cfg.reward_funcs:
            if objects.is_memory(spec):
                objects.lookup(spec)
            else:
                reward_function(spec, cfg.rollout.max_new_tokens)
        return dict(_named_metric(path) for path in cfg.metrics)
    except (ValueError, LookupError) as err:  # rl/ knows no ConfigError; its message already names the key
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from err


@owns_output_dir
def ppo(cfg: PPOConfig, metrics: dict[str, MetricFn] | None = None,
        reward_funcs: dict[str, Callable] | None = None, callbacks=()) -> LoopResult | None:
    """Train (or resume) a policy with the RL loop (PPO, GRPO, RLOO, REINFORCE++ by `ppo.estimator`); returns
    None when the run directory was already finished. `metrics` (name -> f(prompts, completions) -> one value
    per response) are logged at every step, beside the functions named in `cfg.metrics`; `reward_funcs`
    (name -> f(prompts, completions, **columns) -> one value per completion) are reward sources beside those
    the config names."""
    metrics = {**_named_metrics(cfg), **(metrics or {})}
    run = open_run(cfg, "ppo" if cfg.ppo.estimator == "gae" else cfg.ppo.estimator, callbacks)
    if run.finished:
        return None
    acc = run.accelerator
    for key, lora in (("lora", cfg.lora), ("value_lora", cfg.value_lora)):
        if lora.enabled and distributed.is_sharded(acc):
            raise ValueError(f"ppo: {key}.enabled is not supported under the {distributed.layout(acc)} layout; "
                             "LoRA's trainable weights are small, so launch it with DDP or DeepSpeed ZeRO-2 instead")
    s = setup(run, cfg, reward_funcs or {})
    state = resume(run, s.restore) or LoopState()
    if run.record is not None:
        start, reward_model = find_parent(cfg.model.name_or_path), find_parent(cfg.reward_model.name_or_path)
        run.record.update(parent=start, parents={"model": start, "reward_model": reward_model},
                          inputs={"prompts": {"spec": cfg.data.train}, "reward_model": reward_model},
                          data={"prompts": len(s.prompt_rows)}, resumed_from_step=state.step or None,
                          kernels=s.kernels.summary(), precision=s.precision,
                          models={"policy": model_facts(run, s.models.policy, cfg.lora),
                                  **({"value_model": model_facts(run, s.models.value, cfg.value_lora)}
                                     if s.models.value is not None else {})},
                          learning_rate=learning_rate_facts(run.stage, cfg.model.name_or_path, cfg.train.lr,
                                                            cfg.train.weight_decay),
                          algorithm={"estimator": cfg.ppo.estimator, "critic": s.models.value is not None,
                                     "samples_per_prompt": cfg.rollout.samples_per_prompt,
                                     "loss_aggregation": cfg.ppo.loss_aggregation, "kl_in": cfg.ppo.kl_in,
                                     "kl_estimator": cfg.ppo.kl_estimator},
                          reward_sources=[{"name": source.name, "weight": weight} for source, weight in s.sources])
        run.record.set_compute(acc.num_processes, device=str(acc.device))
        run.record.save()
    log.info(f"ppo: {len(s.prompt_rows)} prompts; {cfg.rollout.batch_size} per process x {acc.num_processes} "
             f"processes per step, {cfg.ppo.epochs} epochs of minibatches of {cfg.train.batch_size}")
    result = run_loop(run, state, ppo_step(run, cfg, s, metrics), s.checkpoint_state)
    if result.completed and s.models.value is not None:
        value_state = acc.get_state_dict(s.models.value)  # every process takes part: sharded layouts gather it
        value = acc.unwrap_model(s.models.value)
        if cfg.value_lora.enabled and cfg.value_lora.merge:
            value, value_state = merged(value), None
        if acc.is_main_process:
            causal_lm.save_model(value, s.tokenizer, run.dir / "value_model", state_dict=value_state)
    summary = {"steps": state.step, **{f"final_{k}": v for k, v in state.last_eval.items()},
               "final_kl_coef": s.kl_ctl.coef}
    result.model = close_run(run, s.models.policy, s.tokenizer, result.status, summary,
                             merge_adapters=cfg.lora.enabled and cfg.lora.merge, reason=result.reason)
    return result
