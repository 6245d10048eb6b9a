"""End-to-end throughput of ConvGPT (published geometry) against its uncompressed Qwen3 twin,
on vLLM or SGLang, measured so that the ratio can be trusted.

Both models' engines are started side by side (the GPU memory split between them) through
the drivers of ``tests/drivers.py`` (offline engine, ``load_format="dummy"``, prefix/radix
cache off, no detokenization: the benchmark tokenizer is smaller than the models' vocab, and
turning ids it lacks into text costs ~45 us a token in the engine's front end; SGLang with
flashinfer attention on CUDA), then every measurement alternates
A/B/A/B ``--rounds`` times.  Reported per measurement: each model's median throughput and
the median of the per-round ratios ConvGPT / twin with its min-max.  Before every timed sample
the benchmark times a fixed piece of pure-Python work in its own process (the "host probe"):
the table shows its spread over the rounds and says when the host's speed varied by more than
a quarter, which makes every wall-clock ratio of that run doubtful (round 15: the twin's batch-256
decode at 26-37k tok/s where round 12's host gave 44-55k).  Two sources of noise the harness
itself made are gone since round 17: SGLang's idle scheduler polled its sockets in a busy loop, so
the engine waiting its turn kept a core busy beside the timed one (now it sleeps on them,
SGLang's ``sleep_on_idle``; ``--sglang-idle-spin`` for the old way), and Python's collector ran
inside timed samples in this process, where the engines' front ends run (now everything built
before the timing is frozen and the samples run without it, :class:`GCPauses`;
``--gc-in-timed-runs`` for the old way, with each sample's pauses recorded).  ``--b-env
CONVGPT_AA=1`` (a variable nothing reads) runs ConvGPT against itself: the harness's own spread.

* prefill: N x L-token prompts, 1 output token each -> prompt tokens / s;
* decode at batch B: B prompts of P tokens, T output tokens; decode tok/s = B * (T - 1) /
  (time(T tokens) - time(1 token)), i.e. the prefill is subtracted;
* the same at batch 1;
* vLLM only, "decode bB steady": B over the median gap between two of the engine's step
  outputs that both carry a further token of every request (its own step loop, which
  ``LLM.generate`` drives; each output's time stamped by the engine core when the step's tokens
  were out), i.e. a decode step with no prefill chunk in it.  The difference
  above holds every step the scheduler ran between the two runs' prefills, which it may split
  differently from run to run; the steady rows do not.

``--b-env VAR=VALUE`` (repeatable) puts ConvGPT itself in the twin's place, its engine started
with those variables (its processes inherit them): the same interleaved A/B for a switch of this
project, e.g. ``--b-env CONVGPT_PDL=0``; the table says so in its first line.

``--trace DIR`` adds kernel traces (the engine's own torch profiler; ``benchmarks/steptrace.py``
reads them).  A decode step is the difference of two profiled runs of the same requests,
17 tokens and 1 token, over 16: on the timed engines (CUDA graphs on) that gives the host
side of a step (CUDA runtime calls, CPU ops; on the H200 with torch 2.11 the profiler also
sees the kernels inside the graph replays); then each model is
started alone with CUDA graphs off (kernels launched one by one, the same compiled kernels)
for GPU-busy time, kernel count, attention share and GPU time per op class beside the
twin's, at batch B and 1, and one prefill's GPU time by op class.  The table puts the timed
rounds' wall time per step beside the GPU-busy time, from the timed engines' traces first where
they hold kernels (those engines tune Inductor's kernels as they ran; the graphs-off engines
tune some at their first, small step).  ``--timed-trace-only`` leaves the graphs-off engines
out; ``--rounds 0 --trace DIR --out JSON`` adds their traces to an earlier run's JSON.

Usage (a CUDA machine, the engine importable, tests/ on PYTHONPATH as nox sets it):
    python benchmarks/e2e.py --engine vllm --out benchmarks/results/e2e_vllm_h200.json [--trace DIR]
    python benchmarks/e2e.py --engine sglang --kv-cache-dtype fp8_e4m3 ...
    python benchmarks/e2e.py --engine vllm --quantization fp8 ...   # fp8 weights, both models
    # long context: 64 x (3840 + 256)-token sequences, decode only
    python benchmarks/e2e.py --engine vllm --prefill-n 0 --no-batch1 --batch 64 --decode-prompt 3840 \\
        --max-model-len 4352 --kv-cache-dtype fp8 --out ...
    python benchmarks/e2e.py --plot-only JSON PNG
On a machine without CUDA the engines run on the CPU: that checks the harness, not the speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("convgpt", "twin")


def write_models(root: str, layers: int | None = None) -> dict[str, str]:
    """config.json + tokenizer for ConvGPT (published) and its twin (Qwen3 at width H);
    ``layers`` overrides the depth of both (for a quick check of the harness on a CPU)."""
    from transformers import Qwen3Config

    from convgpt_core.config import ARCHITECTURE, PUBLISHED, ConvGPTConfig
    from convgpt_core.tiny import build_tokenizer

    tok = build_tokenizer(1024)
    p = dict(PUBLISHED, num_hidden_layers=layers or PUBLISHED["num_hidden_layers"])
    conv = ConvGPTConfig(**p, architectures=[ARCHITECTURE], dtype="bfloat16", eos_token_id=0)
    twin = Qwen3Config(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"], head_dim=p["head_dim"],
        max_position_embeddings=p["max_position_embeddings"], rope_theta=p["rope_theta"],
        tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"], dtype="bfloat16", eos_token_id=0,
    )
    out = {}
    for name, cfg in (("convgpt", conv), ("twin", twin)):
        path = os.path.join(root, name)
        cfg.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Bench:
    """One model's engine and its measurements (each call one timed sample)."""

    def __init__(self, path: str, args: argparse.Namespace, **settings) -> None:
        import torch

        import drivers

        t0 = time.perf_counter()
        self.engine = drivers.start(args.engine, path, engine_settings(args, **settings))
        self.start_s = time.perf_counter() - t0
        self.args = args
        self.gen = torch.Generator().manual_seed(0)

    def prompts(self, n: int, length: int) -> list[list[int]]:
        import torch

        return [torch.randint(10, 60000, (length,), generator=self.gen).tolist() for _ in range(n)]

    def timed(self, batch: list[list[int]], max_tokens: int) -> float:
        with GC_PAUSES.timing(collect=self.args.gc_in_timed_runs):
            _synchronize()
            t = time.perf_counter()
            self.engine.generate(batch, max_tokens)
            _synchronize()
            return time.perf_counter() - t

    def prefill(self, batch) -> float:
        return len(batch) * len(batch[0]) / self.timed(batch, 1)

    def decode(self, batch) -> float:
        """NaN where the one-token run took as long as the whole run (noise larger than the
        decode: too few ``--decode-tokens``); :func:`summary` leaves such rounds out."""
        tokens = self.args.decode_tokens
        dt = self.timed(batch, tokens) - self.timed(batch, 1)
        return len(batch) * (tokens - 1) / dt if dt > 0 else float("nan")

    def steady(self, batch) -> float:
        """Decode tok/s from the engine's steady steps alone: ``len(batch)`` over the median
        time between two step outputs in which every request got a token it was not the first
        (:func:`steady_step_s`; vLLM's step loop, ``drivers.VLLMDriver.step_marks``)."""
        return len(batch) / steady_step_s(self.engine.step_marks(batch, self.args.decode_tokens), len(batch))


