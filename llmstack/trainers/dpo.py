"""DPO: the SFT model learns people's preferences directly, with no reward model (Rafailov et al. 2023).

Preference rows -> each response's summed log-probability under the policy and under the reference -> the
DPO loss of every ranking (its implied pairs, or a Plackett-Luce likelihood), on the shared supervised loop.

Design decisions:
- A ranking's responses share one row that holds their prompt once (`PreferenceRows`, as the reward stage
  builds them): each response attends to the prompt and to itself at the positions it would have alone, so
  its log-probability is exactly that of prompt + response alone, while the prompt is computed once.
- The reference is the policy as it starts: its log-probabilities are computed once, before the first
  update, by the same model through the same path (kernels, precision, layout) as the policy's own during
  training, so at step 0 the two agree exactly and the loss is ln 2 per pair. They are kept in the run
  directory (`reference_logps.safetensors`, written and read with safetensors), so a resumed run needs no
  reference model. Under LoRA the reference is the policy with its adapter disabled, computed per batch.
- The KL to the reference is measured on held-out prompts by sampling the policy's own answers (a
  teacher-forced log-ratio on the data's responses is not a KL), which keeps a reference model loaded for
  the evaluations; `dpo.kl_prompts=0` turns that off.

Shape legend: N rankings, K responses per ranking, T row positions, M scored response tokens.
"""

from __future__ import annotations

import contextlib

import torch
from safetensors.torch import load_file, save_file

from llmstack.config import DPOConfig
from llmstack.data import batching, sources
from llmstack.data.agreement import annotator_statistics
from llmstack.data.batching import to_device
from llmstack.data.chat import ensure_chat_template
from llmstack.data.label_studio import annotation_facts
from llmstack.data.preference import PAD_SEGMENT, build_preference_rows, load_groups, shared_prompt_mask
from llmstack.data.prompts import left_padded
from llmstack.evaluation.heldout import preference_metrics
from llmstack.kernels import KernelPlan
from llmstack.losses import dpo_ranking_loss
from llmstack.models import causal_lm
from llmstack.models.engines import build_engine
from llmstack.models.forward import logprobs_at, token_logprobs
from llmstack.models.fused import apply_kernels
from llmstack.models.lora import adapters_disabled, prepare_for_training
from llmstack.rl.rollout import SamplingSettings, rollout
from llmstack.rl.sampling import row_seeds
from llmstack.trainers.base import compute_precision, log
from llmstack.trainers.loop import LoopResult
from llmstack.trainers.run import open_run
from llmstack.trainers.stage import run_supervised_stage
from llmstack.trainers.supervised import SupervisedObjective
from llmstack.tracking.progress import Progress
from llmstack.tracking.record import find_parent
from llmstack.tracking.run_dir import owns_output_dir

REFERENCE_FILE = "reference_logps.safetensors"


def response_logprobs(model, batch: dict, kernels: KernelPlan) -> torch.Tensor:
    """[N, K] summed log-probability of every response (its tokens and its EOS) given its prompt, from one
    forward pass over the shared-prompt rows; 0 for padding responses. A response's first token is
    predicted at the prompt's last position, every later one at the position before it."""
    segments_NT = batch["segment_ids"]
    n, width = segments_NT.shape
    prompt_last_N = (segments_NT == 0).sum(-1) - 1
    columns_T = torch.arange(width, device=segments_NT.device)
    previous_NT = torch.cat([torch.full_like(segments_NT[:, :1], PAD_SEGMENT), segments_NT[:, :-1]], dim=1)
    in_response = segments_NT > 0
    continues = in_response & (previous_NT == segments_NT)
    starts = in_response & ~continues & (prompt_last_N[:, None] >= 0)
    predictor_NT = torch.where(continues, columns_T - 1, prompt_last_N[:, None].expand(-1, width))
    rows_M, columns_M = torch.nonzero(continues | starts, as_tuple=True)
    logp_M = logprobs_at(model, rows_M, predictor_NT[rows_M, columns_M], batch["input_ids"][rows_M, columns_M],
                         kernels, input_ids=batch["input_ids"], attention_mask=shared_prompt_mask(segments_NT),
                         position_ids=batch["position_ids"])
    k = batch["ranks"].shape[1]
    out = torch.zeros(n, k + 1, dtype=logp_M.dtype, device=logp_M.device)
    out = out.index_put((rows_M, segments_NT[rows_M, columns_M]), logp_M, accumulate=True)
    return out[:, 1:]


class WithReference:
    """Preference rows with each ranking's reference log-probabilities [N, K] beside them."""

    def __init__(self, rows, reference_NK: torch.Tensor):
        self.inner, self.reference = rows, reference_NK

    def __len__(self) -> int:
        return len(self.inner)

    def rows(self, index) -> dict:
        return {**self.inner.rows(index), "ref_logp": self.reference[index]}


