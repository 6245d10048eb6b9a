"""Round 22 probe (bare GPU, PYTHONPATH=src): the q+k+v + q/k-norm + RoPE kernel's row tile in the
shipped decode chain (bench_norm_linear's, 32 layers, attention stood in), at 65-256 rows.  The
shipped tile past 128 rows (64 rows, 4 warps) spills ~1 KB a thread under Triton 3.6 (round 21,
kernel_regs_triton36_r21.txt); 32 x 4 spills 40 bytes and 64 x 8 72.  Round 15 timed the tiles one
call at a time, hot, where they came within 2-7%; here each runs in the chain.

Per row count, cos | sin table (bf16 as vLLM's, float32 as SGLang's) and tile (BLOCK_M, warps):
the chain's us per layer in a CUDA graph (median of 5 do_bench_cudagraph runs, the tiles
interleaved) and the q+k+v and gate/up kernels' own us per launch from an eager profiled pass
(steptrace.launches, less what overlapped the kernel before).  Each tile's chain output is compared with the shipped tile's
(largest difference over the output's largest value).

Usage: python benchmarks/gpu/probe_r22.py OUT_DIR
"""

import functools
import json
import os
import statistics
import sys
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_norm_linear as bench  # noqa: E402
import steptrace  # noqa: E402

from convgpt_core import norm_linear as nl  # noqa: E402

ROWS = (96, 128, 160, 192, 256)
TILES = ((16, 4), (32, 4), (32, 8), (64, 4), (64, 8))  # (BLOCK_M, warps) of the RoPE path


def tile_used(tile):
    """A context in which the RoPE path takes ``tile``; the rest stays shipped."""
    shipped = nl._tiles

    def tiles(m, swiglu, half_head=0):
        base = shipped(m, swiglu, half_head)
        return (tile[0], base[1], tile[1]) if half_head else base
    return mock.patch.object(nl, "_tiles", tiles)


def own_us(path: str) -> tuple[float, float]:
    """Medians of the q+k+v and gate/up launches' own time (less what overlapped the kernel
    before: an early start under programmatic dependent launch), us; a layer launches q+k+v first."""
    own = [d - overlapped for _, d, overlapped in steptrace.launches(steptrace.kernels(path), "norm_linear")]
    return statistics.median(own[0::2]), statistics.median(own[1::2])


def main():
    out = sys.argv[1]
    dev, dt = torch.device("cuda"), torch.bfloat16
    layers, table = bench.chain_case(dev, dt)
    rows = []
    for m in ROWS:
        h, res, pos = bench.chain_inputs(m, dev, dt)
        for tname, cos_sin in (("bf16", table), ("float32", table.float())):
            step = functools.partial(bench.chain_step, layers, cos_sin, h, res, pos)
            want = step()
            shipped = nl._tiles(m, False, 64)
            variants = {t: functools.partial(tile_used, t) for t in TILES}
            kernel_us, diff = {}, {}
            for t, setup in variants.items():
                with setup():
                    diff[t] = bench.max_rel_diff(step(), want)
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(3):
                            step()
                        torch.cuda.synchronize()
                path = os.path.join(out, "probe.json")
                prof.export_chrome_trace(path)
                kernel_us[t] = own_us(path)
                os.remove(path)
            runs = bench.interleaved(step, variants)
            base = statistics.median(runs[(shipped[0], shipped[2])])
            print(f"rows {m}, cos|sin {tname}, shipped tile {shipped[0]}x{shipped[2]}: chain us/layer "
                  f"(median, min-max of 5), q+k+v / gate-up kernel us (eager, profiled)")
            for t in TILES:
                med = statistics.median(runs[t])
                print(f"  {t[0]:>3} rows x {t[1]} warps  {med:7.2f} ({min(runs[t]):.2f}-{max(runs[t]):.2f})"
                      f"  {med / base:5.3f}x   qkv {kernel_us[t][0]:6.2f}  gate/up {kernel_us[t][1]:6.2f}"
                      f"  output vs shipped tile {diff[t]:.1e}")
                rows.append(dict(rows=m, table=tname, block_m=t[0], warps=t[1], shipped=t == (shipped[0], shipped[2]),
                                 chain_us_per_layer=runs[t], qkv_us=kernel_us[t][0], gate_up_us=kernel_us[t][1],
                                 max_rel_diff=diff[t]))
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows),
                      open(os.path.join(out, "probe_r22.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