class GCPauses:
    """Python's garbage collections in this process during timed samples.  The engine's front
    end runs here (vLLM's output processing, SGLang's tokenizer manager), so a collection pause
    inside a sample can stall the engine when it holds up handing in the requests or taking the
    last output.  With the collector on, a full collection of what the engines had built (421 ms,
    round 17) fell by the deterministic allocation order on the same sample of every run:
    ConvGPT's third batch-256 round on SGLang, the round that ran at half speed in rounds 15-17.
    After the warm-up, :func:`run` freezes what exists (``gc.freeze``: never scanned again) and
    the timed samples run with the collector off; ``--gc-in-timed-runs`` keeps it on, and the
    pauses are recorded per sample (``gc_ms``)."""

    def __init__(self) -> None:
        self.ms, self._t0, self._on = 0.0, 0.0, False
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if not self._on:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._t0) * 1e3

    @contextlib.contextmanager
    def timing(self, collect: bool):
        was = gc.isenabled()
        if not collect:
            gc.disable()
        self._on = True
        try:
            yield
        finally:
            self._on = False
            if was:
                gc.enable()

    def take(self) -> float:
        """The pause recorded since the last ``take``, ms."""
        ms, self.ms = self.ms, 0.0
        return ms


GC_PAUSES = GCPauses()
PROBE_SPREAD = 1.25  # slowest / fastest host probe of a measurement above which the table warns


