"""End-to-end SGLang throughput: ConvGPT (published geometry) vs its uncompressed Qwen3 twin.

The measurements are ``e2e.py``'s (shared with the vLLM benchmark); this file starts SGLang's
offline ``Engine`` with ``load_format="dummy"``, the radix cache off, and ConvGPT from this
package (``SGLANG_EXTERNAL_MODEL_PACKAGE=convgpt.sglang``).  On a machine without CUDA it runs
on the CPU (torch_native attention, no CUDA graphs; ``--gpu-mem`` is then a fraction of host
memory, e.g. 0.3): that checks the harness, not the speed.

Usage (GPU host, SGLang importable):
    python benchmarks/bench_e2e_sglang.py --out benchmarks/results/e2e_sglang_h100.json [--kv-cache-dtype fp8_e4m3]
    python benchmarks/bench_e2e_sglang.py --plot-only JSON PNG
"""

from __future__ import annotations

import os

import e2e


def start(path, args):
    import sglang as sgl
    import torch

    os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "convgpt.sglang")
    device = {} if torch.cuda.is_available() else dict(
        device="cpu", attention_backend="torch_native", disable_cuda_graph=True)
    llm = sgl.Engine(model_path=path, load_format="dummy", dtype=args.dtype, context_length=args.max_model_len,
                     max_running_requests=args.batch, disable_radix_cache=True, kv_cache_dtype=args.kv_cache_dtype,
                     random_seed=0, log_level="warning",
                     mem_fraction_static=args.gpu_mem, **device)

    def generate(prompts, max_tokens):
        llm.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": max_tokens,
                                                         "ignore_eos": True})

    return generate, llm.shutdown


if __name__ == "__main__":
    args = e2e.parser(__doc__, "e2e_sglang_h100.json").parse_args()
    version = "" if args.plot_only else __import__("sglang").__version__
    e2e.main("sglang", version, start, args)
