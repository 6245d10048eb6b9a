"""End-to-end vLLM throughput: ConvGPT (published geometry) vs its uncompressed Qwen3 twin.

The measurements are ``e2e.py``'s (shared with the SGLang benchmark); this file starts vLLM's
offline ``LLM`` with ``load_format="dummy"`` and prefix caching off.

Usage (GPU host, vLLM importable):
    python benchmarks/bench_e2e_vllm.py --out benchmarks/results/e2e_vllm_h100.json [--kv-cache-dtype fp8]
    # long context: 64 x (3840 + 256)-token sequences, decode only
    python benchmarks/bench_e2e_vllm.py --prefill-n 0 --no-batch1 --batch 64 --decode-prompt 3840 \\
        --max-model-len 4352 --kv-cache-dtype fp8 --out ...
    python benchmarks/bench_e2e_vllm.py --plot-only JSON PNG
"""

from __future__ import annotations

import e2e


def start(path, args):
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, load_format="dummy", dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.batch, gpu_memory_utilization=args.gpu_mem, enable_prefix_caching=False,
              kv_cache_dtype=args.kv_cache_dtype, seed=0)

    def generate(prompts, max_tokens):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def stop():
        llm.llm_engine.engine_core.shutdown()

    return generate, stop


if __name__ == "__main__":
    args = e2e.parser(__doc__, "e2e_vllm_h100.json").parse_args()
    version = "" if args.plot_only else __import__("vllm").__version__
    e2e.main("vllm", version, start, args)
