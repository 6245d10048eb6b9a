"""The decode-step reader behind the benchmarks' per-step numbers (benchmarks/steptrace.py):
on vLLM a step is cut from one trace at the worker's step marks; elsewhere it is what a run of
N + 1 tokens has beyond a run of 1 token, divided by N."""

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import steptrace  # noqa: E402

PREFILL = [("gemm_big_nvjet", 300.0), ("flash_fwd_prefill", 120.0), ("triton_red_fused_rms_norm", 8.0)]
STEP = [("nvjet_tst_64x8", 4.0), ("flash_fwd_splitkv", 6.0), ("triton_poi_fused_mul_silu", 1.5),
        ("triton_per_fused_add_rms_norm", 2.5), ("_gumbel_sample_kernel", 1.0)]


def _trace(path: Path, tokens: int) -> str:
    """A profiler trace of one prefill and ``tokens`` - 1 decode steps, each step launched by one
    cudaGraphLaunch and annotated with its sizes, as the engines' profilers write them."""
    events, t = [], 0.0
    for step in range(tokens):
        events.append({"ph": "X", "cat": "user_annotation", "name": f"execute_context_0(0)_generation_{step}(1)",
                       "ts": t, "dur": 50.0})
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t, "dur": 20.0})
        for name, dur in PREFILL if step == 0 else STEP:
            events.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur})
            t += dur + 1.0
        t += 30.0
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    return str(path)


def test_decode_step_is_the_difference_of_two_runs_over_the_extra_tokens(tmp_path):
    step = steptrace.decode_per_step(steptrace.window(_trace(tmp_path / "long.json.gz", 17)),
                                     steptrace.window(_trace(tmp_path / "short.json.gz", 1)), 16)
    busy = sum(d for _, d in STEP)
    assert step["kernels"] == len(STEP)
    assert abs(step["busy_ms"] - busy / 1e3) < 1e-12
    assert abs(step["attention_share"] - 6.0 / busy) < 1e-12
    assert dict(step["top_kernels_us"]) == dict(STEP)
    assert step["us_by_class"]["gemm"] == 4.0 and step["us_by_class"]["norm"] == 2.5
    assert step["us_by_class"]["sampling/logits"] == 1.0 and step["us_by_class"]["attention"] == 6.0
    # every kernel of the step under its class, the class's time their sum
    listed = {cls: dict(ks) for cls, ks in step["kernels_by_class"].items()}
    assert {n: us for ks in listed.values() for n, us in ks.items()} == dict(STEP)
    assert {cls: sum(ks.values()) for cls, ks in listed.items()} == step["us_by_class"]
    # one graph launch and one annotated step per step; the annotation's numbers folded into one name
    assert ["cudaGraphLaunch", 1.0, 20.0] in step["runtime_per_step"]
    assert ["execute_context_#(#)_generation_#(#)", 1.0, 50.0] in step["cpu_ops_per_step"]


def test_prefill_op_classes_cover_every_kernel(tmp_path):
    ks = steptrace.kernels(_trace(tmp_path / "prefill.json.gz", 1))
    got = steptrace.op_classes(ks)
    assert got["kernels"] == len(PREFILL)
    assert abs(got["total_ms"] - sum(d for _, d in PREFILL) / 1e3) < 1e-12
    assert got["ms_by_class"] == {"gemm": 0.3, "attention": 0.12, "norm": 0.008}


def test_prefill_span_and_idle_time():
    # kernels at 0-100 us and 150-250 us, one inside the second (another stream), one at 300-310:
    # a 310 us span with 210 us covered, 100 us with no kernel running
    ks = [(0.0, 100.0, "nvjet_gemm"), (150.0, 100.0, "flash_fwd"), (160.0, 20.0, "rms_norm"), (300.0, 10.0, "silu")]
    got = steptrace.op_classes(ks)
    assert abs(got["span_ms"] - 0.310) < 1e-12 and abs(got["idle_ms"] - 0.100) < 1e-12
    assert abs(got["total_ms"] - 0.230) < 1e-12  # kernel time summed, overlap counted twice
    assert steptrace.op_classes([])["span_ms"] == 0.0