def reference_of(batch: dict, model, kernels: KernelPlan) -> torch.Tensor:
    """[N, K] the reference's log-probabilities of the batch's responses: saved beside the rows, or under
    LoRA the policy's with its adapter disabled."""
    if "ref_logp" in batch:
        return batch["ref_logp"]
    with torch.no_grad(), adapters_disabled(model):
        return response_logprobs(model, batch, kernels)


def dpo_objective(cfg: DPOConfig, kernels: KernelPlan, fresh: bool = False) -> SupervisedObjective:
    """DPO's loss on preference rows. `fresh` (a run starting at its first step, where the policy still is
    the reference): the first training batch's largest |log pi - log ref| over its responses is reported once as
    `health/logprob_gap`, the precision noise between the reference's pass and the training pass (0 when
    both compute alike)."""
    d = cfg.dpo
    pending, first = {}, [fresh]

    def loss_sum(model, batch: dict) -> torch.Tensor:
        logp_NK, ref_NK = response_logprobs(model, batch, kernels), reference_of(batch, model, kernels)
        if first[0] and torch.is_grad_enabled():  # a training pass, not the evaluation before training
            first[0] = False
            pending["health/logprob_gap"] = float((logp_NK.detach().float() - ref_NK.float()).abs().max())
        loss_N, _, _ = dpo_ranking_loss(logp_NK, ref_NK, batch["ranks"], d.beta, d.rankings, d.loss, d.label_smoothing)
        return loss_N.sum()

    def health() -> dict:
        out = dict(pending)
        pending.clear()
        return out

    return SupervisedObjective(loss_sum=loss_sum, count_targets=lambda b: len(b["ranks"]),
                               count_tokens=lambda b: int((b["segment_ids"] != PAD_SEGMENT).sum()), health=health)


@torch.no_grad()
def reference_logprobs(acc, model, rows, batch_size: int, kernels: KernelPlan, what: str = "rows") -> torch.Tensor:
    """[N, K] log-probabilities of every ranking's responses under `model` as it is now (eval mode, no
    gradients), through the path training takes, with progress and ETA (`what` names the rows in it). Every
    process computes every row, so sharded layouts, whose forward is collective, stay in step."""
    was_training = model.training
    model.eval()
    starts = range(0, len(rows), batch_size)
    progress = Progress(len(starts), 0, acc.is_main_process, f"dpo reference ({what})")
    chunks = []
    for done, start in enumerate(starts, 1):
        batch = to_device(rows.rows(torch.arange(start, min(start + batch_size, len(rows)))), acc.device)
        chunks.append(response_logprobs(model, batch, kernels).float().cpu())
        progress.update(done)
    progress.close()
    model.train(was_training)
    return torch.cat(chunks)


def _reference_for(run, cfg: DPOConfig, model, train_rows, held_rows, kernels) -> dict[str, torch.Tensor]:
    """The reference log-probabilities of the training and held-out rows: read back when this run saved
    them already (a resume), else computed from the model before its first update and saved."""
    path = run.dir / REFERENCE_FILE
    if path.is_file():
        return load_file(path)
    acc = run.accelerator
    with acc.autocast():
        size = cfg.train.batch_size
        saved = {"train": reference_logprobs(acc, model, train_rows, size, kernels, "training rows")}
        if held_rows is not None:
            saved["held_out"] = reference_logprobs(acc, model, held_rows, size, kernels, "held-out rows")
    if acc.is_main_process:
        save_file(saved, str(path))
    acc.wait_for_everyone()
    return saved


