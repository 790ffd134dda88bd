#!/usr/bin/env bash
# The first run on a CUDA GPU, in one command (sized for under 8 minutes on one GPU): the kernel tests (their
# cuda cases: the Triton kernels compiled, see tests/kernels/conftest.py) and the stage tests' cuda cases, every
# stage of the tiny pipeline for a few steps in bf16 with sdpa attention and the Triton kernels compiled (the
# kernels' default on CUDA), and the kernel benchmark at its quick size; then one table of what passed, and
# the benchmark's. Without a CUDA device it says so and exits 0.
#   bash scripts/gpu-check.sh [OUT_DIR]        (default runs/gpu-check; PYTHON=path/to/python to choose one)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${1:-runs/gpu-check}

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[gpu-check] $py cannot import torch: install llmstack first (bash scripts/install.sh)" >&2
  exit 2
fi
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu-check] skipped: torch sees no CUDA device on this machine, so there is nothing to check here"
  exit 0
fi
unset TRITON_INTERPRET  # the compiled kernels, not Triton's interpreter
mkdir -p "$out"
"$py" -c "import torch; print(f'[gpu-check] {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}')"

rows=()
failed=0
check() {  # check NAME COMMAND...: run it with its output in OUT_DIR/NAME.log, and add a row to the table
  local name=$1 start=$SECONDS status=ok
  shift
  echo "[gpu-check] $name"
  "$@" > "$out/$name.log" 2>&1 || { status="FAILED (see $out/$name.log)"; failed=1; }
  rows+=("| $name | $status | $((SECONDS - start)) s |")
}

stage_settings=()
for stage in pretrain sft reward ppo grpo dpo; do
  stage_settings+=("$stage.train.precision=bf16" "$stage.model.attn_implementation=sdpa")
done
check kernel-tests "$py" -m pytest -v -rs -p no:cacheprovider tests/kernels
# a pass with every cuda case skipped (no triton, the interpreter forced on) would check nothing
check kernel-tests-ran-on-cuda grep -Eq '\[(.*-)?cuda(-.*)?\] PASSED' "$out/kernel-tests.log"
check stage-tests-on-cuda "$py" -m pytest -v -rs -p no:cacheprovider -k cuda \
  "tests/trainers/test_sft.py::test_a_short_sft_run_with_the_kernels_follows_the_stock_one" \
  "tests/trainers/test_grpo.py::test_grpo_trains_without_a_value_model"
check stages-bf16-sdpa "$py" recipes/pipeline.py --config configs/tiny/pipeline.yaml "output_dir=$out/pipeline" \
  "routes=[ppo,grpo,dpo]" pretrain.train.max_steps=40 sft.train.max_steps=30 reward.train.max_steps=30 \
  ppo.train.max_steps=4 grpo.train.max_steps=4 dpo.train.max_steps=4 "${stage_settings[@]}"
check kernel-benchmark "$py" -m benchmarks.kernels --quick --out "$out/kernels.md"

echo
echo "| check | result | time |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
if [[ -f $out/kernels.md ]]; then
  echo
  cat "$out/kernels.md"
fi
exit $failed
