# Round 24, second machine: `bash benchmarks/gpu/round24b.sh OUT` in the call itself, with SGLang
# staged and installed (little device time left: the kernel tests' results go to OUT first).
# The head's logits widened to float32 by convgpt_core.logits (SGLang 0.5.16 casts them with
# torch's strided copy_): its GPU tests, then ConvGPT vs twin, decode at batch 256, 5 interleaved
# rounds, traced on the timed engines.
out=${1:?OUT}
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q -p no:cacheprovider tests/core/test_logits.py 2>&1 | tail -3 > $out/logits_tests_h200_r24b.txt)
cat $out/logits_tests_h200_r24b.txt
bash benchmarks/gpu/gpu.sh e2e sglang $out e2e_sglang_h200_r24b --rounds 5 --decode-tokens 128 --prefill-n 0 \
  --no-batch1 --gpu-mem 0.8 --twin-first --timed-trace-only --trace /root/trace-r24b
