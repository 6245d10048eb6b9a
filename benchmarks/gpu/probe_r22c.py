"""Round 22 probe, part two (bare GPU, PYTHONPATH=src): the other choices the decode chain makes
at 129-256 rows, timed in the chain itself (bench_norm_linear's 32 layers, attention stood in,
bf16), as probe_r22.py did for the q+k+v+RoPE tile.  At 256 rows SGLang's batch-256 step spends
~0.8 ms in the layers' kernels: q+k+v and gate/up (norm_linear), o_proj (cuBLAS above 128 rows,
from round 6's single-call timings) and down (narrow_linear).  Variants, each against the shipped
chain:
  pdl256        programmatic dependent launch up to 256 rows (shipped: 192)
  oproj-narrow  o_proj through narrow_linear up to 256 rows (shipped: cuBLAS above 128)
  gu BMxBN      the gate/up + SwiGLU tile above 128 rows (shipped 32 x 64, 4 warps)
  down BM/KPS   narrow_linear's tile above 128 rows (shipped 64 rows, 8 K slices of 128, 4 warps)
Per row count: us per layer, the median of 5 interleaved CUDA-graph timings with its min-max,
and the largest difference of the chain's output from the shipped chain's (bf16 rounding).

Usage: python benchmarks/gpu/probe_r22c.py OUT_DIR
"""

import contextlib
import functools
import json
import os
import statistics
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_norm_linear as bench  # noqa: E402

from convgpt_core import kernels  # noqa: E402
from convgpt_core import narrow_linear as nar  # noqa: E402
from convgpt_core import norm_linear as nl  # noqa: E402

ROWS = (160, 192, 224, 256)


def gate_up_tile(bm, bn):
    shipped = nl._tiles

    def tiles(m, swiglu, half_head=0):
        return (bm, bn, 4) if (swiglu and m > 128 and not half_head) else shipped(m, swiglu, half_head)
    return mock.patch.object(nl, "_tiles", tiles)


def down_tile(bm, kps):
    shipped = nar._tiles

    def tiles(m):
        return (bm, 128, kps, 4) if m > 128 else shipped(m)
    return mock.patch.object(nar, "_tiles", tiles)


@contextlib.contextmanager
def both(*cms):
    with contextlib.ExitStack() as stack:
        for cm in cms:
            stack.enter_context(cm)
        yield


VARIANTS = {
    "shipped": contextlib.nullcontext,
    "pdl256": lambda: mock.patch.object(kernels, "PDL_MAX_ROWS", 256),
    "oproj-narrow": lambda: mock.patch.object(nar, "MAX_ROWS", 256),
    "oproj-narrow+pdl256": lambda: both(mock.patch.object(nar, "MAX_ROWS", 256),
                                        mock.patch.object(kernels, "PDL_MAX_ROWS", 256)),
    "gu 16x64": lambda: gate_up_tile(16, 64),
    "gu 32x128": lambda: gate_up_tile(32, 128),
    "gu 64x64": lambda: gate_up_tile(64, 64),
    "down 32/8": lambda: down_tile(32, 8),
    "down 64/4": lambda: down_tile(64, 4),
    "down 32/4": lambda: down_tile(32, 4),
}


def main():
    out = sys.argv[1]
    dev, dt = torch.device("cuda"), torch.bfloat16
    layers, table = bench.chain_case(dev, dt)
    rows = []
    for m in ROWS:
        step = functools.partial(bench.chain_step, layers, table, *bench.chain_inputs(m, dev, dt))
        want = step()
        diff = {}
        for v, setup in VARIANTS.items():
            with setup():
                diff[v] = bench.max_rel_diff(step(), want)
        runs = bench.interleaved(step, VARIANTS)
        base = statistics.median(runs["shipped"])
        print(f"rows {m}: chain us per layer (median, min-max of 5), ratio to shipped, output vs shipped")
        for v in VARIANTS:
            med = statistics.median(runs[v])
            print(f"  {v:<22}{med:7.2f} ({min(runs[v]):.2f}-{max(runs[v]):.2f})  {med / base:5.3f}x  {diff[v]:.1e}")
            rows.append(dict(rows=m, variant=v, chain_us_per_layer=runs[v], max_rel_diff=diff[v]))
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows),
                  open(os.path.join(out, "probe_r22c.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
