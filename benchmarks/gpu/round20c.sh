# Round 20, second call: ConvGPT vs twin, decode only, traced on the timed engines, both models
# with FlashAttention's KV splits capped at one (the combine kernel gone); run after round20.sh on
# the same machine, `gpu.sh bg benchmarks/gpu/round20c.sh`.
bash benchmarks/gpu/gpu.sh e2e vllm - e2e_vllm_h200_r20_splits1 --rounds 5 --decode-tokens 128 --timed-trace-only --prefill-n 0 --attn-splits 1 --trace /root/trace-r20c
