"""llmstack's PPO against TRL 1.12's, side by side: `python -m benchmarks.ppo` (see `run.py`)."""
