"""The annotation round trip: a model's answers out as a Label Studio ranking project, the project's export
back in as K-way rankings with annotator ids, and a reward model trained on them."""

import itertools
import json
import xml.etree.ElementTree as ET

import pytest

from llmstack.config import RewardConfig, load_config
from llmstack.data import synthetic
from llmstack.data.chat import ensure_chat_template
from llmstack.data.label_studio import ranking_task
from llmstack.data.preference import import_label_studio
from llmstack.data.sources import DataError
from llmstack.data.text import train_tokenizer
from llmstack.evaluation.annotate import main, simulate_export
from llmstack.models.causal_lm import build_from_preset, save_model
from llmstack.trainers.reward import reward


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    texts = synthetic.corpus(100) + [m["content"] for c in synthetic.instructions(100) for m in c]
    tokenizer = train_tokenizer(texts, 384)
    ensure_chat_template(tokenizer)
    path = tmp_path_factory.mktemp("policy") / "model"
    save_model(build_from_preset("llama-1m", tokenizer, 128, seed=0), tokenizer, path)
    return path


def label_studio_export(tasks: list[dict]) -> list[dict]:
    """What Label Studio's JSON export holds after two people ranked every task of the project (Ranker tag,
    "Example results"): user 7 puts the shortest answer first; user 9 does the same but swaps the first two;
    user 4 opened the first task and cancelled."""
    export = []
    for task_id, task in enumerate(tasks, 1):
        items = task["data"]["answers"]
        shortest = [item["id"] for item in sorted(items, key=lambda item: (len(item["body"]), item["id"]))]
        swapped = [shortest[1], shortest[0], *shortest[2:]]
        annotations = [{"id": 10 * task_id + n, "completed_by": user, "was_cancelled": False, "lead_time": 12.5,
                        "result": [{"value": {"ranker": {"rank": order}}, "id": f"r{task_id}{n}", "from_name": "rank",
                                    "to_name": "answers", "type": "ranker", "origin": "manual"}]}
                       for n, (user, order) in enumerate(((7, shortest), (9, swapped)))]
        if task_id == 1:
            annotations.append({"id": 1, "completed_by": 4, "was_cancelled": True, "result": []})
        export.append({"id": task_id, "data": task["data"], "annotations": annotations, "predictions": []})
    return export


def test_answers_go_out_as_a_ranking_project_and_come_back_as_rankings_a_reward_model_learns(policy, tmp_path):
    out = tmp_path / "annotation"
    assert main(["--model", str(policy), "--prompts", "synthetic:6", "--k", "3", "--out", str(out),
                 "--max-new-tokens", "12"]) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks and all(2 <= len(t["data"]["answers"]) <= 3 for t in tasks)
    assert all(t["data"]["messages"] in synthetic.rl_prompts(6, seed=0) for t in tasks)
    view = ET.fromstring((out / "labeling_config.xml").read_text())
    listed, ranker = view.find("List"), view.find("Ranker")
    assert ranker.get("toName") == listed.get("name") and listed.get("value") == "$answers"

    people = json.loads((out / "annotation.json").read_text())
    assert people == {"recruitment": None, "pay": None, "instructions": view.find("Header").get("value")}
    people["recruitment"] = "four volunteers from the team"
    (out / "annotation.json").write_text(json.dumps(people))
    export = out / "export.json"
    export.write_text(json.dumps(label_studio_export(tasks)))
    groups = list(import_label_studio(export))
    assert [g.annotator for g in groups] == ["7", "9"] * len(tasks)  # the cancelled annotation is not read
    for task, first, second in zip(tasks, groups[::2], groups[1::2]):
        bodies = [item["body"] for item in task["data"]["answers"]]
        by_length = sorted(range(len(bodies)), key=lambda i: (len(bodies[i]), i))
        assert first.prompt == task["data"]["messages"] and first.responses == bodies
        assert [by_length.index(i) for i in range(len(bodies))] == first.ranks
        assert second.ranks[by_length[0]] == 1 and second.ranks[by_length[1]] == 0

    cfg = load_config(RewardConfig, None, [
        f"output_dir={tmp_path / 'rm'}", f"model.name_or_path={policy}", f"data.train={export}",
        "data.format=label_studio", "data.eval_fraction=0", "data.max_length=48", "train.batch_size=2",
        "train.max_steps=3", "train.warmup_steps=0", "train.eval_every=0", "train.log_every=1"])
    assert reward(cfg).completed
    record = json.loads((tmp_path / "rm" / "record.json").read_text())
    stats = record["annotators"]
    assert stats["annotators"] == {"7": len(tasks), "9": len(tasks)} and stats["rankings"] == 2 * len(tasks)
    # the two disagree on exactly one pair (the first two) of each task's K(K-1)/2 pairs
    pairs = [len(list(itertools.combinations(t["data"]["answers"], 2))) for t in tasks]
    assert stats["pairwise_agreement"] == {"7|9": round(1 - len(tasks) / sum(pairs), 4)}
    card = (tmp_path / "rm" / "MODEL_CARD.md").read_text()
    assert "## Human judgements" in card and f"| 7 | {len(tasks)} | 50.0% |" in card
    assert ("recruitment: four volunteers from the team; pay: not recorded in the data; instructions: Order the "
            "answers from best to worst") in card


def test_the_simulated_annotators_rank_the_project_by_the_rubric(monkeypatch):
    monkeypatch.setattr(synthetic, "ANNOTATOR_NOISE", {"ann-a": 0.0, "ann-b": 0.0, "ann-c": 0.0})
    question = [{"role": "user", "content": "What is two plus three?"}]
    # gold rubric: right 1.5, wrong 0.5, rude -0.3 -> 1.5, 0.5, 1.2: best first 0, 2, 1
    task = ranking_task(question, ["two plus three is five.", "two plus three is nine.",
                                   "Ugh, fine. two plus three is five."])
    (exported,) = simulate_export([task], seed=0)
    assert len(exported["annotations"]) == 2
    assert len({a["completed_by"] for a in exported["annotations"]}) == 2
    for annotation in exported["annotations"]:
        assert annotation["result"][0]["value"]["ranker"]["rank"] == ["a0", "a2", "a1"]


def test_an_export_that_does_not_rank_every_answer_is_refused(tmp_path):
    task = ranking_task("Q", ["x", "y", "z"])
    export = [{"id": 5, **task, "annotations": [{"id": 8, "completed_by": 1, "result": [
        {"type": "ranker", "value": {"ranker": {"rank": ["a0", "a2"]}}, "from_name": "rank", "to_name": "answers"}]}]}]
    (tmp_path / "e.json").write_text(json.dumps(export))
    with pytest.raises(DataError, match=r"e\.json, task 5, annotation 8: the ranking \['a0', 'a2'\] does not order"):
        list(import_label_studio(tmp_path / "e.json"))


def test_a_missing_model_directory_is_one_clear_line_and_writes_nothing(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--prompts", "synthetic:2", "--out", str(tmp_path / "o")]) == 2
    assert f"--model {tmp_path / 'missing'}: no such model directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
