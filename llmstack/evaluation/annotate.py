"""`llmstack annotate`: the first step of the loop that makes a reward model. A model answers each prompt K
times; the answers go to people as a Label Studio ranking project; their export comes back through
`data.format=label_studio` as K-way rankings with annotator ids, which `llmstack reward` trains on.

    llmstack annotate --model runs/pipeline/sft/model --prompts prompts.jsonl --k 4 --out annotation/

writes `annotation/tasks.json` (import it into a project), `annotation/labeling_config.xml` (the
project's labelling interface: a List of the answers and a Ranker) and `annotation/annotation.json` (the
instructions shown; fill in how the annotators were recruited and paid, and keep it beside the export: the
reward model's card states what it says, and "not recorded" for what it leaves empty). `--simulate` also writes
`annotation/export.json`: the built-in task's simulated annotators (`llmstack.data.synthetic`) ranking the same
tasks, in Label Studio's export format, so the whole round trip runs without people.

Answers are sampled as RL samples them (the same rollout engine, temperature and stopping at EOS). A prompt
keeps only its distinct, non-empty answers, since an annotator cannot order two identical ones; a prompt
with fewer than two is left out, and the count is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from llmstack.data import label_studio, synthetic
from llmstack.data.chat import ensure_chat_template
from llmstack.data.formats import ChatFields
from llmstack.data.prompts import left_padded, load_prompt_set
from llmstack.data.sources import DataError
from llmstack.models.causal_lm import load_causal_lm, load_tokenizer
from llmstack.models.engines import build_engine
from llmstack.rl.rollout import SamplingSettings, rollout
from llmstack.rl.sampling import row_seeds


@torch.no_grad()
def sample_answers(model_dir: str, prompts: list, k: int, sampling: SamplingSettings, seed: int,
                   batch: int = 64) -> list[list[str]]:
    """`k` sampled answers per prompt, in prompt order, each row from its own seed."""
    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer)
    engine = build_engine("hf", sampling, tokenizer.eos_token_id, tokenizer.pad_token_id)
    engine.load_weights(load_causal_lm(model_dir).eval())
    repeated = [p for p in prompts for _ in range(k)]
    answers: list[str] = []
    for start in range(0, len(repeated), batch):
        rows = left_padded(tokenizer, repeated[start:start + batch])
        seeds = row_seeds(seed, 0, start + rows.index)
        exp = rollout(engine, rows.input_ids, rows.attention_mask, rows.index, seeds)
        answers += [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
                    for r, m in zip(exp.response_ids, exp.mask)]
    return [answers[i * k:(i + 1) * k] for i in range(len(prompts))]


def ranking_tasks(prompts: list, answers: list[list[str]]) -> list[dict]:
    """Label Studio tasks for the prompts with at least two distinct, non-empty answers."""
    tasks = []
    for prompt, options in zip(prompts, answers):
        distinct = list(dict.fromkeys(a for a in options if a))
        if len(distinct) >= 2:
            tasks.append(label_studio.ranking_task(prompt, distinct))
    return tasks


def _question(task: dict) -> str:
    messages = task["data"].get("messages")
    return messages[-1]["content"] if messages else task["data"]["prompt"]


def simulate_export(tasks: list[dict], seed: int, judges_per_task: int = 2) -> list[dict]:
    """The tasks as Label Studio exports them once the built-in task's simulated annotators have ranked
    each (`synthetic.annotator_ranking`): ids as Label Studio numbers them (tasks, annotations and users from
    1), one annotation per judge."""
    rng = random.Random(seed)
    users = {name: i for i, name in enumerate(sorted(synthetic.ANNOTATOR_NOISE), 1)}
    export, annotation_id = [], 0
    for task_id, task in enumerate(tasks, 1):
        items = task["data"][label_studio.LIST]
        annotations = []
        for name in rng.sample(sorted(users), judges_per_task):
            annotation_id += 1
            order = synthetic.annotator_ranking(_question(task), [item["body"] for item in items], name, rng)
            annotations.append({"id": annotation_id, "completed_by": users[name], "was_cancelled": False,
                                "result": label_studio.ranker_result([items[i]["id"] for i in order])})
        export.append({"id": task_id, **task, "annotations": annotations})
    return export


def annotate(model: str, prompts_spec: str, k: int, out: str | Path, *, max_new_tokens: int = 32,
             temperature: float = 1.0, seed: int = 0, simulate: bool = False) -> dict:
    """Sample, write the Label Studio import (and the simulated export); returns what was written."""
    if k < 2:
        raise ValueError(f"--k {k}: an annotator ranks at least two answers; use --k 2 or more")
    if not Path(model).is_dir() and (Path(model).is_absolute() or model.startswith(".") or model.count("/") != 1):
        raise ValueError(f"--model {model}: no such model directory; give a run's model/ folder or a Hub name")
    out = Path(out)
    prompts, _ = load_prompt_set(prompts_spec, ChatFields(), seed)
    answers = sample_answers(model, prompts, k, SamplingSettings(max_new_tokens, temperature), seed)
    tasks = ranking_tasks(prompts, answers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1) + "\n")
    (out / "labeling_config.xml").write_text(label_studio.RANKING_CONFIG)
    # to be completed by whoever runs the project; the reward stage copies it into the model card
    people = {"recruitment": None, "pay": None, "instructions": label_studio.INSTRUCTIONS}
    (out / label_studio.ANNOTATION_FILE).write_text(json.dumps(people, indent=1) + "\n")
    written = {"prompts": len(prompts), "tasks": len(tasks),
               "files": ["tasks.json", "labeling_config.xml", label_studio.ANNOTATION_FILE]}
    if simulate:
        (out / "export.json").write_text(json.dumps(simulate_export(tasks, seed), indent=1) + "\n")
        written["files"].append("export.json")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmstack annotate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (a run's model/) that answers")
    parser.add_argument("--prompts", required=True, help="prompt-only records ({'prompt'} or {'messages'}, "
                        "JSONL/JSON/Parquet) or 'synthetic:N' (the built-in questions)")
    parser.add_argument("--k", type=int, default=4, help="answers sampled per prompt (default 4)")
    parser.add_argument("--out", required=True, help="directory for tasks.json and labeling_config.xml")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate", action="store_true", help="also write export.json ranked by the built-in "
                        "task's simulated annotators")
    args = parser.parse_args(argv)
    try:
        written = annotate(args.model, args.prompts, args.k, args.out, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed, simulate=args.simulate)
    except (DataError, ValueError, OSError) as err:
        print(f"llmstack annotate: {err}", file=sys.stderr)
        return 2
    left_out = written["prompts"] - written["tasks"]
    print(f"llmstack annotate: {written['tasks']} ranking tasks in {args.out}/ ({', '.join(written['files'])})"
          + (f"; {left_out} prompts left out with fewer than two distinct answers" if left_out else "")
          + ". Import tasks.json into a Label Studio project whose labelling interface is labeling_config.xml, "
          "export it as JSON beside annotation.json (fill in recruitment and pay), and train on it with "
          "`llmstack reward data.train=EXPORT data.format=label_studio`.")
    return 0