def test_prefill_host_time_is_ranked_by_event(tmp_path):
    # three steps: three annotations (one name, 50 us each) and three graph launches (20 us each)
    win = steptrace.window(_trace(tmp_path / "t.json.gz", 3))
    assert steptrace.top_host(win) == [["execute_context_#(#)_generation_#(#)", 3, 0.15]]
    assert steptrace.top_host(win, "runtime") == [["cudaGraphLaunch", 3, 0.06]]
    win["cpu"]["aten::mm"] = [7, 400.0]
    assert [n for n, _, _ in steptrace.top_host(win)] == ["aten::mm", "execute_context_#(#)_generation_#(#)"]
    assert steptrace.top_host(win, top=1) == [["aten::mm", 7, 0.4]]


def test_fused_norm_linear_kernels_have_their_own_class():
    # the Triton kernels of convgpt_core.norm_linear are named after their source functions
    from convgpt_core import logits, narrow_linear, norm_linear

    assert steptrace.op_class(norm_linear._norm_linear_src.__name__) == steptrace.FUSED_NORM_GEMM
    assert steptrace.op_class(norm_linear._silu_mul_src.__name__) == "activation"
    assert steptrace.op_class(narrow_linear._narrow_linear_src.__name__) == "gemm"  # o_proj, down
    assert steptrace.op_class("triton_per_fused_add_rms_norm_0") == "norm"
    # the logits' float32 cast, where the engine's own is a copy kernel
    assert steptrace.op_class(logits._to_float32_src.__name__) == "copy/elementwise"
    assert steptrace.FUSED_NORM_GEMM in steptrace.FUSED_PARTS and "gemm" in steptrace.FUSED_PARTS


def test_engine_bookkeeping_is_not_counted_as_the_compressors():
    # vLLM's model runner prepares every step's inputs and sampled tokens with kernels of its own,
    # the same for both models; the compressor/embedding class holds the models' input side
    from convgpt_core import kernels

    for name in ("_gather_block_tables_kernel", "_compute_slot_mappings_kernel", "_prepare_pos_seq_lens_kernel",
                 "_post_update_kernel", "_combine_sampled_and_draft_tokens_kernel",
                 "_get_num_sampled_and_rejected_kernel"):
        assert steptrace.op_class(name) == "step bookkeeping", name
    # ConvGPT's compressor and compressed-table lookup; the twin's embedding, fused by Inductor with
    # its first RMSNorm (ConvGPT's first norm is in its fused q+k+v kernel)
    for name in (kernels._compress_kernel_src.__name__, "triton_poi_fused__to_copy_clamp_embedding_0",
                 "triton_red_fused__to_copy_embedding_rms_norm_0"):
        assert steptrace.op_class(name) == "compressor/embedding", name


def test_benchmark_table_reads_the_timed_engines_first(tmp_path):
    # e2e.py's table: per-step GPU-busy and op classes from the timed engines' traces (CUDA graphs
    # on) where the profiler saw their kernels, then from the graphs-off engines; an old result whose
    # graphs-on traces hold no kernels gets the graphs-off block alone
    import e2e

    def step(scale: float) -> dict:
        long, short = (_trace(tmp_path / f"{n}-{scale}.json.gz", t) for n, t in (("long", 17), ("short", 1)))
        s = steptrace.decode_per_step(steptrace.window(long), steptrace.window(short), 16)
        return dict(s, busy_ms=s["busy_ms"] * scale, us_by_class={k: v * scale for k, v in s["us_by_class"].items()})

    timed = {"convgpt": {"decode_b8": step(1.0)}, "twin": {"decode_b8": step(2.0)}}
    off = {"convgpt": {"decode_b8": step(3.0)}, "twin": {"decode_b8": step(2.0)}}
    result = {"measurements": {"decode b8": {"tok_s": {"convgpt": [7000.0, 8000.0, 9000.0],
                                                       "twin": [4000.0, 3000.0, 5000.0]}}},
              "engine_start_s": {"convgpt": 1.0, "twin": 1.0}, "host_traces": timed, "traces": off}
    text = e2e.table({"args": {"rounds": 5}, "result": result})
    blocks = text.split("per decode step: kernels from ")[1:]
    assert [b.split(";")[0] for b in blocks] == ["the timed engines, CUDA graphs on", "engines with CUDA graphs off"]
    assert "GPU-busy per step: 0.50x" in blocks[0] and "GPU-busy per step: 1.50x" in blocks[1]
    assert "<- slower" not in blocks[0] and "<- slower" in blocks[1]
    # a class flagged slower is followed by both models' kernels in it
    lines = blocks[1].splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["attention"])
    assert lines[at].endswith("<- slower")
    assert [s.strip() for s in lines[at + 1:at + 3]] == ["convgpt: flash_fwd_splitkv 6.0", "twin: flash_fwd_splitkv 6.0"]
    wall = f"{8 / 8000 * 1e3:>9.3f}"  # batch 8 at 8000 tok/s: 1 ms a step
    assert any(line.startswith("convgpt decode_b8") and wall in line for line in blocks[0].splitlines())

    for s in timed.values():
        s["decode_b8"]["kernels"] = 0  # a profiler that does not see inside graph replays
    text = e2e.table({"args": {"rounds": 5}, "result": result})
    assert text.count("per decode step: kernels from ") == 1 and "from engines with CUDA graphs off" in text


