# Round 6 (what round 5 left): run by `gpu.sh bg benchmarks/gpu/round6.sh` after the vLLM parts
# are staged and installed, with .gpu/sglang/part-1 carried.  Most needed first; results in
# /root/results (gpu.sh collect).
G="bash benchmarks/gpu/gpu.sh"
($G stage .gpu/sglang/part-1 /root/stage-sgl && $G install sglang) > /root/results/install-sglang.txt 2>&1 &
# the kernel tests on the GPU, and norm_linear against the engine path with the recompile fix
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -k gpu -p no:cacheprovider 2>&1 | tail -3 > /root/results/kernel_tests_r6.txt
 python3 benchmarks/bench_norm_linear.py --out /root/results > /dev/null 2>&1)
# norm_linear by rows since round 5 (kernel up to 256 rows on vLLM, 128 on SGLang): parity, speed
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity vllm - parity_vllm_h200_bf16_r6
$G e2e vllm - e2e_vllm_h200_r6 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
wait
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity sglang - parity_sglang_h200_bf16_r6
$G e2e sglang - e2e_sglang_h200_r6 --rounds 5 --decode-tokens 128 --gpu-mem 0.8 --trace /root/trace-sgl
# SGLang LoRA where CUDA is (not reached in rounds 4-5)
PYTHONUNBUFFERED=1 PYTHONPATH=/root/site-sgl:$PWD/tests timeout 400 python3 -m pytest -q -s -rA tests/sglang -k lora \
  -p no:cacheprovider > /root/results/sglang_lora_gpu.txt 2>&1
# vLLM's optional q/k-norm + RoPE fusion pass: does it fire on ConvGPT, what does it give
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
