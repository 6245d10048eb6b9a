"""GPU micro-benchmark of the ConvGPT compressor at the published geometry (bf16).

Paths timed for T tokens (F=36, e=3, D=144, k=5, H=1296, vocab 65538):

* ``seed``: the op sequence a naive PyTorch module runs, tokens as the batch: view
  (T, 1, F, F) -> transpose to (T, F, 1, F) -> F.pad (k-1 left) -> conv2d with the
  (F, F, 1, k) weight -> transpose -> avg_pool2d(e) -> view (T, D) -> ScaleNorm (norm,
  clamp, div, mul);
* ``fused``: ``convgpt_core.kernels.fused_compress``, one Triton kernel (x @ M.T with the
  ScaleNorm epilogue);
* ``table``: the serving path for token ids, a gather of rows of the precomputed
  vocab x D table (``F.embedding``);
* ``gather_h``: a plain gather of the vocab x H embedding table, the cost floor of looking
  up an uncompressed embedding.

Each path is checked first (fused vs seed in float32 within 1e-4 relative error, in bf16
within 2e-2; table rows vs fused on the same ids), then timed with
``triton.testing.do_bench`` (median; do_bench flushes L2 between runs).  The device copy
bandwidth is measured once with a large device-to-device copy (bytes read + written), and
each path reports its memory-roofline fraction: the minimal bytes it must move (inputs
read once, outputs written once) / bandwidth / measured time.

Usage (GPU host with torch + triton):
    python benchmarks/bench_compressor.py [--out benchmarks/results/compressor_h100.json] [--variants]
    python benchmarks/bench_compressor.py --plot-only JSON PNG
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOKENS = [1, 16, 256, 4096, 65536]
PATHS = ["seed", "fused", "table", "gather_h"]

# (label, fused_compress keyword options) for --variants; {} is the built-in heuristic
VARIANTS = [
    ("heuristic", {}),
    ("bt16", dict(block_t=16, block_h=64, num_warps=4, num_stages=3)),
    ("bt32", dict(block_t=32, block_h=64, num_warps=4, num_stages=3)),
    ("bt64", dict(block_t=64, block_h=64, num_warps=4, num_stages=3)),
    ("bt128-w8", dict(block_t=128, block_h=64, num_warps=8, num_stages=3)),
    ("bt128-bh32-w8-s4", dict(block_t=128, block_h=32, num_warps=8, num_stages=4)),
    ("bt64-bh128", dict(block_t=64, block_h=128, num_warps=4, num_stages=3)),
    ("padded-d", dict(split_d=False)),
]


def seed_compress(x, weight, g, F, e, k, eps=1e-5):
    """The compressor as a naive PyTorch module computes it (tokens are the batch)."""
    import torch
    import torch.nn.functional as fn

    T = x.shape[0]
    h = x.view(T, 1, F, F).transpose(1, 2)  # (T, channel a, 1, column b)
    h = fn.pad(h, (k - 1, 0))  # causal along b
    h = fn.conv2d(h, weight)  # (T, o, 1, b)
    h = h.transpose(1, 2)  # (T, 1, o, b)
    h = fn.avg_pool2d(h, kernel_size=e, stride=e)  # (T, 1, F/e, F/e)
    h = h.reshape(T, -1)
    norm = torch.norm(h, dim=-1, keepdim=True) * h.shape[-1] ** -0.5
    return h / norm.clamp(min=eps) * g


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(bench, dev: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median."""
    import torch

    n = 1 << 30 if dev == "cuda" else 1 << 26  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def host_us(fn, dev: str, n: int = 200) -> float:
    """Back-to-back calls without L2 flush, synchronised once: per-call time including
    host launch overhead (what an eager decode step sees)."""
    n = n if dev == "cuda" else 3
    for _ in range(min(n, 10)):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / n * 1e6


