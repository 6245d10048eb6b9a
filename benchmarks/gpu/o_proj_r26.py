"""Round 26 probe: o_proj inside the decode attention kernel, one request, bare on the GPU, CUDA
graphs (16 calls per graph, us per call from replays; the two ways alternate 5 times, median and
min-max).  "apart": ``decode_attention`` then o_proj by ``narrow_linear`` (what SGLang's lone
decode steps ran in round 25); "fused": ``decode_attention(..., o_weight=w)``.  16 q / 8 kv heads
of 128 to D = 144, bf16, slots scattered through the cache; both checked against float32.

Usage: PYTHONPATH=src:benchmarks:benchmarks/gpu python3 benchmarks/gpu/o_proj_r26.py OUT_DIR
"""

import json
import os
import sys

import report
import torch
from head_r25 import HD, KV_HEADS, Q_HEADS, alternate, line

from convgpt_core.decode_attention import decode_attention
from convgpt_core.narrow_linear import narrow_linear

D = 144


def main(out: str) -> None:
    say = report.tee(os.path.join(out, "o_proj_h200_r26.txt"))
    say(f"one request's decode attention + o_proj on {torch.cuda.get_device_name()}: apart (two kernels) vs fused; "
        f"us per call, 16 per CUDA graph, median of 5 alternations (min-max)")
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for ctx in (192, 1024, 4096):
        slots = ctx + 64
        k = torch.randn(slots, KV_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        v = torch.randn(slots, KV_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        table = torch.randperm(slots, device="cuda", generator=gen)[:ctx].to(torch.int32).view(1, ctx)
        req = torch.zeros(1, dtype=torch.int64, device="cuda")
        lens = torch.full((1,), ctx, device="cuda", dtype=torch.int64)
        q = torch.randn(1, Q_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(D, Q_HEADS * HD, device="cuda", generator=gen) * (Q_HEADS * HD) ** -0.5).to(torch.bfloat16)
        idx = table[0].long()
        kk, vv = k[idx].float().repeat_interleave(2, 1), v[idx].float().repeat_interleave(2, 1)
        p = (torch.einsum("hd,thd->ht", q[0].float(), kk) * HD**-0.5).softmax(-1)
        ref = torch.einsum("ht,thd->hd", p, vv).reshape(1, -1) @ w.float().T
        s = HD**-0.5
        cases = {"apart": lambda: narrow_linear(decode_attention(q, k, v, table, req, lens, s), w),
                 "fused": lambda: decode_attention(q, k, v, table, req, lens, s, o_weight=w)}
        errs = {name: float((fn().float() - ref).abs().max()) for name, fn in cases.items()}
        times = alternate(cases)
        say(f"ctx {ctx:5d}: {line(times, 'apart')}; largest difference from float32: "
            + ", ".join(f"{n} {e:.3g}" for n, e in errs.items()))
        rows.append(dict(ctx=ctx, us=times, errors=errs))
    with open(os.path.join(out, "o_proj_h200_r26.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
