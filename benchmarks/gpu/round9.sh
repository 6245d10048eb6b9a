# Round 9 (what round 8 left, vLLM with the ops as in round 7): the ops' host time per call
# against Inductor's code for the same work, alone and beside a spinning Python thread; vLLM end
# to end with traces (the prefill's CPU ops ranked: where its GPU idle time goes); SGLang's engine
# start with the twin started first (is ConvGPT's 307 s the first start building the JIT kernels
# both engines use?); vLLM with a 32k-token prefill budget; vLLM's q/k-norm + RoPE pass.  Run by
# `gpu.sh bg benchmarks/gpu/round9.sh` after the vLLM parts are staged and installed, with
# .gpu/sglang/part-1 carried.  Most needed first; engines one at a time.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
($G stage .gpu/sglang/part-1 /root/stage-sgl && $G install sglang) > $R/install-sglang.txt 2>&1 &
SGL=$!
(export PYTHONPATH=$PWD/src
 python3 benchmarks/bench_op_host.py --out $R > $R/op_host_r9.txt 2>&1
 python3 benchmarks/bench_op_host.py --busy > $R/op_host_busy_r9.txt 2>&1)
$G e2e vllm - e2e_vllm_h200_r9 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
wait $SGL
ls -la ~/.cache/flashinfer ~/.cache/tvm-ffi > $R/jit_caches_before_sglang_r9.txt 2>&1
CONVGPT_SGLANG_LOG_LEVEL=info $G e2e sglang - e2e_sglang_h200_r9_twinfirst --twin-first --rounds 3 --decode-tokens 32 \
  --gpu-mem 0.8
# prefill with a 32k-token budget per engine step for both models: does vLLM's per-step host work
# (the same for both) cap ConvGPT's cheaper prefill at the engine's default budget?
$G e2e vllm - e2e_vllm_h200_r9_chunk32k --rounds 5 --decode-tokens 32 --no-batch1 --chunk 32768
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
