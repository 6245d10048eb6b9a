"""The core's kernels around the D-wide stream against the kernels an engine runs for the
same work, per decode batch size, each inside a CUDA graph.

Into the stream's readers: the fused residual-add + RMSNorm + linear (+ SwiGLU) kernel.
The two places a ConvGPT layer reads its D = 144 stream (published geometry):
  qkv      rmsnorm(h + residual) @ W_qkv.T              (W: 4096 x 144)
  gate_up  silu(gate) * up of rmsnorm(h + residual) @ W_gate_up.T   (W: 6144 x 144)
"engine" is what vLLM's compiled model runs: Inductor's fused add + RMSNorm kernel, the
cuBLAS GEMM, and (gate_up) Inductor's SiLU*mul kernel (torch.compile, default mode, static
shapes); "fused" is ``convgpt_core.norm_linear`` (one kernel).  Also the fused kernel's
column-block sweep, to check the tile heuristic.
  qkv_rope the qkv site with the q/k norm and RoPE after it (16 q, 8 kv heads of 128):
           the engine's are Inductor's kernels for the per-head RMSNorms and the rotation
           (vLLM's compiled Qwen3 without its optional fusion pass); the fused kernel takes a
           head per program, swept over row blocks and warps.

Back to the stream: o_proj (W: 144 x 2048) and down (144 x 3072) as ``narrow_linear`` (the
split-K kernel) against cuBLAS (``F.linear``), with a sweep of the K split.

One line per shape as it completes, and a JSON of each part (norm_linear.json, narrow_linear.json).

``--only chain``: the layers' kernels as a decode step runs them back to back: 32 layers of the
fused decoder layer (q+k+v with q/k norm + RoPE, o_proj, gate/up + SwiGLU, down; attention
stood in by one elementwise kernel on q) in one CUDA graph, with programmatic dependent launch
(``convgpt_core.kernels.pdl``, here at every size) and without (``CONVGPT_PDL=0``), checked equal;
us per layer.

``--tiles M[,M..]``: instead, both kernels' whole tile space at those row counts (the sizes
where the heuristics were only swept along one axis), each configuration against the shipped
heuristic and the engine's ops, ranked; ``tiles.{txt,json}``.

Usage (CUDA): python benchmarks/bench_norm_linear.py --out DIR [--tiles 128,256]
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import report

SITES = [("qkv", 4096, False), ("gate_up", 3072, True)]  # (name, N out, swiglu)
NARROW_SITES = [("o_proj", 2048), ("down", 3072)]  # (name, K in): D = 144 out
SPLITS = [(128, 1), (128, 2), (128, 4), (256, 1), (64, 2)]  # (BLOCK_K, K blocks per split)
D = 144


def engine_path(h, residual, nw, w, swiglu: bool):
    import torch
    import torch.nn.functional as F

    s = h + residual
    x = s.float()
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * nw
    y = F.linear(x, w)
    if swiglu:
        n = y.shape[-1] // 2
        y = F.silu(y[..., :n]) * y[..., n:]
    return y, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256,512,1024")
    ap.add_argument("--only", choices=["norm_linear", "narrow_linear", "qkv_rope", "chain"], default=None)
    ap.add_argument("--tiles", default=None, help="row counts for the full tile sweep (replaces the rest)")
    args = ap.parse_args()
    import torch
    from triton.testing import do_bench_cudagraph

    from convgpt_core import narrow_linear as nar
    from convgpt_core import norm_linear as nl

    def timed(fn, *fn_args, rep: int = 50, **kw) -> float:
        """us per call, replayed in a CUDA graph"""
        return do_bench_cudagraph(functools.partial(fn, *fn_args, **kw), rep=rep) * 1e3

    dev, dt = torch.device("cuda"), torch.bfloat16
    batches = [int(b) for b in args.batches.split(",")]
    head = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16, us per call (CUDA graph replay)"

    def logger(name: str):
        say = report.tee(os.path.join(args.out, f"{name}.txt"))
        say(head)
        return say

    def save(name: str, rows: list) -> None:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
                  open(os.path.join(args.out, f"{name}.json"), "w"), indent=1)

    if args.tiles:
        tile_sweep([int(m) for m in args.tiles.split(",")], timed, logger("tiles"),
                   lambda rows: save("tiles", rows))
        return
    if args.only == "chain":
        chain(batches, timed, logger("chain"), lambda rows: save("chain", rows))
        return
    if args.only == "qkv_rope":
        qkv_rope(batches, timed, logger("qkv_rope"), lambda rows: save("qkv_rope", rows))
        return
    if args.only != "norm_linear":
        say, rows = logger("narrow_linear"), []
        say(f"{'site':<8}{'M':>6}{'cuBLAS':>9}{'split-K':>9}{'ratio':>7}   by (BLOCK_K, K blocks per split): "
            + " ".join(f"{bk}/{kps}" for bk, kps in SPLITS))
        for name, k in NARROW_SITES:
            w = torch.randn(D, k, device=dev, dtype=dt) / k**0.5
            for m in batches:
                x = torch.randn(m, k, device=dev, dtype=dt)
                torch.testing.assert_close(nar.narrow_linear_triton(x, w), torch.nn.functional.linear(x, w),
                                           rtol=3e-2, atol=3e-2)
                cublas = timed(torch.nn.functional.linear, x, w)
                ours = timed(nar.narrow_linear_triton, x, w)
                sweep = {f"{bk}/{kps}": timed(nar.narrow_linear_triton, x, w, block_k=bk, k_blocks_per_split=kps,
                                              rep=30) for bk, kps in SPLITS}
                tiles = nar._tiles(m)
                rows.append(dict(site=name, m=m, k=k, cublas_us=cublas, split_k_us=ours, by_split=sweep,
                                 heuristic=tiles))
                say(f"{name:<8}{m:>6}{cublas:>9.2f}{ours:>9.2f}{ours / cublas:>7.2f}   "
                    + " ".join(f"{v:.2f}" for v in sweep.values()) + f"  (picked {tiles[1]}/{tiles[2]})")
                save("narrow_linear", rows)
    if args.only == "narrow_linear":
        return
    say, rows = logger("norm_linear"), []
    say(f"{'site':<9}{'M':>6}{'engine':>9}{'fused':>8}{'ratio':>7}   fused by column block (32/64/128)")
    compiled = torch.compile(engine_path, dynamic=False)
    for name, n, swiglu in SITES:
        w = torch.randn(2 * n if swiglu else n, D, device=dev, dtype=dt) / D**0.5
        nw = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
        for m in batches:
            torch._dynamo.reset()  # one static-shape compile per batch size (no recompile limit)
            h = torch.randn(m, D, device=dev, dtype=dt)
            r = torch.randn(m, D, device=dev, dtype=dt)
            want_y, want_s = compiled(h, r, nw, w, swiglu)
            y, s = nl.norm_linear_triton(h, r, nw, 1e-6, w, swiglu)
            torch.testing.assert_close(y, want_y, rtol=3e-2, atol=3e-2)
            assert torch.equal(s, want_s)
            eng = timed(compiled, h, r, nw, w, swiglu)
            fused = timed(nl.norm_linear_triton, h, r, nw, 1e-6, w, swiglu)
            sweep = {bn: timed(nl.norm_linear_triton, h, r, nw, 1e-6, w, swiglu, block_n=bn, rep=30)
                     for bn in (32, 64, 128)}
            tiles = nl._tiles(m, swiglu)
            rows.append(dict(site=name, m=m, n=n, swiglu=swiglu, engine_us=eng, fused_us=fused,
                             fused_by_block_n=sweep, heuristic=tiles))
            say(f"{name:<9}{m:>6}{eng:>9.2f}{fused:>8.2f}{fused / eng:>7.2f}   "
                + " ".join(f"{sweep[b]:.2f}" for b in (32, 64, 128)) + f"  (picked {tiles[1]})")
            save("norm_linear", rows)
    qkv_rope(batches, timed, logger("qkv_rope"), lambda rows: save("qkv_rope", rows))


Q_HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128


def engine_qkv_rope(h, residual, nw, w, qw, kw, cos_sin, positions):
    """The qkv site as vLLM's compiled Qwen3 runs it: add + RMSNorm, GEMM, then per-head q/k
    RMSNorm (rounded to the model dtype) and neox RoPE from the cos | sin table."""
    import torch

    y, s = engine_path(h, residual, nw, w, False)
    q, k, v = y.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    cos, sin = cos_sin.index_select(0, positions)[:, None, :].chunk(2, dim=-1)

    def norm_rope(t, weight, heads):
        t = t.reshape(-1, heads, HEAD_DIM).float()
        t = ((t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * weight).float()
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1).to(h.dtype).flatten(1)

    return torch.cat((norm_rope(q, qw, Q_HEADS), norm_rope(k, kw, KV_HEADS), v), dim=-1), s


def qkv_rope(batches: list[int], timed, say, save) -> None:
    """The qkv site with the q/k norm and RoPE: the engine's kernels against norm_linear's
    RoPE epilogue, with the fused kernel's row-block x warps sweep."""
    import torch

    from convgpt_core import norm_linear as nl

    dev, dt = torch.device("cuda"), torch.bfloat16
    n = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    w = torch.randn(n, D, device=dev, dtype=dt) / D**0.5
    nw, qw, kw = ((1 + 0.1 * torch.randn(d, device=dev)).to(dt) for d in (D, HEAD_DIM, HEAD_DIM))
    inv = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, device=dev, dtype=torch.float32) / HEAD_DIM)
    ang = torch.arange(8192, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
    cos_sin = torch.cat((ang.cos(), ang.sin()), dim=-1)  # float32, as SGLang keeps it on CUDA
    compiled = torch.compile(engine_qkv_rope, dynamic=False)
    sweep_tiles = [(bm, wp) for bm in (16, 32, 64) for wp in (4, 8)]
    rows = []
    say(f"{'M':>6}{'engine':>9}{'fused':>8}{'ratio':>7}   fused by (BLOCK_M, warps): "
        + " ".join(f"{bm}/{wp}" for bm, wp in sweep_tiles))
    for m in batches:
        torch._dynamo.reset()
        h, r = (torch.randn(m, D, device=dev, dtype=dt) for _ in range(2))
        pos = torch.randint(0, 8192, (m,), device=dev)
        rope = nl.QKRope(qw, kw, 1e-6, cos_sin, pos, Q_HEADS, KV_HEADS)
        want, want_s = compiled(h, r, nw, w, qw, kw, cos_sin, pos)
        y, s = nl.norm_linear_triton(h, r, nw, 1e-6, w, rope=rope)
        torch.testing.assert_close(y, want, rtol=3e-2, atol=3e-2)
        assert torch.equal(s, want_s)
        eng = timed(compiled, h, r, nw, w, qw, kw, cos_sin, pos)
        fused = timed(nl.norm_linear_triton, h, r, nw, 1e-6, w, rope=rope)
        sweep = {f"{bm}/{wp}": timed(nl.norm_linear_triton, h, r, nw, 1e-6, w, rope=rope, block_m=bm, num_warps=wp,
                                     rep=30) for bm, wp in sweep_tiles}
        tiles = nl._tiles(m, False, HEAD_DIM // 2)
        rows.append(dict(site="qkv_rope", m=m, engine_us=eng, fused_us=fused, fused_by_tile=sweep, heuristic=tiles))
        say(f"{m:>6}{eng:>9.2f}{fused:>8.2f}{fused / eng:>7.2f}   " + " ".join(f"{v:.2f}" for v in sweep.values())
            + f"  (picked {tiles[0]}/{tiles[2]})")
        save(rows)


LAYERS, INNER = 32, 3072


def chain_case(dev, dt):
    """LAYERS decoder layers' weights at the published widths (random, each layer its own) and a
    cos | sin table of 8192 positions: what the chain benchmarks run."""
    import torch

    heads = Q_HEADS * HEAD_DIM
    n = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dt)

    layers = [dict(nw1=1 + randn(D, scale=0.1), wqkv=randn(n, D, scale=D**-0.5), wo=randn(D, heads, scale=heads**-0.5),
                   nw2=1 + randn(D, scale=0.1), wgu=randn(2 * INNER, D, scale=D**-0.5),
                   wd=randn(D, INNER, scale=INNER**-0.5), qw=1 + randn(HEAD_DIM, scale=0.1),
                   kw=1 + randn(HEAD_DIM, scale=0.1)) for _ in range(LAYERS)]
    inv = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, device=dev, dtype=torch.float32) / HEAD_DIM)
    ang = torch.arange(8192, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
    return layers, torch.cat((ang.cos(), ang.sin()), dim=-1).to(dt)


def stand_in_attention(qkv):
    """Attention's place in the chain: one elementwise kernel on the q heads."""
    return qkv[..., :Q_HEADS * HEAD_DIM] * 1.0


def chain_step(layers, cos_sin, h, res, pos):
    """The shipped kernels through ``layers`` (``fused_decoder_layer``, ``narrow_linear`` back to
    the stream), attention stood in by :func:`stand_in_attention`: (MLP output, residual)."""
    from convgpt_core import narrow_linear as nar
    from convgpt_core import norm_linear as nl

    for p in layers:
        rope = nl.QKRope(p["qw"], p["kw"], 1e-6, cos_sin, pos, Q_HEADS, KV_HEADS)
        h, res = nl.fused_decoder_layer(
            h, res, (p["nw1"], 1e-6), p["wqkv"], lambda qkv, roped, stored: stand_in_attention(qkv),
            lambda x, w=p["wo"]: nar.narrow_linear(x, w), (p["nw2"], 1e-6), p["wgu"],
            lambda x, w=p["wd"]: nar.narrow_linear(x, w), rope)
    return h, res


def chain_inputs(m: int, dev, dt):
    """A decode step of ``m`` rows for :func:`chain_step`: the stream and the residual (random,
    ``dt``) and positions in :func:`chain_case`'s table."""
    import torch

    h, res = (torch.randn(m, D, device=dev).to(dt) for _ in range(2))
    return h, res, torch.randint(0, 8192, (m,), device=dev)


def max_rel_diff(got, want) -> float:
    """The largest difference between two outputs of :func:`chain_step`, over ``want``'s largest
    value (a tile that changes only the rounding shows bf16-sized numbers here)."""
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, want))


