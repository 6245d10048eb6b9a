# Ran at commit 4d9f94d (float32 logits, taken back after round23b.sh).
# Round 23: SGLang alone (its one part staged in /root/stage-sgl and installed first),
# `gpu.sh bg benchmarks/gpu/round23.sh`.  The head's GEMM writing float32 logits into SGLang's
# logits buffer (convgpt_core.logits): its GPU tests; ConvGPT vs twin at batch 256 and 1, 5
# interleaved rounds, traced on the timed engines; bf16 parity (tied F=16 k=3 and untied F=36 k=5
# one kv head); then ConvGPT against itself with CONVGPT_FLOAT_LOGITS=0 (SGLang's own head: bf16
# GEMM, then its cast), 5 interleaved rounds, traced.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
PYTHONPATH=$PWD/src:$PWD/tests python3 -m pytest -q -p no:cacheprovider tests/core/test_logits.py 2>&1 \
  | tail -3 > $R/logits_tests_h200_r23.txt
$G e2e sglang - e2e_sglang_h200_r23 --rounds 5 --decode-tokens 128 --prefill-n 0 --gpu-mem 0.8 --twin-first \
  --timed-trace-only --trace /root/trace-r23
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 PARITY_TIMEOUT=500 $G parity sglang - parity_sglang_h200_bf16_r23
$G e2e sglang - ab_float_logits_sglang_h200_r23 --b-env CONVGPT_FLOAT_LOGITS=0 --rounds 5 --decode-tokens 128 \
  --prefill-n 0 --gpu-mem 0.8 --timed-trace-only --trace /root/trace-r23ab
