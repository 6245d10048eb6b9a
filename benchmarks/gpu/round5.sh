# Round 5: run by `gpu.sh bg benchmarks/gpu/round5.sh` after the vLLM parts are staged and
# installed (and `gpu.sh kernels`-style tests of the fused norm_linear kernel have passed), with
# .gpu/sglang/part-1 carried.  Most needed first; results in /root/results (gpu.sh collect).
G="bash benchmarks/gpu/gpu.sh"
# SGLang's install is CPU work: beside the vLLM parity run
($G stage .gpu/sglang/part-1 /root/stage-sgl && $G install sglang) > /root/results/install-sglang.txt 2>&1 &
# bf16 parity with the fused add + RMSNorm + linear kernels (and the q/k-norm rewrite, a1b4fda)
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity vllm - parity_vllm_h200_bf16_r5
$G e2e vllm - e2e_vllm_h200_r5 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
wait
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity sglang - parity_sglang_h200_bf16_r5
$G e2e sglang - e2e_sglang_h200_r5 --rounds 5 --decode-tokens 128 --gpu-mem 0.8 --trace /root/trace-sgl
# SGLang LoRA where CUDA is (round 4's run was killed within a minute with no output; float32
# now runs triton attention, and the log is written as it goes)
PYTHONUNBUFFERED=1 PYTHONPATH=/root/site-sgl:$PWD/tests timeout 400 python3 -m pytest -q -s -rA tests/sglang -k lora \
  -p no:cacheprovider > /root/results/sglang_lora_gpu.txt 2>&1
# vLLM's optional q/k-norm + RoPE fusion pass: does it fire on ConvGPT, what does it give
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
