"""Decode attention as a CUDA-graphed step runs it, at the attention geometry ConvGPT shares
with its twin (16 q heads, 8 kv heads, head_dim 128).  Two tables:

``--sweep`` (round 20): vLLM's FlashAttention 3 over the two serving settings that shape it,
  page   the KV block size (``--block-size``; vLLM's default for FlashAttention is 16)
  splits the most KV splits a decode step may use under CUDA graphs
         (``attention_config.flash_attn_max_num_splits_for_cuda_graph``, vLLM's default 32).
         Above 1 a graphed step also runs FlashAttention's combine kernel (vLLM's decode
         traces have it at batch 1 and at batch 256 alike).

``--backends`` (round 21): the decode kernels the engines can run on a Hopper GPU, page 16:
  fa3         vLLM's default backend (FLASH_ATTN), 32 splits; ``fa3-1split``: one split
  fi-cuda     FlashInfer's decode kernel on CUDA cores (SGLang's flashinfer backend at 2 q heads
              per kv head)
  fi-tc       FlashInfer's decode on tensor cores (vLLM's FLASHINFER backend when XQA is not
              there, as on an offline host: XQA's kernels are downloaded)

Each case: 32 layers, each with its own cache (vLLM's layout: one block holds a slot's heads as
rows of K then V; FlashInfer reads the same views), the sequences' blocks scattered through it,
metadata made outside the graph as the engines' metadata builders make it, and the 32 calls
captured in one CUDA graph; us per layer from replays.  Every output of the first layer is
checked against FlashAttention's unsplit call on the same query.  Needs vLLM (its
``vllm_flash_attn``; flashinfer for ``--backends``) on a Hopper GPU.

Usage: python benchmarks/bench_attention.py --out DIR [--backends]   (nox -s bench-attention -- ...)
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
BACKENDS = ["fa3", "fa3-1split", "fi-cuda", "fi-tc"]


class Batch:
    """One decode batch over ``caches`` (one per layer, ``(tokens, kv_heads, 2 * head_dim)``):
    its context lengths (spread +-12% around ``ctx``, as a batch's sequences are), a block table
    of scattered blocks of ``page`` slots, a query per layer and the layers' K and V views."""

    def __init__(self, batch: int, ctx: int, page: int, caches, gen) -> None:
        import torch

        self.batch, self.page = batch, page
        lens = (ctx * (0.88 + 0.24 * torch.rand(batch, generator=gen))).long().clamp(min=1)
        lens[0] = ctx
        self.lens, self.max_k = lens, int(lens.max())
        blocks = caches[0].shape[0] // page
        per_seq = -(-self.max_k // page)
        self.table = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq).to(torch.int32)
        self.qs = [torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in caches]
        self.views = []
        for flat in caches:  # blocks of `page` slots, a slot's heads as rows of K then V
            paged = flat.view(-1, page, KV_HEADS, 2 * HEAD_DIM)
            self.views.append((paged[..., :HEAD_DIM], paged[..., HEAD_DIM:]))

    def kv_bytes(self) -> int:
        return int(self.lens.sum()) * KV_HEADS * 2 * HEAD_DIM * 2


def fa3(b: Batch, splits: int):
    """``attend(q, (k, v), out)`` for ``b`` with vLLM's FlashAttention 3 at most ``splits``
    splits, scheduler metadata made once as vLLM's builder makes it (None: unsplit, no
    metadata: the reference call)."""
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    seqused = b.lens.to(torch.int32).cuda()
    table = b.table.cuda()
    cu_q = torch.arange(b.batch + 1, dtype=torch.int32, device="cuda")
    kw = {"num_splits": 1}
    if splits is not None:
        kw = {"num_splits": splits, "scheduler_metadata": get_scheduler_metadata(
            batch_size=b.batch, max_seqlen_q=1, max_seqlen_k=b.max_k, num_heads_q=Q_HEADS,
            num_heads_kv=KV_HEADS, headdim=HEAD_DIM, cache_seqlens=seqused, qkv_dtype=torch.bfloat16,
            cu_seqlens_q=cu_q, page_size=b.page, causal=True, num_splits=splits)}

    def attend(q, kv, out=None):
        return flash_attn_varlen_func(
            q=q, k=kv[0], v=kv[1], cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=seqused, max_seqlen_k=b.max_k,
            softmax_scale=HEAD_DIM ** -0.5, causal=True, block_table=table, fa_version=3, out=out, **kw)

    return attend


def flashinfer_decode(b: Batch, tensor_cores: bool):
    """``attend(q, (k, v), out)`` for ``b`` with FlashInfer's paged decode wrapper, set up for
    CUDA graphs and planned once (as an engine plans it once a step for all layers)."""
    import flashinfer
    import torch

    pages = (b.lens + b.page - 1) // b.page
    indptr = torch.zeros(b.batch + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages, 0)
    indices = torch.cat([b.table[i, : int(n)] for i, n in enumerate(pages)]).to(torch.int32)
    last = (b.lens - (pages - 1) * b.page).to(torch.int32)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.zeros(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_cuda_graph=True,
        use_tensor_cores=tensor_cores, paged_kv_indptr_buffer=indptr.cuda(),
        paged_kv_indices_buffer=torch.empty_like(indices, device="cuda"),
        paged_kv_last_page_len_buffer=last.cuda())
    wrapper.plan(indptr, indices.cuda(), last, Q_HEADS, KV_HEADS, HEAD_DIM, b.page, q_data_type=torch.bfloat16,
                 kv_data_type=torch.bfloat16, sm_scale=HEAD_DIM ** -0.5)

    def attend(q, kv, out=None):
        return wrapper.run(q, kv, out=out)

    return attend


def timed(b: Batch, attend) -> tuple[float, float]:
    """(us per layer of one graphed step of ``LAYERS`` calls of ``attend``, the largest
    difference of the first layer's output from FlashAttention's unsplit call)."""
    import torch

    outs = [torch.empty_like(q) for q in b.qs]

    def step():
        for q, out, kv in zip(b.qs, outs, b.views):
            attend(q, kv, out)

    graph = report.captured(step, warmup=3)
    graph.replay()
    torch.cuda.synchronize()
    err = float((fa3(b, None)(b.qs[0], b.views[0]).float() - outs[0].float()).abs().max())
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 50
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps / len(b.qs), err


def attention(name: str, b: Batch):
    """The ``attend`` of backend ``name`` (BACKENDS)."""
    return {"fa3": lambda: fa3(b, 32), "fa3-1split": lambda: fa3(b, 1),
            "fi-cuda": lambda: flashinfer_decode(b, False), "fi-tc": lambda: flashinfer_decode(b, True)}[name]()


def caches_for(batch: int, ctx: int):
    import torch

    tokens = -(-int(batch * (ctx * 1.12 + 2 * max(PAGES))) // max(PAGES)) * max(PAGES)
    return [torch.randn(tokens, KV_HEADS, 2 * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            for _ in range(LAYERS)]


def sweep(say, gen, shapes) -> list[dict]:
    """FlashAttention 3 over page sizes and split caps (round 20's table)."""
    rows = []
    for batch, ctx in shapes:
        caches = caches_for(batch, ctx)
        cells = {}
        for page in PAGES:
            b = Batch(batch, ctx, page, caches, gen)
            for splits in SPLITS:
                us, err = timed(b, fa3(b, splits))
                cells[(page, splits)] = us
                rows.append(dict(batch=batch, ctx=ctx, page=page, splits=splits, us=us,
                                 tb_s=b.kv_bytes() / (us * 1e-6) / 1e12, max_diff=err))
        base = cells[(16, 32)]
        say(f"\nbatch {batch}, context ~{ctx}")
        say("page  " + "".join(f"  splits {s:<2}  " for s in SPLITS))
        for page in PAGES:
            say(f"{page:4d}  " + "".join(
                f"{cells[(page, s)]:7.2f} {cells[(page, s)] / base:4.2f}x" for s in SPLITS))
        del caches
    return rows


def backends(say, gen, shapes) -> list[dict]:
    """The decode kernels of BACKENDS at page 16, per shape (round 21's table)."""
    say("\nus per layer (ratio to fa3), KV read TB/s")
    say("batch  ctx   " + "".join(f"{n:>20}" for n in BACKENDS))
    rows = []
    for batch, ctx in shapes:
        caches = caches_for(batch, ctx)
        b = Batch(batch, ctx, 16, caches, gen)
        cells = {}
        for name in BACKENDS:
            us, err = timed(b, attention(name, b))
            cells[name] = us
            rows.append(dict(batch=batch, ctx=ctx, page=16, backend=name, us=us,
                             tb_s=b.kv_bytes() / (us * 1e-6) / 1e12, max_diff=err))
        say(f"{batch:5d} {ctx:5d} " + "".join(
            f"{cells[n]:8.2f} {cells[n] / cells['fa3']:4.2f}x {b.kv_bytes() / cells[n] / 1e6:4.1f}" for n in BACKENDS))
        del caches
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", action="store_true", help="compare the engines' decode kernels (default: --sweep)")
    ap.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES),
                    help="BATCHxCONTEXT,... (default: %(default)s)")
    ap.add_argument("--name", help="output files' name (default: attention, or backends with --backends)")
    args = ap.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    name = args.name or ("backends" if args.backends else "attention")
    say = report.tee(os.path.join(args.out, f"{name}.txt"))
    say(f"decode attention, {torch.cuda.get_device_name()}, {LAYERS} layers in one CUDA graph, "
        f"{Q_HEADS} q heads, {KV_HEADS} kv heads of {HEAD_DIM}; us per layer and its ratio to vLLM's default "
        f"(FlashAttention 3, page 16, 32 splits)")
    gen = torch.Generator().manual_seed(0)
    rows = (backends if args.backends else sweep)(say, gen, shapes)
    worst = max(r["max_diff"] for r in rows)
    say(f"\nlargest difference from FlashAttention's unsplit output over all cases: {worst:.3g}")
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
