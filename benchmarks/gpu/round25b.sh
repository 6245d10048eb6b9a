# Round 25b: what round25.sh did not reach when its machine was given back (SGLang alone, its one
# part staged in /root/stage-sgl and installed first; `gpu.sh bg benchmarks/gpu/round25b.sh`).
# ConvGPT vs twin, decode at batch 256 and 1, 5 interleaved rounds, traced on the timed engines;
# ConvGPT against itself with CONVGPT_DECODE_ATTENTION=0 (batch 1: the decode-attention kernel's
# effect; batch 256, where it does not run: a control); bf16 parity untied F=36 k=5 one kv head and
# the sliding-window geometry (its decode steps of one request take the kernel's window).
G="bash benchmarks/gpu/gpu.sh"
$G e2e sglang - e2e_sglang_h200_r25 --rounds 5 --decode-tokens 128 --prefill-n 0 --gpu-mem 0.8 --twin-first \
  --timed-trace-only --trace /root/trace-r25
$G e2e sglang - ab_decode_attention_sglang_h200_r25 --b-env CONVGPT_DECODE_ATTENTION=0 --rounds 5 \
  --decode-tokens 128 --prefill-n 0 --gpu-mem 0.8 --timed-trace-only --trace /root/trace-r25ab
CONVGPT_PARITY_GEOMETRIES=untied-F36-k5-kv1,tied-F16-k5-sliding PARITY_TIMEOUT=500 $G parity sglang - parity_sglang_h200_bf16_r25u
