"""The `sft` comparison: llmstack's SFT stage vs TRL's `SFTTrainer`, each with packing off and on, on the same
conversations; each contender runs alone in this process (see run.py) and prints one JSON line of results.

    python -m benchmarks.sft_contenders NAME INIT_DIR DATA_DIR OUT_DIR SEQ BATCH STEPS WARMUP PRECISION
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from benchmarks import common
from llmstack.data import chat, text
from llmstack.data.batching import ShuffledBatches
from llmstack.data.sources import iter_records
from llmstack.losses import causal_lm_loss_sum, count_targets
from llmstack.models.causal_lm import build_from_preset, load_causal_lm, load_tokenizer, save_model

LR, HELD_OUT_FRACTION = 1e-4, 0.05

# llmstack's default template with `{% generation %}` markers around each answer and its EOS: the markers
# render nothing, so the text, and llmstack's labels, are those of DEFAULT_CHAT_TEMPLATE, while TRL builds
# its assistant-only mask from them.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

DESCRIPTION = (
    "Work: preset {preset}, vocabulary {vocabulary:,} (a byte-level BPE trained on the conversations{also}, "
    "{vocab:,} asked for), {conversations} conversations ({source}), {held_out} of them held out, at most {seq} tokens each "
    "(longer ones cut), {batch} rows per step, " + common.ALIGNED_SETTINGS + (
    " from the same initial weights. Loss on the answers and their EOS only, with the "
    "same template and the same token ids: TRL tokenizes the messages itself (`assistant_only_loss=True`, from "
    "the template's `{{% generation %}}` markers). Unpacked, both read the same conversations in the same batches "
    "(each pads a batch to its longest conversation), so their losses agree step by step. "
    "Packed, llmstack fills rows of {seq} greedily in data order under a block-diagonal mask and TRL packs "
    "best-fit-decreasing into one padding-free row per batch (boundaries from position ids), so their batches "
    "differ. Real tokens: the non-padding tokens of a step's input (llmstack's own log counts every position it "
    "runs, padding included; TRL's `num_tokens` counts these). MFU: real tokens/s x the model's training FLOPs "
    "per token (6N + 12LHT at T = {seq}) over this machine's measured {precision} matmul peak ({peak_gflops:,.0f} "
    "GFLOP/s, {threads} threads). Peak memory: the process's resident-set high-water mark. Held-out loss: "
    "mean answer-token loss of the saved model on the held-out conversations, one conversation per forward, the "
    "same function for every contender."
))

NOTES = """Notes:
- Where the unpacked step goes (`py-spy record -r 50`, 8 steps each, 2026-12-01): the decoder layers' forward
  costs both the same (0.68 s llmstack, 0.64 s TRL). TRL 1.16 computes its loss through its own chunked
  log-probability function (`trl/kernels/chunked_logprob.py`) at every position, prompt included, with the
  entropy and statistics it logs: 1.4 s in the forward, and its backward (head and layers) takes 3.7 s.
  llmstack (`kernels: auto`) projects only the answer tokens, computing the loss and the head's gradients in
  one chunked pass (0.56 s), so its backward is the layers' alone (1.2 s).
- Packed, TRL flattens each batch into one padding-free row of about 4,000 tokens and attends within it
  under a block-diagonal mask built from the position ids; without FlashAttention (CPU) that attention is
  computed over the whole row and then masked, quadratic in the row's length.
