# Round 25: SGLang alone (its one part staged in /root/stage-sgl and installed first),
# `gpu.sh bg benchmarks/gpu/round25.sh`.  Decode attention of one request by the core's kernel
# (convgpt_core.decode_attention) instead of FlashInfer's decode + merge.  GPU tests of the kernel
# (float64, CUDA-graph replay at other lengths), of the KV store and PDL paths and of the logits
# cast; bf16 parity (tied F=16 k=3; the parity's last requests decode alone, so through the new
# kernel, and every step's logits through round 24's cast); ConvGPT vs twin, decode at batch 256
# and 1, 5 interleaved rounds, traced on the timed engines; ConvGPT against itself with
# CONVGPT_DECODE_ATTENTION=0 (batch 1: the kernel's effect; batch 256, where it does not run: a
# control); then bf16 parity untied F=36 k=5 one kv head.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q -p no:cacheprovider tests/core/test_kernels.py -k "gpu and (decode_attention or kv_cache or pdl)" \
   2>&1 | tail -3 > $R/kernel_tests_h200_r25.txt
 python3 -m pytest -q -p no:cacheprovider tests/core/test_logits.py 2>&1 | tail -1 >> $R/kernel_tests_h200_r25.txt)
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 PARITY_TIMEOUT=500 $G parity sglang - parity_sglang_h200_bf16_r25
$G e2e sglang - e2e_sglang_h200_r25 --rounds 5 --decode-tokens 128 --prefill-n 0 --gpu-mem 0.8 --twin-first \
  --timed-trace-only --trace /root/trace-r25
$G e2e sglang - ab_decode_attention_sglang_h200_r25 --b-env CONVGPT_DECODE_ATTENTION=0 --rounds 5 \
  --decode-tokens 128 --prefill-n 0 --gpu-mem 0.8 --timed-trace-only --trace /root/trace-r25ab
CONVGPT_PARITY_GEOMETRIES=untied-F36-k5-kv1,tied-F16-k5-sliding PARITY_TIMEOUT=500 $G parity sglang - parity_sglang_h200_bf16_r25u
