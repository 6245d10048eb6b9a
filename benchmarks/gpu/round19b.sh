# Round 19, second call: round19.sh's A/B (ConvGPT against itself with CONVGPT_KV_STORE=0) did not
# start its second engine: vLLM's compile cache handed it the graph traced with the store on (its
# key had no ConvGPT switches; fixed in the commit before this script).  Staged as round19.sh.
G="bash benchmarks/gpu/gpu.sh"
$G e2e vllm - e2e_vllm_h200_r19_kv0 --rounds 5 --decode-tokens 128 --timed-trace-only --b-env CONVGPT_KV_STORE=0 \
  --trace /root/trace-r19ab
