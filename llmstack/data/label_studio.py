"""Label Studio, both ways: ranking tasks to import into a project, and a project's JSON export read back as
llmstack's ranking records (`{"prompt", "responses", "ranking", "annotator"}`, `llmstack.data.preference`).

The ranking project shows the prompt and K answers in a `List`; the annotator orders them with a `Ranker`.
Label Studio stores a Ranker's result as `{"ranker": {"<Ranker name>": [item ids, best first]}}` (Ranker
tag, "Example results"). Pairwise projects (the Pairwise template, `toName="answer1,answer2"`) store
`{"selected": "left" | "right"}`. A JSON export is a list of tasks, each with its `data` and its
`annotations`, each annotation with `completed_by` (the user's id; some versions write the user object) and
`was_cancelled`. Cancelled annotations are skipped.

A task also keeps the prompt as written (`data.messages` for a conversation), so the round trip gives back
exactly the prompt the model answered, not its rendering for the annotators.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from llmstack.data.sources import DataError

LIST, RANKER = "answers", "rank"

INSTRUCTIONS = "Order the answers from best to worst (drag to reorder)"
ANNOTATION_FILE = "annotation.json"  # beside the export: who ranked, for what pay, under which instructions
PEOPLE = ("recruitment", "pay", "instructions")

RANKING_CONFIG = f"""<View>
  <Header value="{INSTRUCTIONS}"/>
  <Text name="prompt" value="$prompt"/>
  <List name="{LIST}" value="${LIST}" title="Answers"/>
  <Ranker name="{RANKER}" toName="{LIST}"/>
</View>
"""


def annotation_facts(spec: str) -> dict:
    """What `annotation.json` beside the data (`spec`'s folder) says of the people who judged it:
    recruitment, pay, instructions; {} when there is no such file. Its other keys are ignored."""
    path = Path(spec)
    if not path.exists():  # a dataset name or the built-in data: no folder of its own
        return {}
    path = (path if path.is_dir() else path.parent) / ANNOTATION_FILE
    if not path.is_file():
        return {}
    try:
        facts = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); it holds {', '.join(PEOPLE)} as text") from err
    if not isinstance(facts, dict):
        raise DataError(f"{path}: expected an object with {', '.join(PEOPLE)}")
    return {k: str(facts[k]) for k in PEOPLE if facts.get(k)}


def shown_prompt(prompt: str | list[dict]) -> str:
    """What the annotator reads: the text, or a conversation one turn per line."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def ranking_task(prompt: str | list[dict], answers: list[str]) -> dict:
    """One task of a ranking project: the prompt and its answers as the List's items (id, title, body)."""
    data = {"prompt": shown_prompt(prompt),
            LIST: [{"id": f"a{i}", "title": f"Answer {i + 1}", "body": answer} for i, answer in enumerate(answers)]}
    if not isinstance(prompt, str):
        data["messages"] = prompt
    return {"data": data}


def ranker_result(rank_ids: list[str]) -> list[dict]:
    """An annotation's `result` as Label Studio saves a List + Ranker ordering, best first."""
    return [{"value": {"ranker": {RANKER: list(rank_ids)}}, "from_name": RANKER, "to_name": LIST, "type": "ranker",
             "origin": "manual"}]


def _annotator(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return str(who)


def _items(data: dict, where: str) -> list[dict]:
    lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(x, dict) and "id" in x
                                                                          for x in v)]
    items = data.get(LIST) if isinstance(data.get(LIST), list) else (lists[0] if len(lists) == 1 else None)
    if items is None:
        raise DataError(f"{where}: field 'data' holds no list of answers (items with 'id' and 'body') for the "
                        "ranking; export a project made by `llmstack annotate`, or one with a single List")
    return items


def _ranking_record(data: dict, order, where: str) -> dict:
    items = _items(data, where)
    index = {str(item["id"]): i for i, item in enumerate(items)}
    if not isinstance(order, dict) or len(order) != 1:
        raise DataError(f"{where}: the ranker result {order!r} is not one ordered list; rankings sorted into "
                        "buckets are not read, use a List + Ranker project without Bucket tags")
    ids = [str(i) for i in next(iter(order.values()))]
    if sorted(ids) != sorted(index):
        raise DataError(f"{where}: the ranking {ids} does not order exactly the task's answers {sorted(index)}; "
                        "every answer must be ranked once")
    prompt = data.get("messages") or data.get("prompt")
    return {"prompt": prompt, "responses": [item.get("body", item.get("title", "")) for item in items],
            "ranking": [index[i] for i in ids]}


def _pairwise_record(data: dict, choice, where: str) -> dict:
    missing = [k for k in ("prompt", "answer1", "answer2") if k not in data]
    if missing:
        raise DataError(f"{where}: missing field {', '.join(repr(k) for k in missing)} in the task's 'data'")
    if choice not in ("left", "right"):
        raise DataError(f"{where}: pairwise 'selected' is {choice!r}; expected 'left' or 'right'")
    first, second = (data["answer1"], data["answer2"]) if choice == "left" else (data["answer2"], data["answer1"])
    return {"prompt": data["prompt"], "chosen": first, "rejected": second}


def read_export(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) per completed annotation of a Label Studio JSON export: a ranking record for a
    Ranker result, a pair for a pairwise one, each with the annotator's id."""
    if not Path(path).is_file():
        raise DataError(f"{path}: a Label Studio export is one JSON file; this is not a file")
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); export the project as JSON") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a Label Studio JSON export ({err.msg} at line {err.lineno}); export the "
                        "project as JSON") from err
    if not isinstance(tasks, list):
        raise DataError(f"{path}: a Label Studio JSON export is a list of tasks, got {type(tasks).__name__}")
    for index, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict) \
                or not isinstance(task.get("annotations", []), list):
            name = task.get("id", index) if isinstance(task, dict) else index
            raise DataError(f"{path}, task {name}: missing field 'data' of a Label Studio task, or 'annotations' "
                            "is not a list; each task is an object with 'data' (an object) and 'annotations'")
        data = task.get("data", {})
        for number, annotation in enumerate(task.get("annotations", [])):
            where = f"{path}, task {task.get('id', index)}, annotation {annotation.get('id', number) if isinstance(annotation, dict) else number}"
            if not isinstance(annotation, dict) or not isinstance(annotation.get("result", []), list):
                raise DataError(f"{where}: expected an object with a 'result' list")
            if annotation.get("was_cancelled"):
                continue
            results = [r for r in annotation.get("result", []) if isinstance(r, dict) and isinstance(r.get("value"), dict)]
            ranked = next((r["value"].get("ranker") for r in results if r.get("type") == "ranker"), None)
            pair = next((r["value"].get("selected") for r in results if r.get("type") == "pairwise"), None)
            if ranked is not None:
                record = _ranking_record(data, ranked, where)
            elif pair is not None:
                record = _pairwise_record(data, pair, where)
            else:
                raise DataError(f"{where}: the annotation has neither a ranker nor a pairwise result")
            yield where, {**record, "annotator": _annotator(annotation)}
