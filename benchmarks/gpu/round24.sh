# Round 24: SGLang alone (its one part staged in /root/stage-sgl and installed first),
# `gpu.sh bg benchmarks/gpu/round24.sh`.  The q heads apart: round 23's q+k+v kernel writing them
# as a tensor of their own in decode steps, and this round's two GEMMs (linear_q_apart) in
# SGLang's own layers from Q_APART_MIN_ROWS rows on (prefill chunks).  GPU tests of both; the
# bare probe of one GEMM + q copy against two GEMMs by rows (qsplit_r24.py); ConvGPT against
# itself with CONVGPT_Q_APART=0 (prefill 256 x 1024, decode at batch 256 and 1), 5 interleaved
# rounds, traced (timed engines, then graphs off: a prefill's GPU time by op class); bf16 parity
# (tied F=16 k=3); ConvGPT vs twin, the same measurements and traces on the timed engines; then
# bf16 parity untied F=36 k=5 one kv head.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
PYTHONPATH=$PWD/src:$PWD/tests python3 -m pytest -q -p no:cacheprovider tests/core/test_kernels.py \
  -k "gpu and (kv_cache or pdl or q_apart)" 2>&1 | tail -3 > $R/kernel_tests_h200_r24.txt
PYTHONPATH=$PWD/src python3 benchmarks/gpu/qsplit_r24.py $R > $R/qsplit_h200_r24.txt 2>&1
$G e2e sglang - ab_q_apart_sglang_h200_r24 --b-env CONVGPT_Q_APART=0 --rounds 5 --decode-tokens 128 \
  --gpu-mem 0.8 --trace /root/trace-r24ab
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 PARITY_TIMEOUT=400 $G parity sglang - parity_sglang_h200_bf16_r24
$G e2e sglang - e2e_sglang_h200_r24 --rounds 5 --decode-tokens 128 --gpu-mem 0.8 --twin-first \
  --timed-trace-only --trace /root/trace-r24
CONVGPT_PARITY_GEOMETRIES=untied-F36-k5-kv1 PARITY_TIMEOUT=400 $G parity sglang - parity_sglang_h200_bf16_r24u
