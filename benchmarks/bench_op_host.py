"""Host time per call of the core's custom ops, as vLLM's compiled graph calls them, against
the same work in Inductor's generated code: is the host side of a ConvGPT layer slower than
the twin's?

vLLM runs prefill-sized steps without CUDA graphs, so every call's host time counts there.
Round 7's vLLM trace (graphs off, profiled) put ~1.5 ms of CPU in each ``convgpt::norm_linear``
call at batch 256 and ~0.8 ms in each ``convgpt::narrow_linear`` (cuBLAS inside), where
Inductor's kernels for the twin took ~40 us a launch.  This measures it without vLLM and
without the profiler, per site of a layer (published widths) and per token count:

  op        ``torch.ops.convgpt.<op>(...)`` from Python: the dispatcher, then the op's Python body
  op+param  the same with the weight as vLLM hands it over: vLLM's linear layers hold their weights
            as parameter subclasses that define ``__torch_function__``, and Inductor passes the
            parameter itself to an opaque op, so every call first runs that Python hook
  body      the op's body called directly (no dispatcher)
  inductor  the engine's way: add + RMSNorm + GEMM (+ SiLU * up) compiled by Inductor
            (static shapes), i.e. what the twin's layer runs

Host us per call: the wall time of ``--calls`` back-to-back calls without a sync, divided by
their number; with ``--busy`` a second Python thread spins meanwhile (vLLM's engine process has
such threads: its input and output sockets), so a call that gives up the GIL may wait for it.
GPU us per call from CUDA events, to show which side bounds each row.

Usage: python benchmarks/bench_op_host.py [--rows 1,256,16384] [--busy] [--out DIR]
(CUDA; on a machine without it, the torch paths on CPU: rows above the kernels' limits only.)
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from bench_norm_linear import D, engine_path  # the engine's add + RMSNorm + GEMM (+ SiLU * up)

QKV, INNER, HEADS = 4096, 3072, 2048  # published geometry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,256,16384")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--busy", action="store_true", help="a second Python thread spins during the timing")
    ap.add_argument("--out", default=None, help="write op_host.json here")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from convgpt_core import narrow_linear as nar
    from convgpt_core import norm_linear as nl

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dev, dt)

    class Param(torch.nn.Parameter):  # what vLLM's BasevLLMParameter adds to a Parameter
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    def param(t):
        return Param(t, requires_grad=False)

    nw = 1 + rand(D, scale=0.1)
    w_qkv, w_gu = rand(QKV, D, scale=D**-0.5), rand(2 * INNER, D, scale=D**-0.5)
    w_o, w_d = rand(D, HEADS, scale=HEADS**-0.5), rand(D, INNER, scale=INNER**-0.5)
    p_qkv, p_gu, p_o, p_d = (param(w) for w in (w_qkv, w_gu, w_o, w_d))

    inductor_nl = torch.compile(engine_path, dynamic=False, fullgraph=True)
    inductor_lin = torch.compile(F.linear, dynamic=False, fullgraph=True)

    def sites(rows: int):
        h, r = rand(rows, D), rand(rows, D)
        heads, act = rand(rows, HEADS), rand(rows, INNER)
        yield ("qkv", {
            "op": lambda: torch.ops.convgpt.norm_linear(h, r, nw, 1e-6, w_qkv, False),
            "op+param": lambda: torch.ops.convgpt.norm_linear(h, r, nw, 1e-6, p_qkv, False),
            "body": lambda: nl._op_impl(h, r, nw, 1e-6, w_qkv, False),
            "inductor": lambda: inductor_nl(h, r, nw, w_qkv, False)})
        yield ("gate_up", {
            "op": lambda: torch.ops.convgpt.norm_linear(h, r, nw, 1e-6, w_gu, True),
            "op+param": lambda: torch.ops.convgpt.norm_linear(h, r, nw, 1e-6, p_gu, True),
            "body": lambda: nl._op_impl(h, r, nw, 1e-6, w_gu, True),
            "inductor": lambda: inductor_nl(h, r, nw, w_gu, True)})
        for name, x, w, pw in (("o_proj", heads, w_o, p_o), ("down", act, w_d, p_d)):
            yield (name, {
                "op": lambda x=x, w=w: torch.ops.convgpt.narrow_linear(x, w),
                "op+param": lambda x=x, pw=pw: torch.ops.convgpt.narrow_linear(x, pw),
                "body": lambda x=x, w=w: nar._kernel_or_cublas(x, w),
                "inductor": lambda x=x, w=w: inductor_lin(x, w)})

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def measure(fn) -> tuple[float, float | None]:
        for _ in range(3):  # compile, allocate, warm up
            fn()
        sync()
        best_host = best_gpu = float("inf")
        for _ in range(5):
            if dev == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            host = (time.perf_counter() - t0) / args.calls * 1e6
            if dev == "cuda":
                end.record()
                end.synchronize()
                best_gpu = min(best_gpu, start.elapsed_time(end) * 1e3 / args.calls)
            best_host = min(best_host, host)
        return best_host, (best_gpu if dev == "cuda" else None)

    def cell(host: float, gpu: float | None) -> str:
        return f"{host:>7.1f} ({gpu:>6.1f})" if gpu is not None else f"{host:>7.1f} (     -)"

    stop = threading.Event()

    def spin():
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=spin, daemon=True) if args.busy else None
    if spinner:
        spinner.start()
    results = []
    print(f"{dev} {dt}; host us per call (GPU us per call), best of 5 x {args.calls} calls"
          + ("; a second Python thread spinning" if args.busy else ""))
    kinds = ("op", "op+param", "body", "inductor")
    print(f"{'site':9} {'rows':>6} " + " ".join(f"{k:>16}" for k in kinds))
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            if dev == "cpu" and rows <= nl.MAX_ROWS:
                continue  # the kernels need CUDA (or the interpreter, far too slow to time)
            with torch.no_grad():
                for site, fns in sites(rows):
                    row = {"site": site, "rows": rows}
                    for kind, fn in fns.items():
                        row[kind] = measure(fn)
                    results.append(row)
                    print(f"{site:9} {rows:>6} " + " ".join(cell(*row[k]) for k in kinds),
                          flush=True)
    finally:
        stop.set()
    if args.out:
        with open(os.path.join(args.out, "op_host.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                       "busy": args.busy, "calls": args.calls, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
