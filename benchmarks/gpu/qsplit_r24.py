"""Round 24 probe: SGLang's q+k+v at its own layers' sizes (steps past the kernels' MAX_ROWS),
bare on the GPU.  Today: one cuBLAS GEMM into q|k|v columns, then the copy of the strided q that
SGLang's flashinfer backend makes (``q.contiguous()``).  The alternative: two GEMMs, q's into a
tensor of its own (``linear_q_apart``).  Published widths (D = 144, 16 q and 8 kv heads of 128),
bf16; each pair timed alternately (triton's do_bench, median of its repeats), 5 times per size.

Usage: PYTHONPATH=src python3 benchmarks/gpu/qsplit_r24.py OUT_DIR
"""

import json
import os
import statistics
import sys

import torch
from triton.testing import do_bench

from convgpt_core.norm_linear import linear_q_apart

D, Q, KV = 144, 16 * 128, 8 * 128
ROWS = (257, 384, 512, 768, 1024, 1536, 2048, 4096, 8192)


def main(out: str) -> None:
    w = torch.randn(Q + 2 * KV, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    rows = []
    print(f"{'rows':>6}{'GEMM + q copy us':>18}{'two GEMMs us':>14}{'two / one':>11}  (median of 5, min-max)")
    for m in ROWS:
        x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)

        def one(x=x):
            return (x @ w.t())[:, :Q].contiguous()

        def two(x=x):
            return linear_q_apart(x, w, Q)

        torch.testing.assert_close(two().q, one(), rtol=2e-2, atol=2e-2)
        a, b = [], []
        for _ in range(5):
            a.append(do_bench(one, warmup=25, rep=100) * 1e3)
            b.append(do_bench(two, warmup=25, rep=100) * 1e3)
        r = [y / z for y, z in zip(b, a)]
        rows.append(dict(rows=m, one_us=a, two_us=b, ratio=r))
        print(f"{m:>6}{statistics.median(a):>18.2f}{statistics.median(b):>14.2f}{statistics.median(r):>10.3f}x"
              f"  ({min(r):.3f}-{max(r):.3f})")
    with open(os.path.join(out, "qsplit_h200_r24.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
