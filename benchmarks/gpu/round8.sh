# Round 8 (ran 2026-11-29, results in benchmarks/results/README.md): the compiled graph's choice
# by rows as a torch.cond (reverted after this round: vLLM 0.26 on torch 2.11 could not start
# with it), vLLM's bf16 parity and end to end, then what round 7 left: SGLang end to end with
# its engine start explained (recompiles and graph breaks logged), vLLM with a 32k-token prefill
# budget, the SGLang LoRA test in bf16 on CUDA, vLLM's q/k-norm + RoPE pass.  Run by
# `gpu.sh bg benchmarks/gpu/round8.sh` after the vLLM parts are staged and installed, with
# .gpu/sglang/part-1 carried.  Most needed first; engines one at a time.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
($G stage .gpu/sglang/part-1 /root/stage-sgl && $G install sglang) > $R/install-sglang.txt 2>&1 &
SGL=$!
PYTHONPATH=$PWD/src:$PWD/tests python3 -m pytest -q -rf tests/core/test_kernels.py -k "gpu and (inductor or many_rows)" \
  -p no:cacheprovider 2>&1 | tail -20 > $R/kernel_tests_r8.txt
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity vllm - parity_vllm_h200_bf16_r8
$G e2e vllm - e2e_vllm_h200_r8 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
wait $SGL
TORCH_LOGS=recompiles,graph_breaks $G e2e sglang - e2e_sglang_h200_r8 --rounds 5 --decode-tokens 128 --gpu-mem 0.8 \
  --trace /root/trace-sgl
# prefill with a 32k-token budget per engine step for both models: does vLLM's per-step host work
# (the same for both) cap ConvGPT's cheaper prefill at the engine's default budget?
$G e2e vllm - e2e_vllm_h200_r8_chunk32k --rounds 5 --decode-tokens 32 --no-batch1 --chunk 32768
PYTHONUNBUFFERED=1 PYTHONPATH=/root/site-sgl:$PWD/tests timeout 400 python3 -m pytest -q -s -rA tests/sglang -k lora \
  -p no:cacheprovider > $R/sglang_lora_gpu_r8.txt 2>&1
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