- The machine is shared with whatever else runs on it: read the load column (about 2 is the contender's own
  two threads) before comparing runs."""


def _paths(node: dict, before: list[dict]):
    if node.get("synthetic"):
        return
    here = before + [{"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]}]
    replies = [reply for reply in node.get("replies", []) if not reply.get("synthetic")]
    if not replies:
        yield here
    for reply in replies:
        yield from _paths(reply, here)


TREE_SOURCE = "OASST message trees: every human-written root-to-leaf path, cut back to its last answer"


def read_conversations(path: str) -> tuple[list[list[dict]], str]:
    """(conversations, where they came from): OASST message trees as every human-written root-to-leaf path cut
    back to its last answer, each distinct path once; any other records are read as llmstack chat records."""
    records = [record for _, record in iter_records(path)]
    if not (records and isinstance(records[0].get("prompt"), dict) and "replies" in records[0]["prompt"]):
        return list(chat.iter_examples(path)), "chat records"
    conversations, seen = [], set()
    for record in records:
        for messages in _paths(record["prompt"], []):
            while messages and messages[-1]["role"] != "assistant":
                messages = messages[:-1]
            key = json.dumps(messages)
            if messages and key not in seen:
                seen.add(key)
                conversations.append(messages)
    return conversations, TREE_SOURCE


def prepare(args, work: Path) -> dict:
    """The tokenizer (trained on the conversations, with CHAT_TEMPLATE), the initial weights and the train and
    held-out conversations as llmstack chat JSONL, once for every contender."""
    conversations, source = read_conversations(args.data)
    tokenizer = text.train_tokenizer(common.tokenizer_texts((m["content"] for c in conversations for m in c),
                                                            args.tokenizer_text), args.vocab)
    tokenizer.chat_template = CHAT_TEMPLATE
    save_model(build_from_preset(args.preset, tokenizer, args.seq, seed=common.SEED), tokenizer, work / "init")
    held_out = common.write_split(conversations, HELD_OUT_FRACTION, lambda c: {"messages": c}, work / "data")
    return {"data": str(work / "data"), "conversations": len(conversations), "held_out": held_out,
            "vocabulary": len(tokenizer), "source": source, "lr": LR, "also": common.also(args.tokenizer_text)}


def _conversations(data: str, part: str) -> list[list[dict]]:
    return list(chat.iter_examples(str(Path(data) / f"{part}.jsonl")))


def _kept(tokenizer, conversations: list, seq: int) -> tuple[list, list]:
    """The conversations llmstack trains on (a cut one must keep an answer token) and their (ids, labels)."""
    pairs = [(c, chat.fit_length(chat.tokenize_conversation(tokenizer, c), seq, "truncate")) for c in conversations]
    kept = [(c, e) for c, e in pairs if e is not None]
    return [c for c, _ in kept], [e for _, e in kept]


def llmstack_run(packing: bool):
    def run(init, data, out, seq, batch, steps, precision="fp32") -> common.Steps:
        from llmstack.config import SFTConfig, load_config
        from llmstack.trainers.sft import sft

        cfg = load_config(SFTConfig, None, [
            f"output_dir={out}", f"model.name_or_path={init}", f"data.train={Path(data) / 'train.jsonl'}",
            f"data.eval={Path(data) / 'held_out.jsonl'}", f"data.max_length={seq}", f"data.packing={packing}",
            f"seed={common.SEED}", f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.lr={LR}",
            *common.LLMSTACK_SCHEDULE, "train.log_every=1", "train.eval_every=0",
            f"train.save_every={steps}", f"train.precision={precision}", "train.keep_last=1", "sample_prompts=0"])
        sft(cfg)
        # llmstack counts every position it runs, padding included: count the real tokens of its batches
        tokenizer = load_tokenizer(init)
        _, examples = _kept(tokenizer, _conversations(data, "train"), seq)
        rows = chat.build_rows(examples, seq, tokenizer.pad_token_id, packing)
        dealt = [b for _, b in zip(range(steps), ShuffledBatches(rows, batch, 0, 1, common.SEED))]
        return common.llmstack_steps(out, tokens=[int((b["input_ids"] != tokenizer.pad_token_id).sum()) for b in dealt],
                                     positions=[b["input_ids"].numel() for b in dealt])

    return run


def trl_run(packing: bool):
    def run(init, data, out, seq, batch, steps, precision="fp32") -> common.Steps:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        tokenizer = load_tokenizer(init)
        conversations, _ = _kept(tokenizer, _conversations(data, "train"), seq)
        if packing:
            # TRL packs the whole set its own way and samples its packed rows in its default shuffled order
            dataset, sampling = Dataset.from_list([{"messages": c} for c in conversations]), "random"
        else:
            # the conversations in the order llmstack's sampler deals its unpacked rows, read in order: the
            # same batches, so the losses can be compared step by step
            order = common.dealing_order(len(conversations), batch, steps)
            dataset, sampling = Dataset.from_list([{"messages": conversations[i]} for i in order]), "sequential"
        clock = common.Clock()
        args = common.trainer_arguments(
            SFTConfig, out, batch, steps, LR, 0, **common.TRAINER_SCHEDULE, max_length=seq,
            packing=packing, assistant_only_loss=True, precision=precision, activation_checkpointing=False,
            train_sampling_strategy=sampling)
        trainer = SFTTrainer(model=init, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[clock])
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        run = common.trainer_steps(trainer, clock, out)
        # packed, every batch is one padding-free row; unpacked, each is padded to its longest conversation
        run.positions = run.tokens if packing else [batch * max(lengths[i:i + batch])
                                                    for i in range(0, batch * steps, batch)]
        return run

    return run


@torch.no_grad()
def held_out_loss(init: str, data: str, model_dir: str, seq: int) -> float:
    """Mean answer-token loss of `model_dir` on the held-out conversations, each alone, cut to `seq`."""
    _, examples = _kept(load_tokenizer(init), _conversations(data, "held_out"), seq)
    model = load_causal_lm(model_dir).eval()
    total, count = 0.0, 0
    for ids, labels in examples:
        labels = torch.tensor([labels])
        total += float(causal_lm_loss_sum(model(input_ids=torch.tensor([ids])).logits, labels))
        count += count_targets(labels)
    return total / count


def quality(init: str, data: str, model_dir: str, seq: int) -> dict:
    return {"held_out_loss": held_out_loss(init, data, model_dir, seq)}


CONTENDERS = {"llmstack": llmstack_run(False), "trl": trl_run(False),
              "llmstack-packed": llmstack_run(True), "trl-packed": trl_run(True)}


if __name__ == "__main__":
    common.main(sys.argv[1:], CONTENDERS, quality)
