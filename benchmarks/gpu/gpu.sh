#!/usr/bin/env bash
# Steps of the H100 runs (the lent machine has torch 2.11 + triton, no network).
# vLLM 0.26.0 travels as the three parts made by ../shared/gpu/pack-vllm.sh into .gpu/vllm
# (one part per call, staged in /root/stage); see benchmarks/results/README.md for the
# exact sequence of calls that produced the committed results.
#   h100.sh stage PART_DIR      copy one part's files into /root/stage
#   h100.sh install             assemble vLLM into /root/site-vllm, install this project
#   h100.sh kernels OUT         kernel tests on the GPU + compressor micro-benchmark
#   h100.sh parity OUT          the vLLM parity matrix in bf16, torch.compile + CUDA graphs
#   h100.sh e2e OUT [ARGS]      end-to-end vLLM benchmark, ConvGPT vs twin
#   h100.sh sglang-parity OUT   SGLang 0.5.16 (staged in /root/stage-sgl): install + parity matrix
#   h100.sh sglang-e2e OUT [ARGS]  end-to-end SGLang benchmark (after sglang-parity installed it)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step=${1:?step}; shift
case "$step" in
  stage) mkdir -p /root/stage && cp "$1"/* /root/stage/ && ls /root/stage | wc -l ;;
  install)
    bash /root/stage/install-offline.sh /root/stage /root/site-vllm > /root/install.log 2>&1 || { tail -20 /root/install.log; exit 1; }
    tail -1 /root/install.log
    python3 -m pip install -q --no-deps --no-build-isolation --no-index . ;;
  kernels)
    out=$1
    export PYTHONPATH=$PWD/src:$PWD/tests
    python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider 2>&1 | tail -5 | tee "$out/kernel_tests_h100.txt"
    python3 benchmarks/bench_compressor.py --out "$out/compressor_h100.json" 2>&1 | tee "$out/compressor_h100.txt" ;;
  parity)
    out=$1
    export PYTHONPATH=/root/site-vllm:$PWD/tests CONVGPT_PARITY_DIR=/root/parity CONVGPT_PARITY_DTYPE=bfloat16 CONVGPT_PARITY_EAGER=0
    python3 tests/parity/run_reference.py 2>&1 | tail -2
    timeout "${PARITY_TIMEOUT:-3000}" python3 tests/parity/run_engine.py vllm > "$out/parity_vllm_gpu.log" 2>&1 || tail -5 "$out/parity_vllm_gpu.log"
    cp /root/parity/vllm.json "$out/parity_vllm_h100_bf16.json"
    python3 tests/parity/compare.py --dir /root/parity --engines vllm --report-only | tee "$out/parity_vllm_h100_bf16.txt" ;;
  e2e)
    out=$1; shift
    export PYTHONPATH=/root/site-vllm:$PWD/tests
    name=${E2E_NAME:-e2e_vllm_h100}
    python3 benchmarks/e2e.py --engine vllm --out "$out/$name.json" "$@" 2>&1 | grep -v -E "^\(|INFO|WARNING" | tee "$out/$name.txt" ;;
  sglang-parity)
    # SGLang 0.5.16 from pack-sglang.sh (one part, staged in /root/stage-sgl)
    out=$1
    bash /root/stage-sgl/install-offline.sh /root/stage-sgl /root/site-sgl > /root/install-sgl.log 2>&1 || { tail -20 /root/install-sgl.log; exit 1; }
    tail -1 /root/install-sgl.log
    python3 -m pip install -q --no-deps --no-build-isolation --no-index .
    export PYTHONPATH=/root/site-sgl:$PWD/tests SGLANG_EXTERNAL_MODEL_PACKAGE=convgpt.sglang CONVGPT_PARITY_DIR=/root/parity-sgl CONVGPT_PARITY_DTYPE=bfloat16
    python3 tests/parity/run_reference.py 2>&1 | tail -1
    timeout "${PARITY_TIMEOUT:-3000}" python3 tests/parity/run_engine.py sglang > "$out/parity_sglang_gpu.log" 2>&1 || tail -30 "$out/parity_sglang_gpu.log"
    cp /root/parity-sgl/sglang.json "$out/parity_sglang_h100_bf16.json" 2>/dev/null || true
    python3 tests/parity/compare.py --dir /root/parity-sgl --engines sglang --report-only | tee "$out/parity_sglang_h100_bf16.txt" ;;
  sglang-e2e)
    out=$1; shift
    export PYTHONPATH=/root/site-sgl:$PWD/tests SGLANG_EXTERNAL_MODEL_PACKAGE=convgpt.sglang
    name=${E2E_NAME:-e2e_sglang_h100}
    python3 benchmarks/e2e.py --engine sglang --out "$out/$name.json" "$@" 2>&1 | grep -v -E "INFO|WARNING" | tee "$out/$name.txt" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