def _cpu_bench(f, warmup: float, rep: float, return_mode: str = "median") -> float:
    """Stand-in for do_bench with --device cpu (a smoke test of this script, not a timing)."""
    f()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def run(args) -> dict:
    import torch
    import torch.nn.functional as fn
    import triton
    from triton.testing import do_bench

    from convgpt_core import kernels
    from convgpt_core.compressor import Geometry, compressed_table, fold
    from convgpt_core.config import PUBLISHED

    VOCAB = PUBLISHED["vocab_size"]
    geom = Geometry.from_config(SimpleNamespace(**PUBLISHED))
    F_, E_, K_ = geom.F, geom.e, geom.k

    dev = args.device
    if dev == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA device"
    else:  # smoke test of the script on CPU through Triton's interpreter
        assert os.environ.get("TRITON_INTERPRET") == "1", "--device cpu needs TRITON_INTERPRET=1"
        do_bench = _cpu_bench  # noqa: F811
    torch.manual_seed(0)
    H, D = geom.H, geom.D
    dt = torch.bfloat16

    def bench(f) -> float:
        return do_bench(f, warmup=args.warmup, rep=args.rep, return_mode="median")

    # weights: embedding ~ N(0, 0.02), conv ~ N(0, 1/sqrt(F*k)), g = 1
    emb32 = torch.randn(VOCAB, H, device=dev) * 0.02
    w32 = torch.randn(F_, F_, 1, K_, device=dev) / (F_ * K_) ** 0.5
    g32 = torch.ones(1, device=dev)
    emb, w, g = emb32.to(dt), w32.to(dt), g32.to(dt)
    table = compressed_table(emb, w, g, geom).to(dt)  # vocab x D
    # M.T (H x D) as the conv module holds it after loading, folded once outside the timings
    mt32 = fold(w32, geom, torch.float32).T.contiguous()
    mt = fold(w, geom, torch.float32).T.contiguous().to(dt)

    # ---- correctness -----------------------------------------------------------------
    checks = {}
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 seed
    ids = torch.randint(0, VOCAB, (4099 if dev == "cuda" else 37,), device=dev)
    x32 = emb32[ids]
    want32 = seed_compress(x32, w32, g32, F_, E_, K_)
    checks["fp32_fused_vs_seed"] = rel_err(kernels.fused_compress(x32, mt32, g32, 1e-5), want32)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    xb = emb[ids]
    seed_b = seed_compress(xb, w, g, F_, E_, K_)
    fused_b = kernels.fused_compress(xb, mt, g, 1e-5)
    checks["bf16_fused_vs_seed"] = rel_err(fused_b, seed_b)
    checks["bf16_table_vs_fused"] = rel_err(fn.embedding(ids, table), fused_b)
    for opts_label, opts in VARIANTS if args.variants else []:
        checks[f"bf16_{opts_label}_vs_seed"] = rel_err(kernels.fused_compress(xb, mt, g, 1e-5, **opts), seed_b)
    ok = checks["fp32_fused_vs_seed"] < 1e-4 and all(v < 2e-2 for k, v in checks.items() if k.startswith("bf16"))
    print("correctness:", ", ".join(f"{k}={v:.2e}" for k, v in checks.items()), "->", "OK" if ok else "FAILED")
    if not ok:
        raise SystemExit("correctness check failed")

    # ---- bandwidth -------------------------------------------------------------------
    bw = copy_bandwidth(bench, dev)
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")

    m_bytes = H * D * 2
    conv_bytes = F_ * F_ * K_ * 2
    rows = []
    variants = []
    for T in args.tokens:
        ids = torch.randint(0, VOCAB, (T,), device=dev, dtype=torch.int32)
        x = emb[ids]
        out = torch.empty(T, D, dtype=dt, device=dev)
        fns = {
            "seed": (lambda x=x: seed_compress(x, w, g, F_, E_, K_), T * H * 2 + conv_bytes + T * D * 2),
            "fused": (lambda x=x, out=out: kernels.fused_compress(x, mt, g, 1e-5, out=out),
                      T * H * 2 + m_bytes + T * D * 2),
            "table": (lambda ids=ids: fn.embedding(ids, table), T * D * 2 + T * 4 + T * D * 2),
            "gather_h": (lambda ids=ids: fn.embedding(ids, emb), T * H * 2 + T * 4 + T * H * 2),
        }
        for path, (f, nbytes) in fns.items():
            ms = bench(f)
            us = ms * 1e3
            rows.append(dict(tokens=T, path=path, median_us=us, bytes=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9,
                             roofline=nbytes / bw / (ms * 1e-3), host_us=host_us(f, dev) if T <= 256 else None))
        if args.variants:
            for label, opts in VARIANTS:
                ms = bench(lambda opts=opts, x=x, out=out: kernels.fused_compress(x, mt, g, 1e-5, out=out, **opts))
                nbytes = fns["fused"][1]
                variants.append(dict(tokens=T, variant=label, opts=opts, median_us=ms * 1e3,
                                     roofline=nbytes / bw / (ms * 1e-3)))

    by = {(r["tokens"], r["path"]): r for r in rows}
    t_max = max(args.tokens)
    ratios = {
        "tokens": t_max,
        "seed_over_fused": by[(t_max, "seed")]["median_us"] / by[(t_max, "fused")]["median_us"],
        "table_over_gather_h": by[(t_max, "table")]["median_us"] / by[(t_max, "gather_h")]["median_us"],
        "fused_over_gather_h": by[(t_max, "fused")]["median_us"] / by[(t_max, "gather_h")]["median_us"],
    }
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu, sms = props.name, props.multi_processor_count
    else:
        gpu, sms = "cpu (TRITON_INTERPRET smoke test, timings meaningless)", 0
    return dict(
        meta=dict(gpu=gpu, sms=sms, torch=torch.__version__,
                  triton=triton.__version__, dtype="bfloat16", vocab=VOCAB,
                  geometry=dict(H=H, F=F_, e=E_, D=D, k=K_),
                  copy_bandwidth_gbps=bw / 1e9, warmup_ms=args.warmup, rep_ms=args.rep,
                  default_tiles={T: kernels._default_tiles(T, H, sum(kernels._d_blocks(D)), dt, torch.device(dev))
                                 for T in args.tokens}),
        checks=checks, results=rows, ratios=ratios, variants=variants,
    )


