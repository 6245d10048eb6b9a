"""Round 25 probe: decode attention at small batches, bare on the GPU, CUDA graphs (16 calls per
graph, us per call from replays; the two kernels alternate 5 times, median and min-max).
FlashInfer's decode kernel as SGLang runs it (CUDA cores, page 1, planned for CUDA graphs: split
keys + merge kernel) against ours (``convgpt_core.decode_attention``: one kernel, the merge done
by each (request, kv head)'s last program; "ours-2x" with twice the key splits, "-bt32" 32 keys a block instead of 64, "-w8" 8 warps), 16 q / 8 kv heads of 128, bf16, every request at the
same context length, slots scattered through the cache; both checked against a float32
evaluation.

Usage: PYTHONPATH=src:benchmarks:benchmarks/gpu python3 benchmarks/gpu/decode_r25.py OUT_DIR
"""

import json
import os
import sys

import report
import torch
from head_r25 import HD, KV_HEADS, Q_HEADS, alternate, line

from convgpt_core.decode_attention import decode_attention, splits_for

SHAPES = [(1, 192), (1, 1024), (1, 4096), (1, 16384), (4, 192), (4, 1024), (4, 4096), (8, 192), (8, 1024), (16, 192),
          (16, 1024), (16, 4096), (32, 192)]


def main(out: str) -> None:
    import flashinfer

    say = report.tee(os.path.join(out, "decode_h200_r25.txt"))
    say(f"decode attention on {torch.cuda.get_device_name()}: FlashInfer (SGLang's, split + merge) vs "
        f"convgpt_core.decode_attention; us per call, 16 per CUDA graph, median of 5 alternations (min-max)")
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for batch, ctx in SHAPES:
        slots = batch * ctx + 64
        k = torch.randn(slots, KV_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        v = torch.randn(slots, KV_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        perm = torch.randperm(slots, device="cuda", generator=gen)[: batch * ctx].to(torch.int32)
        table = perm.view(batch, ctx)
        req = torch.arange(batch, device="cuda")
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int64)
        indptr = torch.arange(batch + 1, dtype=torch.int32) * ctx
        last = torch.ones(batch, dtype=torch.int32)
        q = torch.randn(batch, Q_HEADS, HD, device="cuda", generator=gen).to(torch.bfloat16)
        ref = []
        for b in range(batch):
            idx = table[b].long()
            kk, vv = k[idx].float().repeat_interleave(2, 1), v[idx].float().repeat_interleave(2, 1)
            p = torch.einsum("hd,thd->ht", q[b].float(), kk) * HD**-0.5
            ref.append(torch.einsum("ht,thd->hd", p.softmax(-1), vv))
        ref = torch.stack(ref).view(batch, -1)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.zeros(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_cuda_graph=True,
            use_tensor_cores=False, paged_kv_indptr_buffer=indptr.cuda(),
            paged_kv_indices_buffer=torch.empty_like(perm), paged_kv_last_page_len_buffer=last.cuda())
        wrapper.plan(indptr, perm, last, Q_HEADS, KV_HEADS, HD, 1, q_data_type=torch.bfloat16,
                     kv_data_type=torch.bfloat16, sm_scale=HD**-0.5)
        o = torch.empty_like(q)
        kv4 = (k.view(slots, 1, KV_HEADS, HD), v.view(slots, 1, KV_HEADS, HD))
        twice = 2 * splits_for(batch, KV_HEADS, q.device)
        cases = {"flashinfer": lambda w=wrapper, q=q, kv=kv4, o=o: w.run(q, kv, out=o),
                 "ours": lambda q=q, k=k, v=v, t=table, r=req, n=lens: decode_attention(q, k, v, t, r, n, HD**-0.5),
                 "ours-bt32": lambda q=q, k=k, v=v, t=table, r=req, n=lens: decode_attention(
                     q, k, v, t, r, n, HD**-0.5, block_t=32),
                 "ours-w8": lambda q=q, k=k, v=v, t=table, r=req, n=lens: decode_attention(
                     q, k, v, t, r, n, HD**-0.5, num_warps=8),
                 "ours-2x": lambda q=q, k=k, v=v, t=table, r=req, n=lens, x=twice: decode_attention(
                     q, k, v, t, r, n, HD**-0.5, splits=x)}
        errs = {}
        for name, fn in cases.items():
            got = fn().view(batch, -1).float()
            torch.cuda.synchronize()
            errs[name] = float((got - ref).abs().max())
        times = alternate(cases)
        say(f"batch {batch:3d} ctx {ctx:5d}: {line(times, 'flashinfer')}; largest difference from float32: "
            + ", ".join(f"{n} {e:.3g}" for n, e in errs.items()))
        rows.append(dict(batch=batch, ctx=ctx, us=times, errors=errs))
    with open(os.path.join(out, "decode_h200_r25.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
