"""The end-to-end harness both engine benchmarks share: the two models, the measurements,
the table, the plot and the command line.  An engine benchmark supplies only ``start(path,
args)``, returning ``(generate, stop)``: ``generate(prompts, max_tokens)`` runs greedy requests
(lists of token ids) to completion and ``stop()`` frees the engine.

Measured for ConvGPT (published geometry) and its uncompressed Qwen3 twin, one after the other
in one process, same settings, random weights (speed does not depend on the values):

* prefill: N x L-token prompts, 1 output token each -> prompt tokens / s;
* decode at batch B: B prompts of P tokens, T output tokens; decode tok/s = B * (T - 1) /
  (time(T tokens) - time(1 token)), i.e. the prefill is subtracted;
* the same at batch 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Generate = Callable[[list[list[int]], int], None]
Start = Callable[[str, argparse.Namespace], tuple[Generate, Callable[[], None]]]


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


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_model(start: Start, path: str, args: argparse.Namespace) -> dict:
    import torch

    t0 = time.perf_counter()
    generate, stop = start(path, args)
    res = {"engine_start_s": time.perf_counter() - t0}
    gen = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [torch.randint(10, 60000, (length,), generator=gen).tolist() for _ in range(n)]

    def timed(batch: list[list[int]], max_tokens: int) -> float:
        _synchronize()
        t = time.perf_counter()
        generate(batch, max_tokens)
        _synchronize()
        return time.perf_counter() - t

    def median(batch: list[list[int]], max_tokens: int) -> float:
        return sorted(timed(batch, max_tokens) for _ in range(args.repeats))[args.repeats // 2]

    timed(prompts(4, 64), 8)  # warm-up: every shape class once
    if args.prefill_n:
        pre = prompts(args.prefill_n, args.prefill_len)
        res["prefill_s"] = median(pre, 1)
        res["prefill_tok_s"] = args.prefill_n * args.prefill_len / res["prefill_s"]
    for batch in (args.batch,) if args.no_batch1 else (args.batch, 1):
        ps = prompts(batch, args.decode_prompt)
        decode_s = median(ps, args.decode_tokens) - median(ps, 1)
        res[f"decode_b{batch}_s"] = decode_s
        res[f"decode_b{batch}_tok_s"] = batch * (args.decode_tokens - 1) / decode_s
        res[f"decode_b{batch}_step_ms"] = 1e3 * decode_s / (args.decode_tokens - 1)
    stop()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def table(data: dict) -> str:
    c, t = data["convgpt"], data["twin"]
    b = data["args"]["batch"]
    keys = [("prefill_tok_s", "prefill tok/s"), (f"decode_b{b}_tok_s", f"decode tok/s b={b}"),
            ("decode_b1_tok_s", "decode tok/s b=1"), (f"decode_b{b}_step_ms", "decode step ms (big batch)"),
            ("decode_b1_step_ms", "decode step ms b=1"), ("engine_start_s", "engine start s")]
    lines = [f"{'metric':<28}{'ConvGPT':>14}{'twin':>14}{'ratio':>9}"]
    for k, label in keys:
        if k in c and k in t:
            lines.append(f"{label:<28}{c[k]:>14.1f}{t[k]:>14.1f}{c[k] / t[k]:>9.2f}")
    return "\n".join(lines)


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(json_path))
    b = data["args"]["batch"]
    metrics = [(k, label) for k, label in (
        ("prefill_tok_s", f"prefill\n({data['args']['prefill_n']}x{data['args']['prefill_len']})"),
        (f"decode_b{b}_tok_s", f"decode\nbatch {b}"), ("decode_b1_tok_s", "decode\nbatch 1"),
    ) if k in data["convgpt"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(metrics))
    ratios = [data["convgpt"][k] / data["twin"][k] for k, _ in metrics]
    ax.bar(xs, ratios, color=["#3b7dd8" if r >= 1 else "#d8553b" for r in ratios])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(xs), [m for _, m in metrics])
    ax.set_ylabel("ConvGPT / uncompressed twin (throughput)")
    meta = data["meta"]
    ax.set_title(f"{meta.get('engine', 'vllm')} {meta.get(meta.get('engine', 'vllm'), '')}, {meta.get('gpu', '')}, "
                 f"{data['args']['dtype']}, KV {data['args']['kv_cache_dtype']}")
    for x, r in zip(xs, ratios):
        ax.text(x, r, f"{r:.2f}x", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def parser(doc: str, default_out: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", default_out))
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
    return ap


def main(engine: str, version: str, start: Start, args: argparse.Namespace) -> None:
    if args.plot_only:
        plot(*args.plot_only)
        return
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    data = {"args": vars(args), "meta": {"engine": engine, engine: version, "torch": torch.__version__,
                                         "gpu": gpu, "argv": sys.argv}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_models(tmp)
        for name in args.models:
            data[name] = bench_model(start, paths[name], args)
            print(name, json.dumps(data[name]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=2)
    if "convgpt" in data and "twin" in data:
        print(table(data))
