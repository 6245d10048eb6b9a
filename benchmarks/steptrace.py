"""Read torch-profiler chrome traces of an engine (vLLM's or SGLang's profiler) into step
statistics: where one model step's time goes.

Decode steps on vLLM (:func:`annotated_decode_steps`): one trace, cut at the worker's step
marks; the decode-only steps' host time and the kernels it launched.  Any engine
(:func:`decode_per_step`): two traces of the same requests, one generating N tokens and one
generating 1 (the prefill alone); their difference divided by N - 1 is one decode step (exact
only when both runs schedule their prefill alike).  Either way: GPU-busy time (kernel
durations), kernel count, attention share, GPU time per op class and per kernel, and on the
host side the CUDA runtime calls (``cudaLaunchKernel``, ``cudaGraphLaunch``, copies,
synchronisations) and CPU ops per step.
Kernel statistics come from engines with graphs off (every kernel launched on its own; some
profiler/driver combinations miss the kernels inside graph replays); traces of engines with
graphs on say what the host does per step (graph launches, kernels launched outside the
graph, the step's CPU work).
Per prefill (:func:`op_classes`): GPU time by op class.

Per launch (:func:`follows`): every launch of one kernel by the kernel that ran before it, its
duration, and how much of it overlapped that kernel (a launch programmatic dependent launch let
start early waits inside its duration until the one before it lets it go on).

Usage: python benchmarks/steptrace.py --steps TRACE.json BATCH              (vLLM decode, per step)
       python benchmarks/steptrace.py --diff TRACE_N.json TRACE_1.json N   (decode, per step)
       python benchmarks/steptrace.py TRACE.json[.gz] --prefill             (a prefill, by op class)
       python benchmarks/steptrace.py --follows TRACE.json NAME             (NAME's launches, by predecessor)
"""

from __future__ import annotations

import gzip
import json
import os
import re
import statistics
import sys
import time

ATTENTION = re.compile(r"flash|fmha|attn|attention|paged|batchdecode|batchprefill|mha|decode_kernel|prefill_kernel",
                       re.IGNORECASE)
CLASSES = [  # (class, pattern), first match wins
    ("attention", ATTENTION),
    (FUSED_NORM_GEMM := "norm+gemm (fused)", re.compile(r"norm_linear")),  # convgpt_core.norm_linear
    ("gemm", re.compile(r"gemm|cutlass|nvjet|cublas|matmul|sm90_xmma|wgmma|splitk|triton_.*mm|narrow_linear",
                        re.IGNORECASE)),  # narrow_linear: convgpt_core.narrow_linear
    # the engine's own per-step input preparation and sampling bookkeeping (vLLM's model runner:
    # block tables, slot mappings, positions, the sampled tokens), the same for every model
    ("step bookkeeping", re.compile(r"block_tables|slot_mapping|pos_seq_lens|post_update|sampled_and_",
                                    re.IGNORECASE)),
    # the models' input side (the engine's embedding kernel may carry the first RMSNorm fused in)
    ("compressor/embedding", re.compile(r"compress|embedding|index_select|gather", re.IGNORECASE)),
    ("norm", re.compile(r"rms|norm", re.IGNORECASE)),
    ("rope", re.compile(r"rotary|rope", re.IGNORECASE)),
    ("activation", re.compile(r"silu|act_and_mul|gelu", re.IGNORECASE)),
    ("kv-cache write", re.compile(r"reshape_and_cache|store_kv|set_kv|kv_cache|cache_kernel", re.IGNORECASE)),
    ("sampling/logits", re.compile(r"softmax|argmax|topk|sampl|log_softmax", re.IGNORECASE)),
    # (to_float32: convgpt_core.logits's cast of the logits, where the engine's is a copy kernel)
    ("copy/elementwise", re.compile(r"elementwise|copy|cat|fill|memcpy|memset|vectorized|reduce|to_float32",
                                    re.IGNORECASE)),
]
# the classes whose work the fused kernel does: compared with the twin's as one sum
FUSED_PARTS = (FUSED_NORM_GEMM, "gemm", "norm", "activation")


