# Round 4 (the GPU items round 3 left), most needed first: run by `gpu.sh bg benchmarks/gpu/round4.sh`
# after the vLLM parts are staged and installed, with .gpu/sglang/part-1 carried.
# Each line is independent; results in /root/results (gpu.sh collect).
G="bash benchmarks/gpu/gpu.sh"
$G stage .gpu/sglang/part-1 /root/stage-sgl
$G install sglang > /root/results/install-sglang.txt 2>&1
# SGLang bf16 parity on the current adapter (pipeline-stage code since round 2)
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3,untied-F36-k5-kv1 $G parity sglang - parity_sglang_h200_bf16_r4
# SGLang LoRA where CUDA is (skipped on CPU)
PYTHONPATH=/root/site-sgl:$PWD/tests timeout 400 python3 -m pytest -q tests/sglang -k lora -p no:cacheprovider \
  > /root/results/sglang_lora_gpu.txt 2>&1
# fp8 weights: parity on both engines (vLLM with the embeddings cell: multiprocess engine), then speed
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 CONVGPT_PARITY_QUANT=fp8 $G parity sglang - parity_sglang_h200_fp8
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 CONVGPT_PARITY_QUANT=fp8 $G parity vllm - parity_vllm_h200_fp8_r4
$G e2e vllm - e2e_vllm_h200_fp8 --rounds 5 --decode-tokens 128 --quantization fp8
$G e2e sglang - e2e_sglang_h200_fp8 --rounds 5 --decode-tokens 128 --gpu-mem 0.8 --quantization fp8
# SGLang fp8 KV: parity, then long context
CONVGPT_PARITY_GEOMETRIES=tied-F16-k3 CONVGPT_PARITY_KV=fp8_e4m3 $G parity sglang - parity_sglang_h200_kvfp8
$G e2e sglang - e2e_sglang_h200_long_fp8kv_r4 --rounds 5 --prefill-n 0 --no-batch1 --batch 64 \
  --decode-prompt 3840 --max-model-len 4352 --kv-cache-dtype fp8_e4m3 --gpu-mem 0.8
# vLLM's optional q/k-norm + RoPE fusion pass on both models: does it fire on ConvGPT (kernels
# per step down by one per layer, as on the twin), and what does it give
$G e2e vllm - e2e_vllm_h200_qknormrope --rounds 5 --decode-tokens 128 --vllm-pass enable_qk_norm_rope_fusion \
  --trace /root/trace-vllm-qk
