"""Run the parity matrix through one engine; writes build/parity/<engine>.json.

Usage: python tests/parity/run_engine.py {vllm,sglang}

Each checkpoint gets one engine for every situation but `embeds` (small prefill chunks,
small KV blocks, prefix cache on) and a second one set up for embeddings input (vLLM then
feeds every request through the compressor; SGLang takes input_embeds only with its radix
cache off).  Environment: CONVGPT_PARITY_DTYPE (float32), CONVGPT_PARITY_EAGER (1 on CPU),
CONVGPT_PARITY_TP (1), CONVGPT_PARITY_PP (1), CONVGPT_PARITY_KV (the KV-cache dtype, auto),
CONVGPT_PARITY_QUANT (weight quantization, e.g. fp8; none), CONVGPT_PARITY_CHUNK (the prefill
token budget per step, matrix.CHUNK; above 256 a whole 490-token prompt goes through vLLM's graph
for large steps on CUDA), CONVGPT_PARITY_VLLM_PASS (vLLM compile passes to switch on, comma-separated
pass_config names, e.g. enable_qk_norm_rope_fusion; none), CONVGPT_PARITY_ATTN (the engine's
attention backend by its name, e.g. FLASHINFER on vLLM; the driver's).  Runs with non-default ones write
``<engine>-tp2``, ``<engine>-pp2``, ``<engine>-kvfp8``, ``<engine>-fp8``, ``<engine>-chunk512``,
``<engine>-enable_qk_norm_rope_fusion``, ``<engine>-FLASHINFER`` and so on.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

import drivers
import matrix
from convgpt.serve import cuda_available


def main(engine: str) -> None:
    dtype = os.environ.get("CONVGPT_PARITY_DTYPE", "float32")
    eager = os.environ.get("CONVGPT_PARITY_EAGER", "0" if cuda_available() else "1") == "1"
    tp = int(os.environ.get("CONVGPT_PARITY_TP", "1"))
    pp = int(os.environ.get("CONVGPT_PARITY_PP", "1"))
    kv = os.environ.get("CONVGPT_PARITY_KV", "auto")
    quant = os.environ.get("CONVGPT_PARITY_QUANT") or None
    chunk = int(os.environ.get("CONVGPT_PARITY_CHUNK", matrix.CHUNK))
    passes = tuple(p for p in os.environ.get("CONVGPT_PARITY_VLLM_PASS", "").split(",") if p)
    attn = os.environ.get("CONVGPT_PARITY_ATTN") or None
    tags = ((f"tp{tp}", tp != 1), (f"pp{pp}", pp != 1), (f"kv{kv}", kv != "auto"), (quant, quant),
            (f"chunk{chunk}", chunk != matrix.CHUNK), *((p, True) for p in passes), (attn, attn))
    name_out = "-".join([engine] + [tag for tag, on in tags if on])
    meta = {"dtype": dtype, "eager": eager, engine: importlib.import_module(engine).__version__,
            "device": "cuda" if cuda_available() else "cpu", "tp": tp, "pp": pp, "kv_cache_dtype": kv,
            "quantization": quant, "chunk": chunk, "passes": list(passes), "attention_backend": attn}
    results = {}
    for name, path, embeds_engine, situations in matrix.engine_starts():
        llm = drivers.start(engine, path, dtype=dtype, max_len=matrix.MAX_LEN, chunk=chunk,
                            block=matrix.BLOCK, embeds=embeds_engine, eager=eager, max_batch=16, tp=tp, pp=pp,
                            kv_cache_dtype=kv, quantization=quant, passes=passes, attn_backend=attn)
        for situation, waves in situations:
            cell = []
            for wave in waves:
                requests = [matrix.embeddings(path, p) for p in wave] if situation == "embeds" else wave
                cell += llm.generate(requests, matrix.STEPS, top=matrix.TOP)
            results.setdefault(name, {})[situation] = cell
        llm.stop()
        gc.collect()
        # written after every engine, so a run cut short keeps what it finished
        matrix.write(name_out, results, meta)


if __name__ == "__main__":
    main(sys.argv[1])
