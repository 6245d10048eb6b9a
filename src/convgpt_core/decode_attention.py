"""Decode attention for small batches over a KV cache of one token per row, in one kernel.

A decode step attends each request's one new query row to all its keys.  At a few requests the
engines' kernels spend most of their time on latency, not on the KV they read: FlashInfer's
decode kernel takes ~8 us a layer on an H200 for 192 keys at batch 1 (0.1 MB), and under CUDA
graphs it splits the keys and runs a second kernel to merge the splits (rounds 21, 24, 25).

:func:`decode_attention` is one kernel.  Program (request, kv head, split) takes the request's
slots from the engine's request-to-token table, gathers its split's keys and values from the
cache (the next block's while it multiplies this one), and runs an online softmax for the kv
head's query heads (the GQA group, padded to the 16 rows of a tensor-core dot).  A request's keys
are cut into one split per block of :data:`BLOCK_T` keys, up to the most the batch allows
(:func:`splits_for`); the cut is made in the kernel from the request's length, so a CUDA graph
captured for a batch size replays it for any lengths.  Each split writes its fp32 partial (max,
sum, weighted values) to a workspace, and the (request, kv head)'s last program to finish (an
atomic counter, as in :mod:`convgpt_core.narrow_linear`) merges them in split order, so the
result does not depend on which program came last, writes the output and resets the counter.

The cache layout is SGLang's plain one (``MHATokenToKVPool``): ``k_cache`` and ``v_cache`` are
``[rows, kv_heads, head_dim]``, row ``table[req, t]`` holding key/value ``t`` of request ``req``.
A sliding ``window`` (keys per query, the query's own included) starts each request's keys at
``len - window``.  Only steps of :data:`MAX_ROWS` requests take the kernel (see there).
"""

from __future__ import annotations

import os

import torch

from .kernels import (
    _interpreting,
    _sm_count,
    gdc_launch_dependents,
    gdc_wait,
    jitted,
    kernel_takes,
    pdl,
    tl,
    triton,
)
from .narrow_linear import _counters

# Requests per step that take the kernel.  Round 25's probe (decode_h200_r25.txt: H200, CUDA
# graphs, 16 q / 8 kv heads of 128): at one request 0.71x FlashInfer's time at 192 keys, 0.70x
# at 1024, 0.90x at 4096, 0.96x at 16384; at 4-16 requests it gains at 192 keys (0.68-1.00x)
# but loses from 1024 keys on (1.08-1.12x), and a graph's kernel cannot depend on the lengths.
MAX_ROWS = 1
MAX_SPLITS = 32
BLOCK_T = 64  # keys per loop iteration


