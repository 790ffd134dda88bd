import json
import logging

import pytest
import torch

from llmstack.data.agreement import annotator_statistics, krippendorff_alpha_nominal
from llmstack.data.chat import ensure_chat_template
from llmstack.data.preference import (PAD_SEGMENT, PreferenceGroup, build_preference_rows, import_hh,
                                      import_label_studio, import_oasst, iter_groups, render, shared_prompt_mask)
from llmstack.data.sources import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_pairs_rankings_ties_and_implicit_prompts(tmp_path):
    spec = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "annotator": "ann1", "margin": 2},
        {"chosen": "Q: hi\nA: hello there", "rejected": "Q: hi\nA: go away"},
        {"prompt": "Q", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]},
    ])
    explicit, implicit, ranked = iter_groups(spec)
    assert (explicit.responses, explicit.ranks, explicit.annotator, explicit.margin) == ([" 4", " 5"], [0, 1], "ann1", 2.0)
    # a text pair's implicit prompt is found on a token boundary once it is tokenised (test_trl_formats.py)
    assert implicit.prompt is None and implicit.responses == ["Q: hi\nA: hello there", "Q: hi\nA: go away"]
    assert ranked.ranks == [1, 2, 0, 1]  # c best, a and d tied, b last


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "fields 'chosen' and 'rejected' are the same response"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "is not a permutation of the 3"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 2]}, r"misses \[1\]"),
    ({"prompt": "q", "responses": ["a", " "], "ranking": [0, 1]}, r"field 'responses\[1\]' is empty"),
    ({"prompt": "q", "answer": "a"}, "field 'prompt' makes this a prompt-only record, which reward modelling "
                                     "does not take; it takes 'prompt', 'chosen' and 'rejected'"),
    ({"chosen": "Q: hi", "rejected": "Q: hi there"}, "field 'chosen' is empty once the prompt the two share"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "share no leading message"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     "field 'chosen' is messages but the prompt is text"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, record, message):
    spec = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError, match=rf"bad\.jsonl, line 2: .*{message}"):
        list(iter_groups(spec))


def test_hh_importer_splits_dialogues_into_messages(tmp_path):
    spec = write_jsonl(tmp_path / "hh.jsonl", [{
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: Sure, here is one.",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: No."}])
    (group,) = import_hh(spec)
    assert group.prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": "a joke?"}]
    assert group.responses == ["Sure, here is one.", "No."] and group.ranks == [0, 1]


def test_oasst_importer_ranks_replies_and_skips_synthetic(tmp_path):
    def msg(mid, role, text, rank=None, replies=(), synthetic=False):
        return {"message_id": mid, "role": role, "text": text, "rank": rank, "synthetic": synthetic,
                "replies": list(replies)}

    tree = msg("p", "prompter", "Name a colour.", replies=[
        msg("a1", "assistant", "Blue.", rank=1, replies=[msg("p2", "prompter", "Another?", replies=[
            msg("b1", "assistant", "Red.", rank=0), msg("b2", "assistant", "No.", rank=1)])]),
        msg("a2", "assistant", "Green.", rank=0),
        msg("a3", "assistant", "Teal, made up.", rank=2, synthetic=True)])
    spec = write_jsonl(tmp_path / "trees.jsonl", [{"message_tree_id": "t", "prompt": tree}])
    first, second = import_oasst(spec)
    assert first.prompt == [{"role": "user", "content": "Name a colour."}]
    assert first.responses == ["Green.", "Blue."] and first.ranks == [0, 1]
    assert [m["content"] for m in second.prompt] == ["Name a colour.", "Blue.", "Another?"]
    assert second.responses == ["Red.", "No."]


def test_label_studio_pairwise_export(tmp_path):
    export = [{"id": 1, "data": {"prompt": "Q", "answer1": "A", "answer2": "B"}, "annotations": [
        {"id": 10, "completed_by": 3, "result": [{"type": "pairwise", "value": {"selected": "right"}}]},
        {"id": 11, "completed_by": 4, "was_cancelled": True, "result": []}]}]
    (tmp_path / "ls.json").write_text(json.dumps(export))
    (group,) = import_label_studio(tmp_path / "ls.json")
    assert group.responses == ["B", "A"] and group.annotator == "3"


def test_annotator_statistics_by_hand():
    def judged(annotator, prompt, best, worst):
        return PreferenceGroup(prompt, [best, worst], [0, 1], annotator)

    table = {"p1": {"x": "ab", "y": "ab", "z": "ba"}, "p2": {"x": "ab", "y": "ba"},
             "p3": {"x": "ab", "y": "ab", "z": "ab"}, "p4": {"x": "ab", "y": "ba", "z": "ab"}}
    groups = [judged(who, p, order[0], order[1]) for p, row in table.items() for who, order in row.items()]
    stats = annotator_statistics(groups)
    assert stats["annotators"] == {"x": 4, "y": 4, "z": 3}
    assert stats["pairwise_agreement"] == {"x|y": 0.5, "x|z": round(2 / 3, 4), "y|z": round(1 / 3, 4)}
    # leave-one-out majority (a tie among the others counts for nothing):
    # x: p2 disagrees with y, p3 agrees -> 1/2; y: p2, p3 agree, p4 disagree -> 1/3; z: p1 no, p3 yes -> 1/2
    assert stats["agreement_with_majority"] == {"x": 0.5, "y": round(1 / 3, 4), "z": 0.5}
    # coincidences: o(+,+) = 1 + 3 + 1 = 5, o(+,-) = o(-,+) = 1 + 1 + 1 = 3; n = 11, n+ = 8, n- = 3
    # D_o = 6/11, D_e = 2*8*3 / (11*10); alpha = 1 - D_o/D_e = -0.25
    assert stats["krippendorff_alpha"] == pytest.approx(-0.25)