def interleaved(step, variants: dict, rounds: int = 5, rep: int = 40) -> dict[object, list[float]]:
    """us per layer of ``step`` (a chain of LAYERS layers) replayed in a CUDA graph under each of
    ``variants`` (key: a factory of the context manager that sets the variant up), ``rounds``
    timings each, the variants taking turns."""
    from triton.testing import do_bench_cudagraph

    runs = {v: [] for v in variants}
    for _ in range(rounds):
        for v, setup in variants.items():
            with setup():
                runs[v].append(do_bench_cudagraph(step, rep=rep) * 1e3 / LAYERS)
    return runs


def chain(batches: list[int], timed, say, save) -> None:
    """LAYERS fused decoder layers back to back in one CUDA graph, with and without PDL."""
    import torch

    from convgpt_core import kernels

    dev, dt = torch.device("cuda"), torch.bfloat16
    layers, cos_sin = chain_case(dev, dt)

    def step(h, res, pos):
        return chain_step(layers, cos_sin, h, res, pos)

    assert kernels.pdl(cos_sin, 1), "PDL needs CUDA on compute capability 9.0+"
    shipped, kernels.PDL_MAX_ROWS = kernels.PDL_MAX_ROWS, 1 << 30  # PDL at every size here
    rows = []
    say(f"{LAYERS} layers per CUDA graph, us per layer (PDL at every size; shipped up to {shipped} rows)")
    say(f"{'M':>6}{'plain':>9}{'PDL':>9}{'saved':>8}")
    for m in batches:
        h, res, pos = chain_inputs(m, dev, dt)
        os.environ["CONVGPT_PDL"] = "0"
        want = step(h, res, pos)
        plain = timed(step, h, res, pos) / LAYERS
        os.environ.pop("CONVGPT_PDL")
        got = step(h, res, pos)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        with_pdl = timed(step, h, res, pos) / LAYERS
        rows.append(dict(m=m, layers=LAYERS, plain_us_per_layer=plain, pdl_us_per_layer=with_pdl))
        say(f"{m:>6}{plain:>9.2f}{with_pdl:>9.2f}{plain - with_pdl:>8.2f}")
        save(rows)
    kernels.PDL_MAX_ROWS = shipped