def test_steady_decode_step_is_the_median_gap_between_full_decode_steps():
    # step outputs of 3 requests: two prefill steps (first tokens: 0, then 1 request continuing),
    # then decode steps 10 ms apart with one 50 ms outlier, the last step after one request ended
    import e2e

    marks = [(0.0, 0), (0.030, 1), (0.040, 3), (0.050, 3), (0.100, 3), (0.110, 3), (0.120, 3), (0.125, 2)]
    assert abs(e2e.steady_step_s(marks, 3) - 0.010) < 1e-12
    assert abs(e2e.steady_step_s(marks[:4], 3) - 0.010) < 1e-12  # only 0.040 -> 0.050 counts
    with pytest.raises(RuntimeError, match="no two consecutive decode steps of all 3 requests"):
        e2e.steady_step_s(marks[:3], 3)


def test_rounds_without_a_valid_throughput_are_left_out_of_the_ratio():
    # a differenced decode whose one-token run took longer than the whole run has no throughput
    # (NaN; round 11's SGLang run had printed a negative one as a ratio of -0.46): the median and
    # min-max come from the other rounds, the table says how many were left out
    import e2e

    samples = {"convgpt": [100.0, float("nan"), 300.0, -50.0, 200.0], "twin": [100.0, 100.0, 200.0, 100.0, 50.0]}
    r = e2e.summary(samples)
    assert r["invalid_rounds"] == 2
    assert (r["ratio_median"], r["ratio_min"], r["ratio_max"]) == (1.5, 1.0, 4.0)
    assert r["median_tok_s"] == {"convgpt": 200.0, "twin": 100.0}
    data = {"args": {"rounds": 5}, "result": {"measurements": {"decode b8": {"tok_s": samples}},
                                              "engine_start_s": {"convgpt": 1.0, "twin": 1.0}}}
    row = e2e.table(data).splitlines()[1]
    assert row.split()[:6] == ["decode", "b8", "200", "100", "1.50", "1.00-4.00"]
    assert "2 invalid round(s) left out" in row
    with pytest.raises(RuntimeError, match="no round gave a valid throughput"):
        e2e.summary({"convgpt": [float("nan")], "twin": [1.0]})


def _marked_trace(path: Path, batch: int, decode_steps: int, period: float) -> str:
    """vLLM's view of a run: a prefill step, a step mixing prefill with decode, ``decode_steps``
    decode-only steps of ``batch`` requests ``period`` us apart on the host (each one graph replay
    and a sampling kernel launched after the step's mark ends; the GPU runs behind the host, so a
    step's kernels run in the next step's host time), then a step with one request fewer."""
    events, corr = [], iter(range(1, 10_000))

    def step(t: float, name: str, kernels: list[tuple[str, float]], gpu_lag: float) -> None:
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "ts": t, "dur": period / 2})
        c, s = next(corr), next(corr)
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t + 5, "dur": 20.0,
                       "args": {"correlation": c}})
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t + period * 0.75,
                       "dur": 4.0, "args": {"correlation": s}})
        g = t + gpu_lag
        for k, dur in kernels:
            events.append({"ph": "X", "cat": "kernel", "name": k, "ts": g, "dur": dur, "args": {"correlation": c}})
            g += dur + 0.5
        events.append({"ph": "X", "cat": "kernel", "name": "_argmax_sample_kernel", "ts": g, "dur": 1.0,
                       "args": {"correlation": s}})

    t = 0.0
    step(t, f"execute_context_{batch}({batch * 128})_generation_0(0)", PREFILL, 10.0)
    t += 500.0
    step(t, f"execute_context_1(100)_generation_{batch - 1}({batch - 1})", PREFILL, 10.0)
    t += 500.0
    for _ in range(decode_steps):
        step(t, f"execute_context_0(0)_generation_{batch}({batch})", STEP, 1.3 * period)
        t += period
    step(t, f"execute_context_0(0)_generation_{batch - 1}({batch - 1})", STEP, 1.3 * period)
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    return str(path)


