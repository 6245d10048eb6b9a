"""vLLM's FlashAttention 3 decode as a CUDA-graphed step runs it, at the attention geometry
ConvGPT shares with its twin (16 q heads, 8 kv heads, head_dim 128), swept over the two
serving settings that shape it:

  page   the KV block size (``--block-size``; vLLM's default for FlashAttention is 16)
  splits the most KV splits a decode step may use under CUDA graphs
         (``attention_config.flash_attn_max_num_splits_for_cuda_graph``, vLLM's default 32).
         Above 1 a graphed step also runs FlashAttention's combine kernel (vLLM's decode
         traces have it at batch 1 and at batch 256 alike).

Each case: 32 layers, each with its own cache (vLLM's NHD layout: one block holds a slot's
heads as rows of K then V), the sequences' blocks scattered through it, scheduler metadata
made outside the graph as vLLM's metadata builder makes it, and the 32 calls captured in one
CUDA graph; us per layer from replays.  Needs vLLM (its ``vllm_flash_attn``) on a Hopper GPU.

Usage: python benchmarks/bench_attention.py --out DIR   (nox -s bench-attention -- --out DIR)
"""

from __future__ import annotations

import argparse
import json
import os

import report

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 16, 8, 128, 32
SHAPES = [(1, 192), (1, 1024), (1, 4096), (16, 1024), (256, 192), (64, 4096)]  # (batch, context)
PAGES = [16, 32, 64, 128]
SPLITS = [32, 8, 1]


def case(batch: int, ctx: int, page: int, splits: int, caches, gen):
    """(us per layer of one graphed step of ``LAYERS`` decode attentions, TB/s of KV read, the
    largest difference of the first layer's output from the same call unsplit)."""
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    dev = "cuda"
    # contexts spread +-12% around ctx, as a batch's sequences are
    lens = (ctx * (0.88 + 0.24 * torch.rand(batch, generator=gen))).long().clamp(min=1)
    lens[0] = ctx
    max_k = int(lens.max())
    pages_per_seq = -(-max_k // page)
    blocks = caches[0].shape[0] // page
    table = torch.randperm(blocks, generator=gen)[: batch * pages_per_seq].view(batch, pages_per_seq)
    table = table.to(torch.int32).to(dev)
    seqused = lens.to(torch.int32).to(dev)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    meta = get_scheduler_metadata(
        batch_size=batch, max_seqlen_q=1, max_seqlen_k=max_k, num_heads_q=Q_HEADS,
        num_heads_kv=KV_HEADS, headdim=HEAD_DIM, cache_seqlens=seqused, qkv_dtype=torch.bfloat16,
        cu_seqlens_q=cu_q, page_size=page, causal=True, num_splits=splits)
    qs = [torch.randn(batch, Q_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in caches]
    outs = [torch.empty_like(q) for q in qs]
    views = []
    for flat in caches:  # (tokens, kv_heads, 2 * head_dim) -> blocks of `page` slots
        paged = flat.view(-1, page, KV_HEADS, 2 * HEAD_DIM)
        views.append((paged[..., :HEAD_DIM], paged[..., HEAD_DIM:]))

    def attend(q, k, v, **kw):
        return flash_attn_varlen_func(
            q=q, k=k, v=v, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=seqused, max_seqlen_k=max_k,
            softmax_scale=HEAD_DIM ** -0.5, causal=True, block_table=table, fa_version=3, **kw)

    def step():
        for q, out, (k, v) in zip(qs, outs, views):
            attend(q, k, v, out=out, scheduler_metadata=meta, num_splits=splits)

    graph = report.captured(step, warmup=3)
    err = 0.0
    if splits != 1:  # the same call unsplit: the splits must not change the result
        graph.replay()
        torch.cuda.synchronize()
        err = float((attend(qs[0], *views[0], num_splits=1).float() - outs[0].float()).abs().max())
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 50
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) * 1000 / reps / len(caches)
    kv_bytes = int(lens.sum()) * KV_HEADS * 2 * HEAD_DIM * 2
    return us, kv_bytes / (us * 1e-6) / 1e12, err


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    say = report.tee(os.path.join(args.out, "attention.txt"))
    say(f"vLLM FlashAttention 3 decode, {torch.cuda.get_device_name()}, {LAYERS} layers in one CUDA graph; "
        f"us per layer and its ratio to the default (page 16, splits 32); KV read rates in the JSON")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch, ctx in SHAPES:
        tokens = -(-int(batch * (ctx * 1.12 + 2 * max(PAGES))) // max(PAGES)) * max(PAGES)
        caches = [torch.randn(tokens, KV_HEADS, 2 * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                  for _ in range(LAYERS)]
        cells = {}
        for page in PAGES:
            for splits in SPLITS:
                us, tbs, err = case(batch, ctx, page, splits, caches, gen)
                cells[(page, splits)] = us
                rows.append(dict(batch=batch, ctx=ctx, page=page, splits=splits, us=us, tb_s=tbs, max_diff=err))
        base = cells[(16, 32)]
        say(f"\nbatch {batch}, context ~{ctx}")
        say("page  " + "".join(f"  splits {s:<2}  " for s in SPLITS))
        for page in PAGES:
            say(f"{page:4d}  " + "".join(
                f"{cells[(page, s)]:7.2f} {cells[(page, s)] / base:4.2f}x" for s in SPLITS))
        del caches
        torch.cuda.empty_cache()
    worst = max(r["max_diff"] for r in rows)
    say(f"\nsplit vs unsplit output, largest difference over all cases: {worst:.3g}")
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
