"""What the micro-benchmarks share: their printed output and CUDA-graph capture."""

from __future__ import annotations


def tee(path: str):
    """A ``say(line)`` that prints the line and writes it to ``path`` (created anew), flushed at
    once, so that a run cut short leaves every line it printed."""
    out = open(path, "w")

    def say(line: str) -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    return say


def captured(fn, warmup: int = 2):
    """``fn`` captured in a CUDA graph, after ``warmup`` calls on a side stream (Triton's
    compiles and cuBLAS's workspace happen there, not in the capture)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph
