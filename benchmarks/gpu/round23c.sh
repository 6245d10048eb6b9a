# Round 23, third machine: `bash benchmarks/gpu/round23c.sh OUT` in the call itself (little device
# time left: each step's results go to OUT as soon as it ends), with SGLang staged and installed.
# The q+k+v kernel writing the q heads as a tensor of their own (QKV, CONVGPT_Q_APART), so that
# SGLang's flashinfer decode takes them without its q.contiguous() copy: the GPU kernel tests
# of the KV-store path (q apart and not, published widths); ConvGPT against itself with
# CONVGPT_Q_APART=0, decode at batch 256 and 1, 5 interleaved rounds, traced; then bf16 parity
# on the tied F=16 k=3 geometry, as far as the device time goes.
out=${1:?OUT}
G="bash benchmarks/gpu/gpu.sh"
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider -k "gpu and (kv_cache or pdl)" 2>&1 \
   | tail -3 > $out/kernel_tests_h200_r23c.txt)
cat $out/kernel_tests_h200_r23c.txt
$G e2e sglang $out ab_q_apart_sglang_h200_r23c --b-env CONVGPT_Q_APART=0 --rounds 5 --decode-tokens 128 \
  --prefill-n 0 --gpu-mem 0.8 --timed-trace-only --trace /root/trace-r23c
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 PARITY_TIMEOUT=400 $G parity sglang $out parity_sglang_h200_bf16_r23c