def report(data: dict) -> None:
    rows = data["results"]
    tokens = sorted({r["tokens"] for r in rows})
    by = {(r["tokens"], r["path"]): r for r in rows}
    print(f"\n{data['meta']['gpu']}, torch {data['meta']['torch']}, triton {data['meta']['triton']}, bf16, "
          f"H={data['meta']['geometry']['H']} -> D={data['meta']['geometry']['D']}, "
          f"copy bandwidth {data['meta']['copy_bandwidth_gbps']:.0f} GB/s")
    head = f"{'tokens':>7} | " + " | ".join(f"{p:^26}" for p in PATHS)
    print(head)
    print(f"{'':>7} | " + " | ".join(f"{'us':>8} {'GB/s':>7} {'roof':>8}" for _ in PATHS))
    print("-" * len(head))
    for T in tokens:
        cells = []
        for p in PATHS:
            r = by[(T, p)]
            cells.append(f"{r['median_us']:8.1f} {r['gbps']:7.0f} {r['roofline']:8.1%}")
        print(f"{T:>7} | " + " | ".join(cells))
    host = [(r["tokens"], r["path"], r["host_us"]) for r in rows if r.get("host_us")]
    if host:
        print("\nback-to-back eager calls incl. host overhead (us/call):")
        for T in sorted({h[0] for h in host}):
            print(f"{T:>7} | " + "  ".join(f"{p}={u:.1f}" for t, p, u in host if t == T))
    r = data["ratios"]
    print(f"\nat {r['tokens']} tokens: seed / fused = {r['seed_over_fused']:.2f}x, "
          f"table / gather_h = {r['table_over_gather_h']:.3f}, fused / gather_h = {r['fused_over_gather_h']:.2f}")
    if data.get("variants"):
        print("\nfused kernel variants (median us, roofline fraction):")
        labels = list(dict.fromkeys(v["variant"] for v in data["variants"]))
        print(f"{'tokens':>7} | " + " | ".join(f"{lab:>17}" for lab in labels))
        vb = {(v["tokens"], v["variant"]): v for v in data["variants"]}
        for T in tokens:
            cells = [f"{vb[(T, lab)]['median_us']:8.1f} {vb[(T, lab)]['roofline']:7.1%}" for lab in labels]
            best = min(labels, key=lambda lab: vb[(T, lab)]["median_us"])
            print(f"{T:>7} | " + " | ".join(f"{c:>17}" for c in cells) + f"   best: {best}")


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(json_path))
    rows = data["results"]
    tokens = sorted({r["tokens"] for r in rows})
    by = {(r["tokens"], r["path"]): r for r in rows}
    names = {"seed": "seed-style torch ops", "fused": "fused Triton kernel",
             "table": "vocab x D table gather", "gather_h": "vocab x H gather (floor)"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in PATHS:
        a1.plot(tokens, [by[(t, p)]["median_us"] for t in tokens], marker="o", label=names[p])
        a2.plot(tokens, [100 * by[(t, p)]["roofline"] for t in tokens], marker="o", label=names[p])
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.grid(True, alpha=0.3)
    a1.set_yscale("log")
    a1.set_ylabel("median time (us)")
    a2.set_ylabel("memory-roofline fraction (%)")
    a1.legend(fontsize=8)
    m = data["meta"]
    fig.suptitle(f"ConvGPT compressor, {m['gpu']}, bf16, H={m['geometry']['H']} -> D={m['geometry']['D']}, "
                 f"copy BW {m['copy_bandwidth_gbps']:.0f} GB/s")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compressor_h100.json"))
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--warmup", type=float, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=float, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--variants", action="store_true", help="also time several fused tile settings")
    ap.add_argument("--plot-only", nargs=2, metavar=("JSON", "PNG"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke-test this script under TRITON_INTERPRET=1 (no meaningful timings)")
    args = ap.parse_args()
    if args.plot_only:
        plot(*args.plot_only)
        return
    data = run(args)
    report(data)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\nwrote {args.out}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not importable: no plot (python benchmarks/bench_compressor.py --plot-only JSON PNG)")
        return
    png = os.path.splitext(args.out)[0] + ".png"
    plot(args.out, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
