# Round 5 (what round 4 left): run by `gpu.sh bg benchmarks/gpu/round5.sh` after the vLLM parts
# are staged and installed, with .gpu/sglang/part-1 carried.  Results in /root/results.
G="bash benchmarks/gpu/gpu.sh"
# vLLM bf16 parity since the q/k-norm rewrite (a1b4fda; CPU parity equal, GPU not re-run)
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity vllm - parity_vllm_h200_bf16_r5
$G stage .gpu/sglang/part-1 /root/stage-sgl
$G install sglang > /root/results/install-sglang.txt 2>&1
# SGLang LoRA where CUDA is (skipped on CPU). Round 4's run was killed within a minute with no
# output (SGLang kills its parent when a scheduler dies); float32 now runs triton attention, and
# the log is written as it goes
PYTHONUNBUFFERED=1 PYTHONPATH=/root/site-sgl:$PWD/tests timeout 400 python3 -m pytest -q -s -rA tests/sglang -k lora \
  -p no:cacheprovider > /root/results/sglang_lora_gpu.txt 2>&1
# vLLM's optional q/k-norm + RoPE fusion pass on both models: does it fire on ConvGPT (kernels
# per step down by one per layer, as on the twin), and what does it give
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
