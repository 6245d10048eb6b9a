"""The fused residual-add + RMSNorm + linear (+ SwiGLU) kernel against the kernels an engine
runs for the same work, per decode batch size, each inside a CUDA graph.

The two places a ConvGPT layer reads its D = 144 stream (published geometry):
  qkv      rmsnorm(h + residual) @ W_qkv.T              (W: 4096 x 144)
  gate_up  silu(gate) * up of rmsnorm(h + residual) @ W_gate_up.T   (W: 6144 x 144)
"engine" is what vLLM's compiled model runs: Inductor's fused add + RMSNorm kernel, the
cuBLAS GEMM, and (gate_up) Inductor's SiLU*mul kernel (torch.compile, default mode, static
shapes); "fused" is ``convgpt_core.norm_linear`` (one kernel).  Also the fused kernel's
column-block sweep, to check the tile heuristic.  One line per shape as it completes, and a
JSON of all.

Usage (CUDA): python benchmarks/bench_norm_linear.py --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import os

SITES = [("qkv", 4096, False), ("gate_up", 3072, True)]  # (name, N out, swiglu)
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
    args = ap.parse_args()
    import torch
    from triton.testing import do_bench_cudagraph

    from convgpt_core import norm_linear as nl

    def timed(fn, *fn_args, rep: int = 50, **kw) -> float:
        """us per call, replayed in a CUDA graph"""
        return do_bench_cudagraph(functools.partial(fn, *fn_args, **kw), rep=rep) * 1e3

    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    txt = open(os.path.join(args.out, "norm_linear.txt"), "w")

    def say(line: str) -> None:
        print(line, flush=True)
        txt.write(line + "\n")
        txt.flush()

    say(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16, us per call (CUDA graph replay)")
    say(f"{'site':<9}{'M':>6}{'engine':>9}{'fused':>8}{'ratio':>7}   fused by column block (32/64/128)")
    compiled = torch.compile(engine_path, dynamic=False)
    for name, n, swiglu in SITES:
        w = torch.randn(2 * n if swiglu else n, D, device=dev, dtype=dt) / D**0.5
        nw = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
        for m in (int(b) for b in args.batches.split(",")):
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
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
                      open(os.path.join(args.out, "norm_linear.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
