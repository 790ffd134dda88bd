"""SFT data: TRL's language-modelling and prompt-completion records -> token ids with loss labels -> rows.

Each record is tokenised as TRL 1.16's SFTTrainer tokenises it, so both give the same token ids and labels:
- {"text"}: the text, EOS appended unless it ends with it, tokenised whole; the loss covers every token.
- {"messages"}: the chat template's rendering; the loss covers the assistant answers and their end-of-turn
  token only (TRL with `assistant_only_loss=True`). Each turn is tokenised the way inference sees it: the
  conversation up to the assistant's header alone, then the answer, so the boundary tokens are what
  `generate` continues after `apply_chat_template(..., add_generation_prompt=True)`.
- {"prompt", "completion"} as text: prompt + completion (+ EOS) concatenated and tokenised whole (TRL's
  meaning: no chat template); as messages: the template's rendering of prompt + completion. The loss covers
  what follows the longest common token prefix with the prompt tokenised alone, with its generation header for
  messages (TRL's default `completion_only_loss`).
Types SFT does not take are refused with a one-line error (llmstack.data.formats).

Conversations are rendered with the tokenizer's chat template, or with DEFAULT_CHAT_TEMPLATE which is then
stored on the tokenizer, so the fine-tuned model is saved with the template it was trained on.

Shape legend: N rows, T row length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from llmstack.data.formats import (LANGUAGE_MODELLING, PROMPT_COMPLETION, ChatFields, plain_ids, record_type,
                                   refusal, text_ids, text_or_messages, with_eos)
from llmstack.data.formats import messages as valid_messages
from llmstack.data.sources import DataError, iter_records, synthetic_count
from llmstack.losses import IGNORE_INDEX

# Role headers are plain text, so a tokenizer needs no new tokens (and the model no new embeddings); the
# end of every turn is the tokenizer's EOS, which is what generation stops on.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class PromptCompletion:
    """A prompt-completion record: both parts text (standard) or both messages (conversational)."""

    prompt: str | list[dict]
    completion: str | list[dict]


# An SFT example: standard text, a conversation, or a prompt and its completion.
Example = str | list[dict] | PromptCompletion


def _conversation(value, where: str, name: str) -> list[dict]:
    conversation = valid_messages(value, where, name)
    for i, message in enumerate(conversation):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: field '{name}'[{i}] is an empty assistant answer")
    if not any(m["role"] == "assistant" for m in conversation):
        raise DataError(f"{where}: field '{name}' has no assistant turn, so there is nothing to learn from it")
    return conversation


def to_example(record, where: str, fields: ChatFields = ChatFields()) -> Example:
    """A validated SFT example from a `{"text"}`, `{"messages"}` or `{"prompt", "completion"}` record."""
    kind = record_type(record, where, fields)
    if kind == LANGUAGE_MODELLING and fields.messages in record:
        return _conversation(record[fields.messages], where, fields.messages)
    if kind == LANGUAGE_MODELLING:
        text = record[fields.text]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field '{fields.text}' must be non-empty text")
        return text
    if kind != PROMPT_COMPLETION:
        raise refusal(record, where, "sft", fields)
    prompt = text_or_messages(record[fields.prompt], where, fields.prompt)
    completion = text_or_messages(record[fields.completion], where, fields.completion)
    if type(prompt) is not type(completion):
        raise DataError(f"{where}: fields '{fields.prompt}' and '{fields.completion}' must both be text "
                        "(standard) or both lists of messages (conversational)")
    if isinstance(completion, str) and not completion.strip():
        raise DataError(f"{where}: field '{fields.completion}' is empty, so there is nothing to learn from it")
    return PromptCompletion(prompt, completion)


def iter_examples(spec: str, fields: ChatFields = ChatFields()) -> Iterator[Example]:
    """SFT examples from JSONL/JSON/Parquet files, a directory of them, a `datasets` name, or
    'synthetic[:N]' (the built-in arithmetic conversations)."""
    n_synthetic = synthetic_count(spec)
    if n_synthetic is not None:
        from llmstack.data.synthetic import instructions

        yield from instructions(n_synthetic)
        return
    for where, record in iter_records(spec):
        yield to_example(record, where, fields)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the default one; True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one SFT example; labels are -100 where there is no loss."""
    if isinstance(example, str):
        ids = text_ids(tokenizer, with_eos(tokenizer, example))
        return ids, list(ids)
    if isinstance(example, list):
        return tokenize_conversation(tokenizer, example)
    if isinstance(example.prompt, str):
        prompt = text_ids(tokenizer, example.prompt)
        ids = text_ids(tokenizer, example.prompt + with_eos(tokenizer, example.completion))
    else:
        prompt = plain_ids(tokenizer, _render(tokenizer, example.prompt, generation_prompt=True))
        ids = plain_ids(tokenizer, _render(tokenizer, example.prompt + example.completion, generation_prompt=False))
    # Tokens can merge across the prompt's end (or a template renders a prompt alone differently): the
    # completion starts where the two tokenisations part, and the training sequence is the whole one
    start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
    return ids, [IGNORE_INDEX] * start + ids[start:]


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels on the assistant answers and their end-of-turn token only."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation; "
                             "answer-only labels cannot be placed (use a template without that property)")
        context = plain_ids(tokenizer, prompt[len(done):])
        answer = plain_ids(tokenizer, full[len(prompt):])
        end = _answer_end(answer, tokenizer.eos_token_id)
        if end == len(answer) and (not answer or answer[-1] != tokenizer.eos_token_id):
            answer, end = answer + [tokenizer.eos_token_id], len(answer) + 1
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer[:end] + [IGNORE_INDEX] * (len(answer) - end)
        done = full
    tail = plain_ids(tokenizer, _render(tokenizer, messages, generation_prompt=False)[len(done):])
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    return ids, labels


