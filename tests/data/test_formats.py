"""TRL's dataset types recognised from a record's fields, and the one-line refusal of a type a stage does not
take, naming the file, the record, the field that made the type, and what the stage takes."""

import json

import pytest

from llmstack.data.chat import iter_examples
from llmstack.data.formats import (IMPLICIT_PREFERENCE, LANGUAGE_MODELLING, PREFERENCE, PROMPT_COMPLETION,
                                   PROMPT_ONLY, RANKING, STEPWISE, UNPAIRED_PREFERENCE, ChatFields, iter_prompts,
                                   record_type)
from llmstack.data.preference import iter_groups
from llmstack.data.sources import DataError

TEXT = {"text": "The sky is blue."}
MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
PROMPT = {"prompt": "The sky is"}
PROMPT_COMPLETION_RECORD = {"prompt": "The sky is", "completion": " blue."}
PAIR = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
IMPLICIT_PAIR = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
UNPAIRED = {"prompt": "The sky is", "completion": " blue.", "label": True}
STEPWISE_RECORD = {"prompt": "Two plus two?", "completions": ["Two and two", "is four."], "labels": [True, True]}
RANKING_RECORD = {"prompt": "Q", "responses": ["a", "b"], "ranking": [1, 0]}


def as_messages(record):
    """The conversational form of a standard record."""
    role = {"prompt": "user"}
    return {k: [{"role": role.get(k, "assistant"), "content": v}] if k in ("prompt", "completion", "chosen", "rejected")
            else v for k, v in record.items()}


@pytest.mark.parametrize("record, kind", [
    (TEXT, LANGUAGE_MODELLING), (MESSAGES, LANGUAGE_MODELLING), (PROMPT, PROMPT_ONLY),
    (PROMPT_COMPLETION_RECORD, PROMPT_COMPLETION), (PAIR, PREFERENCE), (IMPLICIT_PAIR, IMPLICIT_PREFERENCE),
    (UNPAIRED, UNPAIRED_PREFERENCE), (STEPWISE_RECORD, STEPWISE), (RANKING_RECORD, RANKING), ({"x": 1}, None)])
def test_record_types_by_their_fields_in_both_forms(record, kind):
    assert record_type(record, "here") == kind
    assert record_type(as_messages(record), "here") == kind


def test_renamed_fields_decide_the_type():
    fields = ChatFields(prompt="question", completion="answer")
    assert record_type({"question": "q", "answer": "a"}, "here", fields) == PROMPT_COMPLETION
    assert record_type({"question": "q"}, "here", fields) == PROMPT_ONLY


READERS = {"sft": lambda spec: list(iter_examples(spec)), "reward": lambda spec: list(iter_groups(spec)),
           "ppo": lambda spec: list(iter_prompts(spec))}
VALID = {"sft": MESSAGES, "reward": PAIR, "ppo": PROMPT}
TAKES = {"sft": "SFT does not take; it takes 'text', 'messages', or 'prompt' and 'completion'",
         "reward": "reward modelling does not take; it takes 'prompt', 'chosen' and 'rejected'",
         "ppo": "PPO does not take; it takes 'prompt' or 'messages'"}


@pytest.mark.parametrize("stage, record, field, kind", [
    ("sft", PROMPT, "prompt", "a prompt-only"),
    ("sft", PAIR, "chosen", "a preference"),
    ("sft", IMPLICIT_PAIR, "chosen", "an implicit-prompt preference"),
    ("sft", UNPAIRED, "label", "an unpaired preference"),
    ("sft", STEPWISE_RECORD, "completions", "a stepwise-supervision"),
    ("sft", RANKING_RECORD, "ranking", "a ranking"),
    ("reward", TEXT, "text", "a language-modelling"),
    ("reward", MESSAGES, "messages", "a language-modelling"),
    ("reward", PROMPT, "prompt", "a prompt-only"),
    ("reward", PROMPT_COMPLETION_RECORD, "completion", "a prompt-completion"),
    ("reward", UNPAIRED, "label", "an unpaired preference"),
    ("reward", STEPWISE_RECORD, "completions", "a stepwise-supervision"),
    ("ppo", TEXT, "text", "a language-modelling"),
    ("ppo", IMPLICIT_PAIR, "chosen", "an implicit-prompt preference"),
])
@pytest.mark.parametrize("form", ["standard", "conversational"])
def test_a_type_a_stage_does_not_take_is_refused_in_one_line(tmp_path, stage, record, field, kind, form):
    record = record if form == "standard" else as_messages(record)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(VALID[stage]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as raised:
        READERS[stage](str(path))
    message = str(raised.value)
    assert message.startswith(f"{path}, line 2: field '{field}' makes this {kind} record, which {TAKES[stage]}")
    assert "\n" not in message


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_a_record_of_no_type_names_what_the_stage_needs(tmp_path, stage):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl, line 1: .* needs fields .*; the record has: question$"):
        READERS[stage](str(path))