def host_probe_ms() -> float:
    """ms for a fixed piece of pure-Python work on this process's CPU: its speed as the host
    gives it at that moment (the engines' own processes share the host, not this number)."""
    t = time.perf_counter()
    acc = 0
    for i in range(200_000):
        acc += i * i
    return (time.perf_counter() - t) * 1e3


def probe_line(probes: dict[str, list[float]]) -> str | None:
    """The host-probe summary of one measurement's samples (None without probes), with a
    warning when its slowest sample took more than PROBE_SPREAD x its fastest."""
    every = [v for n in MODELS for v in probes.get(n, [])]
    if not every:
        return None
    spread = max(every) / min(every)
    text = "  host probe ms, " + ", ".join(
        f"{n} {statistics.median(probes[n]):.1f} ({min(probes[n]):.1f}-{max(probes[n]):.1f})" for n in MODELS
        if probes.get(n))
    if spread > PROBE_SPREAD:
        text += f"; the host's speed varied {spread:.2f}x over the rounds: these wall ratios are doubtful"
    return text


def summary(samples: dict[str, list[float]]) -> dict:
    """Medians and the per-round ratio's median and min-max, over the rounds in which both
    models' throughputs are valid (finite, positive); the others are counted, not used."""
    rounds = [(c, t) for c, t in zip(samples["convgpt"], samples["twin"]) if 0 < c < math.inf and 0 < t < math.inf]
    if not rounds:
        raise RuntimeError(f"no round gave a valid throughput for both models: {samples}")
    ratios = [c / t for c, t in rounds]
    return {"tok_s": samples, "median_tok_s": {n: statistics.median(v) for n, v in zip(MODELS, zip(*rounds))},
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "invalid_rounds": len(samples["convgpt"]) - len(rounds)}


def steady_step_s(marks: list[tuple[float, int]], batch: int) -> float:
    """The median gap between consecutive step outputs that both carry a further token of all
    ``batch`` requests: a step with nothing but those requests' decode in it, no prefill
    chunk, no request joining or leaving (what ``decode`` cannot separate: it differences two
    runs whose prefill steps the scheduler may split differently)."""
    gaps = [t1 - t0 for (t0, n0), (t1, n1) in zip(marks, marks[1:]) if n0 == batch and n1 == batch]
    if not gaps:
        raise RuntimeError(f"no two consecutive decode steps of all {batch} requests in {len(marks)} step outputs")
    return statistics.median(gaps)


def engine_settings(args, **over):
    """The engine settings of every model of a run (both models get the same)."""
    import drivers

    return drivers.Settings(**dict(
        dtype=args.dtype, max_len=args.max_model_len, max_batch=args.batch, mem=args.gpu_mem / 2,
        prefix_cache=False, dummy=True, kv_cache_dtype=args.kv_cache_dtype, eager=False,
        quantization=args.quantization, chunk=args.chunk, detokenize=False, passes=tuple(args.vllm_pass),
        block=args.block_size, attn_splits=args.attn_splits, attn_backend=args.attention_backend,
        sleep_on_idle=not args.sglang_idle_spin, **over))


