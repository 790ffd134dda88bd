"""Typed, strict run configuration: dataclasses, YAML files and dotted command-line overrides.

A stage's configuration is a tree of dataclasses. Sections (`model`, `data`, `train`) are shared by every
stage so a user learns each key once. Loading is strict: an unknown key, a value of the wrong type or a value
out of range stops the run at start-up with the key, the value and what is allowed.

    cfg = load_config(PretrainConfig, "configs/tiny/pretrain.yaml", ["train.lr=3e-4", "seed=1"])

Each field is documented once, in its `help` metadata; `llmstack <stage> --help` prints them all.
"""

from llmstack.config.curate import CurateConfig
from llmstack.config.loading import (ConfigError, config_from_dict, describe, load_config, option, save_config,
                                     to_dict)
from llmstack.config.schema import (PREVIOUS, ChatDataConfig, DataConfig, DPOConfig, DPOSettings, GRPOConfig,
                                    LoraConfig, ModelConfig, ModelRef, PipelineConfig, PPOConfig, PPOSettings,
                                    PreferenceDataConfig, PretrainConfig, PromptDataConfig, RewardConfig,
                                    RolloutConfig, SFTConfig, TrainConfig)

__all__ = ["PREVIOUS", "ChatDataConfig", "ConfigError", "CurateConfig", "DataConfig", "DPOConfig", "DPOSettings",
           "GRPOConfig", "LoraConfig", "ModelConfig", "ModelRef", "PPOConfig", "PPOSettings", "PipelineConfig",
           "PreferenceDataConfig", "PretrainConfig", "PromptDataConfig", "RewardConfig", "RolloutConfig",
           "SFTConfig", "TrainConfig", "config_from_dict", "describe", "load_config", "option", "save_config", "to_dict"]
