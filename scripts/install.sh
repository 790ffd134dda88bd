#!/usr/bin/env bash
# Create (or update) a virtual environment with llmstack installed for development.
#   bash scripts/install.sh [VENV_DIR]      (default .venv)
# The environment sees the system's packages, so a CUDA build of torch already installed there is used as
# is. Only when no torch is importable is one installed: the pinned release, which on CPU-only machines
# with a local wheel cache resolves to the CPU build instead of a multi-GB CUDA download.
set -euo pipefail
venv=${1:-.venv}
torch_pin=${LLMSTACK_TORCH:-torch==2.13.0}

if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv --system-site-packages "$venv"
fi
py=$venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[install] no torch found: installing $torch_pin"
  "$py" -m pip install --quiet "$torch_pin"
fi
"$py" -m pip install --quiet -e ".[dev]"
"$py" -c "import torch, transformers, accelerate; print(f'[install] torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, CUDA available: {torch.cuda.is_available()}')"
