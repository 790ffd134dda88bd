"""`--smoke`: every example configuration (real model names, Hub data) runs offline for a few steps on a tiny
model of its own architecture family, and never touches the real run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack.models.architectures import tiny_config

REPO = Path(__file__).resolve().parents[1]
# --smoke shrinks a training stage; curation has nothing to shrink, and a pipeline config is loaded and
# validated with every other config (tests/test_config.py) and its path run small in tests/trainers/test_pipeline.py
EXAMPLES = sorted(p.name for p in (REPO / "configs/examples").glob("*.yaml")
                  if not p.name.startswith(("curate", "pipeline")))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_smoke_runs_each_example_config_offline_into_its_own_directory(tmp_path, name):
    import yaml

    stage = name.split("-")[0]
    config = REPO / "configs/examples" / name
    output_dir = yaml.safe_load(config.read_text())["output_dir"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "llmstack"), stage, "--config", str(config), "--smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / f"{output_dir}-smoke/record.json").read_text())
    assert record["status"] == "finished" and record["config"]["train"]["max_steps"] == 3
    assert not (tmp_path / output_dir).exists()
    assert "smoke: " in proc.stderr


def test_the_family_comes_from_a_local_config_then_the_table_and_unknown_names_are_refused(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=1000, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, tie_word_embeddings=False).save_pretrained(tmp_path / "local")
    local, source = tiny_config(str(tmp_path / "local"), 300)
    assert (local.model_type, local.num_hidden_layers, local.vocab_size, local.tie_word_embeddings) == \
        ("qwen2", 2, 320, False) and source == "its config.json"
    table, source = tiny_config("runs/sft-qwen2.5-0.5b/model", 300)
    assert (table.model_type, table.hidden_size, table.tie_word_embeddings) == ("qwen2", 64, True)
    assert source == "the table of known families"
    with pytest.raises(ValueError, match="cannot tell the architecture of 'acme/secret-model' offline"):
        tiny_config("acme/secret-model", 300)


def test_only_the_training_stages_offer_smoke():
    """--smoke shrinks a training stage; the pipeline and curation do not list an option they would refuse."""
    from llmstack.cli import STAGES, stage_parser

    offered = {stage for stage in STAGES if "--smoke" in stage_parser(stage).format_help()}
    assert offered == {"pretrain", "sft", "reward", "ppo", "grpo", "dpo"}
