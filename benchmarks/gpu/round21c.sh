# Round 21, second machine, after round21b.sh: round 20's FlashAttention sweep at two shapes from the
# refactored bench_attention (its first run since), then SGLang (its one part staged in
# /root/stage-sgl and installed): ConvGPT vs twin at batch 256, 2 rounds, traced, and each trace's
# norm_linear launches by the kernel before them (steptrace.py --follows): how much of the kernel's
# duration in SGLang's batch-256 step (705 us a step in round 18, vLLM's 445) is the wait of its
# early start (programmatic dependent launch) and how much its own.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
PYTHONPATH=/root/site-vllm python3 benchmarks/bench_attention.py --shapes 1x192,256x192 --name sweep_check \
  --out $R/attention_h200_r21 > $R/attention_h200_r21c.log 2>&1
$G install sglang
$G e2e sglang - e2e_sglang_h200_r21 --rounds 2 --decode-tokens 128 --prefill-n 0 --no-batch1 --gpu-mem 0.8 \
  --timed-trace-only --trace /root/trace-r21s
for f in $(ls -S /root/trace-r21s/*); do
  echo "== $(basename $f) $(du -k $f | cut -f1) kB"
  python3 benchmarks/steptrace.py --follows $f norm_linear
done > $R/follows_sglang_h200_r21.txt 2>&1
