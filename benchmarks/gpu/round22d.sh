# Round 22, fourth machine: `gpu.sh bg benchmarks/gpu/round22d.sh` at the commit that runs o_proj
# through narrow_linear and launches the decode kernels with PDL up to 256 rows (probe_r22c; taken
# back in the next commit), with SGLang staged and installed.  GPU kernel tests of narrow_linear, PDL and the fused layers; the
# decode chain at 1-256 rows; probe_r22c.py again (its "shipped" now the new choices); then
# ConvGPT vs twin on SGLang at batch 256, 5 interleaved rounds, traced on the timed engines.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider \
   -k "gpu and (narrow or pdl or fused_decoder)" 2>&1 | tail -3 > $R/kernel_tests_h200_r22d.txt
 mkdir -p $R/chain && python3 benchmarks/bench_norm_linear.py --only chain --batches 1,16,64,128,160,192,224,256 \
   --out $R/chain > /dev/null 2>&1
 python3 benchmarks/gpu/probe_r22c.py $R 2>&1 | grep -v -i warn > $R/probe_r22d.txt)
$G e2e sglang - e2e_sglang_h200_r22d --rounds 5 --decode-tokens 128 --prefill-n 0 --no-batch1 --gpu-mem 0.8 \
  --twin-first --timed-trace-only --trace /root/trace-r22d
