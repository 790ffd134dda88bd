"""Bad inputs and faults driven through the command line, from one table.

Each case lays out files in a fresh directory, runs `llmstack <stage> ...` (in-process through
`cli.run_stage`, which is what `llmstack` calls), and checks three things: the exit code (2: configuration
or data, 1: a runtime failure), exactly one error line naming the problem and no traceback, and that every
file that existed before the run is still there, byte for byte (inputs, a foreign directory's files, the
shared tiny model). A few cases at the end go through a real subprocess, to prove the exit codes and the
absence of tracebacks where nothing is captured.

To add a case: one `Case` row in the table of its kind. `files` maps a path (relative to the case's
directory) to its content (str or bytes; `DIR` makes an empty directory); `{policy}` in an argument is the
tiny chat model's directory, `{tmp}` the case's directory, and the working directory is the case's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmstack import cli
from llmstack.tracking import run_dir

ROOT = Path(__file__).resolve().parents[2]
DIR = object()  # an empty directory in `files`
HH = "\n\nHuman: What is 2+2?\n\nAssistant: "
OASST_OK = {"message_id": "m0", "role": "prompter", "text": "Hi?",
            "replies": [{"message_id": "m1", "role": "assistant", "text": "Hello.", "rank": 0},
                        {"message_id": "m2", "role": "assistant", "text": "Go away.", "rank": 1}]}
LS_TASK = {"id": 7, "data": {"prompt": "Hi?", "answer1": "Hello.", "answer2": "Go away."},
           "annotations": [{"completed_by": 3, "result": [{"type": "pairwise", "value": {"selected": "left"}}]}]}


@dataclass
class Case:
    id: str
    stage: str
    args: list[str]
    code: int
    message: str  # a substring the one error line must hold
    files: dict = field(default_factory=dict)


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def run_args(*extra: str, model: bool = True) -> list[str]:
    return ["output_dir=run", *(["model.name_or_path={policy}"] if model else []), *extra]


SFT_OK = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
PAIR_OK = {"prompt": "1+1?", "chosen": "2", "rejected": "3"}

CONFIG = [
    Case("empty-yaml", "pretrain", ["--config", "c.yaml"], 2, "holds no settings", {"c.yaml": ""}),
    Case("comments-only-yaml", "sft", ["--config", "c.yaml"], 2, "holds no settings", {"c.yaml": "# todo\n"}),
    Case("yaml-list", "pretrain", ["--config", "c.yaml"], 2, "must hold a mapping", {"c.yaml": "- a\n- b\n"}),
    Case("yaml-syntax", "pretrain", ["--config", "c.yaml"], 2, "not valid YAML", {"c.yaml": "train: {lr: 1\n"}),
    Case("unknown-key", "pretrain", ["output_dir=run", "train.learning_rate=1"], 2, "unknown config key"),
    Case("batch-size-zero", "sft", run_args("train.batch_size=0"), 2, "train.batch_size"),
    Case("vocab-huge", "pretrain", ["output_dir=run", "model.vocab_size=1000000000000"], 2, "model.vocab_size"),
    Case("block-size-huge", "pretrain", ["output_dir=run", "data.block_size=1000000000"], 2, "data.block_size"),
    Case("seed-beyond-numpy", "pretrain", ["output_dir=run", "seed=1099511627776"], 2, "'seed'"),
    Case("max-new-tokens-huge", "ppo", run_args("reward_model.name_or_path={policy}", "rollout.max_new_tokens=100000000"), 2,
         "rollout.max_new_tokens"),
    Case("group-huge", "grpo", run_args("rollout.samples_per_prompt=100000"), 2,
         "rollout.samples_per_prompt"),
    Case("minhash-huge", "curate", ["output_dir=run", "rules.near_dedup.num_perm=1000000000"], 2,
         "rules.near_dedup.num_perm"),
    Case("curate-workers-huge", "curate", ["output_dir=run", "workers=100000"], 2, "'workers'"),
    Case("fp16-on-cpu", "pretrain", ["output_dir=run", "train.precision=fp16", "data.train=synthetic:20"], 2,
         "fp16 needs a CUDA device"),
    Case("unknown-preset", "pretrain", ["output_dir=run", "model.preset=llama-7b", "data.train=synthetic:20"], 2,
         "unknown preset 'llama-7b'"),
    Case("wordlist-missing", "curate", ["output_dir=run", "rules.order=[wordlist]", "rules.wordlist.path=no.txt"],
         2, "file not found: no.txt"),
    # paths
    Case("data-train-empty", "pretrain", ["output_dir=run", "data.train="], 2, "'data.train' is empty"),
    Case("data-eval-empty", "sft", run_args("data.eval="), 2, "'data.eval' is empty"),
    Case("data-train-missing-relative", "pretrain", ["output_dir=run", "data.train=./corpus.jsonl"], 2,
         "'data.train': no such file or directory: ./corpus.jsonl"),
    Case("data-train-missing-suffix", "sft", run_args("data.train=chats.jsonl"), 2,
         "'data.train': no such file or directory: chats.jsonl"),
    Case("data-train-missing-absolute", "reward", run_args("data.train=/nonexistent/prefs.jsonl"), 2,
         "no such file or directory: /nonexistent/prefs.jsonl"),
    Case("data-train-missing-home", "dpo", run_args("data.train=~/llmstack-no-such-file.jsonl"), 2,
         "no such file or directory: ~/llmstack-no-such-file.jsonl (="),
    Case("data-train-unset-variable", "ppo", run_args("reward_model.name_or_path={policy}",
                                                      "data.train=$LLMSTACK_NO_SUCH_VAR/p.jsonl"), 2,
         "$LLMSTACK_NO_SUCH_VAR, which is not set"),
    Case("ptx-missing", "ppo", run_args("reward_model.name_or_path={policy}", "ppo.ptx_coef=0.1",
                                        "data.ptx=./ptx.txt"), 2, "'data.ptx': no such file"),
    Case("model-missing-relative", "sft", ["output_dir=run", "model.name_or_path=./my-model"], 2,
         "'model.name_or_path': no such file or directory: ./my-model"),
    Case("model-missing-nested", "dpo", ["output_dir=run", "model.name_or_path=runs/sft/model"], 2,
         "'model.name_or_path': no such file or directory: runs/sft/model"),
    Case("model-bare-name-offline", "sft", ["output_dir=run", "model.name_or_path=no-such-model"], 2,
         "cannot load a tokenizer from 'no-such-model'"),
    Case("reward-model-missing", "ppo", run_args("reward_model.name_or_path=./rm"), 2,
         "'reward_model.name_or_path': no such file or directory: ./rm"),
    Case("value-model-missing", "ppo", run_args("reward_model.name_or_path={policy}",
                                                "value_model.name_or_path=/nonexistent/vm"), 2,
         "'value_model.name_or_path': no such file"),
    Case("tokenizer-missing", "pretrain", ["output_dir=run", "model.tokenizer=./tok"], 2,
         "'model.tokenizer': no such file or directory: ./tok"),
    Case("dataset-name-offline", "sft", run_args("data.train=my_corpus"), 2,
         "my_corpus: not a local file or directory, and `datasets` could not load it"),
    Case("metric-not-importable", "ppo", run_args("reward_model.name_or_path={policy}", "metrics=[nope_mod:fn]"), 2,
         "config key 'metrics': cannot import module 'nope_mod'"),
    Case("reward-function-not-importable", "grpo", run_args("reward_funcs=[llmstack.cli:no_such_fn]"), 2,
         "'llmstack.cli' has no function 'no_such_fn'"),
    Case("pipeline-late-stage-path", "pipeline", ["output_dir=run", "sft.data.train=./chats.jsonl"], 2,
         "'sft.data.train': no such file or directory"),
]

RUN_DIR = [
    Case("output-dir-empty", "pretrain", ["output_dir="], 2, "'output_dir' is empty"),
    Case("output-dir-blank", "curate", ["output_dir= "], 2, "'output_dir' is empty"),
    Case("output-dir-dot", "pretrain", ["output_dir=.", "data.train=synthetic:20"], 2,
         "output_dir . is not empty and holds no llmstack run (it has config.yaml, notes.md)",
         {"config.yaml": "mine: 1\n", "notes.md": "my notes\n"}),
    Case("output-dir-foreign", "sft", run_args("output_dir=work"), 2, "output_dir work is not empty",
         {"work/metrics.jsonl": "{}\n", "work/MODEL_CARD.md": "# mine\n"}),
    Case("output-dir-foreign-pipeline", "pipeline", ["output_dir=work"], 2, "output_dir work is not empty",
         {"work/REPORT.md": "# my report\n"}),
    Case("output-dir-is-file", "reward", run_args("output_dir=run.txt"), 2, "run.txt is a file",
         {"run.txt": "x\n"}),
    Case("output-dir-unset-variable", "dpo", run_args("output_dir=$LLMSTACK_NO_SUCH_VAR/run"), 2,
         "$LLMSTACK_NO_SUCH_VAR, which is not set"),
    Case("output-dir-not-writable", "curate", ["output_dir=/sys/llmstack-run"], 2,
         "output_dir /sys/llmstack-run cannot be written"),
    Case("output-dir-other-stage", "sft", run_args(), 2, "output_dir run holds a pretrain run",
         {"run/record.json": json.dumps({"stage": "pretrain", "status": "finished"}), "run/model/config.json": "{}"}),
    Case("output-dir-record-damaged", "reward", run_args(), 2, "holds no llmstack run (it has record.json)",
         {"run/record.json": '{"stage": "rew'}),
    Case("output-dir-record-damaged-overwrite", "reward", run_args("overwrite_output_dir=true"), 2,
         "record.json is not a readable run record", {"run/record.json": '{"stage": "rew'}),
    Case("output-dir-other-tools-record", "sft", run_args(), 2, "holds no llmstack run (it has record.json)",
         {"run/record.json": json.dumps({"experiment": "mine", "status": "finished"})}),
    Case("output-dir-record-not-object", "dpo", run_args("overwrite_output_dir=true"), 2,
         "record.json is not a run record (a JSON list)", {"run/record.json": "[1, 2]"}),
    Case("curate-other-stage", "curate", ["output_dir=run"], 2, "output_dir run holds a sft run",
         {"run/record.json": json.dumps({"stage": "sft", "status": "running"})}),
    Case("curate-input-inside-output", "curate", ["output_dir=run", "data.train=run/data"], 2,
         "'data.train': run/data is inside output_dir run",
         {"run/record.json": json.dumps({"stage": "curate", "status": "failed"}),
          "run/data/part-00000.jsonl": jsonl({"id": "a", "text": "One sentence here."})}),
    Case("curate-output-inside-input", "curate", ["output_dir=corpus/curated", "data.train=corpus"], 2,
         "corpus/curated is inside data.train=corpus",
         {"corpus/a.jsonl": jsonl({"text": "One sentence here."})}),
    Case("model-inside-output", "sft", ["output_dir=run", "model.name_or_path=run/model"], 2,
         "'model.name_or_path': run/model is inside output_dir run",
         {"run/record.json": json.dumps({"stage": "sft", "status": "running"}), "run/model/config.json": "{}"}),
    Case("curate-foreign-shard-collides", "curate",
         ["output_dir=run", "data.train=in.jsonl", "rules.order=[exact_dedup]"], 2,
         "part-00000.jsonl exists and was not written by this run",
         {"in.jsonl": jsonl({"text": "One sentence here."}), "run/.llmstack.lock": "",
          "run/data/part-00000.jsonl": jsonl({"id": "mine", "text": "keep me"})}),
]

SFT_DATA = [
    ("invalid-json", "c.jsonl", jsonl(SFT_OK) + "{oops\n", "c.jsonl, line 2: invalid JSON"),
    ("not-an-object", "c.jsonl", "[1, 2]\n", "c.jsonl, line 1: expected a JSON object, got list"),
    ("messages-not-list", "c.jsonl", jsonl({"messages": "hi"}), "field 'messages' must be a non-empty list"),
    ("message-without-role", "c.jsonl", jsonl({"messages": [{"content": "hi"}]}),
     "field 'messages'[0] must be an object with 'role' and 'content'"),
    ("bad-role", "c.jsonl", jsonl({"messages": [{"role": "robot", "content": "x"}]}), "role is 'robot'"),
    ("content-not-text", "c.jsonl", jsonl({"messages": [{"role": "user", "content": 3}]}),
     "field 'messages'[0].content must be a string"),
    ("no-assistant", "c.jsonl", jsonl({"messages": [{"role": "user", "content": "hi"}]}), "has no assistant turn"),
    ("prompt-only", "c.jsonl", jsonl({"prompt": "hi"}), "prompt-only record, which SFT does not take"),
    ("preference-record", "c.jsonl", jsonl(PAIR_OK), "preference record, which SFT does not take"),
    ("mixed-forms", "c.jsonl", jsonl({"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}),
     "must both be text"),
    ("text-number", "c.jsonl", jsonl({"text": 5}), "field 'text' must be non-empty text"),
    ("no-known-field", "c.jsonl", jsonl({"question": "hi"}), "SFT needs fields"),
    ("empty-file", "c.jsonl", "", "holds no SFT examples"),
    ("json-object-not-array", "c.json", json.dumps({"messages": []}), "expected a JSON array of records"),
    ("not-utf8", "c.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8 text"),
    ("truncated-gzip", "c.jsonl.gz", gzip.compress(jsonl(SFT_OK).encode() * 50)[:60], "not a whole gzip file"),
    ("corrupt-parquet", "c.parquet", b"PAR1 this is not parquet", "not a readable .parquet file"),
    ("unsupported-suffix", "c.csv", "text\nhi\n", "unsupported file type"),
    ("directory-without-data", "d/readme.md", "nothing\n", "holds no .txt, .jsonl"),
    ("all-overlong", "c.jsonl", jsonl({"text": "word " * 100}) + "", "no example fits data.max_length=16"),
]

PREFERENCE_DATA = [  # (id, stage, format, file, content, message)
    ("same-response", "reward", "auto", "p.jsonl", jsonl({"prompt": "q", "chosen": "a", "rejected": "a"}),
     "are the same response"),
    ("ranking-not-permutation", "reward", "auto", "p.jsonl",
     jsonl({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]}), "is not a permutation"),
    ("one-response", "reward", "auto", "p.jsonl", jsonl({"prompt": "q", "responses": ["a"], "ranking": [0]}),
     "must list at least two responses"),
    ("margin-text", "reward", "auto", "p.jsonl", jsonl({**PAIR_OK, "margin": "big"}),
     "field 'margin' must be a number"),
    ("hh-without-format", "reward", "auto", "p.jsonl",
     jsonl({"chosen": HH + "4.", "rejected": HH + "5."}), "set data.format=hh"),
    ("unpaired", "reward", "auto", "p.jsonl", jsonl({"prompt": "q", "completion": "a", "label": True}),
     "unpaired preference record"),
    ("empty", "reward", "auto", "p.jsonl", "", "no usable preference records"),
    ("chosen-number", "dpo", "auto", "p.jsonl", jsonl({"prompt": "q", "chosen": 1, "rejected": "a"}),
     "field 'chosen' must be text or a list of messages"),
    ("dpo-invalid-json", "dpo", "auto", "p.jsonl", "{\n", "p.jsonl, line 1: invalid JSON"),
    ("hh-missing-rejected", "reward", "hh", "p.jsonl", jsonl({"chosen": HH + "4."}),
     "missing field 'rejected' of an HH pair"),
    ("hh-chosen-number", "reward", "hh", "p.jsonl", jsonl({"chosen": 4, "rejected": HH + "5."}),
     "field 'chosen' of an HH pair must be text"),
    ("hh-record-list", "dpo", "hh", "p.jsonl", "[1]\n", "expected a JSON object (an HH pair), got list"),
    ("oasst-no-prompt", "reward", "oasst", "t.jsonl", jsonl({"tree": OASST_OK}),
     "missing field 'prompt' of an Open-Assistant tree"),
    ("oasst-no-role", "reward", "oasst", "t.jsonl", jsonl({"prompt": {"message_id": "m0", "text": "Hi"}}),
     "message m0: missing field 'role'"),
    ("oasst-bad-role", "reward", "oasst", "t.jsonl", jsonl({"prompt": {**OASST_OK, "role": "bot"}}),
     "Open-Assistant messages are 'prompter' or 'assistant'"),
    ("oasst-replies-text", "dpo", "oasst", "t.jsonl", jsonl({"prompt": {**OASST_OK, "replies": "none"}}),
     "field 'replies' of an Open-Assistant message must be a list"),
    ("oasst-reply-without-text", "reward", "oasst", "t.jsonl",
     jsonl({"prompt": {**OASST_OK, "replies": [{"role": "assistant", "rank": 0}, OASST_OK["replies"][1]]}}),
     "missing field 'text'"),
    ("ls-not-json", "reward", "label_studio", "ls.json", "[{", "ls.json: not a Label Studio JSON export"),
    ("ls-object", "reward", "label_studio", "ls.json", json.dumps({"tasks": []}),
     "a Label Studio JSON export is a list of tasks"),
    ("ls-no-data", "reward", "label_studio", "ls.json", json.dumps([{"id": 1}]),
     "task 1: missing field 'data' of a Label Studio task"),
    ("ls-no-answer2", "dpo", "label_studio", "ls.json",
     json.dumps([{**LS_TASK, "data": {"prompt": "Hi?", "answer1": "x"}}]), "missing field 'answer2'"),
    ("ls-no-choice", "reward", "label_studio", "ls.json",
     json.dumps([{**LS_TASK, "annotations": [{"result": [{"type": "pairwise", "value": {}}]}]}]),
     "annotation 0: the annotation has neither a ranker nor a pairwise result"),
    ("ls-directory", "reward", "label_studio", "lsdir/x.json", json.dumps([LS_TASK]),
     "a Label Studio export is one JSON file"),
]

PROMPT_DATA = [
    ("no-prompt-field", "ppo", jsonl({"question": "hi"}), "PPO needs fields 'prompt' or 'messages'"),
    ("prompt-number", "ppo", jsonl({"prompt": 3}), "field 'prompt' must be text or a list of messages"),
    ("empty", "grpo", "", "holds no prompts"),
    ("messages-empty", "grpo", jsonl({"messages": []}), "field 'messages' must be a non-empty list"),
]

PRETRAIN_DATA = [
    ("no-text-field", "d.jsonl", jsonl({"body": "x"}), "missing field 'text' (the record has: body)"),
    ("text-list", "d.jsonl", jsonl({"text": ["x"]}), "field 'text' must be a string"),
    ("txt-not-utf8", "d.txt", b"caf\xe9 au lait\n", "not UTF-8 text"),
    ("too-little-text", "d.jsonl", jsonl({"text": "hi"}), "training and 0 held-out blocks of 256"),
    ("empty-file", "d.jsonl", "", "0 tokens make 0 training"),
]


def _data_cases() -> list[Case]:
    cases = [Case(f"sft-{name}", "sft", run_args(f"data.train={path.split('/')[0]}", "data.max_length=16",
                                                 "data.overlong=drop"), 2, msg, {path: content})
             for name, path, content, msg in SFT_DATA]
    cases += [Case(f"{stage}-{name}", stage, run_args(f"data.train={path.split('/')[0]}", f"data.format={fmt}"),
                   2, msg, {path: content}) for name, stage, fmt, path, content, msg in PREFERENCE_DATA]
    cases += [Case(f"{stage}-{name}", stage, run_args("data.train=p.jsonl", "reward_model.name_or_path={policy}"),
                   2, msg, {"p.jsonl": content}) for name, stage, content, msg in PROMPT_DATA]
    cases += [Case(f"pretrain-{name}", "pretrain", ["output_dir=run", f"data.train={path}",
                                                    "model.tokenizer={policy}"], 2, msg, {path: content})
              for name, path, content, msg in PRETRAIN_DATA]
    cases += [Case("curate-no-text-field", "curate", ["output_dir=run", "data.train=d.jsonl"], 2,
                   "d.jsonl, line 1: missing field 'text'", {"d.jsonl": jsonl({"body": "x"})}),
              Case("curate-invalid-json", "curate", ["output_dir=run", "data.train=d.jsonl"], 2,
                   "d.jsonl, line 2: invalid JSON", {"d.jsonl": jsonl({"text": "A b c."}) + "nope\n"}),
              Case("curate-more-shards-than-files", "curate",
                   ["output_dir=run", "data.train=d.jsonl", "data.num_shards=2", "data.shard_index=1"], 2,
                   "data.num_shards=2 but the input has 1 file(s)", {"d.jsonl": jsonl({"text": "A b c."})})]
    return cases


FAULTS = [
    Case("disk-full", "pretrain", ["output_dir=run", "data.train=synthetic:20"], 1, "no space left on the device",
         {"run/record.json": json.dumps({"stage": "pretrain", "status": "running"})}),
    Case("record-path-is-directory", "pretrain", ["output_dir=run", "data.train=synthetic:20"], 1,
         "IsADirectoryError", {"run/record.json": json.dumps({"stage": "pretrain", "status": "running"}),
                               "run/config.yaml/": DIR}),
]

CASES = CONFIG + RUN_DIR + _data_cases() + FAULTS


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (by path), and a marker for every directory; a run directory's lock
    file is left out, since every run that claims the directory writes its own details into it."""
    out = {}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.name != run_dir.LOCK_FILE):
            if path.is_symlink() or path.is_dir():
                out[str(path)] = "dir" if path.is_dir() else "link"
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def lay_out(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        if content is DIR:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests" / "trainers"))
    from helpers import tiny_chat_policy

    path, _ = tiny_chat_policy(tmp_path_factory.mktemp("model"))
    return path


@pytest.fixture
def offline(monkeypatch):
    """No Hub: the libraries read their offline switches at import, so they are set on the modules too. And
    llmstack's log handler is made anew on the stream this test captures."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.delenv("LLMSTACK_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(logging.getLogger("llmstack"), "handlers", [])


def run_case(case: Case, root: Path, policy: Path, capsys) -> tuple[int, str]:
    args = [a.replace("{policy}", str(policy)).replace("{tmp}", str(root)) for a in case.args]
    capsys.readouterr()
    code = cli.run_stage(case.stage, args)
    return code, capsys.readouterr().err


def error_lines(stage: str, err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"llmstack {stage}:")]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, tmp_path, policy, capsys, monkeypatch, offline):
    lay_out(tmp_path, case.files)
    if case.id == "disk-full":  # the kernel's own ENOSPC: every write to /dev/full fails with it
        (tmp_path / "run" / "config.yaml").symlink_to("/dev/full")
    before = tree_digest(tmp_path, policy)
    monkeypatch.chdir(tmp_path)
    code, err = run_case(case, tmp_path, policy, capsys)
    lines = error_lines(case.stage, err)
    assert code == case.code, err
    assert len(lines) == 1, err
    assert case.message in lines[0], lines[0]
    assert "Traceback" not in err
    after = tree_digest(tmp_path, policy)
    assert {p: h for p, h in after.items() if p in before} == before, "a file that existed before was changed"
    if case.id == "unknown-preset":  # refused before a tokenizer was trained for it
        assert not (tmp_path / "run" / "tokenizer").exists()
    if case.id == "pipeline-late-stage-path":  # refused before the first stage ran
        assert not (tmp_path / "run" / "curate").exists()


# ---------------------------------------------------------------------------------------------------------
# Cases that need more than a table row


def test_second_run_on_a_locked_directory_stops_at_once_naming_the_holder(tmp_path, capsys, monkeypatch, offline):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from llmstack.tracking.run_dir import claim; "
                               "claim(sys.argv[1], 'pretrain'); print('held', flush=True); time.sleep(60)",
         str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_digest(tmp_path)
        monkeypatch.chdir(tmp_path)
        # a run that waited for the lock would get it when the holder exits and then train (exit 0): exit 2
        # with the holder named is what stopping at once looks like
        code = cli.run_stage("pretrain", ["output_dir=run", "data.train=synthetic:20"])
        lines = error_lines("pretrain", capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and len(lines) == 1
    assert f"in use by another llmstack run (pretrain, pid {holder.pid} on host" in lines[0]
    assert tree_digest(tmp_path) == before
    # the holder is gone: the kernel released its lock, and the directory can be claimed again
    run_dir.claim(tmp_path / "run", "pretrain").release()


def test_read_only_output_dir_is_reported_as_such(tmp_path, capsys, monkeypatch, offline):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "run"))

    monkeypatch.setattr(run_dir.Path, "mkdir", read_only)
    monkeypatch.chdir(tmp_path)
    code = cli.run_stage("pretrain", ["output_dir=run"])
    lines = error_lines("pretrain", capsys.readouterr().err)
    assert code == 2 and len(lines) == 1
    assert "output_dir run cannot be written: it is on a read-only file system" in lines[0]


def test_errors_are_printed_by_rank_zero_only(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    assert cli.run_stage("pretrain", ["output_dir=run", "data.train=./missing.jsonl"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.run_stage("pretrain", ["output_dir=run", "data.train=./missing.jsonl"]) == 2
    assert len(error_lines("pretrain", capsys.readouterr().err)) == 1


def test_debug_switch_adds_the_traceback(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMSTACK_DEBUG", "1")
    assert cli.run_stage("pretrain", ["output_dir=run", "data.train=./missing.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert len(error_lines("pretrain", err)) == 1


def test_report_of_a_directory_without_a_run(tmp_path, capsys, offline):
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", str(tmp_path / "nowhere")])
    lines = error_lines("report", capsys.readouterr().err)
    assert stop.value.code == 2 and len(lines) == 1
    assert "nowhere holds no record.json: not an llmstack run directory" in lines[0]


def test_unfinished_curation_removes_only_the_shards_its_record_lists(tmp_path, capsys, monkeypatch, offline):
    """A re-run starts over: the earlier attempt's listed shard goes, a file put beside it by hand stays."""
    out = tmp_path / "run"
    lay_out(tmp_path, {"in.jsonl": jsonl({"text": "One sentence here."}, {"text": "Another one here."}),
                       "run/data/part-00001.jsonl": jsonl({"id": "old", "text": "stale"}),
                       "run/data/mine.jsonl": jsonl({"id": "mine", "text": "keep me"})})
    (out / "record.json").write_text(json.dumps({
        "stage": "curate", "status": "failed: killed",
        "outputs": {"data": {"files": [{"path": str(out / "data" / "part-00001.jsonl")},
                                       {"path": str(tmp_path / "in.jsonl")}]}}}))
    before = tree_digest(tmp_path / "in.jsonl", out / "data" / "mine.jsonl") | {
        str(tmp_path / "in.jsonl"): hashlib.sha256((tmp_path / "in.jsonl").read_bytes()).hexdigest(),
        str(out / "data" / "mine.jsonl"): hashlib.sha256((out / "data" / "mine.jsonl").read_bytes()).hexdigest()}
    monkeypatch.chdir(tmp_path)
    assert cli.run_stage("curate", ["output_dir=run", "data.train=in.jsonl", "rules.order=[exact_dedup]"]) == 0
    assert not (out / "data" / "part-00001.jsonl").exists()
    kept = [json.loads(line)["text"] for line in (out / "data" / "part-00000.jsonl").read_text().splitlines()]
    assert kept == ["One sentence here.", "Another one here."]
    for path, digest in before.items():  # the input (listed by a forged record, outside data/) and the hand-put file
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest


def test_overwrite_output_dir_writes_beside_foreign_files_and_keeps_them(tmp_path, capsys, monkeypatch, offline):
    lay_out(tmp_path, {"in.jsonl": jsonl({"text": "One sentence here."}), "work/notes.md": "mine\n"})
    monkeypatch.chdir(tmp_path)
    args = ["output_dir=work", "data.train=in.jsonl", "rules.order=[exact_dedup]"]
    assert cli.run_stage("curate", args) == 2
    assert cli.run_stage("curate", [*args, "overwrite_output_dir=true"]) == 0
    assert (tmp_path / "work" / "notes.md").read_text() == "mine\n"
    assert (tmp_path / "work" / "data" / "part-00000.jsonl").is_file()


# ---------------------------------------------------------------------------------------------------------
# Through a real process: exit codes and no traceback where nothing is captured


SUBPROCESS = [
    (["sft", "output_dir=run", "model.name_or_path=./nope"], 2, "no such file or directory: ./nope"),
    (["curate", "output_dir=run", "data.train=bad.jsonl"], 2, "bad.jsonl, line 1: invalid JSON"),
    (["pretrain", "output_dir=full", "data.train=synthetic:20"], 1, "no space left on the device"),
]


def test_command_line_exit_codes_and_one_line(tmp_path):
    """The cases run side by side: each process spends most of its time importing torch."""
    lay_out(tmp_path, {"bad.jsonl": "{nope\n", "full/record.json": json.dumps({"stage": "pretrain"})})
    (tmp_path / "full" / "config.yaml").symlink_to("/dev/full")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LLMSTACK_DEBUG", None)
    runs = [subprocess.Popen([sys.executable, "-c", "from llmstack.cli import main; main()", *argv], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for argv, _, _ in SUBPROCESS]
    for run, (argv, code, message) in zip(runs, SUBPROCESS):
        _, stderr = run.communicate(timeout=300)
        lines = error_lines(argv[0], stderr)
        assert run.returncode == code, stderr
        assert len(lines) == 1 and message in lines[0], stderr
        assert "Traceback" not in stderr
