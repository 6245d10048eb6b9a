#!/usr/bin/env bash
# Steps of the runs on a lent GPU (torch 2.11 + triton there, no network; called h100.sh for
# the H100 runs).  The engines travel as the parts made by ../shared/gpu/pack-vllm.sh .gpu/vllm
# (three) and pack-sglang.sh .gpu/sglang (one), one part per call; see
# benchmarks/results/README.md for the exact sequence of calls behind each committed result.
#   gpu.sh stage PART_DIR [DEST]    copy one part's files into DEST (/root/stage)
#   gpu.sh install [vllm|sglang]    assemble the engine (/root/site-vllm, /root/site-sgl from
#                                   /root/stage, /root/stage-sgl) and install this project
#   gpu.sh kernels OUT              kernel tests on the GPU + compressor and norm_linear
#                                   micro-benchmarks
#   gpu.sh parity ENGINE OUT NAME   the parity matrix through ENGINE (bf16, torch.compile + CUDA
#                                   graphs; CONVGPT_PARITY_{GEOMETRIES,KV,QUANT,EAGER} as in
#                                   tests/parity/run_engine.py) -> OUT/NAME.json; compared with the
#                                   float64 reference where the results are committed;
#                                   DUMP_AFTER=S: the engine in-process (vLLM) and every thread's
#                                   stack written to the log each S seconds (a run that hangs)
#   gpu.sh e2e ENGINE OUT NAME [ARGS]  benchmarks/e2e.py, ConvGPT vs twin -> OUT/NAME.{json,txt}
#   gpu.sh bg SCRIPT                run SCRIPT (a sequence of these steps, OUT "-": results stay
#                                   in /root/results) from a copy of the repo, past this call's end
#   gpu.sh collect SECONDS OUT      wait up to SECONDS for the background script, then pack
#                                   /root/results (no traces) into OUT/results.tgz
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
    python3 benchmarks/bench_compressor.py --out "$out/compressor.json" 2>&1 | tee "$out/compressor.txt"
    python3 benchmarks/bench_norm_linear.py --out "$out" 2>&1 | tail -30 ;;
  parity)
    engine=$1 out=$2 name=$3
    export PYTHONPATH=$(site "$engine"):$PWD/tests CONVGPT_PARITY_DIR=/root/parity-$name CONVGPT_PARITY_DTYPE=bfloat16
    export CONVGPT_PARITY_EAGER=${CONVGPT_PARITY_EAGER:-0}
    run=(tests/parity/run_engine.py "$engine")
    if [ -n "${DUMP_AFTER:-}" ]; then
      export VLLM_ENABLE_V1_MULTIPROCESSING=0
      run=(-c "import faulthandler, os, runpy, sys; faulthandler.dump_traceback_later($DUMP_AFTER, repeat=True);
sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')" "${run[@]}")
    fi
    timeout "${PARITY_TIMEOUT:-500}" python3 "${run[@]}" > "$RES/$name.log" 2>&1 \
      || { echo "parity $name: exit $?"; tail -60 "$RES/$name.log"; }
    cp /root/parity-$name/$engine*.json "$RES/$name.json" 2>/dev/null || echo "parity $name: no results"
    [ "$out" = - ] || cp "$RES"/* "$out"/ ;;
  e2e)
    engine=$1 out=$2 name=$3; shift 3
    export PYTHONPATH=$(site "$engine"):$PWD/tests
    python3 benchmarks/e2e.py --engine "$engine" --out "$RES/$name.json" "$@" > "$RES/$name.log" 2>&1 \
      || { echo "e2e $name: exit $?"; tail -30 "$RES/$name.log"; }
    cat "$RES/$name.txt" 2>/dev/null || true
    [ "$out" = - ] || cp "$RES"/* "$out"/ ;;
  bg)
    rm -rf /root/repo && cp -r . /root/repo && rm -f $RES/done
    (cd /root/repo && setsid nohup bash -c "bash $1; touch $RES/done" > $RES/bg.log 2>&1 < /dev/null &) ;;
  collect)
    secs=$1 out=$2; t=0
    while [ ! -f $RES/done ] && [ $t -lt "$secs" ]; do sleep 5; t=$((t + 5)); done
    [ -f $RES/done ] && echo "background script done" || echo "background script still running"
    tail -5 $RES/bg.log; ls $RES
    tar czf "$out/results.tgz" -C $RES . ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
