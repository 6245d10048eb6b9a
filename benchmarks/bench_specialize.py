"""What Triton's specialization on the row count costs and buys for the two D-wide kernels
(``norm_linear``: qkv and gate_up; ``narrow_linear``: o_proj and down), at the token counts
vLLM captures CUDA graphs for (1, 2, 4, 8, then every 8 up to each kernel's row limit).

Triton compiles a kernel once per specialization key; an integer argument is specialized on
being 1 and on being divisible by 16, so the row count ``M`` alone can triple the variants a
tile class compiles.  Each variant compiles during the engine's graph capture on a fresh
machine.  This runs the sweep twice, each in a fresh process with an empty Triton cache:
"specialized" (the kernels as shipped) and "M unspecialized" (``do_not_specialize=["M"]``),
and reports per kernel the variants compiled, the time of the first calls (compiles included)
and each size's kernel time inside a CUDA graph (``triton.testing.do_bench_cudagraph``).

Usage (CUDA): nox -s bench-specialize -- [--out JSON]
(or python benchmarks/bench_specialize.py with src/ importable)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_norm_linear import NARROW_SITES, D  # the same kernel sites as the kernels' benchmark
from bench_norm_linear import SITES as NORM_SITES


def sizes(limit: int) -> list[int]:
    return [m for m in [1, 2, 4, 8, *range(16, 513, 8)] if m <= limit]


def sweep(unspecialized: bool) -> dict:
    import torch
    import triton
    import triton.testing

    from convgpt_core import kernels
    from convgpt_core.narrow_linear import _narrow_linear_src, max_rows, narrow_linear_triton
    from convgpt_core.norm_linear import MAX_ROWS as NORM_ROWS
    from convgpt_core.norm_linear import _norm_linear_src, norm_linear_triton

    if unspecialized:  # the jitted kernels the modules will look up, built without M's specialization
        for src in (_norm_linear_src, _narrow_linear_src):
            kernels._JITTED[(src, False)] = triton.jit(src, do_not_specialize=["M"])
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dt) * 0.1

    calls = {}  # name: (row limit, width in, call)
    for name, n, swiglu in NORM_SITES:
        w, nw = randn(2 * n if swiglu else n, D), randn(D) + 1
        calls[name] = (NORM_ROWS, D,
                       lambda x, r, w=w, nw=nw, swiglu=swiglu: norm_linear_triton(x, r, nw, 1e-6, w, swiglu))
    for name, k in NARROW_SITES:
        w = randn(D, k)
        calls[name] = (max_rows(k), k, lambda x, r, w=w: narrow_linear_triton(x, w))
    out = {}
    for name, (limit, k_in, call) in calls.items():
        first, steady = {}, {}
        for m in sizes(limit):
            x, r = randn(m, k_in), randn(m, k_in)
            torch.cuda.synchronize()
            t = time.perf_counter()
            call(x, r)
            torch.cuda.synchronize()
            first[m] = time.perf_counter() - t
        for m in sizes(limit):
            x, r = randn(m, k_in), randn(m, k_in)
            steady[m] = triton.testing.do_bench_cudagraph(functools.partial(call, x, r), rep=50) * 1e3  # us
        out[name] = {"first_call_s": first, "steady_us": steady,
                     "compiled": sum(s > 0.05 for s in first.values())}  # a first call that compiled
    return out


def run_mode(unspecialized: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        cmd = [sys.executable, __file__, "--child"] + (["--unspecialized"] if unspecialized else [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def report(data: dict) -> str:
    a, b = data["specialized"], data["M unspecialized"]
    lines = [f"{'kernel':<9}{'variants':>10}{'first calls s':>16}{'kernel us, median ratio':>26}{'worst size':>18}",
             f"{'':<9}{'spec / not':>10}{'spec / not':>16}{'(not / spec), min-max':>26}{'(rows: not/spec)':>18}"]
    for name in a:
        sa, sb = a[name]["steady_us"], b[name]["steady_us"]
        ratios = {m: sb[m] / sa[m] for m in sa}
        worst = max(ratios, key=ratios.get)
        rs = sorted(ratios.values())
        med = statistics.median(rs)
        lines.append(f"{name:<9}{a[name]['compiled']:>5} / {b[name]['compiled']:<3}"
                     f"{sum(a[name]['first_call_s'].values()):>8.1f} / {sum(b[name]['first_call_s'].values()):<6.1f}"
                     f"{med:>12.3f} ({rs[0]:.3f}-{rs[-1]:.3f})"
                     f"{worst:>8}: {ratios[worst]:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON to write")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--unspecialized", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(sweep(args.unspecialized)))
        return
    data = {"specialized": run_mode(False), "M unspecialized": run_mode(True)}
    text = report(data)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
            f.write(f"$ {' '.join(sys.argv)}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
