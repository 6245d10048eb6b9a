# Round 13: does vLLM's optional q/k-norm + RoPE fusion pass (pass_config.enable_qk_norm_rope_fusion)
# fire on ConvGPT's graph as on its twin's, and what does it change per decode step?  Decode only,
# the pass on for both models, traced on the timed engines (compare round 12: the same run without
# it).  Then the bf16 parity matrices: SGLang with the current code (its last GPU run was round 7)
# and vLLM with the pass on.  The vLLM parts staged and installed first, the SGLang part staged to
# /root/stage-sgl, then `gpu.sh bg benchmarks/gpu/round13.sh`.  ~20 min.
G="bash benchmarks/gpu/gpu.sh"
$G e2e vllm - e2e_vllm_h200_r13_qknormrope --prefill-n 0 --rounds 5 --decode-tokens 128 \
  --trace /root/trace-r13 --timed-trace-only --vllm-pass enable_qk_norm_rope_fusion
$G install sglang
$G parity sglang - parity_sglang_h200_bf16_r13
CONVGPT_PARITY_VLLM_PASS=enable_qk_norm_rope_fusion $G parity vllm - parity_vllm_h200_bf16_r13_qknormrope
