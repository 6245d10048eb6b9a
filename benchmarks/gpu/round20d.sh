# Round 20, last machine: ConvGPT vs twin, decode only, traced on the timed engines, with the
# benchmark's corrected op classes (steptrace: step bookkeeping, the input side before norm,
# every kernel by class); 2 rounds, for the kernel lists, not for the wall ratios.
bash benchmarks/gpu/gpu.sh e2e vllm - e2e_vllm_h200_r20_classes --rounds 2 --decode-tokens 64 --timed-trace-only --prefill-n 0 --trace /root/trace-r20d