def _decode_attention_src(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, req_ptr, lens_ptr, part_ptr, count_ptr,
    stride_qm, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_om, stride_oh, stride_table,
    scale, window,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[b, g * GROUP + i] = softmax(q k^T * scale) v over request b's keys, for the GROUP query
    heads of kv head g.  The request's keys are cut into at most SPLITS splits of whole blocks
    (as many as there are blocks of keys): program (b, g, s) takes split s, and programs past the
    last split do nothing.  Each loop iteration issues the next block's gathers before it
    multiplies this block, so that the memory round trips overlap the arithmetic."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    if PDL:  # the kernel before writes this step's keys and queries: wait for it first
        gdc_wait()
        gdc_launch_dependents()
    length = tl.load(lens_ptr + b).to(tl.int32)
    lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    blocks = tl.maximum(tl.cdiv(length - lo, BLOCK_T), 1)  # a row without keys (none in decode) divides by 1
    active = tl.minimum(blocks, SPLITS)
    per = tl.cdiv(blocks, active) * BLOCK_T
    start = lo + s * per
    end = tl.minimum(length, start + per)
    if s < active:
        req = tl.load(req_ptr + b).to(tl.int64)
        rows_h = tl.arange(0, GROUP_PAD)
        live_h = rows_h < GROUP
        heads = (g * GROUP + rows_h).to(tl.int64)
        d = tl.arange(0, HEAD_DIM)
        dot_ty = tl.float32 if UPCAST else k_ptr.dtype.element_ty
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qm + heads[:, None] * stride_qh + d[None, :],
                    mask=live_h[:, None], other=0.0)
        q = (q.to(tl.float32) * scale).to(dot_ty)

        m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
        k_head = k_ptr + g.to(tl.int64) * stride_kh
        v_head = v_ptr + g.to(tl.int64) * stride_vh
        row_of = table_ptr + req * stride_table
        t = start + tl.arange(0, BLOCK_T)
        slot = tl.load(row_of + t, mask=t < end, other=0).to(tl.int64)
        k = tl.load(k_head + slot[:, None] * stride_kr + d[None, :], mask=(t < end)[:, None], other=0.0)
        v = tl.load(v_head + slot[:, None] * stride_vr + d[None, :], mask=(t < end)[:, None], other=0.0)
        t = t + BLOCK_T
        slot = tl.load(row_of + t, mask=t < end, other=0).to(tl.int64)
        for t0 in range(start, end, BLOCK_T):
            k_now, v_now = k, v
            live_t = t0 + tl.arange(0, BLOCK_T) < end
            k = tl.load(k_head + slot[:, None] * stride_kr + d[None, :], mask=(t < end)[:, None], other=0.0)
            v = tl.load(v_head + slot[:, None] * stride_vr + d[None, :], mask=(t < end)[:, None], other=0.0)
            t = t + BLOCK_T
            slot = tl.load(row_of + t, mask=t < end, other=0).to(tl.int64)
            scores = tl.dot(q, tl.trans(k_now.to(dot_ty)), input_precision=PRECISION)
            scores = tl.where(live_t[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dot_ty), v_now.to(dot_ty), input_precision=PRECISION)
            m_i = m_new

        if SPLITS == 1:
            out = out_ptr + b.to(tl.int64) * stride_om + heads[:, None] * stride_oh + d[None, :]
            tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=live_h[:, None])
        else:
            # partials, fp32: per (request, kv head, split) the GROUP_P2 heads' weighted values
            # (GROUP_P2 x HEAD_DIM), maxima and sums
            unit: tl.constexpr = GROUP_P2 * (HEAD_DIM + 2)
            tile = (b.to(tl.int64) * tl.num_programs(1) + g) * SPLITS
            mine = part_ptr + (tile + s) * unit
            kept = rows_h < GROUP_P2
            tl.store(mine + rows_h[:, None] * HEAD_DIM + d[None, :], acc, mask=kept[:, None])
            tl.store(mine + GROUP_P2 * HEAD_DIM + rows_h, m_i, mask=kept)
            tl.store(mine + GROUP_P2 * (HEAD_DIM + 1) + rows_h, l_i, mask=kept)
            tl.debug_barrier()  # every thread's partial is stored before the counter is raised
            counter = count_ptr + b * tl.num_programs(1) + g
            done = tl.atomic_add(counter, 1, sem="acq_rel")
            if done == active - 1:  # the last program of (b, g): the other partials are visible
                tl.debug_barrier()
                sp = tl.arange(0, SPLITS)
                there = sp < active
                at = tile + sp
                gr = tl.arange(0, GROUP_P2)
                m_s = tl.load(part_ptr + at[:, None] * unit + GROUP_P2 * HEAD_DIM + gr[None, :],
                              mask=there[:, None], other=float("-inf"), cache_modifier=".cg")
                l_s = tl.load(part_ptr + at[:, None] * unit + GROUP_P2 * (HEAD_DIM + 1) + gr[None, :],
                              mask=there[:, None], other=0.0, cache_modifier=".cg")
                a_s = tl.load(part_ptr + at[:, None, None] * unit + gr[None, :, None] * HEAD_DIM + d[None, None, :],
                              mask=there[:, None, None], other=0.0, cache_modifier=".cg")
                m = tl.max(m_s, axis=0)
                w = tl.where(there[:, None], tl.exp(m_s - m[None, :]), 0.0)
                values = tl.sum(w[:, :, None] * a_s, axis=0) / tl.sum(w * l_s, axis=0)[:, None]
                heads_m = (g * GROUP + gr).to(tl.int64)
                out = out_ptr + b.to(tl.int64) * stride_om + heads_m[:, None] * stride_oh + d[None, :]
                tl.store(out, values.to(out_ptr.dtype.element_ty), mask=(gr < GROUP)[:, None])
                tl.atomic_xchg(counter, 0)


