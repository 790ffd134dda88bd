"""Benchmarks of `llmstack.kernels`: `python -m benchmarks.kernels` (see `run.py`)."""
