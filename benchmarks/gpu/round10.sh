# Round 10 (what round 9 left; ran up to the 512-budget parity, the rest did not fit the session's
# device time, see benchmarks/results/README.md "Round 10"): bf16 parity on vLLM over two checkpoints at the
# matrix's own budget (64 tokens: the graph for up to 256) and at 512 (the graph above); vLLM's
# prefill with a 32k-token budget, i.e. half the steps and so half of vLLM's per-step host work
# (both models) for the same tokens; SGLang with the twin started first (is ConvGPT's long first
# start the JIT builds both engines share?); vLLM with the twin started first (the graphs-on decode
# traces of rounds 7 and 9 show every host op of ConvGPT's engine, the sampler's included, 1.3-1.6x
# slower than the same op in the twin's: does that follow the start order?).  Run by `gpu.sh bg benchmarks/gpu/round10.sh` after
# the vLLM parts are staged and installed, with .gpu/sglang/part-1 carried.  Most needed first.
# The last `collect` call also copies /root/inductor_code_r10.tgz to $OUT.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
($G stage .gpu/sglang/part-1 /root/stage-sgl && $G install sglang) > $R/install-sglang.txt 2>&1 &
SGL=$!
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity vllm - parity_vllm_h200_bf16_r10
$G e2e vllm - e2e_vllm_h200_r10_chunk32k --rounds 5 --decode-tokens 32 --no-batch1 --chunk 32768 \
  --trace /root/trace-vllm-32k
CONVGPT_PARITY_CHUNK=512 CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 PARITY_TIMEOUT=300 \
  $G parity vllm - parity_vllm_h200_bf16_r10_chunk512
$G e2e vllm - e2e_vllm_h200_r10_twinfirst --twin-first --rounds 5 --decode-tokens 64 --trace /root/trace-vllm-tf
# Inductor's generated code of every vLLM graph above (both models, every range): which kernels
# make the b256 decode trace's "other" class (ConvGPT's triton_red_fused_0 92 us vs the twin's 47)
(cd ~/.cache/vllm/torch_compile_cache && find . -name '*.py' -size -4M | tar czf /root/inductor_code_r10.tgz -T -)
ls -la /root/inductor_code_r10.tgz > $R/inductor_code_r10.txt 2>&1
wait $SGL
ls -la ~/.cache/flashinfer ~/.cache/tvm-ffi > $R/jit_caches_before_sglang_r10.txt 2>&1
CONVGPT_SGLANG_LOG_LEVEL=info $G e2e sglang - e2e_sglang_h200_r10_twinfirst --twin-first --rounds 3 --decode-tokens 32 \
  --gpu-mem 0.8
