"""llmstack: curate -> pretrain -> SFT -> reward model -> PPO, GRPO or DPO, in one library with one training loop.

    from llmstack import SFTTrainer, SFTConfig, Callback

The names below are imported on first use, so `import llmstack` (and the command line's `--help`) stays light.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    **{name: "llmstack.api" for name in ("PretrainTrainer", "SFTTrainer", "RewardTrainer", "PPOTrainer",
                                         "GRPOTrainer", "DPOTrainer", "TrainResult")},
    **{name: "llmstack.config" for name in ("PretrainConfig", "SFTConfig", "RewardConfig", "PPOConfig",
                                            "GRPOConfig", "DPOConfig", "ConfigError", "load_config")},
    "Callback": "llmstack.trainers.callbacks",
    "RunInfo": "llmstack.trainers.callbacks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmstack' has no attribute {name!r}")
