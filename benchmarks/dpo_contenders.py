"""The `dpo` comparison: llmstack's DPO stage vs TRL's `DPOTrainer` on the same preference pairs; each contender
runs alone in this process (see run.py) and prints one JSON line of results.

    python -m benchmarks.dpo_contenders NAME INIT_DIR DATA_DIR OUT_DIR SEQ BATCH STEPS WARMUP PRECISION
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from llmstack.data import chat, text
from llmstack.data.formats import chat_text, prompt_ids
from llmstack.data.preference import import_hh, iter_groups, render
from llmstack.data.sources import iter_records
from llmstack.models.causal_lm import build_from_preset, load_causal_lm, load_tokenizer, save_model

LR, BETA, HELD_OUT_FRACTION = 1e-6, 0.1, 0.1

DESCRIPTION = (
    "Work: preset {preset} with fresh weights as the starting policy and its own reference, vocabulary "
    "{vocabulary:,} (a byte-level BPE trained on the dialogues{also}), {pairs} Anthropic HH harmless-base pairs "
    "whose prompt + response fit {seq} tokens, {held_out} of them held out, {batch} pairs per step, sigmoid DPO "
    "loss with beta " + str(BETA) + ", " + common.ALIGNED_SETTINGS + (
    ". Both read the same records in the same batches: the prompt as text (the dialogue rendered with llmstack's "
    "chat template up to the answer header), each response as text, EOS appended by each trainer. TRL (default "
    "settings) runs the frozen reference on every batch, and each pair as two sequences (chosen, rejected) padded "
    "to the batch's longest; llmstack computes the reference's log-probabilities once before the first step (its "
    "one-time cost is in `whole run`, with model loading and data preparation, as TRL's are) and runs each pair as one row holding the prompt once. "
    "Scored tokens: the tokens of every (prompt + response) sequence, the same work for both. Peak memory: the "
    "process's resident-set high-water mark. Held-out: the DPO loss and reward accuracy of the saved policy "
    "against the starting model, one sequence per forward, the same function for every contender."
))

NOTES = """Notes:
- The first loss is ln 2 = 0.6931 for both (policy == reference before the first update), and the last and
  the held-out measures agree to about 1e-6: the same computation.
- `whole run` is each process's training call from start to end: for llmstack it includes the held-out
  evaluation before and after training (with answers sampled for the KL to the reference) and the reference
  pass, which TRL's run does not do, so it measures more work than the step rates.
- What differs is how much each step runs: TRL's default forwards the reference model on every batch and
  runs each prompt twice; llmstack runs the reference once over the data before training and each prompt once
  per pair. The reference pass is paid once per run and grows with the data, not the steps."""


def prepare(args, work: Path) -> dict:
    groups = list(import_hh(args.data))
    texts = (piece for g in groups for piece in [m["content"] for m in g.prompt] + g.responses)
    tokenizer = text.train_tokenizer(common.tokenizer_texts(texts, args.tokenizer_text), args.vocab)
    chat.ensure_chat_template(tokenizer)
    save_model(build_from_preset(args.preset, tokenizer, args.seq, seed=common.SEED), tokenizer, work / "init")
    fitting = [g for g in groups if all(len(render(tokenizer, g.prompt, r)) <= args.seq for r in g.responses)]

    def pair(group) -> dict:
        return {"prompt": chat_text(tokenizer, group.prompt, prompt=True), "chosen": group.responses[0],
                "rejected": group.responses[1]}

    held_out = common.write_split(fitting, HELD_OUT_FRACTION, pair, work / "data")
    return {"data": str(work / "data"), "pairs": len(fitting), "held_out": held_out, "vocabulary": len(tokenizer),
            "also": common.also(args.tokenizer_text), "lr": LR}


def _pairs(data: str, part: str) -> list:
    return list(iter_groups(str(Path(data) / f"{part}.jsonl")))


def _scored_tokens(tokenizer, pairs, order, batch, steps) -> list[int]:
    return [sum(len(render(tokenizer, pairs[i].prompt, r)) for i in order[s * batch:(s + 1) * batch]
                for r in pairs[i].responses) for s in range(steps)]


def llmstack_run(init, data, out, seq, batch, steps, precision="fp32") -> common.Steps:
    from llmstack.config import DPOConfig, load_config
    from llmstack.trainers.dpo import dpo

    cfg = load_config(DPOConfig, None, [
        f"output_dir={out}", f"model.name_or_path={init}", f"data.train={Path(data) / 'train.jsonl'}",
        f"data.eval={Path(data) / 'held_out.jsonl'}", f"data.max_length={seq}", f"seed={common.SEED}",
        f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.lr={LR}", f"dpo.beta={BETA}",
        *common.LLMSTACK_SCHEDULE, "train.log_every=1", "train.eval_every=0", f"train.save_every={steps}",
        f"train.precision={precision}", "train.keep_last=1"])
    start = time.perf_counter()
    dpo(cfg)
    run_s = time.perf_counter() - start
    pairs = _pairs(data, "train")
    order = common.dealing_order(len(pairs), batch, steps)
    return common.llmstack_steps(out, tokens=_scored_tokens(load_tokenizer(init), pairs, order, batch, steps),
                                 items=[batch] * steps, extra={"run_s": run_s})


def trl_run(init, data, out, seq, batch, steps, precision="fp32") -> common.Steps:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    tokenizer = load_tokenizer(init)
    records = [record for _, record in iter_records(str(Path(data) / "train.jsonl"))]
    order = common.dealing_order(len(records), batch, steps)
    dataset = Dataset.from_list([records[i] for i in order])
    clock = common.Clock()
    args = common.trainer_arguments(DPOConfig, out, batch, steps, LR, 0, **common.TRAINER_SCHEDULE,
                                    max_length=seq, beta=BETA, precision=precision, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=init, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    setup_s = time.perf_counter() - started
    pairs = _pairs(data, "train")
    start = time.perf_counter()
    steps_ = common.trainer_steps(trainer, clock, out, tokens=_scored_tokens(tokenizer, pairs, order, batch, steps),
                                  items=[batch] * steps)
    steps_.extra = {"run_s": time.perf_counter() - start + setup_s}
    return steps_


@torch.no_grad()
def _logp(model, ids: list[int], prompt_len: int) -> float:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(ids[1:])
    token_logp = F.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    return float(token_logp[prompt_len - 1:].sum())


@torch.no_grad()
def quality(init: str, data: str, model_dir: str, seq: int) -> dict:
    """Held-out DPO loss and reward accuracy of the trained policy against the starting model."""
    tokenizer = load_tokenizer(init)
    policy, reference = load_causal_lm(model_dir).eval(), load_causal_lm(init).eval()
    margins = []
    for group in _pairs(data, "held_out"):
        prompt_len = len(prompt_ids(tokenizer, group.prompt))
        rewards = []
        for response in group.responses:
            ids = render(tokenizer, group.prompt, response)
            rewards.append(BETA * (_logp(policy, ids, prompt_len) - _logp(reference, ids, prompt_len)))
        margins.append(rewards[0] - rewards[1])
    margins = torch.tensor(margins)
    return {"held_out_loss": float(F.softplus(-margins).mean()),
            "held_out_accuracy": float((margins > 0).float().mean())}


CONTENDERS = {"llmstack": llmstack_run, "trl": trl_run}


if __name__ == "__main__":
    common.main(sys.argv[1:], CONTENDERS, quality)