def measurements(args) -> list[tuple[str, str, int, int]]:
    """(name, kind, batch, prompt length) of the measurements this run makes."""
    out = []
    if args.prefill_n:
        out.append((f"prefill {args.prefill_n}x{args.prefill_len}", "prefill", args.prefill_n, args.prefill_len))
    batches = [args.batch] + ([] if args.no_batch1 else [1])
    for batch in batches:
        out.append((f"decode b{batch}", "decode", batch, args.decode_prompt))
    if args.engine == "vllm":  # its step loop is open to the benchmark; SGLang's offline engine's is not
        out += [(f"decode b{batch} steady", "steady", batch, args.decode_prompt) for batch in batches]
    return out


def b_env(args) -> dict[str, str]:
    """``--b-env VAR=VALUE`` as a dict (empty: the second model is the twin)."""
    pairs = [kv.partition("=") for kv in getattr(args, "b_env", None) or []]
    if any(not var or not eq for var, eq, _ in pairs):
        raise SystemExit(f"--b-env takes VAR=VALUE, got {args.b_env}")
    return {var: value for var, _, value in pairs}


@contextlib.contextmanager
def started_env(args, name: str):
    """The environment model ``name``'s engine starts in: with ``--b-env`` the twin's slot runs
    ConvGPT itself, its engine (and the processes it spawns: vLLM's engine core, SGLang's
    scheduler) started with those variables set; the benchmark's own environment is restored
    after."""
    env = b_env(args) if name == "twin" else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def model_paths(args, paths: dict[str, str]) -> dict[str, str]:
    """The checkpoint each slot runs: with ``--b-env`` both run ConvGPT's."""
    return dict(paths, twin=paths["convgpt"]) if b_env(args) else paths


def run(args, paths: dict[str, str]) -> dict:
    benches = {}
    paths = model_paths(args, paths)
    # side by side: both engines up before any timing; the first to start builds the kernels
    # both use (JIT caches on disk), so --twin-first swaps the order to show that in start times
    for name in MODELS[::-1] if args.twin_first else MODELS:
        profile = {"profile_dir": os.path.join(os.path.abspath(args.trace), f"{name}-graphs")} if args.trace else {}
        with started_env(args, name):
            benches[name] = Bench(paths[name], args, **profile)
        print(f"{name}: engine up in {benches[name].start_s:.0f} s", file=sys.stderr, flush=True)
    for b in benches.values():  # warm-up: every shape class once
        b.timed(b.prompts(4, 64), 8)
    if not args.gc_in_timed_runs:  # the engines' objects are never scanned again (GCPauses)
        gc.collect()
        gc.freeze()
    result = {"engine_start_s": {n: b.start_s for n, b in benches.items()}, "measurements": {}}
    for label, kind, batch, length in measurements(args):
        samples, probes, pauses = ({n: [] for n in MODELS} for _ in range(3))
        inputs = {n: b.prompts(batch, length) for n, b in benches.items()}
        for _ in range(args.rounds):  # A/B/A/B
            for n in MODELS:
                probes[n].append(host_probe_ms())
                GC_PAUSES.take()
                samples[n].append(getattr(benches[n], kind)(inputs[n]))
                pauses[n].append(GC_PAUSES.take())
        result["measurements"][label] = dict(summary(samples), host_probe_ms=probes, gc_ms=pauses)
        print(label, json.dumps(result["measurements"][label]), file=sys.stderr, flush=True)
    if args.trace:
        result["host_traces"] = host_traces(args, benches, os.path.abspath(args.trace))
    for b in benches.values():
        b.engine.stop()
    gc.unfreeze()  # the stopped engines' objects collectable again (GPU memory for what follows)
    gc.collect()
    return result


def profiled(b: Bench, folder: str, prompts: list[list[int]], tokens: int) -> str:
    """The trace file of one profiled ``generate`` (the same shapes run once before, untraced)."""
    import steptrace as tr

    b.timed(prompts, tokens)
    before = set(tr.trace_files(folder))
    b.engine.llm.start_profile()
    b.timed(prompts, tokens)
    b.engine.llm.stop_profile()
    return tr.wait_new_trace(folder, before)


