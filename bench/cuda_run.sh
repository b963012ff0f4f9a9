#!/usr/bin/env bash
# The CUDA figures in bench/NOTES.md, in one run on a machine with a GPU: the GPU's ceilings, the model and
# engine tests on CUDA, engine decode steps and serve_bench in bfloat16, each with and without CUDA graphs.
#   bash bench/cuda_run.sh [OUT_DIR]
set -uo pipefail
out=${1:-.cache/bench/cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0
python3 -m bench.gpu_ceilings --json-out "$out/gpu_ceilings.json" || status=1
python3 -m pytest --device cuda -q -p no:cacheprovider tests/test_gpt2.py tests/test_gpt_oss.py tests/test_engine.py \
  tests/test_engine_metrics.py tests/test_moe.py tests/test_mxfp4.py tests/test_decode_graphs.py tests/test_triton_paged_attention.py \
  > "$out/pytest_cuda.txt" 2>&1 || status=1
tail -n 4 "$out/pytest_cuda.txt"
python3 -m bench.gpu_paged_attention > "$out/paged_attention.txt" 2>&1 || status=1
for mode in graphs eager; do
  flag=$([ "$mode" = eager ] && echo --enforce-eager)
  python3 -m bench.engine_steps --device cuda --dtype bfloat16 $flag --json-out "$out/steps-$mode.json" || status=1
  python3 -m bench.serve_bench --server-args "--device cuda --dtype bfloat16 $flag" --out "$out/serve-$mode" \
    || status=1
done
exit $status
