"""Roofline of ConvGPT and its uncompressed twin, set against measured end-to-end runs.

No GPU needed: it reads the geometry from ``convgpt_core`` (the twin's parameter count
from transformers' own Qwen3 on the meta device), the copy bandwidth that
``bench_compressor.py`` measured, and the step times of ``bench_e2e_vllm.py`` runs, and
prints how far each measured step is from the bytes (decode) or the per-op bytes/FLOPs
(prefill) it cannot avoid.

Model of a step (bf16 activations and weights; KV in the run's KV dtype):

* decode: every weight is read once per step (tied lm_head = the embedding), plus the KV
  cache of every sequence at its mean context length over the run;
* prefill, per token: each op reads its inputs and writes its outputs once (residual add +
  RMSNorm fused, as in vLLM; nothing else fused); an op costs
  max(FLOPs / peak, bytes / bandwidth); attention is causal (mean context (L + 1) / 2).
  The FLOP peak is the H100 SXM's nominal dense bf16 rate, not a measurement.

Usage:
    python benchmarks/roofline.py [--compressor JSON] [--e2e JSON ...] [--out JSON]
    python benchmarks/roofline.py --plot-only JSON PNG
"""

from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
NOMINAL_BF16_TFLOPS = 989.4  # H100 SXM dense bf16 (datasheet)
KV_BYTES = {"auto": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


def geometries() -> dict[str, dict]:
    """Per-model shapes and weight counts: ConvGPT (published preset) and its Qwen3 twin."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from convgpt_core.checkpoint import parameter_count
    from convgpt_core.config import ConvGPTConfig
    from convgpt_core.tiny import PRESETS

    cfg = ConvGPTConfig(**PRESETS["published"])
    g = cfg.geometry
    twin_cfg = Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=g.H, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        twin_params = sum(p.numel() for p in Qwen3ForCausalLM(twin_cfg).parameters())
    common = dict(layers=cfg.num_hidden_layers, q=cfg.num_attention_heads * cfg.head_dim,
                  kv=cfg.num_key_value_heads * cfg.head_dim, inner=cfg.intermediate_size,
                  H=g.H, vocab=cfg.vocab_size)
    return {
        "convgpt": dict(common, width=g.D, params=parameter_count(cfg), tied_scale_up=cfg.tie_word_embeddings),
        "twin": dict(common, width=g.H, params=twin_params, tied_scale_up=False),
    }


def kv_bytes_per_token(m: dict, kv_dtype: str) -> int:
    return m["layers"] * 2 * m["kv"] * KV_BYTES[kv_dtype]


def decode_floor_bytes(m: dict, batch: int, mean_context: float, kv_dtype: str) -> float:
    return 2 * m["params"] + batch * mean_context * kv_bytes_per_token(m, kv_dtype)


def prefill_ops(m: dict, prompt_len: int) -> list[tuple[str, float, float]]:
    """(op, FLOPs, bytes) per prompt token, summed over layers."""
    W, q, kv, inner, H = m["width"], m["q"], m["kv"], m["inner"], m["H"]
    ctx = (prompt_len + 1) / 2
    per_layer = [
        ("add+rmsnorm x2", 0, 2 * 4 * W),
        ("qkv proj", 2 * W * (q + 2 * kv), W + q + 2 * kv),
        ("q/k rmsnorm", 0, 2 * (q + kv)),
        ("rope", 0, 2 * (q + kv)),
        ("kv cache write", 0, 4 * kv),
        ("attention", 4 * q * ctx, 2 * q + 2 * kv),
        ("o proj", 2 * q * W, q + W),
        ("gate_up proj", 4 * W * inner, W + 2 * inner),
        ("silu*mul", 0, 3 * inner),
        ("down proj", 2 * inner * W, inner + W),
    ]
    ops = [(name, m["layers"] * f, m["layers"] * 2 * b) for name, f, b in per_layer]
    ops.append(("embedding gather", 0, 2 * 2 * W))
    if m["tied_scale_up"]:  # D -> 4H SwiGLU -> H on every token, then RMSNorm over H
        ops += [("scale_up gate_up", 2 * W * 8 * H, 2 * (W + 8 * H)), ("scale_up silu*mul", 0, 2 * 12 * H),
                ("scale_up down", 2 * 4 * H * H, 2 * 5 * H), ("final rmsnorm (H)", 0, 2 * 2 * H)]
    else:
        ops.append(("final rmsnorm", 0, 2 * 2 * W))
    return ops


def op_floor_s(flops: float, nbytes: float, bandwidth: float) -> float:
    return max(flops / (NOMINAL_BF16_TFLOPS * 1e12), nbytes / bandwidth)


def analyse(models: dict, runs: list[dict], bandwidth: float) -> dict:
    out = {"bandwidth_gbps": bandwidth / 1e9, "peak_tflops_nominal": NOMINAL_BF16_TFLOPS, "models": {}}
    for name, m in models.items():
        out["models"][name] = {k: m[k] for k in ("params", "width")}
        out["models"][name]["kv_bytes_per_token_bf16"] = kv_bytes_per_token(m, "auto")
    rows = []
    for run in runs:
        args, label = run["args"], run["label"]
        kv_dtype = args["kv_cache_dtype"]
        if args.get("prefill_n") and "prefill_s" in run["convgpt"]:
            tokens = args["prefill_n"] * args["prefill_len"]
            row = {"scenario": f"prefill {args['prefill_n']}x{args['prefill_len']}", "kind": "prefill", "run": label}
            for name, m in models.items():
                ops = [{"op": o, "flops": f, "bytes": b, "floor_ns": 1e9 * op_floor_s(f, b, bandwidth)}
                       for o, f, b in prefill_ops(m, args["prefill_len"])]
                measured_s = run[name]["prefill_s"]
                flops, nbytes = sum(o["flops"] for o in ops), sum(o["bytes"] for o in ops)
                row[name] = {"floor_ms": 1e-6 * tokens * sum(o["floor_ns"] for o in ops), "measured_ms": 1e3 * measured_s,
                             "flops_per_token": flops, "bytes_per_token": nbytes,
                             "tflops": tokens * flops / measured_s / 1e12, "gbps": tokens * nbytes / measured_s / 1e9,
                             "ops": ops}
            rows.append(row)
        batches = [args["batch"]] + ([] if args.get("no_batch1") else [1])
        for batch in batches:
            key = f"decode_b{batch}_step_ms"
            if key not in run["convgpt"]:
                continue
            mean_ctx = args["decode_prompt"] + args["decode_tokens"] / 2
            row = {"scenario": f"decode b{batch} ctx~{mean_ctx:.0f} KV {kv_dtype}", "kind": "decode", "run": label}
            for name, m in models.items():
                nbytes = decode_floor_bytes(m, batch, mean_ctx, kv_dtype)
                row[name] = {"floor_ms": 1e3 * nbytes / bandwidth, "measured_ms": run[name][key], "bytes": nbytes}
            rows.append(row)
    for row in rows:
        for name in models:
            row[name]["fraction"] = row[name]["floor_ms"] / row[name]["measured_ms"]
        row["ratio_measured"] = row["twin"]["measured_ms"] / row["convgpt"]["measured_ms"]
        row["ratio_at_floor"] = row["twin"]["floor_ms"] / row["convgpt"]["floor_ms"]
    out["rows"] = rows
    return out


def report(result: dict) -> str:
    lines = [f"copy bandwidth {result['bandwidth_gbps']:.0f} GB/s (measured), bf16 peak "
             f"{result['peak_tflops_nominal']:.0f} TFLOP/s (nominal)"]
    for name, m in result["models"].items():
        lines.append(f"{name}: {m['params']:,} params, residual width {m['width']}, "
                     f"KV {m['kv_bytes_per_token_bf16'] // 1024} KiB/token (bf16)")
    lines.append("")
    head = f"{'scenario':<30}{'model':>9}{'floor ms':>11}{'measured':>11}{'of floor':>10}"
    head += f"{'twin/conv':>11}{'at floor':>10}"
    lines += [head, "-" * len(head)]
    for row in result["rows"]:
        for i, name in enumerate(("convgpt", "twin")):
            r = row[name]
            tail = f"{row['ratio_measured']:>11.2f}{row['ratio_at_floor']:>10.2f}" if i == 0 else ""
            lines.append(f"{row['scenario'] if i == 0 else '':<30}{name:>9}{r['floor_ms']:>11.3f}"
                         f"{r['measured_ms']:>11.3f}{100 * r['fraction']:>9.0f}%{tail}")
    for row in result["rows"]:
        if row["kind"] != "prefill":
            continue
        lines += ["", f"{row['scenario']} ({row['run']}), per token: floor ns by op"]
        lines.append(f"{'op':<22}{'convgpt':>10}{'twin':>10}")
        floors = {name: {o["op"]: o["floor_ns"] for o in row[name]["ops"]} for name in ("convgpt", "twin")}
        for op in dict.fromkeys([*floors["convgpt"], *floors["twin"]]):
            cells = "".join(f"{floors[name][op]:>10.3f}" if op in floors[name] else f"{'-':>10}"
                            for name in ("convgpt", "twin"))
            lines.append(f"{op:<22}{cells}")
        for name in ("convgpt", "twin"):
            r = row[name]
            lines.append(f"{name}: {r['flops_per_token'] / 1e6:.0f} MFLOP and {r['bytes_per_token'] / 1e6:.2f} MB "
                         f"per token; measured {r['tflops']:.0f} TFLOP/s, {r['gbps']:.0f} GB/s")
    return "\n".join(lines)


def plot(json_path: str, png_path: str) -> None:
    """Each step's measured time as a fraction of its floor, both models side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.load(open(json_path))
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(rows))
    for shift, name, color in ((-0.2, "convgpt", "#3b7dd8"), (0.2, "twin", "#999999")):
        fractions = [100 * r[name]["fraction"] for r in rows]
        ax.bar([x + shift for x in xs], fractions, width=0.4, color=color, label=name)
        for x, f in zip(xs, fractions):
            ax.text(x + shift, f, f"{f:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r["scenario"].replace(" ctx", "\nctx").replace(" KV", "\nKV") for r in rows], fontsize=8)
    ax.set_ylabel("% of the step's floor (higher is better)")
    ax.set_title(f"{result['inputs']['measured_on']}: measured steps against their bytes/FLOPs floor", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compressor", default=os.path.join(RESULTS, "compressor_h100.json"),
                    help="bench_compressor.py output (for the measured copy bandwidth)")
    ap.add_argument("--e2e", nargs="+", default=[os.path.join(RESULTS, f) for f in (
        "e2e_vllm_h100.json", "e2e_vllm_h100_long_bf16kv.json", "e2e_vllm_h100_long_fp8kv.json")])
    ap.add_argument("--out", default=os.path.join(RESULTS, "roofline_h100.json"))
    ap.add_argument("--plot-only", nargs=2, metavar=("JSON", "PNG"), help="draw an earlier result (matplotlib)")
    args = ap.parse_args()
    if args.plot_only:
        plot(*args.plot_only)
        return
    bandwidth = json.load(open(args.compressor))["meta"]["copy_bandwidth_gbps"] * 1e9
    runs = []
    for path in args.e2e:
        run = json.load(open(path))
        run["label"] = os.path.splitext(os.path.basename(path))[0]
        runs.append(run)
    result = analyse(geometries(), runs, bandwidth)
    def engine(meta: dict) -> str:  # runs before the SGLang harness carry no "engine" key: vLLM
        name = meta.get("engine", "vllm")
        return f"{name} {meta.get(name, '')}".strip()

    measured_on = sorted({f"{r['meta']['gpu']}, {engine(r['meta'])}, {r['args']['dtype']}" for r in runs})
    result["inputs"] = {"compressor": os.path.relpath(args.compressor, ROOT),
                        "e2e": [os.path.relpath(p, ROOT) for p in args.e2e], "measured_on": "; ".join(measured_on)}
    text = report(result)
    print(text)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
