import json

import pytest
import torch

from llmstack.data.chat import (DEFAULT_CHAT_TEMPLATE, ChatFields, PromptCompletion, block_causal_mask, build_rows,
                                ensure_chat_template, iter_examples, sample_prompts, tokenize_conversation)
from llmstack.data.sources import DataError

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Two plus two is four."},
                {"role": "user", "content": "And minus one?"},
                {"role": "assistant", "content": "Three."}]


@pytest.fixture
def chat_tokenizer(tokenizer):
    clone = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<|bos|>",
                                eos_token="<|eos|>", pad_token="<|pad|>")
    assert ensure_chat_template(clone) and clone.chat_template == DEFAULT_CHAT_TEMPLATE
    return clone


def labelled(ids, labels):
    return [t for t, lab in zip(ids, labels) if lab != -100]


def test_labels_cover_exactly_the_assistant_answers_and_their_eos(chat_tokenizer):
    tok = chat_tokenizer
    ids, labels = tokenize_conversation(tok, CONVERSATION)
    expected = []
    for message in CONVERSATION:  # independent expectation: each answer alone, then the end-of-turn token
        if message["role"] == "assistant":
            expected += tok.encode(message["content"], add_special_tokens=False) + [tok.eos_token_id]
    assert labelled(ids, labels) == expected
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # the labelled tokens form exactly two contiguous spans, one per answer
    spans = sum(1 for i, lab in enumerate(labels) if lab != -100 and (i == 0 or labels[i - 1] == -100))
    assert spans == 2


def test_a_template_whose_turn_end_is_not_eos_gets_eos_appended(chat_tokenizer):
    tok = chat_tokenizer
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    ids, labels = tokenize_conversation(tok, CONVERSATION[1:3])
    answer = tok.encode("Two plus two is four.\n", add_special_tokens=False)
    assert labelled(ids, labels) == answer + [tok.eos_token_id]


@pytest.mark.parametrize("record, message", [
    ({"txt": "hi"}, r"line 1: SFT needs fields 'text', 'messages', or 'prompt' and 'completion'; the record "
                    "has: txt"),
    ({"text": " \n"}, r"line 1: field 'text' must be non-empty text"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"line 1: field 'messages'\[0\]\.role is 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     r"line 1: field 'messages'\[1\] is an empty assistant answer"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"line 1: field 'messages' has no assistant turn"),
    ({"prompt": "q", "completion": 3}, r"line 1: field 'completion' must be text or a list of messages"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
     r"line 1: fields 'prompt' and 'completion' must both be text \(standard\) or both lists of messages"),
])
def test_bad_records_name_file_record_and_field(tmp_path, record, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"chat\.jsonl, {message}"):
        list(iter_examples(str(path)))


def test_prompt_completion_records_and_field_mapping(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "a."}) + "\n")
    fields = ChatFields(prompt="question", completion="answer")
    assert list(iter_examples(str(path), fields)) == [PromptCompletion("q?", "a.")]


def test_sample_prompts_are_the_prompts_of_examples_that_have_one():
    examples = ["plain text has no prompt", CONVERSATION, PromptCompletion("The sky is", " blue.")]
    assert sample_prompts(examples, 5) == [(CONVERSATION[:4], "Three."), ("The sky is", " blue.")]
    assert sample_prompts(examples, 1) == [(CONVERSATION[:4], "Three.")]


def test_packing_restarts_positions_masks_first_tokens_and_counts_overlong():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5]), ([6] * 9, [6] * 9), ([7, 8, 9, 10], [-100] * 4)]
    rows = build_rows(examples, max_length=6, pad_id=0, packing=True, overlong="truncate")
    assert rows.stats["truncated"] == 1 and rows.stats["dropped_overlong"] == 0
    assert rows.input_ids[0].tolist() == [1, 2, 3, 4, 5, 0]
    assert rows.labels[0].tolist() == [-100, 2, 3, -100, 5, -100]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0]
    assert rows.segment_ids[0].tolist() == [0, 0, 0, 1, 1, 2]
    dropped = build_rows(examples, max_length=6, pad_id=0, packing=False, overlong="drop")
    assert dropped.stats == {"examples": 3, "dropped_overlong": 1, "truncated": 0, "rows": 3,
                             "fill": round(9 / 18, 4)}


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 2]]))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [0, 0, 1, 0, 0],
                    [0, 0, 1, 1, 0],
                    [0, 0, 0, 0, 1]]


def test_a_batch_is_cut_to_its_longest_row_and_the_cut_columns_were_padding():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5, 6, 7, 8, 9], [-100, 5, 6, 7, 8, 9]), ([4, 5], [4, 5])]
    rows = build_rows(examples, max_length=10, pad_id=0, packing=False)
    assert rows.input_ids.shape == (3, 10) and rows.lengths.tolist() == [3, 6, 2]
    short = rows.rows(torch.tensor([2, 0]))
    assert short["input_ids"].tolist() == [[4, 5, 0], [1, 2, 3]]
    assert short["labels"].tolist() == [[-100, 5, -100], [-100, 2, 3]]
    assert short["position_ids"].tolist() == [[0, 1, 0], [0, 1, 2]]
    assert short["segment_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert rows.rows(torch.tensor([0, 1]))["input_ids"].shape == (2, 6)
    # packed rows are cut the same way: [1 2 3 4 5 | 0 ...] and [6 7 8 9 | 0 ...]
    packed = build_rows(examples[:1] + examples[2:] + [([6, 7, 8, 9], [6, 7, 8, 9])], 10, 0, packing=True)
    assert packed.lengths.tolist() == [9] and packed.rows(torch.tensor([0]))["input_ids"].shape == (1, 9)
