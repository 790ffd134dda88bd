"""Callbacks: every hook is called at its point with the run's own numbers, a callback stops a run that then
closes exactly as a finished one, and the stopped run is not redone."""

import json

import pytest

from llmstack.config import PretrainConfig, load_config
from llmstack.trainers.callbacks import Callback
from llmstack.trainers.pretrain import pretrain

from helpers import metric_rows  # noqa: E402  (tests/trainers)

TINY = ["model.preset=llama-1m", "model.vocab_size=300", "data.train=synthetic:200", "data.block_size=32",
        "train.batch_size=4", "train.warmup_steps=0", "train.log_every=2", "train.eval_every=2",
        "train.eval_batches=1", "train.save_every=4"]


def config(tmp_path, name, *extra):
    return load_config(PretrainConfig, None, [f"output_dir={tmp_path / name}", *TINY, *extra])


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_train_begin(self, info):
        self.calls.append(("begin", info.start_step, info.max_steps))

    def on_step_end(self, step, metrics):
        self.calls.append(("step", step, sorted(metrics)))
        if step == self.stop_at:
            return "loss is low enough"

    def on_log(self, step, row):
        self.calls.append(("log", step, row["loss"]))

    def on_evaluate(self, step, metrics):
        self.calls.append(("evaluate", step, metrics["eval_loss"]))

    def on_save(self, step, checkpoint):
        self.calls.append(("save", step, checkpoint.name))

    def on_train_end(self, status, metrics):
        self.calls.append(("end", status, metrics["steps"]))


def test_every_hook_is_called_at_its_point_with_the_runs_numbers(tmp_path):
    recorder = Recorder()
    pretrain(config(tmp_path, "run", "train.max_steps=4"), callbacks=[recorder])
    rows = metric_rows(tmp_path / "run")
    kinds = [c[0] for c in recorder.calls]
    assert kinds == ["begin", "step", "log", "step", "evaluate", "step", "log", "step", "evaluate", "save", "end"]
    assert recorder.calls[0] == ("begin", 0, 4)
    assert [c[2] for c in recorder.calls if c[0] == "log"] == [r["loss"] for r in rows]
    # the file keeps 7 significant digits; the hook gets the measure itself
    assert [c[2] for c in recorder.calls if c[0] == "evaluate"] == pytest.approx([r["eval_loss"] for r in rows],
                                                                                 rel=1e-6)
    assert ("save", 4, "step-00000004") in recorder.calls and recorder.calls[-1] == ("end", "finished", 4)
    assert {"loss", "eval_loss", "lr"} <= set(recorder.calls[3][2])  # step 2 logged and evaluated


def test_a_callback_stops_the_run_which_closes_like_a_finished_one(tmp_path):
    recorder = Recorder(stop_at=3)
    stopped = pretrain(config(tmp_path, "stopped", "train.max_steps=8"), callbacks=[recorder])
    pretrain(config(tmp_path, "finished", "train.max_steps=3"))
    assert (stopped.status, stopped.reason, stopped.state.step) == ("stopped", "loss is low enough", 3)
    record = json.loads((tmp_path / "stopped/record.json").read_text())
    assert (record["status"], record["stop_reason"]) == ("stopped", "loss is low enough")
    files = lambda run: sorted(p.relative_to(tmp_path / run).as_posix() for p in (tmp_path / run).rglob("*")  # noqa: E731
                               if p.is_file())
    assert files("stopped") == files("finished")  # model/, card, record, metrics, the step-3 checkpoint
    assert recorder.calls[-1] == ("end", "stopped", 3)
    assert pretrain(config(tmp_path, "stopped", "train.max_steps=8")) is None  # completed: not redone