def decode_attention_on() -> bool:
    """``CONVGPT_DECODE_ATTENTION=0`` in the environment leaves decode attention to the engine."""
    return os.environ.get("CONVGPT_DECODE_ATTENTION", "1") != "0"


def decode_attention_takes(q: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether :func:`decode_attention` runs for queries ``q`` (``[requests, heads * head_dim]``
    or ``[requests, heads, head_dim]``) over ``k_cache``: at most :data:`MAX_ROWS` requests, a
    power-of-two ``head_dim`` of 16 or more, the cache in ``q``'s dtype, where the kernels run
    (:func:`convgpt_core.kernels.kernel_takes`) and not turned off (:func:`decode_attention_on`)."""
    return (decode_attention_on() and 0 < q.shape[0] <= MAX_ROWS and head_dim >= 16
            and head_dim & (head_dim - 1) == 0 and k_cache.dtype == q.dtype and kernel_takes(q))


def splits_for(requests: int, kv_heads: int, device: torch.device) -> int:
    """The most key splits per (request, kv head): a power of two up to :data:`MAX_SPLITS`, about
    four programs per SM when every request is long.  The batch alone decides, so a CUDA graph's
    grid is fixed; a request uses one split per block of keys up to it."""
    want = max(1, 4 * _sm_count(device) // max(1, requests * kv_heads))
    return min(MAX_SPLITS, 1 << (want.bit_length() - 1))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                     req: torch.Tensor, lens: torch.Tensor, scale: float, window: int | None = None,
                     splits: int | None = None, block_t: int = BLOCK_T, num_warps: int = 4) -> torch.Tensor:
    """Attention of one query row per request: ``q`` ``[requests, heads, head_dim]`` (or the heads
    flattened), ``k_cache``/``v_cache`` ``[rows, kv_heads, head_dim]`` (each head dense),
    ``table[req[b], t]`` the cache row of request b's key t for t < ``lens[b]`` (the query's own
    key among them), ``window`` keys at most (None: all).  Returns ``[requests, heads * head_dim]``
    in ``q``'s dtype.  ``splits`` (the most per request and kv head; :func:`splits_for`), ``block_t``
    and ``num_warps`` set the launch (benchmarks, tests)."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    n = q.shape[0]
    q3 = q.view(n, -1, head_dim)
    heads = q3.shape[1]
    if heads % kv_heads or k_cache.stride(2) != 1 or v_cache.stride(2) != 1 or q3.stride(2) != 1:
        raise ValueError(f"decode attention: q {tuple(q.shape)} over a cache of {kv_heads} kv heads of {head_dim} "
                         f"(k strides {k_cache.stride()}, v strides {v_cache.stride()}) does not fit")
    group = heads // kv_heads
    out = torch.empty(n, heads * head_dim, dtype=q.dtype, device=q.device)
    splits = splits or splits_for(n, kv_heads, q.device)
    group_p2 = triton.next_power_of_2(group)
    group_pad = max(16, group_p2)
    part = (torch.empty(n * kv_heads * splits * group_p2 * (head_dim + 2), dtype=torch.float32, device=q.device)
            if splits > 1 else out)
    on = pdl(q, n)
    upcast = _interpreting() or q.dtype == torch.float32  # the interpreter's dots: not on 16-bit tiles
    jitted(_decode_attention_src)[(n, kv_heads, splits)](
        q3, k_cache, v_cache, out, table, req, lens, part, _counters(q.device),
        q3.stride(0), q3.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        heads * head_dim, head_dim, table.stride(0), scale, window or 0,
        GROUP=group, GROUP_P2=group_p2, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_T=block_t, SPLITS=splits,
        UPCAST=upcast, PRECISION="ieee" if upcast else "tf32", PDL=on, num_warps=num_warps, num_stages=1,
        **({"launch_pdl": True} if on else {}),
    )
    return out
