"""A measurement before an integration: the MLP sublayer as one kernel instead of two.

Today a ConvGPT layer's MLP runs as ``norm_linear`` (residual add + RMSNorm + gate/up + SwiGLU,
writing the 3072-wide activation) followed by ``narrow_linear`` (down, 3072 -> D = 144, split
over K with an ordered reduction of fp32 partials).  Because D is small, one program can hold
whole rows of the stream, so both can be one kernel: program (i, j) normalises its rows,
computes the gate/up columns of intermediate slice j, applies SwiGLU (rounded to the model
dtype, as the activation is stored today) and multiplies that slice by the matching BLOCK_I
columns of the down weight: a [BLOCK_M, D] fp32 partial, one per slice.  The row block's last
program (an atomic counter, as in ``narrow_linear``) sums the partials in slice order, so the
result does not depend on which program finished last.  One launch and one activation
round trip fewer per layer; the price is that the sum over slices is done by one program per
row block.

This file holds the prototype kernel and times ``LAYERS`` MLP sublayers back to back in one
CUDA graph (each layer its own weights, more than L2 holds), with PDL where the shipped kernels
use it (``convgpt_core.kernels.pdl``), against the shipped pair, per row count and tile; each
configuration is checked against the shipped pair first (bf16 tolerance: only the fp32
summation order differs).  ``--check`` runs the correctness part alone (also under
``TRITON_INTERPRET=1`` on a CPU, small sizes).

Usage (CUDA): python benchmarks/bench_fused_mlp.py --out DIR [--batches 1,16,64,128,256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
import report  # noqa: E402

from convgpt_core.kernels import gdc_launch_dependents, gdc_wait, tl  # noqa: E402

D, INNER, LAYERS = 144, 3072, 32
TILES = [(16, 32, 4), (16, 64, 4), (16, 64, 8), (32, 64, 4), (32, 64, 8), (64, 64, 8)]  # BLOCK_M, BLOCK_I, warps


def _fused_mlp_src(
    x_ptr, r_ptr, s_ptr, nw_ptr, wgu_ptr, wd_ptr, y_ptr, part_ptr, count_ptr,
    M, I, stride_x, stride_r, stride_s, stride_gu, stride_d, stride_y, eps,
    K: tl.constexpr, K_A: tl.constexpr, K_B: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    """y[m] = down(silu(gate) * up of rmsnorm(x[m] + r[m])); s = x + r (stored by slice 0's
    programs).  K = D is covered by K_A + K_B columns; program (i, j) takes rows i*BLOCK_M..
    and intermediate columns j*BLOCK_I.. (SPLIT = number of slices)."""
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_a = tl.arange(0, K_A)
    mask_a = offs_a < K
    offs_i = pid_j * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I
    gcols = offs_i.to(tl.int64)
    dot_ty = tl.float32 if UPCAST else wgu_ptr.dtype.element_ty

    # weights first (with PDL, while the kernel before finishes): gate, up [K, BLOCK_I]; down^T [BLOCK_I, K]
    wmask_a = mask_a[:, None] & mask_i[None, :]
    ga = tl.load(wgu_ptr + gcols[None, :] * stride_gu + offs_a[:, None], mask=wmask_a, other=0.0)
    ua = tl.load(wgu_ptr + (gcols + I)[None, :] * stride_gu + offs_a[:, None], mask=wmask_a, other=0.0)
    da = tl.load(wd_ptr + offs_a[None, :].to(tl.int64) * stride_d + gcols[:, None], mask=mask_i[:, None] & mask_a[None, :], other=0.0)
    na = tl.load(nw_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    if K_B > 0:
        offs_b = K_A + tl.arange(0, K_B)
        mask_b = offs_b < K
        wmask_b = mask_b[:, None] & mask_i[None, :]
        gb = tl.load(wgu_ptr + gcols[None, :] * stride_gu + offs_b[:, None], mask=wmask_b, other=0.0)
        ub = tl.load(wgu_ptr + (gcols + I)[None, :] * stride_gu + offs_b[:, None], mask=wmask_b, other=0.0)
        db = tl.load(wd_ptr + offs_b[None, :].to(tl.int64) * stride_d + gcols[:, None], mask=mask_i[:, None] & mask_b[None, :], other=0.0)
        nb = tl.load(nw_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()

    xa = tl.load(x_ptr + rows[:, None] * stride_x + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
    if HAS_RES:
        ra = tl.load(r_ptr + rows[:, None] * stride_r + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
        xa = (xa.to(tl.float32) + ra.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if pid_j == 0:
            tl.store(s_ptr + rows[:, None] * stride_s + offs_a[None, :], xa, mask=mask_m[:, None] & mask_a[None, :])
    xa = xa.to(tl.float32)
    sq = tl.sum(xa * xa, axis=1)
    if K_B > 0:
        xb = tl.load(x_ptr + rows[:, None] * stride_x + offs_b[None, :], mask=mask_m[:, None] & mask_b[None, :], other=0.0)
        if HAS_RES:
            rb = tl.load(r_ptr + rows[:, None] * stride_r + offs_b[None, :], mask=mask_m[:, None] & mask_b[None, :],
                         other=0.0)
            xb = (xb.to(tl.float32) + rb.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if pid_j == 0:
                tl.store(s_ptr + rows[:, None] * stride_s + offs_b[None, :], xb, mask=mask_m[:, None] & mask_b[None, :])
        xb = xb.to(tl.float32)
        sq += tl.sum(xb * xb, axis=1)
    rstd = 1.0 / tl.sqrt(sq / K + eps)

    xa = (xa * rstd[:, None] * na[None, :]).to(wgu_ptr.dtype.element_ty).to(dot_ty)
    gate = tl.dot(xa, ga.to(dot_ty), input_precision=PRECISION)
    up = tl.dot(xa, ua.to(dot_ty), input_precision=PRECISION)
    if K_B > 0:
        xb = (xb * rstd[:, None] * nb[None, :]).to(wgu_ptr.dtype.element_ty).to(dot_ty)
        gate = tl.dot(xb, gb.to(dot_ty), gate, input_precision=PRECISION)
        up = tl.dot(xb, ub.to(dot_ty), up, input_precision=PRECISION)
    act = (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty).to(dot_ty)  # stored rounded today
    pa = tl.dot(act, da.to(dot_ty), input_precision=PRECISION)  # [BLOCK_M, K_A]
    tile_a = rows[:, None] * K + offs_a[None, :]
    out_a = mask_m[:, None] & mask_a[None, :]
    tl.store(part_ptr + pid_j * M * K + tile_a, pa, mask=out_a)
    if K_B > 0:
        pb = tl.dot(act, db.to(dot_ty), input_precision=PRECISION)
        tile_b = rows[:, None] * K + offs_b[None, :]
        out_b = mask_m[:, None] & mask_b[None, :]
        tl.store(part_ptr + pid_j * M * K + tile_b, pb, mask=out_b)
    tl.debug_barrier()  # every thread's partial is stored before the counter is raised
    done = tl.atomic_add(count_ptr + pid_m, 1, sem="acq_rel")
    if done == SPLIT - 1:  # the row block's last program sums the slices in order
        tl.debug_barrier()
        ta = tl.zeros((BLOCK_M, K_A), dtype=tl.float32)
        for j in range(SPLIT):
            ta += tl.load(part_ptr + j * M * K + tile_a, mask=out_a, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + rows[:, None] * stride_y + offs_a[None, :], ta.to(y_ptr.dtype.element_ty), mask=out_a)
        if K_B > 0:
            tb = tl.zeros((BLOCK_M, K_B), dtype=tl.float32)
            for j in range(SPLIT):
                tb += tl.load(part_ptr + j * M * K + tile_b, mask=out_b, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + rows[:, None] * stride_y + offs_b[None, :], tb.to(y_ptr.dtype.element_ty), mask=out_b)
        tl.atomic_xchg(count_ptr + pid_m, 0)


def fused_mlp(x, residual, norm_weight, eps, w_gate_up, w_down, block_m=16, block_i=64, num_warps=4):
    """(down(silu(gate) * up), x + residual) in one launch (the prototype's wrapper)."""
    import torch

    from convgpt_core import kernels
    from convgpt_core.narrow_linear import _counters
    from convgpt_core.norm_linear import _as_rows

    K = x.shape[-1]
    inner = w_gate_up.shape[0] // 2
    x2 = _as_rows(x)
    M = x2.shape[0]
    r2 = _as_rows(residual)
    s = torch.empty_like(x2)
    y = torch.empty_like(x2)
    split = kernels.triton.cdiv(inner, block_i)
    part = torch.empty(split, M, K, dtype=torch.float32, device=x.device)
    k_a, k_b = kernels._d_blocks(K)
    upcast = kernels._interpreting() and x.dtype != torch.float32
    on = kernels.pdl(x2, M)
    kernels.jitted(_fused_mlp_src)[(kernels.triton.cdiv(M, block_m), split)](
        x2, r2, s, norm_weight, w_gate_up, w_down, y, part, _counters(x.device),
        M, inner, x2.stride(0), r2.stride(0), s.stride(0), w_gate_up.stride(0), w_down.stride(0), y.stride(0),
        float(eps), K=K, K_A=k_a, K_B=k_b, HAS_RES=True, BLOCK_M=block_m, BLOCK_I=block_i, SPLIT=split,
        PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast, PDL=on,
        num_warps=num_warps, num_stages=1, **({"launch_pdl": True} if on else {}))
    return y.view(x.shape), s.view(x.shape)


def shipped_mlp(x, residual, norm_weight, eps, w_gate_up, w_down):
    from convgpt_core.narrow_linear import narrow_linear
    from convgpt_core.norm_linear import norm_linear

    act, s = norm_linear(x, residual, norm_weight, eps, w_gate_up, swiglu=True)
    return narrow_linear(act, w_down), s


def _weights(layers, d, inner, dev, dt, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dt)

    return [dict(nw=1 + randn(d, scale=0.1), wgu=randn(2 * inner, d, scale=d**-0.5),
                 wd=randn(d, inner, scale=inner**-0.5)) for _ in range(layers)]


def check(dev, dt, rows=(1, 5, 33), d=D, inner=INNER, tiles=TILES) -> None:
    """Every tile against the shipped pair and a float64 evaluation (bf16/fp32 tolerance)."""
    import torch
    import torch.nn.functional as F

    p = _weights(1, d, inner, dev, dt)[0]
    g = torch.Generator().manual_seed(1)
    for m in rows:
        x, r = (torch.randn(m, d, generator=g).to(dev, dt) for _ in range(2))
        s64 = x.double() + r.double()
        h = F.rms_norm(s64, (d,), p["nw"].double(), 1e-6)
        gate, up = F.linear(h, p["wgu"].double()).chunk(2, dim=-1)
        want = F.linear(F.silu(gate) * up, p["wd"].double())
        ship, ship_s = shipped_mlp(x, r, p["nw"], 1e-6, p["wgu"], p["wd"])
        tol = dict(rtol=2e-2, atol=2e-2) if dt != torch.float32 else dict(rtol=1e-4, atol=1e-4)
        for bm, bi, nw in tiles:
            y, s = fused_mlp(x, r, p["nw"], 1e-6, p["wgu"], p["wd"], bm, bi, nw)
            assert torch.equal(s, ship_s), (m, bm, bi, nw)
            torch.testing.assert_close(y.double(), want, **tol)
            torch.testing.assert_close(y, ship, **tol)
        print(f"rows {m}: {len(tiles)} tiles match the shipped pair and float64", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,16,64,128,256")
    ap.add_argument("--check", action="store_true", help="correctness only (small sizes under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    import torch

    if args.check:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        small = dev.type == "cpu"
        check(dev, torch.float32, d=D, inner=256 if small else INNER, tiles=TILES[:2] if small else TILES)
        check(dev, torch.bfloat16, d=D, inner=256 if small else INNER, tiles=TILES[:2] if small else TILES)
        return
    from triton.testing import do_bench_cudagraph

    dev, dt = torch.device("cuda"), torch.bfloat16
    check(dev, dt)
    layers = _weights(LAYERS, D, INNER, dev, dt)

    def chain(fn, h, res, **kw):
        for p in layers:
            h, res = fn(h, res, p["nw"], 1e-6, p["wgu"], p["wd"], **kw)
        return h, res

    def us(fn, *a, **kw) -> float:
        return do_bench_cudagraph(lambda: chain(fn, *a, **kw), rep=50) * 1e3 / LAYERS

    say = report.tee(os.path.join(args.out, "fused_mlp.txt"))
    say(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16: {LAYERS} MLP sublayers (D {D}, "
        f"inner {INNER}) per CUDA graph, us per layer; fused tiles BLOCK_M/BLOCK_I/warps")
    say(f"{'M':>5}{'shipped':>9}  " + "  ".join(f"{bm}/{bi}/{nw}" for bm, bi, nw in TILES))
    rows = []
    for m in [int(b) for b in args.batches.split(",")]:
        h, res = torch.randn(m, D, device=dev).to(dt), torch.randn(m, D, device=dev).to(dt)
        base = us(shipped_mlp, h, res)
        fused = {f"{bm}/{bi}/{nw}": us(fused_mlp, h, res, block_m=bm, block_i=bi, num_warps=nw)
                 for bm, bi, nw in TILES}
        rows.append(dict(m=m, shipped_us=base, fused_us=fused))
        say(f"{m:>5}{base:>9.2f}  " + "  ".join(f"{v:>{len(k)}.2f}" for k, v in fused.items())
            + f"   best {min(fused.values()) / base:.2f}x")
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
                  open(os.path.join(args.out, "fused_mlp.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
