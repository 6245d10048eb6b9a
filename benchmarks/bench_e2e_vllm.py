"""End-to-end vLLM throughput: ConvGPT (published geometry) vs its uncompressed Qwen3 twin.

Both models run in this one process, one after the other, with the same harness and the same
engine settings; weights are random (``load_format="dummy"``: speed does not depend on the
values).  Measured (bf16 by default):

* prefill: N x L-token prompts, 1 output token each -> prompt tokens / s;
* decode at batch B: B prompts of P tokens, T output tokens; decode tok/s = B * (T - 1) /
  (time(T tokens) - time(1 token)), i.e. the prefill is subtracted;
* the same at batch 1.

Usage (GPU host, vLLM importable):
    python benchmarks/bench_e2e_vllm.py --out benchmarks/results/e2e_vllm_h100.json [--kv-cache-dtype fp8]
    # long context: 64 x (3840 + 256)-token sequences, decode only
    python benchmarks/bench_e2e_vllm.py --prefill-n 0 --no-batch1 --batch 64 --decode-prompt 3840 \
        --max-model-len 4352 --kv-cache-dtype fp8 --out ...
    python benchmarks/bench_e2e_vllm.py --plot-only JSON PNG
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def write_models(root: str) -> dict[str, str]:
    """config.json + tokenizer for ConvGPT (published) and its twin (Qwen3 at width H)."""
    from transformers import Qwen3Config

    from convgpt_core.config import ARCHITECTURE, ConvGPTConfig
    from convgpt_core.tiny import PRESETS, build_tokenizer

    tok = build_tokenizer(1024)
    p = PRESETS["published"]
    conv = ConvGPTConfig(**p, architectures=[ARCHITECTURE], dtype="bfloat16", eos_token_id=0)
    twin = Qwen3Config(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"], head_dim=p["head_dim"],
        max_position_embeddings=p["max_position_embeddings"], rope_theta=p["rope_theta"],
        tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"], dtype="bfloat16", eos_token_id=0,
    )
    out = {}
    for name, cfg in (("convgpt", conv), ("twin", twin)):
        path = os.path.join(root, name)
        cfg.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def timed(llm, prompts, sp) -> float:
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_model(path: str, args) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=path, load_format="dummy", dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.batch, gpu_memory_utilization=args.gpu_mem, enable_prefix_caching=False,
              kv_cache_dtype=args.kv_cache_dtype, seed=0)
    start_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)

    def prompts(n, length):
        return [{"prompt_token_ids": torch.randint(10, 60000, (length,), generator=gen).tolist()} for _ in range(n)]

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    res = {"engine_start_s": start_s}
    # warm-up: every shape class once
    timed(llm, prompts(4, 64), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    pre = prompts(args.prefill_n, args.prefill_len)
    times = [timed(llm, pre, one) for _ in range(args.repeats)] if args.prefill_n else [float("nan")]
    res["prefill_s"] = sorted(times)[len(times) // 2]
    res["prefill_tok_s"] = args.prefill_n * args.prefill_len / res["prefill_s"]
    for batch in (args.batch,) if args.no_batch1 else (args.batch, 1):
        ps = prompts(batch, args.decode_prompt)
        full = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
        t_full = sorted(timed(llm, ps, full) for _ in range(args.repeats))[args.repeats // 2]
        t_one = sorted(timed(llm, ps, one) for _ in range(args.repeats))[args.repeats // 2]
        decode_s = t_full - t_one
        res[f"decode_b{batch}_s"] = decode_s
        res[f"decode_b{batch}_tok_s"] = batch * (args.decode_tokens - 1) / decode_s
        res[f"decode_b{batch}_step_ms"] = 1e3 * decode_s / (args.decode_tokens - 1)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return res


def table(data: dict) -> str:
    c, t = data["convgpt"], data["twin"]
    if data["args"]["no_batch1"]:  # long-context run: the big-batch decode only
        b = data["args"]["batch"]
        return "\n".join(f"{k:<24}{c[k]:>14.1f}{t[k]:>14.1f}{c[k] / t[k]:>9.2f}"
                         for k in (f"decode_b{b}_tok_s", f"decode_b{b}_step_ms", "engine_start_s"))
    keys = [("prefill_tok_s", "prefill tok/s"), (f"decode_b{data['args']['batch']}_tok_s", f"decode tok/s b={data['args']['batch']}"),
            ("decode_b1_tok_s", "decode tok/s b=1"), (f"decode_b{data['args']['batch']}_step_ms", "decode step ms (big batch)"),
            ("decode_b1_step_ms", "decode step ms b=1"), ("engine_start_s", "engine start s")]
    lines = [f"{'metric':<28}{'ConvGPT':>14}{'twin':>14}{'ratio':>9}"]
    for k, label in keys:
        lines.append(f"{label:<28}{c[k]:>14.1f}{t[k]:>14.1f}{c[k] / t[k]:>9.2f}")
    return "\n".join(lines)


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(json_path))
    b = data["args"]["batch"]
    metrics = [("prefill_tok_s", "prefill\n(256x1024)"), (f"decode_b{b}_tok_s", f"decode\nbatch {b}"),
               ("decode_b1_tok_s", "decode\nbatch 1")]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(metrics))
    ratios = [data["convgpt"][k] / data["twin"][k] for k, _ in metrics]
    ax.bar(xs, ratios, color=["#3b7dd8" if r >= 1 else "#d8553b" for r in ratios])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(xs), [m for _, m in metrics])
    ax.set_ylabel("ConvGPT / uncompressed twin (throughput)")
    ax.set_title(f"vLLM {data['meta'].get('vllm', '')}, {data['meta'].get('gpu', '')}, {data['args']['dtype']}, "
                 f"KV {data['args']['kv_cache_dtype']}")
    for x, r in zip(xs, ratios):
        ax.text(x, r, f"{r:.2f}x", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "e2e_vllm_h100.json"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--prefill-n", type=int, default=256)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-mem", type=float, default=0.85)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["convgpt", "twin"])
    ap.add_argument("--no-batch1", action="store_true", help="skip the batch-1 decode measurement")
    ap.add_argument("--plot-only", nargs=2, metavar=("JSON", "PNG"))
    args = ap.parse_args()
    if args.plot_only:
        plot(*args.plot_only)
        return
    import torch
    import vllm

    data = {"args": vars(args), "meta": {"vllm": vllm.__version__, "torch": torch.__version__,
                                         "gpu": torch.cuda.get_device_name(0), "argv": sys.argv}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_models(tmp)
        for name in args.models:
            data[name] = bench_model(paths[name], args)
            print(name, json.dumps(data[name]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=2)
    if "convgpt" in data and "twin" in data:
        print(table(data))


if __name__ == "__main__":
    main()
