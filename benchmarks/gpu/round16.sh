# Round 16: programmatic dependent launch (PDL) for the decode kernels (norm_linear, narrow_linear;
# convgpt_core.kernels.pdl) and the rope epilogue's cos/sin loads issued before its GEMM.  Checked on
# the GPU (kernel tests, among them 4 fused layers in one CUDA graph with PDL equal bit for bit to
# plain launches; if any fails, CONVGPT_PDL=0 for the rest and the file says so), timed as a chain of
# 32 layers in one CUDA graph with and without PDL (bench_norm_linear.py --only chain), then vLLM bf16
# parity (published grid, untied F=36 k=5 one kv head), vLLM decode end to end traced at vLLM's step
# marks, SGLang bf16 parity (tied F=16 k=3) and SGLang decode end to end (twin first).  The vLLM parts
# staged and installed first, the SGLang part staged to /root/stage-sgl, then
# `gpu.sh bg benchmarks/gpu/round16.sh`.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider \
   -k "gpu and (pdl or rope or fused_decoder or unfused or norm_linear or narrow)" 2>&1 | tail -5 \
   > $R/kernel_tests_h200_r16.txt
 mkdir -p /root/bench && python3 benchmarks/bench_norm_linear.py --only chain --batches 1,16,64,128,256 \
   --out /root/bench > /root/bench/chain.log 2>&1 || tail -20 /root/bench/chain.log >> $R/kernel_tests_h200_r16.txt
 cp /root/bench/chain.txt $R/chain_h200_r16.txt; cp /root/bench/chain.json $R/chain_h200_r16.json)
if ! grep -q " passed" $R/kernel_tests_h200_r16.txt || grep -q "failed" $R/kernel_tests_h200_r16.txt; then
  export CONVGPT_PDL=0; echo "CONVGPT_PDL=0 for the rest of round 16" >> $R/kernel_tests_h200_r16.txt
fi
CONVGPT_PARITY_GEOMETRIES=untied-F36-k5-kv1 PARITY_TIMEOUT=400 $G parity vllm - parity_vllm_h200_bf16_r16
$G e2e vllm - e2e_vllm_h200_r16_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --trace /root/trace-r16 \
  --timed-trace-only
$G install sglang
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 PARITY_TIMEOUT=300 $G parity sglang - parity_sglang_h200_bf16_r16
$G e2e sglang - e2e_sglang_h200_r16_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --twin-first --gpu-mem 0.8