def trace_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".json", ".json.gz"))]


def wait_new_trace(folder: str, before: set[str], timeout: float = 300) -> str:
    """The trace file that appeared in ``folder`` since ``before``, once its size is stable."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = sorted(set(trace_files(folder)) - before, key=os.path.getmtime)
        if new:
            size = -1
            while size != os.path.getsize(new[-1]):
                size = os.path.getsize(new[-1])
                time.sleep(2)
            return new[-1]
        time.sleep(1)
    raise TimeoutError(f"no new trace in {folder} within {timeout:.0f} s")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)
    return events.get("traceEvents", events) if isinstance(events, dict) else events


def kernels(path: str) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every GPU kernel, by start time."""
    out = [(float(e["ts"]), float(e.get("dur", 0.0)), e.get("name", ""))
           for e in load(path) if e.get("cat") == "kernel" and e.get("ph") == "X"]
    return sorted(out)


HOST_CATEGORIES = {"cuda_runtime": "runtime", "cuda_driver": "runtime", "cpu_op": "cpu", "user_annotation": "cpu"}


def window(path: str) -> dict:
    """Totals of one profiled window: GPU kernels (time, count, by class, by name) and host
    events (CUDA runtime/driver calls and CPU ops by name: [count, us])."""
    return _totals(load(path))


def _totals(events, keep=lambda e: True) -> dict:
    """:func:`window`'s totals over the complete events for which ``keep`` is true.

    ``busy_us`` is the time at least one kernel ran (the union of their spans): kernels
    launched with programmatic dependent launch start while the kernel before them finishes,
    so their spans overlap.  The per-class and per-kernel times add each kernel's whole span,
    the time such a kernel waited included."""
    out = {"busy_us": 0.0, "kernels": 0, "attention_us": 0.0, "by_class": {}, "by_kernel": {}, "runtime": {}, "cpu": {}}
    spans = []
    for e in events:
        if e.get("ph") != "X" or not keep(e):
            continue
        cat, name, dur = e.get("cat"), e.get("name", ""), float(e.get("dur", 0.0))
        if cat == "kernel":
            spans.append((float(e.get("ts", 0.0)), dur))
            out["kernels"] += 1
            out["attention_us"] += dur if ATTENTION.search(name) else 0.0
            cls = op_class(name)
            out["by_class"][cls] = out["by_class"].get(cls, 0.0) + dur
            out["by_kernel"][name[:120]] = out["by_kernel"].get(name[:120], 0.0) + dur
        elif cat in HOST_CATEGORIES:  # step annotations carry the step's sizes: one name for all
            key = re.sub(r"\d+", "#", name) if cat == "user_annotation" else name
            slot = out[HOST_CATEGORIES[cat]].setdefault(key[:120], [0, 0.0])
            slot[0] += 1
            slot[1] += dur
    out["busy_us"] = _union(spans)
    return out


