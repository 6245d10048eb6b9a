# Round 19: on vLLM too the q+k+v kernel writes k and v into the KV cache (FlashAttention's NHD cache,
# through convgpt.vllm.model._KVCaches; attention gets no k and v), in the decode-sized graph; the
# graph for steps above 256 tokens writes it with vLLM's own write (convgpt::kv_cache_write).
# vLLM alone (three staged parts, installed first), `gpu.sh bg benchmarks/gpu/round19.sh`: the GPU
# kernel tests (the store into FlashAttention's layout and the compiled layer writing the cache among
# them) and the vLLM test that the kernel's store equals vLLM's reshape_and_cache_flash bit for bit;
# if any fails, CONVGPT_KV_STORE=0 for the rest and the file says so.  Then vLLM bf16 parity (the
# published grid, untied F=36 k=5 one kv head, as round 16), ConvGPT against itself without the
# store (--b-env CONVGPT_KV_STORE=0), prefill and decode, traced on the timed engines, then ConvGPT
# vs twin the same way.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
E=(--rounds 5 --decode-tokens 128 --timed-trace-only)
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider \
   -k "gpu and (kv or rope or fused_decoder or unfused or norm_linear)" 2>&1 | tail -5 \
   > $R/kernel_tests_h200_r19.txt
 PYTHONPATH=/root/site-vllm:$PYTHONPATH python3 -m pytest -q tests/vllm/test_vllm.py -p no:cacheprovider \
   -k "kv_caches or kernel_store" 2>&1 | tail -5 >> $R/kernel_tests_h200_r19.txt)
if ! grep -q " passed" $R/kernel_tests_h200_r19.txt || grep -q "failed\|error" $R/kernel_tests_h200_r19.txt; then
  export CONVGPT_KV_STORE=0; echo "CONVGPT_KV_STORE=0 for the rest of round 19" >> $R/kernel_tests_h200_r19.txt
fi
CONVGPT_PARITY_GEOMETRIES=untied-F36-k5-kv1 PARITY_TIMEOUT=450 $G parity vllm - parity_vllm_h200_bf16_r19
$G e2e vllm - e2e_vllm_h200_r19_kv0 "${E[@]}" --b-env CONVGPT_KV_STORE=0 --trace /root/trace-r19ab
$G e2e vllm - e2e_vllm_h200_r19 "${E[@]}" --trace /root/trace-r19
