# Round 7 (what round 6 left): the split-K kernel's 128-row limit, SGLang fused up to 256 rows, the Library-registered
# ops end to end, prefill with its GPU idle time, vLLM parity's missing cell, SGLang LoRA in
# bf16 on CUDA, vLLM's q/k-norm + RoPE pass, and why SGLang's first piecewise-graph capture of
# ConvGPT takes minutes.  Run by `gpu.sh bg benchmarks/gpu/round7.sh` after the vLLM parts are
# staged and installed, with .gpu/sglang/part-1 carried.  Most needed first; engines one at a
# time, in the order of need (round 6 ran two parity engines side by side and lost a vLLM start to it).
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
($G stage .gpu/sglang/part-1 /root/stage-sgl && $G install sglang) > $R/install-sglang.txt 2>&1 &
SGL=$!
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q -rf tests/core/test_kernels.py -k gpu -p no:cacheprovider 2>&1 | tail -40 > $R/kernel_tests_r7.txt
 if grep -q "^FAILED.*narrow" $R/kernel_tests_r7.txt; then echo "narrow_linear off for this round" >> $R/kernel_tests_r7.txt; fi
 python3 benchmarks/bench_norm_linear.py --only narrow_linear --batches 1,16,32,64,128 --out $R > /dev/null 2>&1)
if grep -q "narrow_linear off" $R/kernel_tests_r7.txt; then export CONVGPT_NARROW_LINEAR=0; fi
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity vllm - parity_vllm_h200_bf16_r7
$G e2e vllm - e2e_vllm_h200_r7 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
wait $SGL
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity sglang - parity_sglang_h200_bf16_r7
TORCH_LOGS=recompiles,graph_breaks $G e2e sglang - e2e_sglang_h200_r7 --rounds 5 --decode-tokens 128 --gpu-mem 0.8 \
  --trace /root/trace-sgl
PYTHONUNBUFFERED=1 PYTHONPATH=/root/site-sgl:$PWD/tests timeout 400 python3 -m pytest -q -s -rA tests/sglang -k lora \
  -p no:cacheprovider > $R/sglang_lora_gpu_r7.txt 2>&1
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
