# Round 18: the q+k+v kernel writes k and v into SGLang's KV pool itself (KVStore; attention is
# called with save_kv_cache=False), which drops SGLang's store_kvcache kernel from every layer.
# SGLang alone (one staged part, /root/stage-sgl, installed first), `gpu.sh bg benchmarks/gpu/round18.sh`:
# the GPU kernel tests (the store at published widths among them; if any fails, CONVGPT_KV_STORE=0
# for the rest and the file says so), SGLang bf16 parity (tied F=16 k=3, as round 16), ConvGPT
# against itself without the store (--b-env CONVGPT_KV_STORE=0) traced on the timed engines, then
# ConvGPT vs twin (twin first) traced.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
E=(--prefill-n 0 --rounds 5 --decode-tokens 128 --gpu-mem 0.8)
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider \
   -k "gpu and (kv or pdl or rope or fused_decoder or norm_linear or narrow)" 2>&1 | tail -5 \
   > $R/kernel_tests_h200_r18.txt)
if ! grep -q " passed" $R/kernel_tests_h200_r18.txt || grep -q "failed" $R/kernel_tests_h200_r18.txt; then
  export CONVGPT_KV_STORE=0; echo "CONVGPT_KV_STORE=0 for the rest of round 18" >> $R/kernel_tests_h200_r18.txt
fi
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 PARITY_TIMEOUT=420 $G parity sglang - parity_sglang_h200_bf16_r18
$G e2e sglang - e2e_sglang_h200_r18_kv0 "${E[@]}" --b-env CONVGPT_KV_STORE=0 --trace /root/trace-r18ab \
  --timed-trace-only
$G e2e sglang - e2e_sglang_h200_r18_decode "${E[@]}" --twin-first --trace /root/trace-r18 --timed-trace-only
