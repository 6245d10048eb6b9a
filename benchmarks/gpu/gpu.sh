#!/usr/bin/env bash
# Steps of the runs on a lent GPU (torch 2.11 + triton there, no network; called h100.sh for
# the H100 runs).  The engines travel as the parts made by ../shared/gpu/pack-vllm.sh .gpu/vllm
# (three) and pack-sglang.sh .gpu/sglang (one), one part per call; see
# benchmarks/results/README.md for the exact sequence of calls behind each committed result.
#   gpu.sh stage PART_DIR [DEST]    copy one part's files into DEST (/root/stage)
#   gpu.sh install [vllm|sglang]    assemble the engine (/root/site-vllm, /root/site-sgl from
#                                   /root/stage, /root/stage-sgl) and install this project
#   gpu.sh kernels OUT              kernel tests on the GPU + compressor micro-benchmark
#   gpu.sh parity ENGINE OUT NAME   the parity matrix through ENGINE (bf16, torch.compile + CUDA
#                                   graphs; CONVGPT_PARITY_{GEOMETRIES,KV,QUANT,EAGER} as in
#                                   tests/parity/run_engine.py) -> OUT/NAME.json; compared with the
#                                   float64 reference where the results are committed
#   gpu.sh e2e ENGINE OUT NAME [ARGS]  benchmarks/e2e.py, ConvGPT vs twin -> OUT/NAME.{json,txt}
# Results are written under /root/results (kept while the machine is held: a later call's
# `e2e ... --rounds 0 --trace DIR` adds traces to an earlier call's JSON) and copied to OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_WORKER_MULTIPROC_METHOD=spawn
site() { case "$1" in vllm) echo /root/site-vllm ;; sglang) echo /root/site-sgl ;; *) echo "engine?" >&2; exit 2 ;; esac; }
RES=/root/results; mkdir -p $RES
step=${1:?step}; shift
case "$step" in
  stage) mkdir -p "${2:-/root/stage}" && cp "$1"/* "${2:-/root/stage}"/ && ls "${2:-/root/stage}" | wc -l ;;
  install)
    engine=${1:-vllm}; stage=/root/stage; [ "$engine" = sglang ] && stage=/root/stage-sgl
    bash $stage/install-offline.sh $stage "$(site "$engine")" > /root/install-$engine.log 2>&1 \
      || { tail -20 /root/install-$engine.log; exit 1; }
    tail -1 /root/install-$engine.log
    python3 -m pip install -q --no-deps --no-build-isolation --no-index . ;;
  kernels)
    out=$1
    export PYTHONPATH=$PWD/src:$PWD/tests
    python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider 2>&1 | tail -5 | tee "$out/kernel_tests.txt"
    python3 benchmarks/bench_compressor.py --out "$out/compressor.json" 2>&1 | tee "$out/compressor.txt" ;;
  parity)
    engine=$1 out=$2 name=$3
    export PYTHONPATH=$(site "$engine"):$PWD/tests CONVGPT_PARITY_DIR=/root/parity-$name CONVGPT_PARITY_DTYPE=bfloat16
    export CONVGPT_PARITY_EAGER=${CONVGPT_PARITY_EAGER:-0}
    timeout "${PARITY_TIMEOUT:-500}" python3 tests/parity/run_engine.py "$engine" > "$RES/$name.log" 2>&1 \
      || { echo "parity $name: exit $?"; tail -30 "$RES/$name.log"; }
    cp /root/parity-$name/$engine*.json "$RES/$name.json" 2>/dev/null || echo "parity $name: no results"
    cp "$RES"/* "$out"/ ;;
  e2e)
    engine=$1 out=$2 name=$3; shift 3
    export PYTHONPATH=$(site "$engine"):$PWD/tests
    python3 benchmarks/e2e.py --engine "$engine" --out "$RES/$name.json" "$@" > "$RES/$name.log" 2>&1 \
      || { echo "e2e $name: exit $?"; tail -30 "$RES/$name.log"; }
    cat "$RES/$name.txt" 2>/dev/null || true
    cp "$RES"/* "$out"/ ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