def kl_reader(acc, cfg: DPOConfig, tokenizer, prompts: list, kernels: KernelPlan, dtype: torch.dtype):
    """f(policy, step) -> {'eval_kl': mean over sampled answers to held-out prompts of log pi - log ref}, or
    None when `dpo.kl_prompts` is 0. Answers are sampled at temperature 1 from fixed seeds, so every
    evaluation reads the same prompts the same way. The reference is held in the policy's weight `dtype` and
    run under the same autocast, so before the first update the two agree exactly."""
    if not cfg.dpo.kl_prompts or not prompts:
        return None
    m = cfg.model
    reference = None if cfg.lora.enabled else causal_lm.no_dropout(causal_lm.load_causal_lm(
        m.name_or_path, m.gguf_file, m.trust_remote_code, dtype=dtype,
        attn_implementation=m.attn_implementation)).requires_grad_(False).eval()
    if reference is not None:
        reference.to(acc.device)
    rows = left_padded(tokenizer, prompts[:cfg.dpo.kl_prompts], cfg.data.max_length)
    sampling = SamplingSettings(cfg.dpo.kl_max_new_tokens, 1.0)
    engine = build_engine("hf", sampling, tokenizer.eos_token_id, tokenizer.pad_token_id)

    @torch.no_grad()
    def read(policy, step: int) -> dict:
        engine.load_weights(policy)
        exp = rollout(engine, rows.input_ids.to(acc.device), rows.attention_mask.to(acc.device), rows.index,
                      row_seeds(cfg.seed, 0, rows.index))
        with acc.autocast():
            logp, _ = token_logprobs(policy, *exp.response_args(), 1.0, kernels)
            disabled = adapters_disabled(policy) if reference is None else contextlib.nullcontext()
            with disabled:
                ref_logp, _ = token_logprobs(reference or policy, *exp.response_args(), 1.0, kernels)
        return {"eval_kl": float(((logp - ref_logp) * exp.mask).sum(-1).mean())}

    return read


@owns_output_dir
def dpo(cfg: DPOConfig, callbacks=()) -> LoopResult | None:
    """Train (or resume) a policy with DPO; returns None when the run directory was already finished."""
    run = open_run(cfg, "dpo", callbacks)
    if run.finished:
        return None
    acc, d, m = run.accelerator, cfg.data, cfg.model
    tokenizer = causal_lm.load_tokenizer(m.tokenizer or m.name_or_path, None if m.tokenizer else m.gguf_file,
                                         m.trust_remote_code)
    ensure_chat_template(tokenizer)
    train_groups, held_groups = load_groups(d.train, d.eval, d.format, d.eval_fraction, cfg.seed)
    train_rows = build_preference_rows(train_groups, tokenizer, d.max_length)
    held_rows = build_preference_rows(held_groups, tokenizer, d.max_length) if held_groups else None
    log.info(f"dpo: {len(train_rows)} training rankings, {len(held_rows) if held_rows else 0} held out "
             f"(each prompt computed once for all its responses, {train_rows.stats['sharing_factor']:.2f}x fewer "
             "tokens)")
    dtype = causal_lm.weight_dtype(m.dtype, compute_precision(acc), frozen=False)
    model = causal_lm.no_dropout(causal_lm.load_causal_lm(m.name_or_path, m.gguf_file, m.trust_remote_code,
                                                          cfg.lora.load_in_4bit, dtype, m.attn_implementation))
    causal_lm.check_vocab(model, tokenizer)
    model = prepare_for_training(model, cfg.lora, cfg.gradient_checkpointing)
    kernels = apply_kernels(model, cfg.kernels, acc.device)
    objective = dpo_objective(cfg, kernels.plan, fresh=run.checkpointer.latest() is None)
    reference = {} if cfg.lora.enabled else _reference_for(run, cfg, model, train_rows, held_rows, kernels.plan)
    if reference:
        train_rows = WithReference(train_rows, reference["train"])
        held_rows = WithReference(held_rows, reference["held_out"]) if held_rows is not None else None
    batches = batching.ShuffledBatches(train_rows, cfg.train.batch_size, acc.process_index, acc.num_processes,
                                       cfg.seed)
    kl = kl_reader(acc, cfg, tokenizer, [g.prompt for g in held_groups], kernels.plan, dtype)

    def held_out():
        return batching.eval_batches(held_rows, cfg.train.batch_size, acc.process_index, acc.num_processes)

    def implicit_rewards(model, batch: dict) -> torch.Tensor:
        logp = response_logprobs(model, batch, kernels.plan)
        return cfg.dpo.beta * (logp - reference_of(batch, model, kernels.plan))

    def metrics(model, step: int) -> dict:
        out = preference_metrics(acc, model, held_out(), implicit_rewards) if held_rows is not None else {}
        return {**out, **(kl(model, step) if kl is not None else {})}

    record = {"inputs": {"train": sources.describe_source(d.train),
                         **({"eval": sources.describe_source(d.eval)} if d.eval else {})},
              "parent": find_parent(m.name_or_path), "parents": {"model": find_parent(m.name_or_path)},
              "annotators": annotator_statistics(train_groups + held_groups),
              "annotation": annotation_facts(d.train),
              "data": {"train": train_rows.inner.stats if reference else train_rows.stats, "format": d.format},
              "kernels": kernels.summary(), "algorithm": {"name": "dpo", **vars(cfg.dpo)}}
    return run_supervised_stage(run, model, tokenizer, batches, objective, d.max_length,
                                held_out if held_rows is not None else None, record, after_eval=metrics,
                                merge_adapters=cfg.lora.enabled and cfg.lora.merge)
