# Round 11 (run 2026-11-30; benchmarks/results/README.md, "Rounds 11 and 12"): vLLM's decode with
# the steady rows (benchmarks/e2e.py: the median step time with every request decoding, from the
# engine's step loop; round 10's b256 rows had 0.71-1.09 and 0.80-1.09 spreads, and one of the two
# differenced runs held an extra eager forward), at round 9's settings and with the twin first,
# traced on the timed engines only; then SGLang, which round 10 could not reach: the twin started
# first, and its prefill at a 32k budget (round 10 on vLLM: 1.31x -> 1.95x).  Run by
# `gpu.sh bg benchmarks/gpu/round11.sh` after the vLLM parts are staged and installed, with
# .gpu/sglang/part-1 carried.  Most needed first; each step ~4-6 min.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
($G stage .gpu/sglang/part-1 /root/stage-sgl && $G install sglang) > $R/install-sglang.txt 2>&1 &
SGL=$!
$G e2e vllm - e2e_vllm_h200_r11 --rounds 5 --decode-tokens 128 --trace /root/trace-r11 --timed-trace-only
$G e2e vllm - e2e_vllm_h200_r11_twinfirst --twin-first --prefill-n 0 --rounds 5 --decode-tokens 128 \
  --trace /root/trace-r11-tf --timed-trace-only
wait $SGL
$G e2e sglang - e2e_sglang_h200_r11_twinfirst --twin-first --rounds 5 --decode-tokens 128 --gpu-mem 0.8
$G e2e sglang - e2e_sglang_h200_r11_chunk32k --prefill-n 256 --no-batch1 --rounds 5 --decode-tokens 32 \
  --chunk 32768 --gpu-mem 0.8
