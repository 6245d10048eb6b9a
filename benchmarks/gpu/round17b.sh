# Round 17, second call: the harness without its own noise (SGLang's idle scheduler sleeping on
# its sockets, Python's collector frozen and off in timed samples), SGLang decode at b256 and b1:
# ConvGPT vs twin (7 rounds), then ConvGPT against itself (--b-env CONVGPT_AA=1, a variable nothing
# reads) with the new harness and with the old one (--sglang-idle-spin --gc-in-timed-runs, each
# sample's collector pauses recorded); `top` 150 s into each A/A run.  SGLang staged and
# installed first (/root/stage-sgl), then `gpu.sh bg benchmarks/gpu/round17b.sh`.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
E=(--prefill-n 0 --decode-tokens 128 --gpu-mem 0.8)
snap() { (sleep 150; top -b -n 2 -d 2 -w 160 | tail -22 > $R/top_$1.txt) & }
$G e2e sglang - e2e_sglang_h200_r17b_decode "${E[@]}" --rounds 7 --twin-first
snap aa
$G e2e sglang - e2e_sglang_h200_r17b_aa "${E[@]}" --rounds 5 --b-env CONVGPT_AA=1
snap aa_old
$G e2e sglang - e2e_sglang_h200_r17b_aa_old "${E[@]}" --rounds 5 --b-env CONVGPT_AA=1 --sglang-idle-spin \
  --gc-in-timed-runs
wait
