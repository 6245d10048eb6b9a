# Round 21: the decode attention kernels the engines offer on Hopper.  vLLM alone (three staged
# parts, installed first), `gpu.sh bg benchmarks/gpu/round21.sh`: bench_attention.py --backends
# (vLLM's FlashAttention 3 at 32 splits and at one, FlashInfer's paged decode on CUDA cores and on
# tensor cores, at the attention geometry ConvGPT shares with its twin); then ConvGPT vs twin on
# vLLM with both models on its FLASHINFER backend, decode only, traced on the timed engines; then
# vLLM bf16 parity on FLASHINFER (the published grid, untied F=36 k=5 one kv head, as round 19).
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
E=(--rounds 5 --decode-tokens 128 --timed-trace-only --prefill-n 0)
PYTHONPATH=/root/site-vllm python3 benchmarks/bench_attention.py --backends --out $R/attention_h200_r21 \
  > $R/attention_h200_r21.log 2>&1
$G e2e vllm - e2e_vllm_h200_r21_flashinfer "${E[@]}" --attention-backend FLASHINFER --trace /root/trace-r21
CONVGPT_PARITY_GEOMETRIES=untied-F36-k5-kv1 CONVGPT_PARITY_ATTN=FLASHINFER PARITY_TIMEOUT=450 \
  $G parity vllm - parity_vllm_h200_bf16_r21_flashinfer
