"""Chat data for supervised fine-tuning: records -> conversations -> token ids with answer-only labels -> rows.

Conversations are rendered with the tokenizer's chat template, or with DEFAULT_CHAT_TEMPLATE which is then
stored on the tokenizer, so the fine-tuned model is saved with the template it was trained on.

Labels cover the assistant turns only (everything else is -100). Each turn is tokenised the way inference
sees it: the prompt up to the assistant's header alone, then the answer, so the boundary tokens match what
`generate` produces after `apply_chat_template(..., add_generation_prompt=True)`.

Shape legend: N rows, T row length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from llmstack.data.sources import DataError, iter_records, synthetic_count
from llmstack.losses import IGNORE_INDEX

ROLES = ("system", "user", "assistant")

# Role headers are plain text, so a tokenizer needs no new tokens (and the model no new embeddings); the
# end of every turn is the tokenizer's EOS, which is what generation stops on.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


@dataclass
class ChatFields:
    """Names of the fields holding a conversation in the user's records."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"


def _as_messages(value, where: str, name: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: field '{name}' must be a string or a list of messages, got {type(value).__name__}")


def to_messages(record, where: str, fields: ChatFields = ChatFields()) -> list[dict]:
    """A validated conversation from a `{"messages"}` or `{"prompt", "completion"}` record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fields.messages in record:
        messages = _as_messages(record[fields.messages], where, fields.messages, "user")
        name = fields.messages
    elif fields.prompt in record and fields.completion in record:
        messages = (_as_messages(record[fields.prompt], where, fields.prompt, "user")
                    + _as_messages(record[fields.completion], where, fields.completion, "assistant"))
        name = fields.completion
    else:
        raise DataError(f"{where}: missing field '{fields.messages}' (or '{fields.prompt}' and "
                        f"'{fields.completion}'); the record has: {', '.join(record) or 'nothing'}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field '{name}'[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: field '{name}'[{i}].role is {message['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: field '{name}'[{i}].content must be a string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: field '{name}'[{i}] is an empty assistant answer")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field '{name}' has no assistant turn, so there is nothing to learn from it")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def iter_conversations(spec: str, fields: ChatFields = ChatFields()) -> Iterator[list[dict]]:
    """Conversations from JSONL/JSON/Parquet files, a directory of them, a `datasets` name, or
    'synthetic[:N]' (the built-in arithmetic questions)."""
    n_synthetic = synthetic_count(spec)
    if n_synthetic is not None:
        from llmstack.data.synthetic import instructions

        yield from instructions(n_synthetic)
        return
    for where, record in iter_records(spec):
        yield to_messages(record, where, fields)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the default one; True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


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
        context = _encode(tokenizer, prompt[len(done):])
        answer = _encode(tokenizer, full[len(prompt):])
        end = _answer_end(answer, tokenizer.eos_token_id)
        if end == len(answer) and (not answer or answer[-1] != tokenizer.eos_token_id):
            answer, end = answer + [tokenizer.eos_token_id], len(answer) + 1
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer[:end] + [IGNORE_INDEX] * (len(answer) - end)
        done = full
    tail = _encode(tokenizer, _render(tokenizer, messages, generation_prompt=False)[len(done):])
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    return ids, labels


def _answer_end(answer: list[int], eos_id: int) -> int:
    """Labels stop after the end-of-turn token; the separator a template puts after it is not the answer."""
    for index in range(len(answer) - 1, -1, -1):
        if answer[index] == eos_id:
            return index + 1
    return len(answer)


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
        raise ValueError(f"no example fits data.max_length={max_length} ({dropped} dropped); raise it or "
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

