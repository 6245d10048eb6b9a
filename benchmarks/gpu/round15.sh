# Round 15: the q/k norm + RoPE in the q+k+v kernel's epilogue (norm_linear's QKRope), checked on the
# GPU (kernel tests; if they fail, CONVGPT_QK_ROPE=0 for the rest and the file says so) and timed
# against the engine's kernels for the same work (bench_norm_linear.py --only qkv_rope); then vLLM
# decode end to end with it and round 14's tiles, traced, steps cut at vLLM's step marks
# (steptrace.annotated_decode_steps); vLLM bf16 parity on the sliding-window checkpoint; SGLang decode
# end to end (twin first, as round 11) and SGLang bf16 parity on the published-grid checkpoint.  The
# vLLM parts staged and installed first, the SGLang part staged to /root/stage-sgl, then
# `gpu.sh bg benchmarks/gpu/round15.sh`.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider \
   -k "gpu and (rope or fused_decoder or unfused or norm_linear)" 2>&1 | tail -5 > $R/kernel_tests_h200_r15.txt
 mkdir -p /root/bench && python3 benchmarks/bench_norm_linear.py --only qkv_rope --batches 1,8,16,32,64,128,192,256 \
   --out /root/bench > /dev/null 2>&1
 cp /root/bench/qkv_rope.txt $R/qkv_rope_h200_r15.txt; cp /root/bench/qkv_rope.json $R/qkv_rope_h200_r15.json)
if ! grep -q " passed" $R/kernel_tests_h200_r15.txt || grep -q "failed" $R/kernel_tests_h200_r15.txt; then
  export CONVGPT_QK_ROPE=0; echo "CONVGPT_QK_ROPE=0 for the rest of round 15" >> $R/kernel_tests_h200_r15.txt
fi
$G e2e vllm - e2e_vllm_h200_r15_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --trace /root/trace-r15 \
  --timed-trace-only
CONVGPT_PARITY_GEOMETRIES=tied-F16-k5-sliding PARITY_TIMEOUT=400 $G parity vllm - parity_vllm_h200_bf16_r15
$G install sglang
$G e2e sglang - e2e_sglang_h200_r15_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --twin-first --gpu-mem 0.8
CONVGPT_PARITY_GEOMETRIES=untied-F36-k5-kv1 PARITY_TIMEOUT=400 $G parity sglang - parity_sglang_h200_bf16_r15
