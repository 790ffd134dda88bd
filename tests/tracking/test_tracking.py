import json
import os

import pytest
import torch

import llmstack.tracking.mfu as mfu_mod
from llmstack.tracking.metrics import MetricsLog, tracker_names
from llmstack.tracking.mfu import mfu, peak_flops, transformer_flops_per_token
from llmstack.tracking.progress import Progress
from llmstack.tracking.record import RunRecord, find_parent, write_json_atomic, write_model_card


def test_metrics_rows_forwarded_and_truncated_on_resume(tmp_path):
    sent = []
    log = MetricsLog(tmp_path / "metrics.jsonl", True, lambda m, step: sent.append((step, m)))
    for step in (1, 2, 3):
        log.log(step, {"loss": torch.tensor(2.5 / step), "note": "x"})
    assert [r["step"] for r in MetricsLog.read(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert sent[0] == (1, {"loss": 2.5})
    log.truncate_after(2)
    assert MetricsLog.read(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.5, "note": "x"},
                                                           {"step": 2, "loss": 1.25, "note": "x"}]


def test_non_main_process_writes_nothing(tmp_path):
    MetricsLog(tmp_path / "m.jsonl", False).log(1, {"loss": 1.0})
    assert not (tmp_path / "m.jsonl").exists()


def test_unknown_or_missing_trackers_fail_early(monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        tracker_names(["mlflow"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'llmstack\[tracking\]'"):
        tracker_names(["wandb"])


def test_flops_per_token_by_hand():
    # 6 * 1000 + 12 * 2 layers * 8 hidden * 16 tokens
    assert transformer_flops_per_token(1000, 2, 8, 16) == 6000 + 3072
    assert mfu(tokens_per_s=1000, flops_per_token=1e9, peak=1e12, n_devices=2) == pytest.approx(0.5)


def test_peak_flops_override_table_and_cached_measurement(monkeypatch):
    assert peak_flops(torch.device("cpu"), torch.float32, override=5e12) == (5e12, "override")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == (756e12, "table: H100 PCIe")
    calls = []
    monkeypatch.setattr(mfu_mod, "_measured", {})
    monkeypatch.setattr(mfu_mod, "measure_gemm_flops", lambda d, t: calls.append(t) or 3e10)
    assert peak_flops(torch.device("cpu"), torch.float32) == (3e10, "measured GEMM")
    assert peak_flops(torch.device("cpu"), torch.float32) == (3e10, "measured GEMM")
    assert calls == [torch.float32]


def test_measured_cpu_peak_is_a_plausible_rate():
    rate = mfu_mod.measure_gemm_flops(torch.device("cpu"), torch.float32, size=256, seconds=0.05)
    assert 1e8 < rate < 1e14


def test_atomic_json_keeps_old_content_when_serialisation_fails(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_record_lineage_and_model_card(tmp_path):
    parent_dir = tmp_path / "pretrain"
    (parent_dir / "model").mkdir(parents=True)
    parent = RunRecord(parent_dir, "pretrain", {"train": {"lr": 0.1}}, {}, None)
    parent.finish("finished")
    link = find_parent(str(parent_dir / "model"))
    assert link["stage"] == "pretrain" and link["run_dir"] == str(parent_dir.resolve())
    assert find_parent("org/some-model") == {"model": "org/some-model"}

    child = RunRecord(tmp_path, "sft", {"train": {"lr": 0.5, "max_steps": 9}},
                      {"train": {"spec": "d.jsonl", "files": [{"path": "d.jsonl", "bytes": 3, "sha256": "ab" * 32}]}},
                      link)
    child.update(metrics={"final_eval_ppl": 12.3456}, model={"class": "LlamaForCausalLM", "parameters": 2_000_000})
    child.finish("finished")
    saved = RunRecord.load(tmp_path)
    assert saved["status"] == "finished" and saved["parent"] == link and saved["wall_time_s"] >= 0
    assert "llmstack" in saved["code"]
    write_model_card(tmp_path, saved)
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "| final_eval_ppl | 12.35 |" in card and "abababababababab" in card
    assert "| train.max_steps | 9 |" in card and "2.00M parameters" in card and "pretrain" in card


def test_plain_progress_lines_when_not_a_terminal(capsys):
    progress = Progress(total_steps=10, initial_step=0, is_main=True, desc="train", plain_every=5)
    for step in range(1, 11):
        progress.update(step, loss=1.0 / step, tokens_per_s=2500.0, mfu=0.125)
    progress.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[train] step 5/10 (50%) loss 0.2 tok/s 2.5k mfu 12.5% eta ")