def _union(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, duration) spans."""
    total, end = 0.0, float("-inf")
    for t0, dur in sorted(spans):
        t1 = t0 + dur
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total


# vLLM's worker names each step's execute_model range by what it holds:
# execute_context_<requests>(<tokens>)_generation_<requests>(<tokens>), or with its detailed
# annotations execute_<all tokens>_context_<requests>(sq<tokens>sk...)_generation_<requests>(sq<tokens>sk...).
STEP_NAME = re.compile(r"^execute_(?:\d+_)?context_(\d+)\((?:sq)?(\d+)\D.*_generation_(\d+)\((?:sq)?(\d+)\D")


def _step_sizes(name: str) -> tuple[int, int, int, int] | None:
    m = STEP_NAME.match(name + "|")  # "|": the simple form ends at its last ")"
    return tuple(int(g) for g in m.groups()) if m else None


def annotated_decode_steps(path: str, batch: int, top: int = 25) -> dict | None:
    """One decode step of ``batch`` requests from a single trace, cut where vLLM's worker marks
    its steps (None when the trace has fewer than two such steps, e.g. SGLang's, or kernels
    without a correlation id).

    A step is the host time from the start of one decode-only step's mark (no prompt tokens,
    ``batch`` requests generating one token each) to the start of the next step's mark: its
    ``execute_model``, its sampling and whatever the worker does before the next step.  Its GPU
    work is the kernels launched in that time (the profiler gives a kernel the correlation id of
    the CUDA call that launched it, a graph replay's kernels that of ``cudaGraphLaunch``), where
    they ran.  Prefill steps and steps mixing prefill with decode are left out, which the
    difference of two runs (:func:`decode_per_step`) cannot do when the longer run's decode
    steps join its later prefill chunks.  Averages over the steps; ``step_ms`` is their median
    length on the host."""
    events = [e for e in load(path) if e.get("ph") == "X"]
    marks = sorted((float(e["ts"]), sizes) for e in events
                   if e.get("cat") == "user_annotation" and (sizes := _step_sizes(e.get("name", ""))))
    decode = (0, 0, batch, batch)
    spans = [(t0, t1) for (t0, sizes), (t1, _) in zip(marks, marks[1:]) if sizes == decode]
    if len(spans) < 2:
        return None

    if any(e.get("cat") == "kernel" and "correlation" not in e.get("args", {}) for e in events):
        return None  # kernels this reader cannot tie to their launches

    def span_of(ts: float) -> int | None:
        return next((i for i, (t0, t1) in enumerate(spans) if t0 <= ts < t1), None)

    launched = {e.get("args", {}).get("correlation"): span_of(float(e["ts"])) for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    launched.pop(None, None)

    def in_steps(e: dict) -> bool:  # a kernel by its launch, a host event by its own time
        if e.get("cat") == "kernel":
            return launched.get(e.get("args", {}).get("correlation")) is not None
        return span_of(float(e["ts"])) is not None

    # the steps' totals over their number: the difference from nothing
    step = decode_per_step(_totals(events, in_steps), _totals([]), len(spans), top)
    return dict(step, method="annotated steps", step_ms=statistics.median(t1 - t0 for t0, t1 in spans) / 1e3)


def decode_per_step(long: dict, short: dict, steps: int, top: int = 25) -> dict:
    """One decode step: (``long`` - ``short``) / ``steps``, where ``long`` and ``short`` are
    :func:`window` totals of the same requests generating ``steps`` + 1 tokens and 1 token."""
    def diff(a: dict, b: dict) -> dict:
        return {k: (v - b.get(k, 0.0)) / steps for k, v in a.items()}

    busy = (long["busy_us"] - short["busy_us"]) / steps
    by_kernel = diff(long["by_kernel"], short["by_kernel"])
    ranked = [(n, round(v, 2)) for n, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])
              if round(v, 2) > 0]  # kernels of the prefill alone cancel out
    by_class: dict[str, list] = {}
    for n, v in ranked:
        by_class.setdefault(op_class(n), []).append([n, v])

    def host(kind: str) -> list:
        rows = {n: [(c - short[kind].get(n, [0, 0.0])[0]) / steps, (us - short[kind].get(n, [0, 0.0])[1]) / steps]
                for n, (c, us) in long[kind].items()}
        ranked = sorted(rows.items(), key=lambda kv: -kv[1][1])[:top]
        return [[n, round(c, 2), round(us, 1)] for n, (c, us) in ranked if c > 0.5 or us > 1.0]

    return {
        "steps": steps,
        "method": "difference of two runs",
        "busy_ms": busy / 1e3,
        "kernels": (long["kernels"] - short["kernels"]) / steps,
        "attention_share": (long["attention_us"] - short["attention_us"]) / steps / busy if busy > 0 else 0.0,
        "us_by_class": diff(long["by_class"], short["by_class"]),
        "top_kernels_us": [[n, v] for n, v in ranked[:top]],
        "kernels_by_class": by_class,  # every kernel of the step, us per step, longest first
        "runtime_per_step": host("runtime"),  # [name, calls, us]
        "cpu_ops_per_step": host("cpu"),
    }


def top_host(win: dict, kind: str = "cpu", top: int = 12) -> list:
    """The ``top`` host events of a :func:`window` (``kind`` "cpu" or "runtime") by total time:
    [name, calls, ms], longest first; a prefill's view of where the host spent its time."""
    ranked = sorted(win[kind].items(), key=lambda kv: -kv[1][1])[:top]
    return [[n, c, round(us / 1e3, 3)] for n, (c, us) in ranked]


def op_class(name: str) -> str:
    return next((cls for cls, pattern in CLASSES if pattern.search(name)), "other")


def op_classes(ks: list[tuple[float, float, str]]) -> dict:
    """GPU ms by op class over the whole trace (a prefill), the ten longest kernels, and the
    span from the first kernel's start to the last one's end with the time in it when no
    kernel ran (``idle_ms``: the GPU waiting for the host, profiler overhead included)."""
    by: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for _, dur, name in ks:
        by[op_class(name)] = by.get(op_class(name), 0.0) + dur / 1e3
        by_name[name] = by_name.get(name, 0.0) + dur / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    covered, reach = 0.0, None  # the union of the kernels' intervals (streams may overlap)
    for start, dur, _ in ks:  # by start time
        end = start + dur
        if reach is None or start >= reach:
            covered += dur
            reach = end
        elif end > reach:
            covered += end - reach
            reach = end
    span = (reach - ks[0][0]) / 1e3 if ks else 0.0
    return {"total_ms": sum(by.values()), "ms_by_class": by, "kernels": len(ks),
            "span_ms": span, "idle_ms": span - covered / 1e3,
            "top_kernels_ms": [[n[:120], round(v, 3)] for n, v in top]}


def launches(ks: list[tuple[float, float, str]], name: str) -> list[tuple[str, float, float]]:
    """Each launch of the kernels whose name contains ``name`` among ``ks`` (:func:`kernels`), in
    order: the name of the kernel that started before it, its duration, and the part of that
    spent while the kernel before still ran (the early start programmatic dependent launch
    allows: the kernel waits there for the one before it); us."""
    return [(n0, d1, min(d1, max(0.0, t0 + d0 - t1))) for (t0, d0, n0), (t1, d1, n1) in zip(ks, ks[1:]) if name in n1]


def follows(ks: list[tuple[float, float, str]], name: str) -> dict[str, dict]:
    """:func:`launches` grouped by the kernel before each: how many, and the medians of their
    duration, of the part that overlapped that kernel, and of the rest (their own time)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for prev, d, overlapped in launches(ks, name):
        groups.setdefault(prev, []).append((d, overlapped))
    return {prev: {"launches": len(v), "us": statistics.median(d for d, _ in v),
                   "overlapped_us": statistics.median(o for _, o in v),
                   "own_us": statistics.median(d - o for d, o in v)}
            for prev, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))}


if __name__ == "__main__":
    if sys.argv[1] == "--steps" and len(sys.argv) == 4:
        print(json.dumps(annotated_decode_steps(sys.argv[2], int(sys.argv[3])), indent=2))
    elif sys.argv[1] == "--diff" and len(sys.argv) == 5:
        print(json.dumps(decode_per_step(window(sys.argv[2]), window(sys.argv[3]), int(sys.argv[4]) - 1), indent=2))
    elif sys.argv[1] == "--follows" and len(sys.argv) == 4:
        print(json.dumps(follows(kernels(sys.argv[2]), sys.argv[3]), indent=2))
    elif len(sys.argv) == 3 and sys.argv[2] == "--prefill":
        print(json.dumps(op_classes(kernels(sys.argv[1])), indent=2))
    else:
        sys.exit(__doc__)
