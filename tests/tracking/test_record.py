import hashlib
import json
import os
import subprocess

import pytest

import llmstack
import llmstack.tracking.record as record_mod
from llmstack.tracking.record import RunRecord, code_version, cpu_model, file_sha256, find_parent, write_json_atomic


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


def test_links_to_other_runs_are_kept_relative_to_the_run(tmp_path):
    parent = tmp_path / "pipeline" / "sft"
    (parent / "model").mkdir(parents=True)
    RunRecord(parent, "sft", {}, {}, None).finish("finished")
    link = find_parent(str(parent / "model"))
    child = RunRecord(tmp_path / "pipeline" / "reward", "reward", {}, {"policy": link}, link)
    child.update(parents={"backbone": link})
    child.finish("finished")
    saved = RunRecord.load(tmp_path / "pipeline" / "reward")
    assert saved["parent"]["run_dir"] == saved["parents"]["backbone"]["run_dir"] == "../sft"
    assert saved["inputs"]["policy"]["run_dir"] == "../sft"
    # the only absolute path left is the host's own description of where the run lived
    assert saved["host"]["run_dir"] == str((tmp_path / "pipeline" / "reward").resolve())


def test_cpu_model_reads_the_marketing_name():
    with open("/proc/cpuinfo") as fh:
        names = {line.split(":", 1)[1].strip() for line in fh if line.startswith(("model name", "Model"))}
    assert cpu_model() in names if names else cpu_model()


def test_energy_of_a_resumed_run_is_the_sum_of_its_sessions(tmp_path):
    first = RunRecord(tmp_path, "sft", {}, {}, None)
    first.add_energy({"method": "measured", "joules": 100.0, "cpu_joules": 100.0, "source": "RAPL"})
    first.finish("interrupted")
    second = RunRecord(tmp_path, "sft", {}, {}, None)
    second.add_energy({"method": "estimated", "joules": 50.0, "source": "CPU model"})
    second.finish("finished")
    energy = RunRecord.load(tmp_path)["energy"]
    assert energy["joules"] == 150.0 and energy["method"] == "estimated" and energy["sessions"] == 2


def test_the_peak_memory_is_the_stages_own_after_a_reset():
    """A stage run after another in one process (the pipeline) reports its own high-water mark, not the
    earlier stage's."""
    import numpy as np

    from llmstack.tracking.record import peak_memory, reset_peak_memory

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this system cannot reset a process's resident peak (/proc/self/clear_refs)")
    big = np.ones(300 * 2**20 // 8)  # 300 MiB, every page touched
    before = peak_memory()["peak_rss_mib"]
    del big
    reset_peak_memory()
    after = peak_memory()["peak_rss_mib"]
    assert before - after > 250, (before, after)
