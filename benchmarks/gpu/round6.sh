# Round 6: narrow_linear (the split-K kernel for o_proj and down) and what round 5 left (the
# norm_linear rows split, SGLang's trace, SGLang LoRA on CUDA, vLLM's q/k-norm + RoPE pass).
# Run by `gpu.sh bg benchmarks/gpu/round6.sh` after the vLLM parts are staged and installed,
# with .gpu/sglang/part-1 carried.  Most needed first; results in /root/results (gpu.sh collect).
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
($G stage .gpu/sglang/part-1 /root/stage-sgl && $G install sglang) > $R/install-sglang.txt 2>&1 &
SGL=$!
# the kernel tests on the GPU; narrow_linear stays off for the round if any of its tests fails
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q -rf tests/core/test_kernels.py -k gpu -p no:cacheprovider 2>&1 | tail -40 > $R/kernel_tests_r6.txt
 if grep -q "^FAILED.*narrow" $R/kernel_tests_r6.txt; then echo "narrow_linear off for this round" >> $R/kernel_tests_r6.txt; fi
 python3 benchmarks/bench_norm_linear.py --out $R > /dev/null 2>&1)
if grep -q "narrow_linear off" $R/kernel_tests_r6.txt; then export CONVGPT_NARROW_LINEAR=0; fi
wait $SGL
# bf16 parity on both engines side by side (each engine takes 0.3 of the GPU's memory)
export CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1
$G parity vllm - parity_vllm_h200_bf16_r6 > $R/parity-vllm-step.txt 2>&1 &
$G parity sglang - parity_sglang_h200_bf16_r6 > $R/parity-sglang-step.txt 2>&1 &
wait
# end to end, ConvGPT vs twin interleaved, with the kernel traces; vLLM then SGLang
$G e2e vllm - e2e_vllm_h200_r6 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
$G e2e sglang - e2e_sglang_h200_r6 --rounds 5 --decode-tokens 128 --gpu-mem 0.8 --trace /root/trace-sgl
# SGLang LoRA where CUDA is (not reached in rounds 4-5)
PYTHONUNBUFFERED=1 PYTHONPATH=/root/site-sgl:$PWD/tests timeout 400 python3 -m pytest -q -s -rA tests/sglang -k lora \
  -p no:cacheprovider > $R/sglang_lora_gpu.txt 2>&1
# vLLM's optional q/k-norm + RoPE fusion pass: does it fire on ConvGPT, what does it give
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
