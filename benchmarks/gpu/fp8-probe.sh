# fp8 weights, then (if they served) fp8 KV cache through vLLM on the tied F=16 checkpoint,
# compiled with CUDA graphs, every thread's stack dumped each 75 s in case a run hangs (170 s each).
G="bash benchmarks/gpu/gpu.sh"
export CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 DUMP_AFTER=75 PARITY_TIMEOUT=170
CONVGPT_PARITY_QUANT=fp8 $G parity vllm - parity_vllm_h200_fp8
[ -f /root/results/parity_vllm_h200_fp8.json ] && CONVGPT_PARITY_KV=fp8 $G parity vllm - parity_vllm_h200_kvfp8
