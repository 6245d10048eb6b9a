"""Run the parity matrix through SGLang; writes build/parity/sglang.json.

One engine per checkpoint runs every situation but `embeds` (small prefill chunks, radix
cache on); a second one with the radix cache off (SGLang takes input_embeds only then)
runs `embeds`.  Environment: CONVGPT_PARITY_DTYPE (float32).
"""

from __future__ import annotations

import gc
import os

import matrix


def records(outputs, prompts) -> list[dict]:
    out = []
    for o, p in zip(outputs, prompts):
        meta = o["meta_info"]
        top = [[[int(tok), float(lp)] for lp, tok, _ in step[: matrix.TOP]] for step in meta["output_top_logprobs"]]
        out.append({"prompt_len": len(p), "tokens": list(o["output_ids"]), "top": top,
                    "cached": meta.get("cached_tokens")})
    return out


def generate_embeds(llm, embeds, params):
    """Engine.generate has no input_embeds argument; the request type does."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(input_embeds=embeds, sampling_params=params, return_logprob=True,
                           top_logprobs_num=matrix.TOP)
    return llm.loop.run_until_complete(llm.tokenizer_manager.generate_request(obj, None).__anext__())


def main() -> None:
    import sglang as sgl
    import torch

    dtype = os.environ.get("CONVGPT_PARITY_DTYPE", "float32")
    cuda = torch.cuda.is_available()
    common = dict(dtype=dtype, context_length=matrix.MAX_LEN, random_seed=0, log_level="warning",
                  chunked_prefill_size=matrix.CHUNK, page_size=1)
    if cuda:
        common.update(attention_backend="flashinfer", mem_fraction_static=0.3)
    else:
        common.update(device="cpu", attention_backend="torch_native", disable_cuda_graph=True,
                      mem_fraction_static=0.05)
    params = {"temperature": 0, "max_new_tokens": matrix.STEPS, "ignore_eos": True}
    results = {}
    for name, path, embeds_engine, situations in matrix.engine_starts():
        llm = sgl.Engine(model_path=path, disable_radix_cache=embeds_engine, **common)
        for situation, waves in situations:
            cell = []
            for wave in waves:
                if situation == "embeds":
                    embeds = [matrix.embeddings(path, p).tolist() for p in wave]
                    outs = generate_embeds(llm, embeds, params)
                else:
                    outs = llm.generate(input_ids=wave, sampling_params=params, return_logprob=True,
                                        top_logprobs_num=matrix.TOP)
                cell += records(outs, wave)
            results.setdefault(name, {})[situation] = cell
        llm.shutdown()
        del llm
        gc.collect()
        # written after every engine, so a run cut short keeps what it finished
        matrix.write("sglang", results, {"dtype": dtype, "sglang": sgl.__version__,
                                         "device": "cuda" if cuda else "cpu"})


if __name__ == "__main__":
    main()