def decode_trace(b: Bench, folder: str, batch: int, length: int, steps: int = 16) -> dict:
    """One decode step of ``batch`` requests from a trace of them generating ``steps`` + 1
    tokens: its decode-only steps where the engine marks its steps (vLLM,
    ``steptrace.annotated_decode_steps``), else the difference from a second trace of the same
    requests generating 1 token (``steptrace.decode_per_step``)."""
    import steptrace as tr

    prompts = b.prompts(batch, length)
    long = profiled(b, folder, prompts, steps + 1)
    stats = tr.annotated_decode_steps(long, batch)
    if stats is not None:
        return dict(stats, trace=[os.path.basename(long)])
    short = profiled(b, folder, prompts, 1)
    stats = tr.decode_per_step(tr.window(long), tr.window(short), steps)
    return dict(stats, trace=[os.path.basename(long), os.path.basename(short)])


def decode_batches(args) -> list[tuple[str, int]]:
    return [(f"decode_b{args.batch}", args.batch)] + ([] if args.no_batch1 else [("decode_b1", 1)])


def host_traces(args, benches: dict[str, Bench], trace_dir: str) -> dict:
    """A decode step with CUDA graphs on (the timed engines): CUDA runtime calls and CPU ops
    per step, and the kernels the profiler sees (on the H200 with torch 2.11 that includes
    the graph replays' kernels)."""
    out = {}
    for name, b in benches.items():
        for label, batch in decode_batches(args):
            stats = decode_trace(b, os.path.join(trace_dir, f"{name}-graphs"), batch, args.decode_prompt)
            out.setdefault(name, {})[label] = stats
            print(name, "graphs on", label, json.dumps(stats["runtime_per_step"][:6]), file=sys.stderr, flush=True)
    return out


def traces(args, paths: dict[str, str], trace_dir: str) -> dict:
    """Profile decode steps at batch B (and 1) and one prefill per model, one model at a
    time, on an engine with CUDA graphs off (the same kernels, launched one by one, so every
    kernel is seen whatever the profiler makes of graph replays)."""
    import steptrace as tr

    out = {}
    paths = model_paths(args, paths)
    for name in MODELS:
        folder = os.path.join(trace_dir, name)
        with started_env(args, name):
            b = Bench(paths[name], args, graphs=False, profile_dir=folder)
        b.timed(b.prompts(4, 64), 8)
        for label, batch in decode_batches(args):
            out.setdefault(name, {})[label] = stats = decode_trace(b, folder, batch, args.decode_prompt)
            print(name, label, json.dumps({k: stats[k] for k in ("busy_ms", "kernels", "attention_share")}),
                  file=sys.stderr, flush=True)
        file = profiled(b, folder, b.prompts(min(args.prefill_n or 32, 32), args.prefill_len), 1)
        out[name]["prefill"] = dict(tr.op_classes(tr.kernels(file)), trace=os.path.basename(file),
                                    cpu_ops=tr.top_host(tr.window(file)))  # where the host's time went
        b.engine.stop()
        del b
        gc.collect()
    return out


def wall_step_ms(result: dict, batch: int) -> dict[str, float]:
    """Each model's wall time per decode step at ``batch`` from the timed (CUDA-graph) rounds:
    the steady steps where measured, else the two runs' difference."""
    ms = result.get("measurements", {})
    m = ms.get(f"decode b{batch} steady") or ms.get(f"decode b{batch}")
    return {n: batch / summary(m["tok_s"])["median_tok_s"][n] * 1e3 for n in MODELS} if m else {}


