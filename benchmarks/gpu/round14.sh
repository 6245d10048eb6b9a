# Round 14: the kernels' new tiles (round 14's sweep, `bench_norm_linear.py --tiles 128,256` on a bare
# machine before this script) checked and timed at every decode size; SGLang's sliding-window
# checkpoint with both fixes of round 13 (the model declares its window; flashinfer's paged prefill for
# models with sliding layers); vLLM's bf16 parity with the new tiles; vLLM decode end to end, traced,
# with steps cut at vLLM's step marks (steptrace.annotated_decode_steps).  The vLLM parts staged and
# installed first, the SGLang part staged to /root/stage-sgl, then `gpu.sh bg benchmarks/gpu/round14.sh`.
# As run (benchmarks/results/README.md, "Round 14"): vLLM's parity hit the 500 s timeout after two
# checkpoints and the device time ran out before the last step; round15.sh takes up both.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider 2>&1 | tail -5 > $R/kernel_tests_h200_r14.txt
 mkdir -p /root/bench && python3 benchmarks/bench_norm_linear.py --batches 1,16,64,96,128,192,256,512 \
   --out /root/bench > /dev/null 2>&1
 for f in norm_linear narrow_linear; do cp /root/bench/$f.txt $R/${f}_h200_r14.txt; cp /root/bench/$f.json $R/${f}_h200_r14.json; done)
$G install sglang
CONVGPT_PARITY_GEOMETRIES=tied-F16-k5-sliding $G parity sglang - parity_sglang_h200_bf16_r14_sliding
$G parity vllm - parity_vllm_h200_bf16_r14
$G e2e vllm - e2e_vllm_h200_r14_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --trace /root/trace-r14 \
  --timed-trace-only
