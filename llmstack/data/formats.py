"""TRL's dataset types with TRL's meaning, and the one prompt rendering every stage shares.

A record's type follows from its fields, as in TRL. Each field holds text (the standard form) or a list of
{"role", "content"} messages (the conversational form):

    language modelling     {"text"}, {"messages"}
    prompt-only            {"prompt"}
    prompt-completion      {"prompt", "completion"}
    preference             {"prompt", "chosen", "rejected"}, or {"chosen", "rejected"} with the prompt implicit
    unpaired preference    {"prompt", "completion", "label"}
    stepwise supervision   {"prompt", "completions", "labels"}

plus llmstack's rankings, {"prompt", "responses", "ranking"}. A stage given a type it does not take raises a
one-line `DataError` naming the file, the record, the field that made the type, and what the stage takes.

Design decisions:
- Standard text that starts a sequence is tokenised as TRL tokenises it, `tokenizer(text)`: with the
  tokenizer's own special tokens (a BOS where the tokenizer adds one). Text that continues a sequence gets no
  special tokens, and where a sequence must end, EOS is appended as text unless the text already ends with it.
- A conversational prompt ends in the chat template's generation header after a user (or system, or tool)
  turn; after an assistant turn its final message is continued (TRL's rule for prompt-only records).
- `prompt_ids` is the only prompt rendering: reward-model rows, PPO rollouts and SFT's sample answers all
  start with it, so the reward model is trained on exactly the prompt tokens it scores during PPO.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmstack.data.sources import DataError, iter_records

ROLES = ("system", "user", "assistant", "tool")

LANGUAGE_MODELLING = "language-modelling"
PROMPT_ONLY = "prompt-only"
PROMPT_COMPLETION = "prompt-completion"
PREFERENCE = "preference"
IMPLICIT_PREFERENCE = "implicit-prompt preference"
UNPAIRED_PREFERENCE = "unpaired preference"
STEPWISE = "stepwise-supervision"
RANKING = "ranking"

STAGES = {
    "sft": ("SFT", "'text', 'messages', or 'prompt' and 'completion'"),
    "reward": ("reward modelling", "'prompt', 'chosen' and 'rejected' (the prompt may be left implicit), or "
                                   "'prompt', 'responses' and 'ranking'"),
    "ppo": ("PPO", "'prompt' or 'messages'"),
}

# What to do instead, where there is something better to say than the stage's accepted fields.
ADVICE = {
    ("sft", PROMPT_ONLY): "add the answer as 'completion' (prompt-only records are for PPO)",
    ("sft", PREFERENCE): "train a reward model on it, or SFT on the chosen answers as 'completion'",
    ("sft", IMPLICIT_PREFERENCE): "train a reward model on it, or SFT on the chosen dialogues as 'text' or "
                                  "'messages'",
    ("sft", UNPAIRED_PREFERENCE): "keep the records labelled true and drop 'label'",
    ("sft", RANKING): "train a reward model on it",
    ("reward", UNPAIRED_PREFERENCE): "pair a desirable and an undesirable completion of the same prompt as "
                                     "'chosen' and 'rejected'",
    ("reward", STEPWISE): "llmstack's reward model scores whole responses; pair whole completions as 'chosen' "
                          "and 'rejected'",
}


@dataclass
class ChatFields:
    """Names of the fields holding a record's text, conversation, prompt and completion."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"