def step_rows(data: dict, src: dict, title: str) -> list[str]:
    """Per decode step from one set of traces: GPU-busy, kernels, attention share and the
    timed rounds' wall time per model, then ConvGPT's GPU time per op class beside the twin's."""
    import steptrace as st

    lines = [f"per decode step: kernels from {title}; wall from the timed rounds",
             f"{'model, step':<24}{'GPU-busy ms':>12}{'kernels':>9}{'attention':>11}{'wall ms':>9}{'wall - busy':>13}"]
    for label in [k for k in src.get("convgpt", {}) if k.startswith("decode")]:
        walls = wall_step_ms(data["result"], int(label.split("_b")[1]))
        for name in MODELS:
            s = src.get(name, {}).get(label)
            if not s:
                continue
            wall = walls.get(name)
            tail = f"{wall:>9.3f}{wall - s['busy_ms']:>13.3f}" if wall else f"{'-':>9}{'-':>13}"
            lines.append(f"{name + ' ' + label:<24}{s['busy_ms']:>12.3f}{s['kernels']:>9.0f}"
                         f"{s['attention_share']:>10.0%}{tail}")
        c, t = src.get("convgpt", {}).get(label), src.get("twin", {}).get(label)
        if not (c and t and t["busy_ms"]):
            continue
        lines.append(f"  ConvGPT / twin GPU-busy per step: {c['busy_ms'] / t['busy_ms']:.2f}x; "
                     "per op class, us per step (ConvGPT vs twin):")

        def slower(a: float, b: float) -> bool:
            return a > 1.05 * b + 1

        def row(cls: str, a: float, b: float, flag: bool = True) -> str:
            return f"    {cls:<22}{a:>9.1f}{b:>9.1f}{'  <- slower' if flag and slower(a, b) else ''}"

        for cls in sorted(set(c["us_by_class"]) | set(t["us_by_class"]), key=lambda k: -t["us_by_class"].get(k, 0.0)):
            a, b = c["us_by_class"].get(cls, 0.0), t["us_by_class"].get(cls, 0.0)
            lines.append(row(cls, a, b, flag=cls not in st.FUSED_PARTS))
            if cls not in st.FUSED_PARTS and slower(a, b):  # the class's kernels side by side, where traced
                for name, s in (("convgpt", c), ("twin", t)):
                    ks = s.get("kernels_by_class", {}).get(cls)
                    if ks is not None:
                        lines.append(f"      {name}: " + ("; ".join(f"{k[:60]} {us:.1f}" for k, us in ks) or "none"))
        if st.FUSED_NORM_GEMM in c["us_by_class"]:  # judged together: what it replaces
            a, b = (sum(x["us_by_class"].get(k, 0.0) for k in st.FUSED_PARTS) for x in (c, t))
            lines.append(row("  norm+gemm+activation", a, b))
    return lines


