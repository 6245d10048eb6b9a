# Round 12: vLLM decode with the steady rows stamped by the engine core (drivers.VLLMDriver.step_marks
# now takes each step output's time from the core's process; round 11 took it where this process's
# step loop received it, and those arrivals came in bursts: one round of the twin's b256 gave 1.09 ms
# steps beside 4.98 ms of GPU work).  Decode only, traced on the timed engines; the vLLM parts staged
# and installed first, then `gpu.sh bg benchmarks/gpu/round12.sh`.  ~8 min.
G="bash benchmarks/gpu/gpu.sh"
$G e2e vllm - e2e_vllm_h200_r12_decode --prefill-n 0 --rounds 5 --decode-tokens 128 --trace /root/trace-r12 \
  --timed-trace-only