NORM_TILES = [(bm, bn, w) for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for w in (4, 8)]
NARROW_TILES = [(bm, bn, kps, w) for bm in (32, 64, 128) for bn in (16, 32, 64) for kps in (2, 4, 8) for w in (4, 8)]


def tile_sweep(ms: list[int], timed, say, save) -> None:
    """Every tile configuration of both kernels at each row count in ``ms`` (published
    geometry), checked against torch, timed in CUDA graphs beside the engine's ops and the
    shipped heuristic; the five fastest printed per site and size, all of them saved."""
    import torch
    import torch.nn.functional as F

    from convgpt_core import narrow_linear as nar
    from convgpt_core import norm_linear as nl

    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []

    def ranked(name, m, base_name, base, shipped, runs, desc):
        best = sorted(runs, key=lambda r: r[1])
        rows.append(dict(site=name, m=m, baseline=base_name, baseline_us=base, shipped_us=shipped,
                         configs=[dict(config=c, us=t) for c, t in best]))
        say(f"{name:<8}{m:>5}  {base_name} {base:6.2f}  shipped {shipped:6.2f}  best {best[0][1]:6.2f} "
            f"({best[0][1] / shipped:.2f}x shipped, {best[0][1] / base:.2f}x {base_name})")
        for c, t in best[:5]:
            say(f"{'':15}{desc}={c}  {t:6.2f}")
        save(rows)

    for name, n, swiglu in SITES:
        w = torch.randn(2 * n if swiglu else n, D, device=dev, dtype=dt) / D**0.5
        nw = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
        compiled = torch.compile(engine_path, dynamic=False)
        for m in ms:
            torch._dynamo.reset()
            h, r = (torch.randn(m, D, device=dev, dtype=dt) for _ in range(2))
            want = compiled(h, r, nw, w, swiglu)[0]
            runs = []
            for bm, bn, wp in NORM_TILES:
                kw = dict(block_m=bm, block_n=bn, num_warps=wp)
                torch.testing.assert_close(nl.norm_linear_triton(h, r, nw, 1e-6, w, swiglu, **kw)[0], want,
                                           rtol=3e-2, atol=3e-2)
                runs.append(((bm, bn, wp), timed(nl.norm_linear_triton, h, r, nw, 1e-6, w, swiglu, rep=20, **kw)))
            ranked(name, m, "engine", timed(compiled, h, r, nw, w, swiglu),
                   timed(nl.norm_linear_triton, h, r, nw, 1e-6, w, swiglu), runs, "(BLOCK_M, BLOCK_N, warps)")
    for name, k in NARROW_SITES:
        w = torch.randn(D, k, device=dev, dtype=dt) / k**0.5
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            want = F.linear(x, w)
            runs = []
            for bm, bn, kps, wp in NARROW_TILES:
                kw = dict(block_m=bm, block_n=bn, block_k=128, k_blocks_per_split=kps, num_warps=wp)
                torch.testing.assert_close(nar.narrow_linear_triton(x, w, **kw), want, rtol=3e-2, atol=3e-2)
                runs.append(((bm, bn, kps, wp), timed(nar.narrow_linear_triton, x, w, rep=20, **kw)))
            ranked(name, m, "cuBLAS", timed(F.linear, x, w), timed(nar.narrow_linear_triton, x, w), runs,
                   "(BLOCK_M, BLOCK_N, K blocks per split, warps)")


if __name__ == "__main__":
    main()
