# Round 14 (next): SGLang's parity matrix with both sliding-window fixes of round 13 (the model
# declares its window; flashinfer's paged prefill for models with sliding layers), then vLLM decode
# traced with steps cut at vLLM's step marks (steptrace.annotated_decode_steps).  The vLLM parts
# staged and installed first, the SGLang part staged to /root/stage-sgl, then
# `gpu.sh bg benchmarks/gpu/round14.sh`.  The SGLang matrix took ~9 min in round 13.
G="bash benchmarks/gpu/gpu.sh"
$G install sglang
PARITY_TIMEOUT=720 $G parity sglang - parity_sglang_h200_bf16_r14
$G e2e vllm - e2e_vllm_h200_r14_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --trace /root/trace-r14 \
  --timed-trace-only
