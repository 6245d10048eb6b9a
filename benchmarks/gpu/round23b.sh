# Ran at commit 955dcab (float32 logits, taken back after this run: see the results README).
# Round 23, second script on the same machine: round23.sh's first ConvGPT vs twin run showed the
# head's GEMM not writing into SGLang's buffer (the vocab, 65538, is padded to 65600 rows, and
# float_logits wanted the buffer as wide as the weight), so this repeats it at the fix, after the
# package is installed again: the GPU tests, ConvGPT vs twin (5 interleaved rounds, traced), the
# kernels before each remaining logits-sized copy in the traces, and bf16 parity.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
PYTHONPATH=$PWD/src:$PWD/tests python3 -m pytest -q -p no:cacheprovider tests/core/test_logits.py 2>&1 \
  | tail -3 > $R/logits_tests_h200_r23b.txt
$G e2e sglang - e2e_sglang_h200_r23b --rounds 5 --decode-tokens 128 --prefill-n 0 --gpu-mem 0.8 --twin-first \
  --timed-trace-only --trace /root/trace-r23b
for f in $(find /root/trace-r23b -name '*.json*' | sort); do
  echo "== $f"
  python3 benchmarks/steptrace.py --follows $f direct_copy
done > $R/follows_copies_sglang_h200_r23b.txt 2>&1
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 PARITY_TIMEOUT=500 $G parity sglang - parity_sglang_h200_bf16_r23b
