"""Implicit prompts of standard text pairs: cut on a token boundary of the sequences TRL tokenises, never inside
a word or a character; and Anthropic HH dialogues under data.format=auto are refused, pointing at data.format=hh."""

import gzip
import json
import os
import re
from pathlib import Path

import pytest

from llmstack.data.formats import text_ids, with_eos
from llmstack.data.preference import encode_group, import_hh, iter_groups, split_implicit, to_group
from llmstack.data.sources import DataError

HH = Path(__file__).resolve().parents[3] / "shared/data/hh_rlhf_harmless_base/test.jsonl.gz"
if not HH.is_file():
    HH = Path("/work/shared/data/hh_rlhf_harmless_base/test.jsonl.gz")


def inside_a_word(prompt: str, continuations) -> bool:
    return bool(re.search(r"\w$", prompt)) and any(re.match(r"\w", c) for c in continuations)


def decoded_split(tokenizer, prompt, responses):
    return tokenizer.decode(prompt), [tokenizer.decode(r) for r in responses]


@pytest.mark.parametrize("chosen, rejected", [
    ("naïve café — 東京", "naïve cafés"),  # the shared token prefix ends in 'café', which goes on in 'cafés'
    ("x é", "x è"),  # é and è share their first UTF-8 byte, a token of its own
    ("Q: Can I go?\nA: Don't.", "Q: Can I go?\nA: Do it."),
])
def test_a_text_pairs_prompt_is_its_longest_common_token_prefix_cut_back_to_a_word_boundary(tokenizer, chosen,
                                                                                             rejected):
    first, second = (text_ids(tokenizer, with_eos(tokenizer, t)) for t in (chosen, rejected))
    prompt, (a, b) = split_implicit(tokenizer, chosen, rejected)
    assert prompt + a == first and prompt + b == second  # TRL's sequences, cut
    text, tails = decoded_split(tokenizer, prompt, [a, b])
    assert chosen.startswith(text) and rejected.startswith(text) and not inside_a_word(text, tails)
    shared = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
    assert len(prompt) <= shared


def test_only_the_tokens_decide_so_two_texts_differing_at_once_have_an_empty_prompt(tokenizer):
    prompt, (a, b) = split_implicit(tokenizer, "Yes.", "No.")
    assert prompt == [] and tokenizer.decode(a) == "Yes.<|eos|>" and tokenizer.decode(b) == "No.<|eos|>"


@pytest.mark.skipif(not HH.is_file(), reason="shared/data/hh_rlhf_harmless_base is not on this machine")
def test_no_hh_harmless_pair_is_split_inside_a_word(tokenizer):
    """Every pair of the HH harmless test file read as a standard implicit-prompt pair (the small vocabulary
    splits words into many pieces, so shared first pieces of different words are common)."""
    records = [json.loads(line) for line in gzip.open(HH, "rt")]
    groups = []
    for index, record in enumerate(records):
        try:
            groups.append(to_group(record, f"line {index + 1}"))
        except DataError as err:  # the release's identical pairs and pairs one of which extends the other
            assert "same response" in str(err) or "is empty once the prompt" in str(err)
    assert len(groups) == 2307
    by_characters = sum(inside_a_word(os.path.commonprefix(g.responses),
                                      [r[len(os.path.commonprefix(g.responses)):] for r in g.responses])
                        for g in groups)
    assert by_characters > 100, "a split by characters would cut many pairs inside a word"
    cut = [decoded_split(tokenizer, *encode_group(tokenizer, g)) for g in groups]
    assert sum(inside_a_word(prompt, tails) for prompt, tails in cut) == 0
    assert all(g.responses[k].startswith(prompt) for g, (prompt, _) in zip(groups, cut) for k in (0, 1))


def test_hh_dialogues_in_standard_pairs_are_refused_under_auto(tmp_path):
    dialogue = "\n\nHuman: hi\n\nAssistant:"
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "x", "rejected": "y", "prompt": "q"}) + "\n"
                    + json.dumps({"prompt": dialogue, "chosen": " hello", "rejected": " go away"}) + "\n")
    with pytest.raises(DataError, match=r"hh\.jsonl, line 2: fields 'chosen' and 'rejected' are Anthropic HH "
                                        r"dialogues .*; set data\.format=hh") as raised:
        list(iter_groups(str(path)))
    assert "\n" not in str(raised.value)
    (group,) = import_hh(str(path))  # line 1 is skipped with a warning: it is no HH dialogue
    assert group.prompt == [{"role": "user", "content": "hi"}] and group.responses == ["hello", "go away"]
