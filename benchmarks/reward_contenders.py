"""The `reward` comparison: llmstack's reward stage vs TRL's `RewardTrainer` on the same preference pairs;
each contender runs alone in this process (see run.py) and prints one JSON line of results.

    python -m benchmarks.reward_contenders NAME INIT_DIR DATA_DIR OUT_DIR SEQ BATCH STEPS WARMUP PRECISION
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common, smollm2
from benchmarks.smollm2 import save_smollm2
from llmstack.data import chat, text
from llmstack.data.batching import ShuffledBatches
from llmstack.data.preference import build_preference_rows, import_hh, iter_groups, render
from llmstack.models.causal_lm import build_from_preset, load_tokenizer, save_model

LR, HELD_OUT_FRACTION = 1e-5, 0.1

DESCRIPTION = (
    "Work: {backbone} under a one-output score head, {pairs} Anthropic HH harmless-base pairs (of {read} usable; "
    "the others have a response over {seq} tokens, which TRL drops and llmstack cuts, so neither gets them), {held_out} of "
    "them held out, {batch} pairs per step, " + common.ALIGNED_SETTINGS + (
    ". Both load the same saved reward model (llmstack's score-head initialisation on "
    "that backbone), read the same pairs in the same batches and score the same token ids: the "
    "prompt rendered with llmstack's chat template up to the answer header, the response, EOS. TRL gets these as "
    "`chosen_ids`/`rejected_ids`, since its own rendering of a conversation ends on the template's newline after "
    "EOS. TRL runs each pair as two sequences, chosen and rejected, each padded to the batch's longest; llmstack "
    "runs each pair as one row, the prompt once and then both responses (each attending to the prompt and "
    "itself, with the positions it has alone), each row padded to the batch's longest. Scored tokens: the "
    "tokens of every (prompt + response) sequence, the same work for both; positions run: the size of what "
    "each trainer's model actually processed per step, padding included. Peak memory: the process's resident-set "
    "high-water mark. Held-out loss and accuracy: the Bradley-Terry loss and the share of held-out pairs whose "
    "chosen response scores higher, one response per forward, the same function for every contender."
))

NOTES = """Notes:
- Both trainers spend nearly all of a step in the same transformers forward and backward (a cProfile of
  llmstack's stage scoring each prompt + response separately, 2026-12-01: 1.0 s forward and 1.5 s backward
  of a 2.5 s step of 8 pairs, about TRL's step time), so the trainers' own work barely differs. What
  llmstack changes is how much the model runs: HH prompts are whole dialogues and the answers short, so
  computing each prompt once for both of its answers cuts the positions run per step, and with them the
  time and the activation memory.
- The rest of the memory is the parameters, gradients and AdamW state of the same model in both, and the
  activations of the positions each runs."""


def prepare(args, work: Path) -> dict:
    """The tokenizer (trained on the dialogues), llmstack's initialised reward model, and the pairs that fit
    `args.seq` split into train and held-out as llmstack preference JSONL, once for every contender."""
    from llmstack.models.reward_model import load_reward_model

    groups = list(import_hh(args.data))
    with tempfile.TemporaryDirectory(dir=work) as backbone:
        if args.model == "smollm2":
            tokenizer = save_smollm2(Path(backbone), work / "smollm2-pkg")
            described = f"{smollm2.LABEL}, with its own {len(tokenizer):,}-token tokenizer and chat template"
        else:
            texts = (piece for g in groups for piece in [m["content"] for m in g.prompt] + g.responses)
            tokenizer = text.train_tokenizer(common.tokenizer_texts(texts, args.tokenizer_text), args.vocab)
            save_model(build_from_preset(args.preset, tokenizer, args.seq, seed=common.SEED), tokenizer, backbone)
            described = (f"preset {args.preset} with fresh weights, vocabulary {len(tokenizer):,} (a byte-level BPE "
                         f"trained on the dialogues{common.also(args.tokenizer_text)}, {args.vocab:,} asked for)")
        chat.ensure_chat_template(tokenizer)
        save_model(load_reward_model(backbone, tokenizer, common.SEED), tokenizer, work / "init")
    fitting = [g for g in groups if all(len(render(tokenizer, g.prompt, r)) <= args.seq for r in g.responses)]
    pair = lambda g: {"prompt": g.prompt, "chosen": g.responses[0], "rejected": g.responses[1]}  # noqa: E731
    held_out = common.write_split(fitting, HELD_OUT_FRACTION, pair, work / "data")
    return {"data": str(work / "data"), "read": len(groups), "pairs": len(fitting), "held_out": held_out,
            "backbone": described, "lr": LR}


def _pairs(data: str, part: str) -> list:
    return list(iter_groups(str(Path(data) / f"{part}.jsonl")))


def llmstack_run(init, data, out, seq, batch, steps, precision="fp32") -> common.Steps:
    from llmstack.config import RewardConfig, load_config
    from llmstack.trainers.reward import reward

    cfg = load_config(RewardConfig, None, [
        f"output_dir={out}", f"model.name_or_path={init}", f"data.train={Path(data) / 'train.jsonl'}",
        f"data.eval={Path(data) / 'held_out.jsonl'}", f"data.max_length={seq}", f"seed={common.SEED}",
        f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.lr={LR}",
        *common.LLMSTACK_SCHEDULE, "train.log_every=1", "train.eval_every=0",
        f"train.save_every={steps}", f"train.precision={precision}", "train.keep_last=1"])
    reward(cfg)
    # llmstack counts the tokens it runs, each prompt once per pair; the table's tokens are those of the scored
    # sequences (each prompt once per response), as TRL counts them, so both rates measure the same work
    tokenizer, pairs = load_tokenizer(init), _pairs(data, "train")
    rows = build_preference_rows(pairs, tokenizer, seq)
    order = common.dealing_order(len(pairs), batch, steps)
    scored = [sum(len(render(tokenizer, pairs[i].prompt, r)) for i in order[s:s + batch] for r in pairs[i].responses)
              for s in range(0, len(order), batch)]
    dealt = [b for _, b in zip(range(steps), ShuffledBatches(rows, batch, 0, 1, common.SEED))]
    return common.llmstack_steps(out, tokens=scored, positions=[b["input_ids"].numel() for b in dealt],
                                 items=[batch] * steps)


def trl_run(init, data, out, seq, batch, steps, precision="fp32") -> common.Steps:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(init)
    pairs = _pairs(data, "train")
    # the pairs in the order llmstack's sampler deals them, read in order: the same batches, so the losses
    # can be compared step by step
    ordered = [pairs[i] for i in common.dealing_order(len(pairs), batch, steps)]
    encoded = [[render(tokenizer, g.prompt, response) for response in g.responses] for g in ordered]
    dataset = Dataset.from_list([{"chosen_ids": chosen, "rejected_ids": rejected} for chosen, rejected in encoded])
    clock = common.Clock()
    args = common.trainer_arguments(RewardConfig, out, batch, steps, LR, 0, **common.TRAINER_SCHEDULE,
                                    max_length=seq, precision=precision, activation_checkpointing=False)
    trainer = RewardTrainer(model=init, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[clock])
    # each batch is padded to its longest response
    longest = [max(len(ids) for pair in encoded[i:i + batch] for ids in pair) for i in range(0, len(encoded), batch)]
    return common.trainer_steps(trainer, clock, out, positions=[2 * batch * n for n in longest],
                                items=[batch] * steps)


@torch.no_grad()
def quality(init: str, data: str, model_dir: str, seq: int) -> dict:
    """Bradley-Terry loss and accuracy of `model_dir` on the held-out pairs, each response scored alone."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(init)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()

    def margin(group) -> float:
        chosen, rejected = (render(tokenizer, group.prompt, r) for r in group.responses)
        return float(model(input_ids=torch.tensor([chosen])).logits - model(input_ids=torch.tensor([rejected])).logits)

    margins = torch.tensor([margin(g) for g in _pairs(data, "held_out")])
    return {"held_out_loss": float(F.softplus(-margins).mean()),
            "held_out_accuracy": float((margins > 0).float().mean())}


CONTENDERS = {"llmstack": llmstack_run, "trl": trl_run}


if __name__ == "__main__":
    common.main(sys.argv[1:], CONTENDERS, quality)
