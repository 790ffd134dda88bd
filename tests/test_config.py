from pathlib import Path

import pytest

from llmstack.cli import main as cli_main
from llmstack.config import (ConfigError, CurateConfig, DPOConfig, GRPOConfig, PipelineConfig, PPOConfig,
                             PretrainConfig, RewardConfig, SFTConfig, load_config, save_config)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_unknown_yaml_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    msg = str(err.value)
    assert "'train.max_step'" in msg and str(path) in msg and "Did you mean 'train.max_steps'?" in msg


def test_unknown_override_key_is_rejected_with_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.blocksize'.*Did you mean 'data\.block_size'"):
        load_config(PretrainConfig, None, ["data.blocksize=64"])


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=ten", "config key 'train.max_steps': expected an integer, got 'ten'"),
    ("train.lr=fast", "config key 'train.lr': expected a number, got 'fast'"),
    ("data.streaming=maybe", "config key 'data.streaming': expected true or false, got 'maybe'"),
    ("seed=1.5", "config key 'seed': expected an integer, got 1.5"),
])
def test_bad_types_name_key_value_and_expected_type(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "config key 'train.lr': -1.0 is out of range; allowed: > 0.0"),
    ("train.batch_size=0", "config key 'train.batch_size': 0 is out of range; allowed: >= 1"),
    ("data.eval_fraction=0.9", "config key 'data.eval_fraction': 0.9 is out of range; allowed: <= 0.5"),
])
def test_out_of_range_values_state_the_bound(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, [override])
    assert message in str(err.value)


def test_choice_typo_lists_choices_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, ["train.precision=bf61"])
    assert "'fp32', 'bf16', 'fp16'" in str(err.value) and "Did you mean 'bf16'?" in str(err.value)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="adam_betas"):
        load_config(PretrainConfig, None, ["train.adam_betas=[0.9]"])


def test_shortening_a_run_clamps_its_warm_up_instead_of_refusing_the_config(caplog):
    from llmstack.trainers.base import effective_warmup

    cfg = load_config(PretrainConfig, None, ["train.max_steps=10", "train.warmup_steps=10"])
    with caplog.at_level("WARNING"):
        assert effective_warmup(cfg.train.warmup_steps, cfg.train.max_steps, "cosine") == 1
    assert "train.warmup_steps=10" in caplog.text
    assert effective_warmup(10, 10, "constant") == 10 and effective_warmup(3, 10, "cosine") == 3


def test_overrides_apply_over_yaml_and_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  max_steps: 50\n")
    cfg = load_config(PretrainConfig, path, ["train.lr=3e-4", "data.eval=null", "train.report_to=[tensorboard]"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 50
    assert cfg.data.eval is None and cfg.train.report_to == ["tensorboard"]


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(PretrainConfig, None, ["train.lr=2e-4", "model.vocab_size=999", "data.train=corpus.txt"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(PretrainConfig, tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts),
                         ids=lambda p: p.name)
def test_shipped_stage_configs_load(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name files relative to the repository root
    classes = {"curate": CurateConfig, "pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig,
               "ppo": PPOConfig, "grpo": GRPOConfig, "dpo": DPOConfig, "pipeline": PipelineConfig}
    stage = next(name for name in classes if name in path.name)
    load_config(classes[stage], path)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["pretrain", "train.lrr=1"])
    assert exit_.value.code == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err


def test_cli_suggests_a_stage_for_a_typo(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["pretrian"])
    assert exit_.value.code == 2 and "Did you mean 'pretrain'?" in capsys.readouterr().err


def test_partial_section_override_keeps_the_stage_defaults():
    cfg = load_config(SFTConfig, None, ["model.name_or_path=some/model", "train.max_steps=50"])
    assert cfg.train.max_steps == 50
    assert cfg.train.lr == SFTConfig().train.lr != PretrainConfig().train.lr


def test_sections_left_at_their_defaults_are_validated_too():
    with pytest.raises(ConfigError, match="set 'model.name_or_path'"):
        load_config(SFTConfig)


def test_a_key_one_section_too_high_is_pointed_to_its_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'sft\.max_steps'.*Did you mean 'sft\.train\.max_steps'"):
        load_config(PipelineConfig, None, ["sft.max_steps=300"])
    # ambiguous (model, reward_model and value_model all have one): no guess
    with pytest.raises(ConfigError) as err:
        load_config(PipelineConfig, None, ["ppo.name_or_path=x"])
    assert "Did you mean" not in str(err.value)


def test_a_missing_model_that_a_tiny_config_writes_names_the_command_to_run_first(monkeypatch):
    from pathlib import Path

    from llmstack.config.paths import producing_config

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert producing_config("runs/tiny-sft/model") == "llmstack sft --config configs/tiny/sft.yaml"
    assert producing_config("runs/tiny-reward") == "llmstack reward --config configs/tiny/reward.yaml"
    assert producing_config("runs/somewhere-else/model") is None
