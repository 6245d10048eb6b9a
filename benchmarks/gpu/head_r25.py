"""Round 25 probe, bare on the GPU, CUDA graphs (each case captured as 16 calls in one graph,
us per call from replays; the cases of a size alternate, 5 times, median and min-max).

Part 1, the tied head's logits at the published widths (H = 1296, vocab 65,538, the weight's
rows padded to 65,600 as the engines pad them), then the greedy sampler's argmax:
  bf16+cast  today on SGLang 0.5.16: cuBLAS writes bf16 logits (padded rows), our kernel
             widens the kept columns to float32 (convgpt_core.logits)
  f32        cuBLAS writes float32 logits of the kept columns straight away
             (torch.mm(..., out_dtype=torch.float32)), nothing to cast
  f32-pad    the same over the padded rows (the sampler then reads a strided view)
and each one's largest difference from the float64 product (the rounding to bf16 costs).

Part 2, FlashInfer's decode kernel (CUDA cores, SGLang's at 2 q heads per kv head) at page 1
(SGLang's), planned for CUDA graphs as SGLang plans it (split KV, then a merge kernel) and
with the split turned off (``disable_split_kv``, what SGLang does only in its deterministic
mode); 16 q / 8 kv heads of 128; checked against a float32 evaluation.

Usage: PYTHONPATH=src:benchmarks python3 benchmarks/gpu/head_r25.py OUT_DIR
"""

import json
import os
import statistics
import sys

import report
import torch

from convgpt_core.logits import logits_to_float32

H, V, VP = 1296, 65538, 65600
Q_HEADS, KV_HEADS, HD = 16, 8, 128
CALLS = 16


def graphed_us(fn) -> float:
    graph = report.captured(lambda: [fn() for _ in range(CALLS)], warmup=3)
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 20 / CALLS


def alternate(cases: dict) -> dict:
    times = {name: [] for name in cases}
    for _ in range(5):
        for name, fn in cases.items():
            times[name].append(graphed_us(fn))
    return times


def line(times: dict, base: str) -> str:
    med = {n: statistics.median(t) for n, t in times.items()}
    return "  ".join(f"{n} {med[n]:7.2f} us ({min(t):.2f}-{max(t):.2f}) {med[n] / med[base]:.2f}x"
                     for n, t in times.items())


def head(say) -> list:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(VP, H, device="cuda", generator=gen) * H**-0.5).to(torch.bfloat16)
    rows = []
    for m in (1, 16, 64, 256):
        h = torch.randn(m, H, device="cuda", generator=gen).to(torch.bfloat16) * 3
        out = torch.empty(m, V, device="cuda", dtype=torch.float32)
        pad = torch.empty(m, VP, device="cuda", dtype=torch.float32)
        exact = (h.double() @ w[:V].double().t())

        def cast(h=h, out=out):
            return logits_to_float32((h @ w.t())[:, :V], out)

        def f32(h=h, out=out):
            return torch.mm(h, w[:V].t(), out_dtype=torch.float32, out=out)

        def f32_pad(h=h, pad=pad):
            return torch.mm(h, w.t(), out_dtype=torch.float32, out=pad)[:, :V]

        errs = {}
        for name, fn in (("bf16+cast", cast), ("f32", f32), ("f32-pad", f32_pad)):
            got = fn().double()
            errs[name] = float((got - exact).abs().max())
            errs[name + " argmax=exact"] = float((got.argmax(-1) == exact.argmax(-1)).float().mean())
        logits = alternate({"bf16+cast": cast, "f32": f32, "f32-pad": f32_pad})
        sampled = alternate({"bf16+cast": lambda: cast().argmax(-1), "f32": lambda: f32().argmax(-1),
                             "f32-pad": lambda: f32_pad().argmax(-1)})
        say(f"rows {m:3d} logits:          {line(logits, 'bf16+cast')}")
        say(f"rows {m:3d} logits + argmax: {line(sampled, 'bf16+cast')}")
        say("         largest |logit - float64|: " + ", ".join(
            f"{n} {e:.3g}" for n, e in errs.items() if "argmax" not in n)
            + "; argmax as float64's: " + ", ".join(f"{n.split()[0]} {e:.3f}" for n, e in errs.items() if "argmax" in n))
        rows.append(dict(rows=m, logits_us=logits, sampled_us=sampled, errors=errs))
    return rows


def decode(say) -> list:
    import flashinfer

    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for batch, ctx in ((1, 192), (1, 1024), (1, 4096), (8, 192), (64, 192), (256, 192)):
        slots = batch * ctx + 64
        k = torch.randn(slots, 1, KV_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        v = torch.randn(slots, 1, KV_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        perm = torch.randperm(slots, device="cuda", generator=gen)[: batch * ctx].to(torch.int32)
        indptr = torch.arange(batch + 1, dtype=torch.int32) * ctx
        last = torch.ones(batch, dtype=torch.int32)
        q = torch.randn(batch, Q_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        ref = []
        for b in range(batch):
            idx = perm[b * ctx:(b + 1) * ctx].long()
            kk, vv = k[idx, 0].float().repeat_interleave(2, 1), v[idx, 0].float().repeat_interleave(2, 1)
            p = torch.einsum("hd,thd->ht", q[b].float(), kk) * HD**-0.5
            ref.append(torch.einsum("ht,thd->hd", p.softmax(-1), vv))
        ref = torch.stack(ref)
        cases, errs = {}, {}
        for name, off in (("split", False), ("no-split", True)):
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                torch.zeros(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_cuda_graph=True,
                use_tensor_cores=False, paged_kv_indptr_buffer=indptr.cuda(),
                paged_kv_indices_buffer=torch.empty_like(perm), paged_kv_last_page_len_buffer=last.cuda())
            wrapper.plan(indptr, perm, last, Q_HEADS, KV_HEADS, HD, 1, q_data_type=torch.bfloat16,
                         kv_data_type=torch.bfloat16, sm_scale=HD**-0.5, disable_split_kv=off)
            o = torch.empty_like(q)
            cases[name] = (lambda wrapper=wrapper, o=o, q=q, kv=(k, v): wrapper.run(q, kv, out=o))
            cases[name]()
            torch.cuda.synchronize()
            errs[name] = float((o.float() - ref).abs().max())
        times = alternate(cases)
        say(f"batch {batch:3d} ctx {ctx:5d}: {line(times, 'split')}; largest difference from float32: "
            + ", ".join(f"{n} {e:.3g}" for n, e in errs.items()))
        rows.append(dict(batch=batch, ctx=ctx, us=times, errors=errs))
    return rows


def main(out: str) -> None:
    say = report.tee(os.path.join(out, "head_h200_r25.txt"))
    say(f"round 25 probe on {torch.cuda.get_device_name()}, torch {torch.__version__}; us per call, "
        f"{CALLS} calls per CUDA graph, median of 5 alternations (min-max), ratio to the first case")
    say("\nthe tied head's logits (1296 -> 65,538 of 65,600 rows), then argmax")
    result = dict(device=torch.cuda.get_device_name(), head=head(say))
    say("\nFlashInfer decode, page 1, CUDA-graph plan: split KV (+ merge) vs not split")
    try:
        result["decode"] = decode(say)
    except Exception as e:  # noqa: BLE001 - the head's part stands without it
        say(f"decode part failed: {type(e).__name__}: {e}")
    with open(os.path.join(out, "head_h200_r25.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
