"""Run the parity matrix through vLLM; writes build/parity/vllm.json.

One engine per checkpoint runs every situation but `embeds` (small prefill chunks, prefix
caching on); a second one with prompt embeddings enabled runs `embeds` (vLLM then feeds
every request through the compressor instead of the compressed table).
Environment: CONVGPT_PARITY_DTYPE (float32), CONVGPT_PARITY_EAGER (1 on CPU).
"""

from __future__ import annotations

import gc
import os

import matrix


def records(outputs, prompts) -> list[dict]:
    out = []
    for o, p in zip(outputs, prompts):
        c = o.outputs[0]
        top = []
        for step in c.logprobs:
            ranked = sorted(step.items(), key=lambda kv: kv[1].rank)[: matrix.TOP]
            top.append([[int(tok), float(lp.logprob)] for tok, lp in ranked])
        out.append({"prompt_len": len(p), "tokens": list(c.token_ids), "top": top,
                    "cached": o.num_cached_tokens})
    return out


def main() -> None:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    dtype = os.environ.get("CONVGPT_PARITY_DTYPE", "float32")
    eager = os.environ.get("CONVGPT_PARITY_EAGER", "0" if torch.cuda.is_available() else "1") == "1"
    sp = SamplingParams(temperature=0, max_tokens=matrix.STEPS, ignore_eos=True, logprobs=matrix.TOP)
    common = dict(dtype=dtype, max_model_len=matrix.MAX_LEN, enforce_eager=eager, seed=0, block_size=matrix.BLOCK,
                  max_num_seqs=16, enable_chunked_prefill=True, max_num_batched_tokens=matrix.CHUNK)
    if torch.cuda.is_available():
        common["gpu_memory_utilization"] = 0.3
    results = {}
    for name, path, embeds_engine, situations in matrix.engine_starts():
        llm = LLM(model=path, enable_prefix_caching=not embeds_engine, enable_prompt_embeds=embeds_engine, **common)
        for situation, waves in situations:
            cell = []
            for wave in waves:
                if situation == "embeds":
                    reqs = [{"prompt_embeds": matrix.embeddings(path, p).to(getattr(torch, dtype))} for p in wave]
                else:
                    reqs = [{"prompt_token_ids": p} for p in wave]
                cell += records(llm.generate(reqs, sp, use_tqdm=False), wave)
            results.setdefault(name, {})[situation] = cell
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        # written after every engine, so a run cut short keeps what it finished
        matrix.write("vllm", results, {"dtype": dtype, "eager": eager, "vllm": vllm.__version__,
                                       "device": "cuda" if torch.cuda.is_available() else "cpu"})


if __name__ == "__main__":
    main()
