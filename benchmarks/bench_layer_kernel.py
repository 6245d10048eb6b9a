"""A measurement before an integration: everything between two attentions as one kernel.

A decode step of the published model runs, per layer, attention and then four of our kernels:
``narrow_linear`` (o_proj), ``norm_linear`` (residual add + RMSNorm + gate/up + SwiGLU),
``narrow_linear`` (down) and the next layer's ``norm_linear`` (residual add + RMSNorm + q+k+v +
q/k norm + RoPE).  At batch 1 each is a few microseconds of launch and memory latency for a few
hundred KB of weights; the step's GPU time outside attention, mostly theirs, is 0.49 of 0.82 ms
(round 19, vLLM).  Issue 11's target for the whole step is 0.6 ms.

Here the four run as one persistent kernel of ``G`` programs, all resident at once, that meet
twice at a grid-wide barrier (an arrival counter in global memory, acquire/release atomics):

1. o_proj: program p < ``O_PROGS`` multiplies its ``KO``-column slice of the attention output
   by the matching slice of W_o and adds its [rows, D] partial into an fp32 buffer (atomics);
   every program meanwhile loads the weights of its later phases.  Barrier.
2. every program reads the summed o_proj output, forms the residual sum and its RMSNorm (the
   same rounding points as the shipped kernels), computes its ``AC`` columns of gate/up and
   SwiGLU, and at once multiplies them by the matching ``AC`` columns of W_down: the activation
   never leaves registers, and its down partial goes into a second fp32 buffer.  Barrier.
3. every program reads the summed down output and forms the next residual sum and RMSNorm;
   programs p < 32 each compute one q, k or v head of the next layer's q+k+v with its q/k norm
   and RoPE.

Two of the shipped kernels' launches and both cross-program sums become barriers.  The fp32
atomics make the sums' order, so the low bits, vary from run to run (the shipped kernels sum in
a fixed order); a shipped version would want an ordered sum.  The barrier needs every program
resident at once, which holds here (``G`` is below the SM count and nothing else runs); Triton's
interpreter runs programs one after another and cannot run it at all.

Times ``LAYERS`` layers back to back in one CUDA graph (attention stood in by one elementwise
kernel, as in ``bench_norm_linear.py --only chain``), against the shipped kernels with and
without PDL, at 1-16 rows; each checked against the shipped chain first (bf16 tolerance).

Usage (CUDA, sm_80+): python benchmarks/bench_layer_kernel.py --out DIR [--batches 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
import report  # noqa: E402
from bench_norm_linear import (  # noqa: E402 - the chain's shapes, weights and shipped step
    HEAD_DIM,
    INNER,
    KV_HEADS,
    LAYERS,
    Q_HEADS,
    D,
    chain_case,
    chain_step,
    stand_in_attention,
)

from convgpt_core.kernels import tl, triton  # noqa: E402

D_A, D_B = 128, 16  # D's two column blocks
HEADS_IN = Q_HEADS * HEAD_DIM  # o_proj's input width
QKV_HEADS = Q_HEADS + 2 * KV_HEADS
G, O_PROGS = 96, 64  # programs; those doing o_proj
AC, KO = INNER // G, HEADS_IN // O_PROGS  # activation columns per program; o_proj input columns per program


@triton.jit
def _barrier(cnt_ptr, G: tl.constexpr):
    """Every program arrives (release), then waits until all G have (acquire)."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu") < G:
        pass
    tl.debug_barrier()


