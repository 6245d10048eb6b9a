# Round 15 (next): what round 14 left. vLLM decode end to end with round 14's tiles, traced, steps
# cut at vLLM's step marks (steptrace.annotated_decode_steps; compare round 12's steps and traces);
# vLLM's bf16 parity on the two checkpoints round 14's timeout left out (MHA, sliding); SGLang
# decode end to end with the new tiles (twin first, as round 11).  The vLLM parts staged and
# installed first, the SGLang part staged to /root/stage-sgl, then `gpu.sh bg benchmarks/gpu/round15.sh`.
G="bash benchmarks/gpu/gpu.sh"
$G e2e vllm - e2e_vllm_h200_r15_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --trace /root/trace-r15 \
  --timed-trace-only
CONVGPT_PARITY_GEOMETRIES=tied-F64-k1-mha,tied-F16-k5-sliding PARITY_TIMEOUT=600 \
  $G parity vllm - parity_vllm_h200_bf16_r15
$G install sglang
$G e2e sglang - e2e_sglang_h200_r15_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --twin-first --gpu-mem 0.8
# Last, if time is left: the tile sweep at 192 rows, which round 14's sweep left out (o_proj's split-K
# kernel was 0.2 us ahead of cuBLAS there in round 14's micro-benchmark).
(mkdir -p /root/tiles192 && PYTHONPATH=$PWD/src python3 benchmarks/bench_norm_linear.py --tiles 192 --out /root/tiles192 \
  > /dev/null 2>&1 && cp /root/tiles192/tiles.txt /root/results/tiles_h200_r15_192.txt \
  && cp /root/tiles192/tiles.json /root/results/tiles_h200_r15_192.json)
