"""ConvGPT's decode GEMMs (published geometry, D = 144): cuBLAS (what the engines call) against
the Triton GEMMs torch.compile's max-autotune picks from, per shape, inside a CUDA graph.

Decode steps run ~130 GEMMs whose weights are 0.3-2 MB; the traces show them at 3.6-6 us each
(benchmarks/results/README.md, round 3).  This says whether a GEMM choice other than cuBLAS's
(Inductor's autotuned Triton templates, which vLLM can enable with max-autotune at fixed
compile sizes) is faster for exactly these shapes.  One line per shape as it completes, and
a JSON of all.

Usage (CUDA): python benchmarks/bench_gemm.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import report

# (name, K, N): y[M, N] = x[M, K] @ W[N, K]^T
SHAPES = [("qkv", 144, 4096), ("gate_up", 144, 6144), ("o_proj", 2048, 144), ("down", 3072, 144),
          ("head gate_up", 144, 10368), ("head down", 5184, 1296)]


def linear(x, w):
    import torch

    return torch.nn.functional.linear(x, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,256")
    args = ap.parse_args()
    import torch
    import torch._inductor.config as inductor
    from triton.testing import do_bench_cudagraph

    inductor.max_autotune_gemm_backends = "ATEN,TRITON"
    dev = torch.device("cuda")
    rows = []
    say = report.tee(os.path.join(args.out, "gemm.txt"))
    def measure(m: int, name: str, k: int, n: int) -> None:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        t0 = time.time()
        tuned = torch.compile(linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        torch.testing.assert_close(tuned(x, w), torch.nn.functional.linear(x, w), rtol=2e-2, atol=2e-2)
        compile_s = time.time() - t0
        cublas = do_bench_cudagraph(lambda: torch.nn.functional.linear(x, w), rep=50) * 1e3
        auto = do_bench_cudagraph(lambda: tuned(x, w), rep=50) * 1e3
        rows.append(dict(gemm=name, m=m, k=k, n=n, cublas_us=cublas, autotuned_us=auto, compile_s=compile_s))
        say(f"{name:<14}{m:>5}{k:>6}{n:>7}{cublas:>9.2f}{auto:>11.2f}{auto / cublas:>7.2f}  {n * k * 2 / 1e6:.2f}")
        torch._dynamo.reset()
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
                  open(os.path.join(args.out, "gemm.json"), "w"), indent=1)

    say(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16, times in us (CUDA graph replay)")
    say(f"{'GEMM':<14}{'M':>5}{'K':>6}{'N':>7}{'cuBLAS':>9}{'autotuned':>11}{'ratio':>7}  weight MB")
    batches = [int(b) for b in args.batches.split(",")]
    for shapes in (SHAPES[:4], SHAPES[4:]):  # the decoder's GEMMs first, then the tied head's
        for m in batches:
            for name, k, n in shapes:
                measure(m, name, k, n)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
