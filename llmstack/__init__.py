"""llmstack: curate -> pretrain -> SFT -> reward model -> PPO, in one library with one training loop."""

__version__ = "0.1.0"
