# Round 21, third machine: SGLang (its one part staged in /root/stage-sgl, installed here): ConvGPT vs
# twin at batch 256, 2 rounds, traced, and each trace's norm_linear launches by the kernel before
# them (steptrace.py --follows): how much of the kernel's time in SGLang's batch-256 step (705 us a
# step in round 18, vLLM's 445) is the wait of an early start (programmatic dependent launch) and
# how much its own.  (As run in round 21 this script first re-ran round 20's FlashAttention sweep at
# two shapes; that step failed, the machine holding no vLLM, and is left out here.  Its loop over
# the traces listed folders, not files; the loop below is the one then run by hand on the machine.)
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
$G install sglang
$G e2e sglang - e2e_sglang_h200_r21 --rounds 2 --decode-tokens 128 --prefill-n 0 --no-batch1 --gpu-mem 0.8 \
  --timed-trace-only --trace /root/trace-r21s
for f in $(find /root/trace-r21s -name '*.json*' | sort); do
  echo "== $f $(du -k $f | cut -f1) kB"
  python3 benchmarks/steptrace.py --follows $f norm_linear
done > $R/follows_sglang_h200_r21.txt 2>&1
