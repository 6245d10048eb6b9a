# Round 9 (what round 8 left, vLLM with the ops as in round 7): the ops' host time per call
# against Inductor's code for the same work, alone and beside a spinning Python thread; vLLM end
# to end with traces (the prefill's CPU ops ranked: where its GPU idle time goes); vLLM with a
# 32k-token prefill budget; vLLM's q/k-norm + RoPE pass.  Run by
# `gpu.sh bg benchmarks/gpu/round9.sh` after the vLLM parts are staged and installed.  Most
# needed first.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
(export PYTHONPATH=$PWD/src
 python3 benchmarks/bench_op_host.py --out $R > $R/op_host_r9.txt 2>&1
 python3 benchmarks/bench_op_host.py --busy > $R/op_host_busy_r9.txt 2>&1)
$G e2e vllm - e2e_vllm_h200_r9 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
# prefill with a 32k-token budget per engine step for both models: does vLLM's per-step host work
# (the same for both) cap ConvGPT's cheaper prefill at the engine's default budget?
$G e2e vllm - e2e_vllm_h200_r9_chunk32k --rounds 5 --decode-tokens 32 --no-batch1 --chunk 32768
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
