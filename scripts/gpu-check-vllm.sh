#!/usr/bin/env bash
# The check that proves the CUDA-only rollout paths: rollout.engine=vllm (weights pushed into a colocated
# vLLM, sleep and wake) and the static engine's compiled decoding step with CUDA graphs. Both are verified
# only on machines where this has run and passed; CPU machines test their logic against fakes.
#   pip install -e '.[dev,vllm]' && bash scripts/gpu-check-vllm.sh
set -euo pipefail
python -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device'; print('vllm', vllm.__version__, torch.cuda.get_device_name())"
python -m pytest -q -rs -m "slow or not slow" -k cuda tests/models/test_vllm_engine.py tests/models/test_static_engine.py
