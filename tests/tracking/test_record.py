import hashlib
import json
import os
import subprocess

import pytest

import llmstack
import llmstack.tracking.record as record_mod
from llmstack.tracking.record import (RunRecord, code_version, file_sha256, find_parent, write_json_atomic,
                                      write_model_card)


def test_file_sha256_streams_in_chunks(tmp_path):
    path = tmp_path / "data.bin"
    payload = bytes(range(256)) * 41
    path.write_bytes(payload)
    assert file_sha256(path, chunk=7) == hashlib.sha256(payload).hexdigest()


def test_atomic_write_keeps_old_content_when_serialisation_fails(tmp_path):
    path = tmp_path / "record.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    write_json_atomic(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert os.listdir(tmp_path) == ["record.json"]


def test_atomic_write_cleans_up_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_json_atomic(path, {"a": 1})

    def disk_trouble(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", disk_trouble)
    with pytest.raises(OSError, match="no space"):
        write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["record.json"]


def test_code_version_names_versions_and_only_llmstack_own_commit(monkeypatch):
    found = code_version()
    assert found["llmstack"] == llmstack.__version__
    assert {"torch", "transformers", "accelerate", "python"} <= set(found)
    if "git_commit" in found:
        assert len(found["git_commit"]) == 40 and isinstance(found["git_dirty"], bool)
    monkeypatch.setattr(record_mod, "_git", lambda src, *args: "/somewhere/else" if "--show-toplevel" in args
                        else "0" * 40)
    assert "git_commit" not in code_version()


def test_code_version_without_git_is_not_an_error(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert "git_commit" not in code_version() and code_version()["llmstack"] == llmstack.__version__


def test_find_parent_links_an_llmstack_model_dir_only(tmp_path):
    run = tmp_path / "pretrain"
    (run / "model").mkdir(parents=True)
    (run / "record.json").write_text(json.dumps({"stage": "pretrain"}))
    link = find_parent(str(run / "model"))
    assert link == {"run_dir": str(run.resolve()), "stage": "pretrain",
                    "record_sha256": hashlib.sha256((run / "record.json").read_bytes()).hexdigest()}
    (tmp_path / "plain").mkdir()
    assert find_parent(str(tmp_path / "plain")) == {"model": str(tmp_path / "plain")}
    assert find_parent("Qwen/Qwen2.5-0.5B") == {"model": "Qwen/Qwen2.5-0.5B"}
    assert find_parent(None) is None


def test_record_round_trip_merges_sections_and_stamps_status(tmp_path):
    record = RunRecord(tmp_path, "pretrain", {"train": {"lr": 0.1}}, {"train": {"spec": "x.txt"}}, None)
    record.update(data={"tokenizer": "trained"})
    record.update(data={"blocks": 12}, resumed_from_step=None)
    record.set_compute(2, device="cpu", peak_source="measured GEMM")
    record.save()
    running = RunRecord.load(tmp_path)
    assert running["status"] == "running" and "ended" not in running
    assert running["data"] == {"tokenizer": "trained", "blocks": 12}
    assert running["compute"] == {"world_size": 2, "device": "cpu", "peak_source": "measured GEMM"}
    assert running["host"]["cpus"] == os.cpu_count() and running["code"]["llmstack"] == llmstack.__version__
    record.finish("failed: loss is nan")
    saved = RunRecord.load(tmp_path)
    assert saved["status"] == "failed: loss is nan" and saved["ended"] >= saved["started"]
    assert saved["config"] == {"train": {"lr": 0.1}} and saved["inputs"] == {"train": {"spec": "x.txt"}}


def test_a_resumed_run_keeps_its_earlier_sessions(tmp_path):
    first = RunRecord(tmp_path, "sft", {}, {}, None)
    first.finish("interrupted")
    second = RunRecord(tmp_path, "sft", {}, {}, None)
    second.save()  # then the process is killed: no finish
    third = RunRecord(tmp_path, "sft", {}, {}, None)
    third.session["wall_time_s"] = 0.0
    third.finish("finished")
    saved = RunRecord.load(tmp_path)
    assert [s["status"] for s in saved["sessions"]] == ["interrupted", "crashed", "finished"]
    assert saved["started"] == saved["sessions"][0]["started"]
    assert saved["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in saved["sessions"]), abs=1e-3)


def table_widths(markdown: str) -> list[set[int]]:
    """Number of cells per row, one set per table: a well-formed table has one width."""
    tables, current = [], None
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current = (current or set()) | {line.count("|")}
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def test_model_card_states_data_metrics_setup_and_lineage(tmp_path):
    pretrain = tmp_path / "pretrain"
    (pretrain / "model").mkdir(parents=True)
    RunRecord(pretrain, "pretrain", {}, {"train": {"spec": "corpus.txt"}}, None).finish("finished")
    sft = tmp_path / "sft"
    (sft / "model").mkdir(parents=True)
    sft_parent = find_parent(str(pretrain / "model"))
    RunRecord(sft, "sft", {}, {"train": {"spec": "chats.jsonl"}}, sft_parent).finish("finished")

    digest = "ab" * 32
    child = RunRecord(tmp_path / "reward", "reward", {"seed": 3, "train": {"lr": 1e-5, "max_steps": 9}},
                      {"train": {"spec": "prefs.jsonl", "files": [{"path": "prefs.jsonl", "bytes": 2048,
                                                                   "sha256": digest}]},
                       "eval": {"spec": "Anthropic/hh-rlhf", "revision": "abc123"}},
                      find_parent(str(sft / "model")))
    child.update(metrics={"steps": 9, "train_loss": 0.61234, "initial_eval_loss": 0.6931, "final_eval_loss": 0.5012,
                          "tokens_seen": 123456},
                 model={"class": "Qwen2ForSequenceClassification", "parameters": 2_000_000},
                 data={"dropped_pairs": 4}, energy={"cpu_joules": 5.4e6, "gpu_joules": 1.8e6, "source": "RAPL + NVML",
                                                     "note": "whole devices"})
    child.set_compute(2, device="cpu")
    child.finish("finished")
    write_model_card(tmp_path / "reward", RunRecord.load(tmp_path / "reward"))
    card = (tmp_path / "reward" / "MODEL_CARD.md").read_text()

    assert "| eval_loss | 0.6931 | 0.5012 |" in card and "| train_loss | 0.6123 |" in card
    assert f"`{digest}`" in card and "2,048 bytes" in card and "revision=abc123" in card
    assert "| `train.lr` | 1e-05 |" in card and "| `seed` | 3 |" in card
    assert "2.00M parameters" in card and "123,456 training tokens" in card and "2 process(es)" in card
    lineage = card.split("## Lineage")[1].split("##")[0]
    assert lineage.index("`pretrain` run") < lineage.index("`sft` run") < lineage.index("this run: `reward`")
    assert "corpus.txt" in lineage and "chats.jsonl" in lineage
    assert "Energy: 2 kWh (RAPL + NVML; whole devices)." in card
    assert "not been evaluated for safety" in card
    assert all(len(widths) == 1 for widths in table_widths(card))


def test_model_card_of_a_fresh_run_with_no_metrics(tmp_path):
    record = RunRecord(tmp_path, "pretrain", {}, {}, None)
    record.update(data={"tokenizer": {"source": "trained", "vocab_size": 384}}, energy={"unmeasured": "no counters"})
    record.finish("finished")
    write_model_card(tmp_path, RunRecord.load(tmp_path))
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "freshly initialised weights" in card and "No metrics were recorded." in card
    assert "Energy was not measured: no counters." in card
    assert "No inputs were recorded." in card and "- tokenizer\n  - source: trained\n  - vocab_size: 384\n" in card
