# Round 22: SGLang alone (its one part staged in /root/stage-sgl and installed first),
# `gpu.sh bg benchmarks/gpu/round22.sh`.  First, bare: the q+k+v+RoPE kernel's row tile in the
# decode chain at 96-256 rows (probe_r22.py).  Then the round-21 fix (the float32 cos | sin table
# read after the GEMM) through SGLang: bf16 parity (tied F=16 k=3 and untied F=36 k=5 one kv
# head), and ConvGPT vs twin, decode at batch 256 and 1, 5 interleaved rounds, traced on the
# timed engines, each trace's norm_linear launches listed by the kernel before them.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
PYTHONPATH=$PWD/src python3 benchmarks/gpu/probe_r22.py $R > $R/probe_r22.txt 2>&1
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 PARITY_TIMEOUT=500 $G parity sglang - parity_sglang_h200_bf16_r22
$G e2e sglang - e2e_sglang_h200_r22 --rounds 5 --decode-tokens 128 --prefill-n 0 --gpu-mem 0.8 --twin-first \
  --timed-trace-only --trace /root/trace-r22
for f in $(find /root/trace-r22 -name '*.json*' | sort); do
  echo "== $f $(du -k $f | cut -f1) kB"
  python3 benchmarks/steptrace.py --follows $f norm_linear
done > $R/follows_sglang_h200_r22.txt 2>&1
