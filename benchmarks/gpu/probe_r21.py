"""Round 21 probe (bare GPU, PYTHONPATH=src): the shipped decode chain (bench_norm_linear's, 32
layers, attention stood in) at 256 rows under the profiler, each launch of norm_linear's kernel by
the kernel before it (steptrace --follows), with a bf16 cos | sin table (vLLM's) and a float32 one
(SGLang's).  SGLang's batch-256 step had the q+k+v launch after down at 15.4 us and the one after
the embedding at 7.6 (round 21); the micro-benchmark's q+k+v at 256 rows took 6.5 (round 15).

Usage: python benchmarks/gpu/probe_r21.py OUT_DIR
"""

import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_norm_linear as bench  # noqa: E402
import steptrace  # noqa: E402

out = sys.argv[1]
dev, dt = torch.device("cuda"), torch.bfloat16
layers, table = bench.chain_case(dev, dt)
for name, cos_sin in (("bf16", table), ("float32", table.float())):
    h, res = (torch.randn(256, bench.D, device=dev).to(dt) for _ in range(2))
    pos = torch.arange(128, 384, device=dev)
    for _ in range(3):
        bench.chain_step(layers, cos_sin, h, res, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            bench.chain_step(layers, cos_sin, h, res, pos)
        torch.cuda.synchronize()
    path = os.path.join(out, f"chain256_{name}.json")
    prof.export_chrome_trace(path)
    print(f"cos|sin {name}:", json.dumps(steptrace.follows(steptrace.kernels(path), "norm_linear"), indent=1))
    os.remove(path)