def test_marked_decode_steps_leave_prefill_and_mixed_steps_out(tmp_path):
    """With vLLM's step marks a decode step is cut from one trace: the kernels its host time
    launched (by correlation id, wherever the GPU ran them), not the prefill or mixed steps a
    difference of two runs can pick up."""
    step = steptrace.annotated_decode_steps(_marked_trace(tmp_path / "t.json.gz", 8, 12, 300.0), batch=8)
    kernels = STEP + [("_argmax_sample_kernel", 1.0)]  # the sampling kernel: launched after the mark ends
    busy = sum(d for _, d in kernels)
    assert step["steps"] == 12
    assert step["kernels"] == len(kernels)
    assert abs(step["busy_ms"] - busy / 1e3) < 1e-12
    assert abs(step["attention_share"] - 6.0 / busy) < 1e-12
    assert dict(step["top_kernels_us"]) == dict(kernels)
    assert abs(step["step_ms"] - 0.3) < 1e-12
    assert ["cudaGraphLaunch", 1.0, 20.0] in step["runtime_per_step"]
    assert ["cudaLaunchKernel", 1.0, 4.0] in step["runtime_per_step"]
    # another batch size has no decode-only steps in this trace
    assert steptrace.annotated_decode_steps(_marked_trace(tmp_path / "u.json.gz", 8, 12, 300.0), batch=4) is None


def _rewrite(path: str, keep) -> str:
    events = json.loads(gzip.decompress(Path(path).read_bytes()))["traceEvents"]
    Path(path).write_bytes(gzip.compress(json.dumps({"traceEvents": [e for e in map(keep, events) if e]}).encode()))
    return path


def test_traces_without_marks_or_correlation_ids_fall_back(tmp_path):
    """Without vLLM's step marks (SGLang's profiler), or with kernels that carry no correlation id
    to tie them to their launches, the reader says so (None) and the caller falls back to the
    difference of two runs."""
    unmarked = _rewrite(_marked_trace(tmp_path / "t.json.gz", 8, 12, 300.0),
                        lambda e: None if e["cat"] == "user_annotation" else e)
    assert steptrace.annotated_decode_steps(unmarked, batch=8) is None
    uncorrelated = _rewrite(_marked_trace(tmp_path / "u.json.gz", 8, 12, 300.0),
                            lambda e: {k: v for k, v in e.items() if k != "args"} if e["cat"] == "kernel" else e)
    assert steptrace.annotated_decode_steps(uncorrelated, batch=8) is None


def test_both_forms_of_vllms_step_mark_are_read():
    """vLLM writes a step's sizes in two forms (``annotate_profile`` in its gpu_worker.py): the
    plain one, and with profiler_config.detailed_trace_annotation the scheduled tokens first and
    per-phase sums (here built as vLLM 0.32's source builds it)."""
    assert steptrace._step_sizes("execute_context_2(256)_generation_6(6)") == (2, 256, 6, 6)
    detailed = "execute_4_context_0(sq0sk0sqsq0sqsk0)_generation_4(sq4sk520sqsq4sqsk520)"
    assert steptrace._step_sizes(detailed) == (0, 0, 4, 4)
    assert steptrace._step_sizes("execute_model") is None


