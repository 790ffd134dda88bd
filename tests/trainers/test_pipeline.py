"""The pipeline on a minimal size: lineage between stages, resume after an interruption, the report."""

import json
import os
import signal
from pathlib import Path

import pytest

import llmstack.evaluation.report as report_module
from llmstack.config import PipelineConfig, load_config
from llmstack.pipeline import pipeline
from llmstack.tracking.lineage import format_lineage, lineage
from llmstack.tracking.metrics import MetricsLog
from llmstack.tracking.record import file_sha256

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/tiny/pipeline.yaml"
MINIMAL = [f"curate.rules.wordlist.path={REPO / 'llmstack/data/blocklist.txt'}", "curate.data.train=synthetic-noisy:200",
           "pretrain.train.max_steps=30", "pretrain.train.warmup_steps=3",
           "pretrain.data.block_size=64", "pretrain.train.eval_batches=2", "sft.train.max_steps=10",
           "sft.train.warmup_steps=2", "sft.data.train=synthetic:100", "sft.sample_prompts=1",
           "reward.train.max_steps=10", "reward.train.warmup_steps=2", "reward.data.train=synthetic:60",
           "ppo.train.max_steps=4", "ppo.train.log_every=1", "ppo.rollout.batch_size=8", "ppo.train.batch_size=4",
           "ppo.rollout.max_new_tokens=8", "ppo.data.train=synthetic:32", "grpo.train.max_steps=2",
           "grpo.rollout.batch_size=2", "grpo.rollout.max_new_tokens=8", "grpo.train.batch_size=4",
           "grpo.data.train=synthetic:32", "dpo.train.max_steps=4", "dpo.train.warmup_steps=1",
           "dpo.data.train=synthetic:40", "dpo.train.eval_every=2", "dpo.dpo.kl_prompts=2",
           "dpo.dpo.kl_max_new_tokens=8"]


@pytest.mark.slow
def test_pipeline_links_every_stage_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "N_QUESTIONS", 4)
    monkeypatch.setattr(report_module, "SAMPLES", 2)
    cfg = load_config(PipelineConfig, TINY, [f"output_dir={tmp_path}", *MINIMAL])
    original = MetricsLog.log

    def stop_in_ppo(self, step, row):
        original(self, step, row)
        if "kl_coef" in row and step == 2 and "ppo-no-kl" not in str(self.path):
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "log", stop_in_ppo)
        interrupted = pipeline(cfg)
    assert interrupted.status == "interrupted" and not (tmp_path / "REPORT.md").exists()
    finished_before = {s: (tmp_path / s / "metrics.jsonl").read_text() for s in ("pretrain", "sft", "reward")}
    finished_before["curate"] = (tmp_path / "curate/curation.json").read_text()

    pipeline(cfg)
    for stage, text in finished_before.items():
        produced = tmp_path / stage / ("curation.json" if stage == "curate" else "metrics.jsonl")
        assert produced.read_text() == text, f"{stage} was run again"
    assert [json.loads(x)["step"] for x in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    chain = [("pretrain", "curate"), ("sft", "pretrain"), ("reward", "sft"), ("ppo", "sft"), ("ppo-no-kl", "sft"),
             ("grpo", "sft"), ("grpo-gold", "sft"), ("dpo", "sft")]
    for child, parent in chain:
        link = json.loads((tmp_path / child / "record.json").read_text())["parent"]
        assert link["run_dir"] == f"../{parent}"  # relative, so the pipeline directory can move
        assert link["record_sha256"] == file_sha256(tmp_path / parent / "record.json")
    ppo_inputs = json.loads((tmp_path / "ppo/record.json").read_text())["inputs"]
    assert ppo_inputs["reward_model"]["record_sha256"] == file_sha256(tmp_path / "reward/record.json")
    chain = lineage(tmp_path / "ppo")
    assert [r["stage"] for r in chain] == ["ppo", "sft", "pretrain", "curate"]
    assert "pretrain [finished]" in format_lineage(chain)
    # the pretrained model's card states how its data was filtered: the curation run's own counts
    pretrain_record = json.loads((tmp_path / "pretrain/record.json").read_text())
    assert pretrain_record["data"]["curation"] == json.loads((tmp_path / "curate/record.json").read_text())["data"]
    assert sum(pretrain_record["data"]["curation"]["removed_by_rule"].values()) > 0
    assert "removed_by_rule" in (tmp_path / "pretrain/MODEL_CARD.md").read_text()
    report = (tmp_path / "REPORT.md").read_text()
    assert "held-out perplexity" in report and "KL penalty off" in report and "gold reward" in report
    # the SFT model read against itself: the same weights give log pi - log ref = 0 on every token
    sft_row = next(line for line in report.splitlines() if line.startswith("| SFT model (the start"))
    assert sft_row.split("|")[4].strip() == "0.00"
    for label in ("GRPO on the reward model", "GRPO on the gold rubric", "DPO on the annotators' rankings"):
        assert f"| {label} |" in report
    for figure in ("training.png", "rl.png", "routes.png"):
        assert f"]({figure})" in report
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_pipeline_can_start_from_a_pretrained_checkpoint(tmp_path, monkeypatch):
    """start=sft: no curation or pretraining; the report's 'before' is the given checkpoint, and its cost table
    has every run's steps and peak memory."""
    from tests.trainers.helpers import tiny_chat_policy

    monkeypatch.setattr(report_module, "N_QUESTIONS", 4)
    monkeypatch.setattr(report_module, "SAMPLES", 2)
    checkpoint, _ = tiny_chat_policy(tmp_path / "hub")
    cfg = load_config(PipelineConfig, TINY, [f"output_dir={tmp_path / 'run'}", *MINIMAL, "start=sft",
                                             f"sft.model.name_or_path={checkpoint}", "routes=[grpo-gold]"])
    pipeline(cfg)
    root = tmp_path / "run"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["grpo-gold", "reward", "sft"]
    assert json.loads((root / "sft/record.json").read_text())["learning_rate"]["starts_from_outside_checkpoint"]
    report = (root / "REPORT.md").read_text()
    assert f"| start | the pretrained checkpoint | {checkpoint} |" in report
    assert "perplexity" not in report and "## Curation" not in report
    cost = report[report.index("## Cost"):].splitlines()
    for run, steps in (("sft", 10), ("reward", 10), ("grpo-gold", 2)):
        row = next(line for line in cost if line.startswith(f"| {run} |")).split("|")
        assert int(row[2]) == steps
        assert float(row[5].replace(",", "")) > 0  # a measured peak, not a placeholder


def test_a_pipeline_starting_at_sft_needs_the_checkpoint(tmp_path):
    from llmstack.config import ConfigError

    with pytest.raises(ConfigError, match="start=sft.*sft.model.name_or_path"):
        load_config(PipelineConfig, TINY, [f"output_dir={tmp_path}", "start=sft"])
