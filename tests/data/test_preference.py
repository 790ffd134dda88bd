import json
import logging

import pytest
import torch

from llmstack.data.agreement import annotator_statistics, krippendorff_alpha_nominal
from llmstack.data.preference import (PreferenceGroup, build_preference_rows, import_hh, import_label_studio,
                                      import_oasst, iter_groups)
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
    assert implicit.prompt == "Q: hi\nA: " and implicit.responses == ["hello there", "go away"]
    assert ranked.ranks == [1, 2, 0, 1]  # c best, a and d tied, b last


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "fields 'chosen' and 'rejected' are the same response"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "is not a permutation of the 3"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 2]}, r"misses \[1\]"),
    ({"prompt": "q", "responses": ["a", " "], "ranking": [0, 1]}, r"field 'responses\[1\]' is empty"),
    ({"prompt": "q", "answer": "a"}, "expected fields 'chosen' and 'rejected', or 'responses' and 'ranking'"),
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


def test_rows_pad_groups_and_keep_the_end_of_long_responses(tokenizer):
    groups = [PreferenceGroup("Q ", ["a", "b", "c"], [0, 1, 2]), PreferenceGroup("Q ", ["x " * 50, "y"], [1, 0])]
    rows = build_preference_rows(groups, tokenizer, max_length=16)
    assert rows.input_ids.shape[:2] == (2, 3) and rows.ranks[1].tolist() == [1, 0, -1]
    assert rows.stats["truncated_responses"] == 1
    long_ids = rows.input_ids[1, 0][rows.attention_mask[1, 0] == 1]
    assert len(long_ids) == 16 and long_ids[-1].item() == tokenizer.eos_token_id


def test_hh_importer_skips_unusable_pairs_with_a_warning(tmp_path, caplog, monkeypatch):
    spec = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hey", "rejected": "\n\nHuman: hi\n\nAssistant: go"}])
    monkeypatch.setattr(logging.getLogger("llmstack"), "propagate", True)
    with caplog.at_level("WARNING", logger="llmstack"):
        groups = list(import_hh(spec))
    assert [g.responses for g in groups] == [["hey", "go"]]
    assert "hh.jsonl, line 1" in caplog.text and "is empty" in caplog.text


def test_a_batch_of_groups_is_cut_to_its_longest_response(tokenizer):
    groups = [PreferenceGroup("Q ", ["a", "b"], [0, 1]), PreferenceGroup("Q ", ["x " * 12, "y"], [1, 0]),
              PreferenceGroup("Q ", ["c", "d", "e"], [0, 1, 2])]
    rows = build_preference_rows(groups, tokenizer, max_length=64)
    lengths = rows.attention_mask.sum(-1)  # [N, K]
    full = rows.input_ids.shape[-1]
    assert full == int(lengths.max()) == int(lengths[1].max())
    batch = rows.rows(torch.tensor([2, 0]))
    width = int(lengths[[2, 0]].max())
    assert width < full and batch["input_ids"].shape == (2, 3, width)
    assert torch.equal(batch["input_ids"], rows.input_ids[[2, 0], :, :width])
    assert torch.equal(batch["attention_mask"].sum(-1), lengths[[2, 0]])  # no real token was cut
    assert batch["ranks"].tolist() == [[0, 1, 2], [0, 1, -1]]