def test_alpha_is_one_for_perfect_agreement():
    units = {("p", "a", "b"): {"x": 1, "y": 1}, ("p", "c", "d"): {"x": -1, "y": -1}}
    assert krippendorff_alpha_nominal(units) == pytest.approx(1.0)


def _row_pieces(rows, n):
    """(prompt ids, [response ids]) of row n, read back through its segment ids."""
    seg, ids = rows.segment_ids[n], rows.input_ids[n]
    k = int((rows.ranks[n] >= 0).sum())
    return ids[seg == 0].tolist(), [ids[seg == i + 1].tolist() for i in range(k)]


def test_rows_hold_each_prompt_once_then_every_response_as_render_builds_it(tokenizer):
    groups = [PreferenceGroup("Question one? ", ["a", "bb b", "c"], [0, 1, 2]),
              PreferenceGroup([{"role": "user", "content": "Hi"}], ["x y", "z"], [1, 0])]
    ensure_chat_template(tokenizer)
    rows = build_preference_rows(groups, tokenizer, max_length=64)
    assert rows.ranks.tolist() == [[0, 1, 2], [1, 0, -1]]
    for n, group in enumerate(groups):
        prompt, responses = _row_pieces(rows, n)
        for k, response in enumerate(group.responses):
            # the row's prompt + response k is exactly the sequence scored alone, with its own positions
            assert prompt + responses[k] == render(tokenizer, group.prompt, response)
            where = rows.segment_ids[n] == k + 1
            assert rows.position_ids[n][where].tolist() == list(range(len(prompt), len(prompt) + len(responses[k])))
            assert rows.last_index[n, k] == where.nonzero().max()
            assert rows.input_ids[n, rows.last_index[n, k]] == tokenizer.eos_token_id
        assert rows.lengths[n] == len(prompt) + sum(len(r) for r in responses)
    seqs = sum(len(render(tokenizer, g.prompt, r)) for g in groups for r in g.responses)
    assert rows.stats["sharing_factor"] == pytest.approx(seqs / int(rows.lengths.sum()), abs=1e-4)


def test_a_group_too_long_keeps_the_end_of_its_prompt_and_of_a_response_too_long_alone(tokenizer):
    prompt = "one two three four five six seven eight nine ten " * 3
    group = PreferenceGroup(prompt, ["short answer", "x " * 50], [0, 1])
    full_prompt = render(tokenizer, prompt, "")[:-1]
    short = render(tokenizer, "", "short answer")
    long = render(tokenizer, "", "x " * 50)
    assert len(long) > 16
    rows = build_preference_rows([group], tokenizer, max_length=16)
    kept_prompt, (kept_short, kept_long) = _row_pieces(rows, 0)
    assert kept_long == long[-16:] and kept_prompt == [] and kept_short == short
    fits = build_preference_rows([PreferenceGroup(prompt, ["short answer", "y"], [0, 1])], tokenizer,
                                 max_length=len(short) + 5)
    kept_prompt, (kept_short, _) = _row_pieces(fits, 0)
    assert kept_prompt == full_prompt[-5:] and kept_short == short
    assert rows.stats["truncated_responses"] == 2 and fits.stats["truncated_responses"] == 2


def test_shared_prompt_mask_by_hand():
    # prompt (0), response 1, response 2, padding (-1)
    mask = shared_prompt_mask(torch.tensor([[0, 0, 1, 1, 2, -1]]))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],
                    [1, 1, 0, 0, 1, 0],
                    [0, 0, 0, 0, 0, 1]]


def test_hh_importer_skips_unusable_pairs_with_a_warning(tmp_path, caplog, monkeypatch):
    spec = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hey", "rejected": "\n\nHuman: hi\n\nAssistant: go"}])
    monkeypatch.setattr(logging.getLogger("llmstack"), "propagate", True)
    with caplog.at_level("WARNING", logger="llmstack"):
        groups = list(import_hh(spec))
    assert [g.responses for g in groups] == [["hey", "go"]]
    assert "hh.jsonl, line 1" in caplog.text and "is empty" in caplog.text


def test_a_batch_of_groups_is_cut_to_its_longest_row(tokenizer):
    groups = [PreferenceGroup("Q ", ["a", "b"], [0, 1]), PreferenceGroup("Q ", ["x " * 12, "y"], [1, 0]),
              PreferenceGroup("Q ", ["c", "d", "e"], [0, 1, 2])]
    rows = build_preference_rows(groups, tokenizer, max_length=64)
    assert rows.input_ids.shape[1] == int(rows.lengths.max()) == int(rows.lengths[1])
    batch = rows.rows(torch.tensor([2, 0]))
    width = int(rows.lengths[[2, 0]].max())
    assert width < rows.input_ids.shape[1] and batch["input_ids"].shape == (2, width)
    for key in ("input_ids", "position_ids", "segment_ids"):
        assert torch.equal(batch[key], getattr(rows, key)[[2, 0], :width])
    assert torch.equal((batch["segment_ids"] != PAD_SEGMENT).sum(-1), rows.lengths[[2, 0]])  # nothing real cut
    assert batch["ranks"].tolist() == [[0, 1, 2], [0, 1, -1]]
    assert torch.equal(batch["last_index"], rows.last_index[[2, 0]])