def table(data: dict) -> str:
    m = data["result"]["measurements"]
    env = data["args"].get("b_env") or []
    lines = [f"'twin' below is ConvGPT itself, its engine started with {' '.join(env)} (--b-env)"] if env else []
    lines += [f"{'measurement':<22}{'ConvGPT tok/s':>15}{'twin tok/s':>13}{'ratio median':>14}{'min-max':>15}"]
    for label, r in m.items():
        r = summary(r["tok_s"])  # from the rounds, also for JSONs written before invalid rounds were left out
        c, t = r["median_tok_s"]["convgpt"], r["median_tok_s"]["twin"]
        lines.append(f"{label:<22}{c:>15,.0f}{t:>13,.0f}{r['ratio_median']:>14.2f}"
                     f"{r['ratio_min']:>8.2f}-{r['ratio_max']:.2f}"
                     + (f"  ({r['invalid_rounds']} invalid round(s) left out)" if r["invalid_rounds"] else ""))
        probe = probe_line(m[label].get("host_probe_ms", {}))
        if probe:
            lines.append(probe)
        pauses = m[label].get("gc_ms", {})
        if any(v >= 1.0 for n in MODELS for v in pauses.get(n, [])):  # --gc-in-timed-runs
            lines.append("  Python gc pauses in the timed samples, ms per round: " + ", ".join(
                f"{n} {' '.join(f'{v:.0f}' for v in pauses[n])}" for n in MODELS))
    starts = data["result"]["engine_start_s"]
    lines.append(f"engine start s: ConvGPT {starts['convgpt']:.0f}, twin {starts['twin']:.0f}; "
                 f"{data['args']['rounds']} interleaved rounds")
    tr = data["result"].get("traces") or {}
    host = data["result"].get("host_traces") or {}
    # The timed engines' own traces (CUDA graphs on) where the profiler saw their kernels
    # (H200, torch 2.11): what the timed rounds ran, Inductor's kernels tuned as they were
    # there.  The graphs-off engines tune some of Inductor's kernels at their first, small
    # step (round 10: one q/k-norm reduction 98 us a step there, 51 us in the timed engine).
    timed = {n: {k: v for k, v in steps.items() if v.get("kernels", 0) > 0} for n, steps in host.items()}
    for title, src in (("the timed engines, CUDA graphs on", timed), ("engines with CUDA graphs off", tr)):
        if any(k.startswith("decode") for k in src.get("convgpt", {})):
            lines += [""] + step_rows(data, src, title)
    for name in MODELS:
        s = tr.get(name, {}).get("prefill")
        if s:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(s["ms_by_class"].items(), key=lambda kv: -kv[1]))
            span = (f" in a {s['span_ms']:.1f} ms span, GPU idle {s['idle_ms']:.1f} ms" if "span_ms" in s
                    else "")  # results before round 7 have no span
            lines.append(f"{name} prefill GPU ms by op class (CUDA graphs off): total {s['total_ms']:.1f}{span}: {parts}")
            if s.get("cpu_ops"):  # from round 8 (nested ops counted in each)
                lines.append("    CPU ops (calls, ms): " + "; ".join(f"{n} x{c} {ms}" for n, c, ms in s["cpu_ops"]))
    if host:
        lines.append("")
        lines.append("a decode step with CUDA graphs on (the timed engines), per step: kernels and their GPU "
                     "time, CUDA runtime calls (calls, us), CPU ops (us, nested ops counted in each)")
        for label in host.get("convgpt", {}):
            for name in MODELS:
                s = host.get(name, {}).get(label)
                if not s:
                    continue
                calls = "; ".join(f"{n} x{c:g} {us:.0f}" for n, c, us in s["runtime_per_step"][:6])
                ops = "; ".join(f"{n} {us:.0f}" for n, _, us in s["cpu_ops_per_step"][:8])
                how = (f"{s['steps']} marked steps of {s['step_ms'] * 1e3:.0f} us (median)" if "step_ms" in s
                       else f"{s['steps']} steps as the difference of two runs")
                lines.append(f"{name + ' ' + label:<24}{s['kernels']:.0f} kernels, GPU-busy {s['busy_ms'] * 1e3:.0f} us, "
                             f"{how}; runtime: {calls}")
                lines.append(f"{'':<24}CPU ops: {ops}")
    return "\n".join(lines)


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(json_path))
    m = {k: summary(v["tok_s"]) for k, v in data["result"]["measurements"].items()}
    labels = list(m)
    med = [m[k]["ratio_median"] for k in labels]
    lo = [m[k]["ratio_median"] - m[k]["ratio_min"] for k in labels]
    hi = [m[k]["ratio_max"] - m[k]["ratio_median"] for k in labels]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(labels))
    ax.bar(xs, med, yerr=[lo, hi], capsize=6, color=["#3b7dd8" if r >= 1 else "#d8553b" for r in med])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(xs), labels)
    env = data["args"].get("b_env") or []
    ax.set_ylabel(f"ConvGPT / ConvGPT with {' '.join(env)}" if env else "ConvGPT / uncompressed twin (throughput)")
    meta = data["meta"]
    ax.set_title(f"{meta['engine']} {meta['version']}, {meta['gpu']}, {data['args']['dtype']}, "
                 f"KV {data['args']['kv_cache_dtype']}\nmedian of {data['args']['rounds']} A/B rounds, min-max")
    for x, r in zip(xs, med):
        ax.text(x, r, f"{r:.2f}x", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    ap.add_argument("--out", help="JSON to write (default benchmarks/results/e2e_ENGINE.json); a .txt table beside it")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--quantization", help="weight quantization of both models, e.g. fp8")
    ap.add_argument("--chunk", type=int, help="prefill token budget per engine step (both models)")
    ap.add_argument("--block-size", type=int, help="KV block (page) size of both models; default: the engine's")
    ap.add_argument("--attn-splits", type=int, metavar="N",
                    help="vLLM: the most KV splits FlashAttention may use in a CUDA-graphed decode step, both "
                         "models (attention_config.flash_attn_max_num_splits_for_cuda_graph; vLLM's default 32)")
    ap.add_argument("--attention-backend", metavar="NAME",
                    help="the engine's attention backend for both models, by the engine's name for it (vLLM: "
                         "attention_config.backend, e.g. FLASHINFER; SGLang: attention_backend); default: the "
                         "engine's (vLLM on Hopper: FLASH_ATTN), on SGLang the driver's (flashinfer)")
    ap.add_argument("--twin-first", action="store_true", help="start the twin's engine before ConvGPT's")
    ap.add_argument("--vllm-pass", action="append", default=[], metavar="NAME",
                    help="switch on a vLLM compile pass for both models (pass_config), e.g. enable_qk_norm_rope_fusion")
    ap.add_argument("--prefill-n", type=int, default=256)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-mem", type=float, default=0.85, help="GPU memory fraction for both engines together")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved A/B rounds per measurement; 0 with --trace: add traces to the --out file")
    ap.add_argument("--no-batch1", action="store_true", help="skip the batch-1 decode measurement")
    ap.add_argument("--layers", type=int, help="override both models' depth (harness checks on a CPU)")
    ap.add_argument("--trace", metavar="DIR",
                    help="then profile decode steps and a prefill of each model (traces kept in DIR)")
    ap.add_argument("--timed-trace-only", action="store_true",
                    help="with --trace: trace the timed engines only (no engines with CUDA graphs off)")
    ap.add_argument("--b-env", action="append", default=[], metavar="VAR=VALUE",
                    help="instead of the twin, run ConvGPT a second time with VAR=VALUE in its engine's environment "
                         "(an A/B of a switch, e.g. CONVGPT_PDL=0); repeatable")
    ap.add_argument("--sglang-idle-spin", action="store_true",
                    help="SGLang's idle scheduler as it comes, polling in a busy loop (before round 17); by "
                         "default it sleeps on its sockets, so the idle engine leaves the host to the timed one")
    ap.add_argument("--gc-in-timed-runs", action="store_true",
                    help="leave Python's collector on in timed samples, nothing frozen after the warm-up "
                         "(as before round 17); each sample records its collections' pause (GCPauses)")
    ap.add_argument("--plot-only", nargs=2, metavar=("JSON", "PNG"))
    ap.add_argument("--table-only", metavar="JSON", help="print the table of an earlier result")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.attn_splits is not None and args.engine != "vllm":
        raise SystemExit("--attn-splits is a vLLM setting (its FlashAttention backend's)")
    if args.plot_only:
        plot(*args.plot_only)
        return
    if args.table_only:
        print(table(json.load(open(args.table_only))))
        return
    import importlib

    import torch

    version = importlib.import_module(args.engine).__version__
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"e2e_{args.engine}.json")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    data = {"args": vars(args), "meta": {"engine": args.engine, "version": version, args.engine: version,
                                         "torch": torch.__version__, "gpu": gpu, "argv": sys.argv}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_models(tmp, args.layers)
        if args.rounds:
            data["result"] = run(args, paths)
        else:  # traces for an earlier run's measurements
            data = json.load(open(args.out))
            data["meta"]["trace_argv"] = sys.argv
        if args.trace and not args.timed_trace_only:
            data["result"]["traces"] = traces(args, paths, os.path.abspath(args.trace))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=2)
    text = table(data)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
        f.write(f"$ {' '.join(sys.argv)}\n{data['meta']}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
