# Round 21, second machine: where FlashInfer's CUDA-core decode (SGLang's kernel at 2 q heads per kv
# head) overtakes vLLM's FlashAttention 3, over batch and context.  vLLM alone (three staged parts,
# installed first), `gpu.sh bg benchmarks/gpu/round21b.sh`.
PYTHONPATH=/root/site-vllm python3 benchmarks/bench_attention.py --backends --name backends_map \
  --shapes 4x1024,32x512,32x2048,64x1024,128x512,128x2048,256x192,256x512,256x1024 \
  --out /root/results/attention_h200_r21 > /root/results/attention_h200_r21b.log 2>&1