def _answer_end(answer: list[int], eos_id: int) -> int:
    """Labels stop after the end-of-turn token; the separator a template puts after it is not the answer."""
    for index in range(len(answer) - 1, -1, -1):
        if answer[index] == eos_id:
            return index + 1
    return len(answer)


def sample_prompts(examples: list[Example], n: int) -> list[tuple[str | list[dict], str | list[dict]]]:
    """(prompt, reference answer) of the first `n` examples that have a prompt: a conversation up to its last
    answer, or a prompt-completion record's two parts (text records have no prompt)."""
    pairs = []
    for example in examples:
        if len(pairs) == n:
            break
        if isinstance(example, PromptCompletion):
            pairs.append((example.prompt, example.completion))
        elif isinstance(example, list):
            last = max(i for i, m in enumerate(example) if m["role"] == "assistant")
            if last > 0:
                pairs.append((example[:last], example[last]["content"]))
    return pairs


@dataclass
class ChatRows:
    """Rows of one or more examples, right-padded to `max_length`. `segment_ids` number the examples in a
    row (padding gets its own segment); `position_ids` restart at 0 for every example; `lengths` count each
    row's tokens before its padding."""

    input_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T]
    position_ids: torch.Tensor  # [N, T]
    segment_ids: torch.Tensor  # [N, T]
    lengths: torch.Tensor  # [N]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index) -> dict:
        """The rows at `index`, cut to the longest of them: a column that is padding in every row of the batch
        is neither attended to nor a target, so dropping it changes no loss and saves its compute."""
        width = int(self.lengths[index].max())
        return {"input_ids": self.input_ids[index, :width], "labels": self.labels[index, :width],
                "position_ids": self.position_ids[index, :width], "segment_ids": self.segment_ids[index, :width]}


def fit_length(example: tuple[list[int], list[int]], max_length: int, overlong: str):
    """The example cut to `max_length` (`truncate`) or None (`drop`, or nothing left to learn)."""
    ids, labels = example
    if len(ids) <= max_length:
        return ids, labels
    if overlong == "drop":
        return None
    ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(label != IGNORE_INDEX for label in labels[1:]) else None


def build_rows(examples: list[tuple[list[int], list[int]]], max_length: int, pad_id: int, packing: bool,
               overlong: str = "truncate") -> ChatRows:
    """Pack examples greedily in order into rows of `max_length` (or one per row without packing)."""
    kept, dropped, truncated = [], 0, 0
    for example in examples:
        fitted = fit_length(example, max_length, overlong)
        dropped += fitted is None
        truncated += fitted is not None and len(fitted[0]) < len(example[0])
        if fitted is not None:
            kept.append(fitted)
    rows: list[list[tuple[list[int], list[int]]]] = []
    for example in kept:
        if packing and rows and sum(len(e[0]) for e in rows[-1]) + len(example[0]) <= max_length:
            rows[-1].append(example)
        else:
            rows.append([example])
    if not rows:
        raise DataError(f"no example fits data.max_length={max_length} ({dropped} dropped); raise it or "
                         "set data.overlong=truncate")
    tensors = [_row(row, max_length, pad_id) for row in rows]
    stacked = [torch.tensor([t[k] for t in tensors], dtype=torch.long) for k in range(4)]
    lengths = torch.tensor([sum(len(e[0]) for e in row) for row in rows], dtype=torch.long)
    n_tokens = sum(len(e[0]) for e in kept)
    stats = {"examples": len(kept), "dropped_overlong": dropped, "truncated": truncated, "rows": len(rows),
             "fill": round(n_tokens / (len(rows) * max_length), 4)}
    return ChatRows(*stacked, lengths, stats=stats)


def _row(examples, max_length: int, pad_id: int):
    ids, labels, positions, segments = [], [], [], []
    for segment, (example_ids, example_labels) in enumerate(examples):
        ids += example_ids
        # the first token of an example is never a target: nothing before it in its own example predicts it
        labels += [IGNORE_INDEX] + example_labels[1:]
        positions += list(range(len(example_ids)))
        segments += [segment] * len(example_ids)
    pad = max_length - len(ids)
    return (ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, positions + list(range(pad)),
            segments + [len(examples)] * pad)


def block_causal_mask(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean mask: position i attends to j iff j <= i and both belong to the same example."""
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    length = segment_ids_BT.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=segment_ids_BT.device))
    return (same & causal)[:, None]

