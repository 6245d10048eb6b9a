"""What a CUDA graph's launch costs the CPU, by the graph's kernel count and kind.

vLLM and SGLang replay one CUDA graph per decode step, and a batch-1 step is host-bound on both
engines: vLLM's traces have ``cudaGraphLaunch`` at 0.27-0.45 ms of CPU time for ConvGPT's
~200-node graph and more for the twin's ~420 (round 20).  If that time grows with the nodes,
fewer kernels a step save host time as well as GPU time; if programmatic dependent launch
(PDL, the decode kernels' launch attribute) makes a node dearer, it trades host time for GPU
time.  Cases, each captured in one graph:

  chain, PDL / no PDL     32 layers of the shipped decode kernels at 1 row (q+k+v with q/k norm
                          + RoPE, o_proj, gate/up + SwiGLU, down; attention stood in by one
                          elementwise kernel: 160 kernels), with PDL and with CONVGPT_PDL=0
  triton N / triton N PDL N launches of one small Triton kernel, without and with PDL
  torch N                 N launches of one small torch op

Host time: the median wall time of ``graph.replay()``, each replay waited for before the next
(so the launch never waits on a full queue); GPU time: per replay, from CUDA events.  The cases
alternate, ``--rounds`` times, and each figure is the median over the rounds with its min-max.

Usage (CUDA): python benchmarks/bench_graph_launch.py --out DIR   (nox -s bench-graph-launch -- --out DIR)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
import report  # noqa: E402
from bench_norm_linear import LAYERS, D, chain_case, chain_step  # noqa: E402

from convgpt_core.kernels import gdc_launch_dependents, gdc_wait, tl, triton  # noqa: E402

NODES = [32, 64, 128, 256, 512]
SWEEPS = {"triton": "triton {}", "triton PDL": "triton {} PDL", "torch": "torch {}"}  # kind: case name of N


def _bump_src(x_ptr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.arange(0, 128)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


def measure(graph, reps: int) -> tuple[float, float]:
    """(host us per replay, GPU us per replay)."""
    import torch

    host = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        host.append(time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return statistics.median(host) * 1e6, start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--profiled", action="store_true",
                    help="measure under torch.profiler (CPU + CUDA activities), as the engines' step traces do")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    say = report.tee(os.path.join(args.out, "graph_launch.txt"))
    dev, dt = torch.device("cuda"), torch.bfloat16

    layers, cos_sin = chain_case(dev, dt)
    h, res = torch.randn(1, D, device=dev).to(dt), torch.randn(1, D, device=dev).to(dt)
    pos = torch.tensor([77], device=dev)
    graphs = {}  # name -> (kernels, graph)
    for name, env in (("chain, PDL", None), ("chain, no PDL", "0")):
        if env is None:
            os.environ.pop("CONVGPT_PDL", None)
        else:
            os.environ["CONVGPT_PDL"] = env
        graphs[name] = (5 * LAYERS, report.captured(lambda: chain_step(layers, cos_sin, h, res, pos)))
    os.environ.pop("CONVGPT_PDL", None)

    bump = triton.jit(_bump_src)
    x = torch.zeros(128, device=dev)
    for n in NODES:
        for pdl in (False, True):
            def launches(n=n, pdl=pdl):
                for _ in range(n):
                    bump[(1,)](x, PDL=pdl, **({"launch_pdl": True} if pdl else {}))
            graphs[SWEEPS["triton PDL" if pdl else "triton"].format(n)] = (n, report.captured(launches))
        graphs[SWEEPS["torch"].format(n)] = (n, report.captured(lambda n=n: [x.add_(1) for _ in range(n)]))

    samples = {name: [] for name in graphs}
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) if args.profiled else contextlib.nullcontext():
        for _ in range(args.rounds):
            for name, (_, graph) in graphs.items():
                samples[name].append(measure(graph, args.reps))

    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; one CUDA graph a case, median of "
        f"{args.rounds} alternating rounds (min-max), each round the median of {args.reps} replays"
        + ("; under torch.profiler (CPU + CUDA)" if args.profiled else ""))
    say(f"{'case':<18}{'kernels':>8}{'host us':>10}{'min-max':>14}{'us/kernel':>10}{'GPU us':>9}")
    rows = []
    for name, (kernels, _) in graphs.items():
        host = [s[0] for s in samples[name]]
        gpu = statistics.median(s[1] for s in samples[name])
        med = statistics.median(host)
        rows.append(dict(case=name, kernels=kernels, host_us=host, gpu_us=gpu))
        say(f"{name:<18}{kernels:>8}{med:>10.1f}{f'{min(host):.1f}-{max(host):.1f}':>14}"
            f"{med / kernels:>10.2f}{gpu:>9.1f}")
    for kind, case in SWEEPS.items():  # least-squares slope of host us over kernels
        pts = [(n, statistics.median(s[0] for s in samples[case.format(n)])) for n in NODES]
        mx, my = statistics.mean(p[0] for p in pts), statistics.mean(p[1] for p in pts)
        slope = sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)
        say(f"{kind}: {slope:.2f} us a kernel, {my - slope * mx:.1f} us a launch")
        rows.append(dict(case=f"slope {kind}", us_per_kernel=slope, us_fixed=my - slope * mx))
    with open(os.path.join(args.out, "graph_launch.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
