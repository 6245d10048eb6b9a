# Round 22, second machine, no engine: `bash benchmarks/gpu/round22b.sh $OUT` at the commit that
# makes the q+k+v+RoPE kernel take 16-row tiles up to 192 rows and 32 beyond (from probe_r22).
# The GPU kernel tests of norm_linear (the rope ones at 1-2048 rows among them), the decode chain
# at 1-256 rows (bench_norm_linear.py --only chain), and probe_r22.py again with the new tiles.
OUT=${1:?OUT}
export PYTHONPATH=$PWD/src:$PWD/tests
python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider \
  -k "gpu and (rope or kv or norm_linear or fused_decoder or pdl)" 2>&1 | tail -5 > $OUT/kernel_tests_h200_r22.txt
cat $OUT/kernel_tests_h200_r22.txt
python3 benchmarks/bench_norm_linear.py --only chain --batches 1,16,64,128,160,192,256 --out $OUT 2>&1 | tail -12
python3 benchmarks/gpu/probe_r22.py $OUT > $OUT/probe_r22b.txt 2>&1
grep -v Warn $OUT/probe_r22b.txt | grep -v _warn_once