def _layer_src(
    a_ptr, res_ptr, wo_ptr, nw2_ptr, wgu_ptr, wd_ptr, nw1_ptr, wqkv_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr,
    qkv_ptr, h_ptr, s_ptr, s2_ptr, obuf_ptr, dbuf_ptr, cnt_ptr, zo_ptr, zd_ptr, zcnt_ptr,
    M, stride_cs, eps, qk_eps,
    D: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, HEADS_IN: tl.constexpr, INNER: tl.constexpr,
    G: tl.constexpr, O_PROGS: tl.constexpr, KO: tl.constexpr, AC: tl.constexpr, HALF: tl.constexpr,
    Q_HEADS: tl.constexpr, NORM_HEADS: tl.constexpr, QKV_HEADS: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    da = tl.arange(0, D_A)
    db = D_A + tl.arange(0, D_B)
    wdt = wo_ptr.dtype.element_ty

    if pid == 0:  # the other parity's buffers and counters, for the layer after next
        tl.store(zo_ptr + offs_m[:, None] * D + da[None, :], tl.zeros((BLOCK_M, D_A), tl.float32))
        tl.store(zo_ptr + offs_m[:, None] * D + db[None, :], tl.zeros((BLOCK_M, D_B), tl.float32))
        tl.store(zd_ptr + offs_m[:, None] * D + da[None, :], tl.zeros((BLOCK_M, D_A), tl.float32))
        tl.store(zd_ptr + offs_m[:, None] * D + db[None, :], tl.zeros((BLOCK_M, D_B), tl.float32))
        tl.store(zcnt_ptr + tl.arange(0, 2), tl.zeros((2,), tl.int32))

    # phase 1: o_proj partials of this program's KO input columns
    if pid < O_PROGS:
        offs_k = pid * KO + tl.arange(0, KO)
        a = tl.load(a_ptr + rows[:, None] * HEADS_IN + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        woa = tl.load(wo_ptr + da[None, :] * HEADS_IN + offs_k[:, None])
        wob = tl.load(wo_ptr + db[None, :] * HEADS_IN + offs_k[:, None])
        pa = tl.dot(a, woa, input_precision=PRECISION)
        pb = tl.dot(a, wob, input_precision=PRECISION)
        tl.atomic_add(obuf_ptr + offs_m[:, None] * D + da[None, :], pa, mask=mask_m[:, None], sem="relaxed")
        tl.atomic_add(obuf_ptr + offs_m[:, None] * D + db[None, :], pb, mask=mask_m[:, None], sem="relaxed")
    # the later phases' weights, while the others finish phase 1
    offs_c = pid * AC + tl.arange(0, AC)
    wga = tl.load(wgu_ptr + offs_c[None, :] * D + da[:, None])
    wgb = tl.load(wgu_ptr + offs_c[None, :] * D + db[:, None])
    wua = tl.load(wgu_ptr + (INNER + offs_c[None, :]) * D + da[:, None])
    wub = tl.load(wgu_ptr + (INNER + offs_c[None, :]) * D + db[:, None])
    wda = tl.load(wd_ptr + da[None, :] * INNER + offs_c[:, None])
    wdb = tl.load(wd_ptr + db[None, :] * INNER + offs_c[:, None])
    n2a = tl.load(nw2_ptr + da).to(tl.float32)
    n2b = tl.load(nw2_ptr + db).to(tl.float32)
    ra = tl.load(res_ptr + rows[:, None] * D + da[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
    rb = tl.load(res_ptr + rows[:, None] * D + db[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
    _barrier(cnt_ptr, G)

    # phase 2: residual add + RMSNorm, gate/up + SwiGLU of AC columns, their down partial
    oa = tl.load(obuf_ptr + offs_m[:, None] * D + da[None, :], cache_modifier=".cg").to(wdt).to(tl.float32)
    ob = tl.load(obuf_ptr + offs_m[:, None] * D + db[None, :], cache_modifier=".cg").to(wdt).to(tl.float32)
    sa = (oa + ra).to(wdt).to(tl.float32)
    sb = (ob + rb).to(wdt).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(sa * sa, axis=1) + tl.sum(sb * sb, axis=1)) / D + eps)
    xa = (sa * rstd[:, None] * n2a[None, :]).to(wdt)
    xb = (sb * rstd[:, None] * n2b[None, :]).to(wdt)
    g = tl.dot(xb, wgb, tl.dot(xa, wga, input_precision=PRECISION), input_precision=PRECISION)
    u = tl.dot(xb, wub, tl.dot(xa, wua, input_precision=PRECISION), input_precision=PRECISION)
    act = (g * tl.sigmoid(g) * u).to(wdt)
    tl.atomic_add(dbuf_ptr + offs_m[:, None] * D + da[None, :], tl.dot(act, wda, input_precision=PRECISION),
                  mask=mask_m[:, None], sem="relaxed")
    tl.atomic_add(dbuf_ptr + offs_m[:, None] * D + db[None, :], tl.dot(act, wdb, input_precision=PRECISION),
                  mask=mask_m[:, None], sem="relaxed")
    # the next q+k+v's weights: one head per program below QKV_HEADS
    is_head = pid < QKV_HEADS
    hp = tl.minimum(pid, QKV_HEADS - 1)
    offs_h = tl.arange(0, HALF)
    c1 = hp * (2 * HALF) + offs_h
    w1a = tl.load(wqkv_ptr + c1[None, :] * D + da[:, None])
    w1b = tl.load(wqkv_ptr + c1[None, :] * D + db[:, None])
    w2a = tl.load(wqkv_ptr + (c1 + HALF)[None, :] * D + da[:, None])
    w2b = tl.load(wqkv_ptr + (c1 + HALF)[None, :] * D + db[:, None])
    n1a = tl.load(nw1_ptr + da).to(tl.float32)
    n1b = tl.load(nw1_ptr + db).to(tl.float32)
    is_q = hp < Q_HEADS
    qk1 = tl.where(is_q, tl.load(qw_ptr + offs_h), tl.load(kw_ptr + offs_h)).to(tl.float32)
    qk2 = tl.where(is_q, tl.load(qw_ptr + HALF + offs_h), tl.load(kw_ptr + HALF + offs_h)).to(tl.float32)
    pos = tl.load(pos_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    cos = tl.load(cs_ptr + pos[:, None] * stride_cs + offs_h[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos[:, None] * stride_cs + HALF + offs_h[None, :], mask=mask_m[:, None],
                  other=0.0).to(tl.float32)
    _barrier(cnt_ptr + 1, G)

    # phase 3: the next residual add + RMSNorm, one q/k/v head per program
    ha = tl.load(dbuf_ptr + offs_m[:, None] * D + da[None, :], cache_modifier=".cg").to(wdt).to(tl.float32)
    hb = tl.load(dbuf_ptr + offs_m[:, None] * D + db[None, :], cache_modifier=".cg").to(wdt).to(tl.float32)
    s2a = (ha + sa).to(wdt).to(tl.float32)
    s2b = (hb + sb).to(wdt).to(tl.float32)
    if pid == 0:
        out_a = rows[:, None] * D + da[None, :]
        out_b = rows[:, None] * D + db[None, :]
        tl.store(h_ptr + out_a, ha.to(wdt), mask=mask_m[:, None])
        tl.store(h_ptr + out_b, hb.to(wdt), mask=mask_m[:, None])
        tl.store(s_ptr + out_a, sa.to(wdt), mask=mask_m[:, None])
        tl.store(s_ptr + out_b, sb.to(wdt), mask=mask_m[:, None])
        tl.store(s2_ptr + out_a, s2a.to(wdt), mask=mask_m[:, None])
        tl.store(s2_ptr + out_b, s2b.to(wdt), mask=mask_m[:, None])
    if is_head:
        rstd2 = 1.0 / tl.sqrt((tl.sum(s2a * s2a, axis=1) + tl.sum(s2b * s2b, axis=1)) / D + eps)
        ya = (s2a * rstd2[:, None] * n1a[None, :]).to(wdt)
        yb = (s2b * rstd2[:, None] * n1b[None, :]).to(wdt)
        acc = tl.dot(yb, w1b, tl.dot(ya, w1a, input_precision=PRECISION), input_precision=PRECISION)
        acc_2 = tl.dot(yb, w2b, tl.dot(ya, w2a, input_precision=PRECISION), input_precision=PRECISION)
        if hp < NORM_HEADS:
            qk_rstd = 1.0 / tl.sqrt((tl.sum(acc * acc, axis=1) + tl.sum(acc_2 * acc_2, axis=1)) / (2 * HALF) + qk_eps)
            x_1 = acc * qk_rstd[:, None] * qk1[None, :]
            x_2 = acc_2 * qk_rstd[:, None] * qk2[None, :]
            acc = x_1 * cos - x_2 * sin
            acc_2 = x_2 * cos + x_1 * sin
        out = qkv_ptr + rows[:, None] * (QKV_HEADS * 2 * HALF) + c1[None, :]
        tl.store(out, acc.to(wdt), mask=mask_m[:, None])
        tl.store(out + HALF, acc_2.to(wdt), mask=mask_m[:, None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--warps", default="4,8", help="the one kernel's warps per program, each timed")
    args = ap.parse_args()
    warp_counts = [int(w) for w in args.warps.split(",")]
    import torch
    from triton.testing import do_bench_cudagraph

    from convgpt_core import kernels
    from convgpt_core import norm_linear as nl

    dev, dt = torch.device("cuda"), torch.bfloat16
    assert torch.cuda.get_device_properties(0).multi_processor_count >= G, "every program must be resident"
    kernel = triton.jit(_layer_src)
    n = QKV_HEADS * HEAD_DIM
    layers, cos_sin = chain_case(dev, dt)

    def randn(*shape):
        return torch.randn(*shape, device=dev).to(dt)

    def shipped(h, res, pos):
        return chain_step(layers, cos_sin, h, res, pos)

    bufs = torch.zeros(2, 2, 16, D, device=dev)  # [parity][o, down] fp32 sums
    counters = torch.zeros(2, 2, device=dev, dtype=torch.int32)  # [parity][barrier]

    def persistent(h, res, pos, warps=4):
        p0 = layers[0]
        qkv, s2 = nl.norm_linear(h, res, p0["nw1"], 1e-6, p0["wqkv"],
                                 rope=nl.QKRope(p0["qw"], p0["kw"], 1e-6, cos_sin, pos, Q_HEADS, KV_HEADS))
        m = h.shape[0]
        for i, p in enumerate(layers):
            nxt = layers[(i + 1) % LAYERS]
            a = stand_in_attention(qkv)
            qkv = torch.empty(m, n, device=dev, dtype=dt)
            h_out, s, s2_next = (torch.empty(m, D, device=dev, dtype=dt) for _ in range(3))
            par = i % 2
            kernel[(G,)](
                a, s2, p["wo"], p["nw2"], p["wgu"], p["wd"], nxt["nw1"], nxt["wqkv"], nxt["qw"], nxt["kw"], cos_sin, pos,
                qkv, h_out, s, s2_next, bufs[par, 0], bufs[par, 1], counters[par], bufs[1 - par, 0], bufs[1 - par, 1],
                counters[1 - par], m, cos_sin.stride(0), 1e-6, 1e-6,
                D=D, D_A=D_A, D_B=D_B, HEADS_IN=HEADS_IN, INNER=INNER, G=G, O_PROGS=O_PROGS, KO=KO, AC=AC,
                HALF=HEAD_DIM // 2, Q_HEADS=Q_HEADS, NORM_HEADS=Q_HEADS + KV_HEADS, QKV_HEADS=QKV_HEADS, BLOCK_M=16,
                PRECISION="tf32", num_warps=warps, num_stages=1,
            )
            s2 = s2_next
        return h_out, s

    def timed(fn, *fn_args, **kw) -> float:
        return do_bench_cudagraph(lambda: fn(*fn_args, **kw), rep=100) * 1e3 / LAYERS

    def stand_in(qkv):  # the attention stand-in alone, LAYERS times
        for _ in range(LAYERS):
            stand_in_attention(qkv)

    say = report.tee(os.path.join(args.out, "layer_kernel.txt"))
    say(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}, bf16; "
        f"{LAYERS} layers per CUDA graph, us per layer (attention stood in by one elementwise kernel)")
    say(f"{'M':>4}{'stand-in':>10}{'shipped':>10}{'no PDL':>10}"
        + "".join(f"{f'one kernel, {w} warps':>22}" for w in warp_counts) + f"{'max |diff| h, s (rel)':>26}")
    rows = []
    shipped_limit, kernels.PDL_MAX_ROWS = kernels.PDL_MAX_ROWS, 1 << 30
    for m in [int(b) for b in args.batches.split(",")]:
        assert m <= 16
        h, res = randn(m, D), randn(m, D)
        pos = torch.randint(0, 8192, (m,), device=dev)
        want = shipped(h, res, pos)
        rel = []
        for w in warp_counts:
            bufs.zero_()
            counters.zero_()
            got = persistent(h, res, pos, warps=w)
            torch.cuda.synchronize()
            rel.append([((g.float() - x.float()).abs().max() / x.float().abs().max()).item()
                        for g, x in zip(got, want)])
            assert all(r < 5e-2 for r in rel[-1]), rel
        t_stand_in = timed(stand_in, torch.randn(m, n, device=dev).to(dt))
        t_shipped = timed(shipped, h, res, pos)
        os.environ["CONVGPT_PDL"] = "0"
        t_plain = timed(shipped, h, res, pos)
        os.environ.pop("CONVGPT_PDL")
        t_one = [timed(persistent, h, res, pos, warps=w) for w in warp_counts]
        rows.append(dict(m=m, stand_in_us=t_stand_in, shipped_us=t_shipped, shipped_no_pdl_us=t_plain,
                         one_kernel_us=dict(zip(warp_counts, t_one)), rel_diff=rel))
        say(f"{m:>4}{t_stand_in:>10.2f}{t_shipped:>10.2f}{t_plain:>10.2f}" + "".join(f"{t:>22.2f}" for t in t_one)
            + f"{max(r[0] for r in rel):>13.1e}{max(r[1] for r in rel):>13.1e}")
        json.dump({"device": torch.cuda.get_device_name(0), "rows": rows},
                  open(os.path.join(args.out, "layer_kernel.json"), "w"), indent=1)
    kernels.PDL_MAX_ROWS = shipped_limit


if __name__ == "__main__":
    main()
