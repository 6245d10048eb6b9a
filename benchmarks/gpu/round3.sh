# Round 3 on one H200 (2026-11-29): the steps run by `gpu.sh bg benchmarks/gpu/round3.sh`
# after the vLLM parts are staged and installed; results in /root/results (gpu.sh collect).
G="bash benchmarks/gpu/gpu.sh"
$G stage .gpu/sglang/part-1 /root/stage-sgl
$G install sglang > /root/results/install-sglang.txt 2>&1 &   # CPU work beside the tiny fp8 runs
# fp8 weights and fp8 KV cache through vLLM (compiled, CUDA graphs), stacks dumped if they hang
bash benchmarks/gpu/fp8-probe.sh
wait
# interleaved ConvGPT / twin, decode traces (graphs off: kernels; graphs on: the host side)
$G e2e vllm - e2e_vllm_h200_r3 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
$G e2e sglang - e2e_sglang_h200_r3 --rounds 5 --decode-tokens 128 --gpu-mem 0.8 --trace /root/trace-sgl
LONG="--rounds 5 --prefill-n 0 --no-batch1 --batch 64 --decode-prompt 3840 --max-model-len 4352"
$G e2e vllm - e2e_vllm_h200_long_fp8kv_r3 $LONG --kv-cache-dtype fp8
$G e2e sglang - e2e_sglang_h200_long_fp8kv_r3 $LONG --kv-cache-dtype fp8_e4m3 --gpu-mem 0.8
[ -f /root/results/parity_vllm_h200_fp8.json ] && $G e2e vllm - e2e_vllm_h200_fp8 --rounds 5 --decode-tokens 128 --quantization fp8