def record_type(record, where: str, fields: ChatFields = ChatFields()) -> str | None:
    """The TRL dataset type of `record` (None when no type's fields are there), by TRL's field names."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fields.messages in record or fields.text in record:
        return LANGUAGE_MODELLING
    if "chosen" in record and "rejected" in record:
        return PREFERENCE if fields.prompt in record else IMPLICIT_PREFERENCE
    if "responses" in record and "ranking" in record:
        return RANKING
    if "completions" in record and "labels" in record:
        return STEPWISE
    if fields.prompt in record:
        if fields.completion not in record:
            return PROMPT_ONLY
        return UNPAIRED_PREFERENCE if "label" in record else PROMPT_COMPLETION
    return None


def _deciding_field(record: dict, kind: str | None, fields: ChatFields) -> str:
    if kind == LANGUAGE_MODELLING:
        return fields.messages if fields.messages in record else fields.text
    return {PREFERENCE: "chosen", IMPLICIT_PREFERENCE: "chosen", RANKING: "ranking", STEPWISE: "completions",
            UNPAIRED_PREFERENCE: "label", PROMPT_COMPLETION: fields.completion, PROMPT_ONLY: fields.prompt}[kind]


def refusal(record: dict, where: str, stage: str, fields: ChatFields = ChatFields()) -> DataError:
    """The one-line error for a record whose type `stage` does not take."""
    kind = record_type(record, where, fields)
    name, takes = STAGES[stage]
    if kind is None:
        return DataError(f"{where}: {name} needs fields {takes}; the record has: {', '.join(record) or 'nothing'}")
    article = "an" if kind[0] in "aeiou" else "a"
    advice = ADVICE.get((stage, kind))
    return DataError(f"{where}: field '{_deciding_field(record, kind, fields)}' makes this {article} {kind} "
                     f"record, which {name} does not take; it takes {takes}" + (f"; {advice}" if advice else ""))


def messages(value, where: str, name: str) -> list[dict]:
    """A validated list of chat messages, each kept as given but for keys whose value is null (Parquet and
    `datasets` give every message every key any message of the column has)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field '{name}'[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: field '{name}'[{i}].role is {message['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: field '{name}'[{i}].content must be a string")
    return [{k: v for k, v in message.items() if v is not None} for message in value]


def text_or_messages(value, where: str, name: str) -> str | list[dict]:
    """A field's value in standard form (text) or conversational form (validated messages)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return messages(value, where, name)
    raise DataError(f"{where}: field '{name}' must be text or a list of messages, got {type(value).__name__}")


def iter_prompts(spec: str, fields: ChatFields = ChatFields()):
    """PPO's prompts, text or messages, from `{"prompt"}` records or `{"messages"}` records, the conversation
    so far."""
    return (prompt for prompt, _ in iter_prompt_records(spec, fields))


def iter_prompt_records(spec: str, fields: ChatFields = ChatFields()):
    """(prompt, the record's other fields) of each prompt-only record: the other fields are what reward
    functions receive by name (a reference answer, a test case), as TRL's online trainers pass them."""
    for where, record in iter_records(spec):
        if isinstance(record, dict) and fields.messages in record:
            yield messages(record[fields.messages], where, fields.messages), _others(record, fields.messages)
        elif isinstance(record, dict) and fields.prompt in record:
            yield text_or_messages(record[fields.prompt], where, fields.prompt), _others(record, fields.prompt)
        else:
            raise refusal(record, where, "ppo", fields)


def _others(record: dict, used: str) -> dict:
    return {k: v for k, v in record.items() if k != used}


# ---------------------------------------------------------------------------------------------------------
# Rendering


def plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of text that continues a sequence: no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of standard text that starts a sequence, as TRL tokenises it."""
    return tokenizer(text)["input_ids"]


def with_eos(tokenizer, text: str) -> str:
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def chat_text(tokenizer, conversation: list[dict], prompt: bool = False) -> str:
    """The chat template's rendering of a whole conversation, or (`prompt`) of a prompt to be answered."""
    if not prompt:
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    continued = conversation[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=not continued,
                                         continue_final_message=continued)


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt, text or messages: the reward model's and PPO's rendering, the same function."""
    if isinstance(prompt, str):
        return text_ids(tokenizer, prompt)
    return plain_ids(tokenizer, chat_text(tokenizer, prompt, prompt=True))


def continuation_text(tokenizer, prompt: list[dict], continuation: list[dict]) -> str:
    """The template's text after the rendered prompt when `continuation` follows it."""
    head = chat_text(tokenizer, prompt, prompt=True)
    full = chat_text(tokenizer, prompt + continuation)
    if not full.startswith(head):
        raise ValueError("the chat template does not render a conversation as a prefix of its continuation, so "
                         "a response cannot be placed after its prompt; use a template with that property")
    return full[len(head):]
