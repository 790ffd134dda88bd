import json

import pytest
import torch

from llmstack.tracking.metrics import MetricsLog, tracker_names


def strict_rows(path):
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_rows_are_plain_rounded_json_and_forwarded_to_trackers(tmp_path):
    sent = []
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl", True, lambda metrics, step: sent.append((step, metrics)))
    log.log(1, {"loss": torch.tensor(2.0 / 3.0), "lr": 3e-4, "tokens_seen": 512, "note": "warm-up"})
    log.log(2, {"loss": float("nan")})
    assert strict_rows(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "loss": 0.6666667, "lr": 0.0003, "tokens_seen": 512, "note": "warm-up"},
        {"step": 2, "loss": "nan"}]
    assert sent == [(1, {"loss": 0.6666667, "lr": 0.0003, "tokens_seen": 512}), (2, {})]


def test_only_the_main_process_writes(tmp_path):
    sent = []
    MetricsLog(tmp_path / "m.jsonl", False, lambda metrics, step: sent.append(step)).log(7, {"loss": 1.0})
    assert not (tmp_path / "m.jsonl").exists()
    assert sent == [7]


def test_resume_truncates_later_steps_so_none_is_duplicated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path, True)
    for step in (10, 20, 30, 40):
        first.log(step, {"loss": step / 10})
    with open(path, "a") as fh:  # a kill in the middle of a write
        fh.write('{"step": 50, "lo')
    resumed = MetricsLog(path, True)
    resumed.truncate_after(20)  # the last checkpoint was at step 20
    for step in (30, 40, 50):
        resumed.log(step, {"loss": step / 100})
    rows = MetricsLog.read(path)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 0.3, 0.4, 0.5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_torn_last_line_is_skipped_but_damage_elsewhere_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert MetricsLog.read(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        MetricsLog.read(path)


def test_truncate_without_a_file_or_off_main_does_nothing(tmp_path):
    MetricsLog(tmp_path / "absent.jsonl", True).truncate_after(5)
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 9}\n')
    MetricsLog(path, False).truncate_after(5)
    assert not (tmp_path / "absent.jsonl").exists()
    assert len(MetricsLog.read(path)) == 2


def test_tracker_names_reject_unknown_and_missing_packages(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown tracker 'mlflow'.*tensorboard, wandb"):
        tracker_names(["mlflow"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else object())
    assert tracker_names(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert tracker_names([]) == []
    with pytest.raises(ValueError, match=r"'wandb' package is not installed.*pip install 'llmstack\[tracking\]'"):
        tracker_names(["tensorboard", "wandb"])