def test_benchmark_table_warns_when_the_host_speed_varied():
    # the host probe before every sample: a steady host gives its spread alone; a host whose speed
    # changed by more than PROBE_SPREAD over the rounds makes the table call that measurement doubtful
    import e2e

    assert e2e.host_probe_ms() > 0
    tok_s = {"convgpt": [7000.0, 8000.0, 9000.0], "twin": [4000.0, 3000.0, 5000.0]}
    steady = {"convgpt": [10.0, 10.5, 10.2], "twin": [10.1, 10.3, 10.0]}
    noisy = {"convgpt": [10.0, 21.0, 10.2], "twin": [10.1, 10.3, 10.0]}
    result = {"measurements": {"decode b8": {"tok_s": tok_s, "host_probe_ms": steady},
                               "decode b1": {"tok_s": tok_s, "host_probe_ms": noisy},
                               "prefill 4x64": {"tok_s": tok_s}},  # a result written before the probe
              "engine_start_s": {"convgpt": 1.0, "twin": 1.0}}
    lines = e2e.table({"args": {"rounds": 3}, "result": result}).splitlines()
    probe = {lines[i - 1].split()[1]: line for i, line in enumerate(lines) if "host probe" in line}
    assert set(probe) == {"b8", "b1"}
    assert "convgpt 10.2 (10.0-10.5), twin 10.1 (10.0-10.3)" in probe["b8"] and "doubtful" not in probe["b8"]
    assert "varied 2.10x" in probe["b1"] and "doubtful" in probe["b1"]


def test_busy_time_counts_overlapping_kernels_once(tmp_path):
    """Kernels launched with programmatic dependent launch start while the one before finishes:
    GPU-busy is the time any kernel ran (their union), while each kernel's class still adds its
    whole span."""
    spans = [("_norm_linear_src", 0.0, 10.0), ("_narrow_linear_src", 8.0, 5.0),  # 2 us overlap
             ("_narrow_linear_src", 9.0, 2.0),  # inside the one before
             ("flash_fwd_splitkv", 20.0, 6.0)]  # after a 7 us gap
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d} for n, t, d in spans]
    path = tmp_path / "pdl.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events[::-1]}).encode()))  # any order
    got = steptrace.window(str(path))
    assert got["busy_us"] == 13.0 + 6.0
    assert got["kernels"] == 4
    assert got["by_kernel"]["_narrow_linear_src"] == 7.0
    assert got["by_class"]["norm+gemm (fused)"] == 10.0 and got["attention_us"] == 6.0


def test_benchmark_b_env_runs_convgpt_twice_with_the_switch_in_one_engine(monkeypatch):
    """``--b-env VAR=VALUE``: the twin's slot runs ConvGPT's checkpoint, its engine started with
    the variables set (and only its engine: the benchmark's environment is as before after each
    start); the table says what the second model is."""
    import e2e

    monkeypatch.setenv("CONVGPT_PDL", "1")
    monkeypatch.delenv("CONVGPT_QK_ROPE", raising=False)
    starts = []

    class Bench:  # records the checkpoint and the environment each engine starts with
        def __init__(self, path, args, **settings):
            starts.append((path, os.environ.get("CONVGPT_PDL"), os.environ.get("CONVGPT_QK_ROPE")))
            self.start_s, self.engine = 0.0, self

        def timed(self, batch, tokens):
            return 1.0

        def prompts(self, n, length):
            return [[1] * length] * n

        def decode(self, batch):
            return 100.0

        steady = decode

        def stop(self):
            pass

    monkeypatch.setattr(e2e, "Bench", Bench)
    monkeypatch.setattr(e2e, "host_probe_ms", lambda: 1.0)
    argv = ["--b-env", "CONVGPT_PDL=0", "--b-env", "CONVGPT_QK_ROPE=0", "--no-batch1", "--prefill-n", "0",
            "--rounds", "2"]
    for first, order in (([], ["convgpt", "twin"]), (["--twin-first"], ["twin", "convgpt"])):
        starts.clear()
        args = e2e.parser().parse_args(argv + first)
        result = e2e.run(args, {"convgpt": "ckpt-convgpt", "twin": "ckpt-twin"})
        want = {"convgpt": ("ckpt-convgpt", "1", None), "twin": ("ckpt-convgpt", "0", "0")}
        assert starts == [want[n] for n in order]  # both run ConvGPT; the twin's slot with the switches
        assert os.environ["CONVGPT_PDL"] == "1" and "CONVGPT_QK_ROPE" not in os.environ
        assert result["measurements"]["decode b256"]["tok_s"] == {"convgpt": [100.0] * 2, "twin": [100.0] * 2}
    text = e2e.table({"args": vars(args), "result": result})
    assert text.splitlines()[0] == ("'twin' below is ConvGPT itself, its engine started with "
                                    "CONVGPT_PDL=0 CONVGPT_QK_ROPE=0 (--b-env)")
    assert "twin below" not in e2e.table({"args": vars(e2e.parser().parse_args([])), "result": result})
    with pytest.raises(SystemExit, match="VAR=VALUE"):
        e2e.b_env(e2e.parser().parse_args(["--b-env", "CONVGPT_PDL"]))


def test_benchmark_samples_run_without_pythons_collector_unless_asked(monkeypatch):
    """The engine's front end runs in the benchmark's process, so a garbage collection inside a
    timed sample can stall the engine (round 17: a full collection fell on the same round of every
    run).  After the warm-up what exists is frozen and the samples run with the collector off; the
    run leaves the collector as it found it.  ``--gc-in-timed-runs`` keeps it on and records each
    sample's pauses.  SGLang's idle scheduler sleeps unless ``--sglang-idle-spin``."""
    import gc
    import time

    import e2e

    import drivers

    seen, settings = [], []

    class Engine:  # allocates enough containers in each run to set off the collector when it is on
        def __init__(self, s):
            settings.append(s)

        def generate(self, batch, tokens):
            seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
            junk = [[] for _ in range(5000)]
            for a, b in zip(junk, junk[1:]):
                a.append(b)
            time.sleep(0.002 * tokens)  # a decode that takes longer with more tokens

        def stop(self):
            pass

    monkeypatch.setattr(drivers, "start", lambda engine, path, s: Engine(s))
    monkeypatch.setattr(e2e, "host_probe_ms", lambda: 1.0)
    argv = ["--engine", "sglang", "--no-batch1", "--prefill-n", "0", "--rounds", "2", "--batch", "2"]
    paths = {"convgpt": "a", "twin": "b"}
    try:
        result = e2e.run(e2e.parser().parse_args(argv), paths)
        warm_up, timed = seen[:2], seen[2:]
        assert warm_up == [(False, False)] * 2  # every run without the collector; frozen after these
        assert timed and set(timed) == {(False, True)}
        assert result["measurements"]["decode b2"]["gc_ms"] == {"convgpt": [0.0, 0.0], "twin": [0.0, 0.0]}
        assert gc.isenabled() and gc.get_freeze_count() == 0
        assert [s.sleep_on_idle for s in settings] == [True, True]

        seen.clear(), settings.clear()
        result = e2e.run(e2e.parser().parse_args(argv + ["--gc-in-timed-runs", "--sglang-idle-spin"]), paths)
        assert set(seen) == {(True, False)}
        pauses = result["measurements"]["decode b2"]["gc_ms"]
        assert all(v > 0 for n in e2e.MODELS for v in pauses[n]), pauses
        assert [s.sleep_on_idle for s in settings] == [False, False]
        pauses.update(convgpt=[12.0, 0.5], twin=[0.2, 0.1])
        assert "gc pauses in the timed samples, ms per round: convgpt 12 0, twin 0 0" in e2e.table(
            {"args": {"rounds": 2}, "result": result})
    finally:
        gc.unfreeze()
        gc.enable()


def test_follows_splits_a_kernels_launches_by_predecessor_and_early_start():
    """A kernel started before its predecessor ended (programmatic dependent launch) waits inside
    its own duration; ``follows`` separates that wait from the kernel's own time, per
    predecessor."""
    ks = []
    t = 0.0
    for _ in range(3):  # a layer: down (split-K), q+k+v launched 2 us early, attention, o_proj, gate/up
        ks += [(t, 5.0, "_narrow_linear_src"), (t + 3.0, 6.0, "_norm_linear_src"), (t + 10.0, 8.0, "flash_fwd"),
               (t + 19.0, 4.0, "nvjet_tst"), (t + 24.0, 7.0, "_norm_linear_src")]
        t += 40.0
    by_prev = steptrace.follows(ks, "norm_linear")
    assert set(by_prev) == {"_narrow_linear_src", "nvjet_tst"}
    early = by_prev["_narrow_linear_src"]
    assert early == {"launches": 3, "us": 6.0, "overlapped_us": 2.0, "own_us": 4.0}
    late = by_prev["nvjet_tst"]
    assert late == {"launches": 3, "us": 7.0, "overlapped_us": 0.0, "own_us": 7.0}
