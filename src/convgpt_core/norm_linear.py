"""Residual add + RMSNorm + the linear that reads the D-wide stream, as one Triton kernel.

Every decoder layer reads its D-wide residual stream twice, each time as
``rmsnorm(h + residual) @ W.T``: into ``qkv_proj`` (W: q+k+v rows x D) and into the MLP's
merged ``gate_up_proj`` (W: 2*inner rows x D), whose output goes straight into SiLU(gate)*up.
An engine runs that as two or three kernels (fused add+norm, GEMM, activation), each a
few microseconds at decode batch sizes, where the GEMM itself reads ~1 MB.  Because K = D is
small (144 in the published model), one program can hold whole rows of the stream: every
program of :func:`norm_linear` loads its ``BLOCK_M`` rows of ``h`` (+ ``residual``), forms
the sum (rounded to the model dtype, as the engines' fused add+norm store it), writes it out
once (the programs of the first column block), normalises the rows in registers, and
multiplies them by its ``BLOCK_N`` rows of W on tensor cores; with ``swiglu`` it also takes
the matching rows of the "up" half of W and writes ``silu(gate) * up`` directly.  At the
q+k+v site it can also finish what attention reads (:class:`QKRope`): each program then takes
one head, as two column blocks of half a head, RMS-normalises the q and k heads and rotates
them by RoPE (neox: the two halves are the rotated pairs), so the engines' q/k-norm and RoPE
kernels do not run at all.  No cross-program reduction, no workspace, nothing to reset
between calls: CUDA graphs capture it as they capture a GEMM.

It pays at decode sizes only: past :data:`MAX_ROWS` rows (prefill chunks) :func:`norm_linear`
runs the unfused ops instead (torch's add and RMSNorm, the cuBLAS GEMM, a one-pass SiLU*mul
kernel).  Only column-parallel linears qualify (their input is the whole row on every rank),
and only unquantized ones without LoRA; the adapters check that and otherwise run the
engine's own layers.  Under ``torch.compile`` the call is the opaque custom op
``convgpt::norm_linear``, which chooses by rows when it runs; a graph compiled only for larger
steps (vLLM's compile range above the limit) gets the unfused ops written in instead
(:mod:`convgpt_core.graph_pass`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from .kernels import (
    _d_blocks,
    _interpreting,
    gdc_launch_dependents,
    gdc_wait,
    jitted,
    kernel_takes,
    pdl,
    register_op,
    tl,
    triton,
)

MAX_K = 512  # rows of the stream are held in registers: D up to this width
# Up to this many rows (tokens) the kernel runs; more take the unfused ops (cuBLAS for the
# GEMM).  H200, round 5 (benchmarks/results), the kernel at every size inside vLLM: at batch 1
# the fused sites took 624 us per step where the engine's norm, GEMM and activation kernels had
# taken 713; at batch 256 968 us vs 922 (the unfused ops below have one kernel more per site
# than the engine's); in a 32 x 1024-token prefill 31 of 60 ms GPU time, where
# cuBLAS and the engine's kernels had taken ~20.
MAX_ROWS = 256


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def norm_linear_available(x: torch.Tensor, weight: torch.Tensor, *, max_rows: int | None = MAX_ROWS) -> bool:
    """True when :func:`norm_linear` runs as the Triton kernel for this input and weight, and
    ``x`` has at most ``max_rows`` rows.  ``max_rows=None``: for a graph traced once for every
    batch size, which leaves the choice by rows to the custom op at run time."""
    return (
        kernel_takes(x, weight)
        and weight.shape[1] <= MAX_K
        and (max_rows is None or _rows(x) <= max_rows)
    )


class QKRope(NamedTuple):
    """What turns a q+k+v output into the q and k that attention reads: each q and k head
    RMS-normalised over its ``head_dim`` columns (``q_weight`` / ``k_weight``, ``eps``), then
    rotated by neox-style RoPE over the whole head at its row's position.  ``cos_sin`` is the
    engines' ``cos_sin_cache``: one row per position, the cosines of the ``head_dim / 2``
    frequencies, then their sines.  The q+k+v columns are ``q_heads`` q heads, then
    ``kv_heads`` k heads and as many v heads (the engines' QKV layout, one rank's heads)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    cos_sin: torch.Tensor
    positions: torch.Tensor
    q_heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.q_weight.shape[0]

    def check(self, rows: int, width: int) -> None:
        hd = self.head_dim
        if hd % 2 or self.k_weight.shape != (hd,) or self.cos_sin.dim() != 2 or self.cos_sin.shape[1] != hd:
            raise ValueError(f"q/k norm + RoPE: q/k norm weights {tuple(self.q_weight.shape)}, "
                             f"{tuple(self.k_weight.shape)} and cos/sin rows {tuple(self.cos_sin.shape)} do not fit")
        if (self.q_heads + 2 * self.kv_heads) * hd != width:
            raise ValueError(f"q/k norm + RoPE: {self.q_heads} q + 2 x {self.kv_heads} kv heads of {hd} do not "
                             f"fit {width} q+k+v columns")
        if self.positions.numel() != rows:
            raise ValueError(f"q/k norm + RoPE: {self.positions.numel()} positions for {rows} rows")


class KVStore(NamedTuple):
    """Where the q+k+v kernel with :class:`QKRope` also writes each row's k heads (normalised and
    rotated) and v heads: into row ``slots[m]`` of the engine's paged KV cache, ``k_cache`` and
    ``v_cache`` (``[cache rows, kv_heads, head_dim]`` views of one layer's buffers in the model's
    dtype, each head's values dense; the rows and heads may be strided, as where the engine keeps
    a slot's k and v heads side by side), which is what the engine's own cache write would have
    done.  A negative slot (a padded row) writes nothing, and so do the rows past the last slot
    (an engine whose slots cover the real rows only).  The engine's attention is then told not
    to write them again."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor

    def check(self, rows: int, rope: QKRope, dtype: torch.dtype) -> None:
        want = (rope.kv_heads, rope.head_dim)
        for name, c in (("k_cache", self.k_cache), ("v_cache", self.v_cache)):
            if c.dim() != 3 or tuple(c.shape[1:]) != want or c.stride(2) != 1 or c.stride(1) < rope.head_dim:
                raise ValueError(f"KV store: {name} {tuple(c.shape)} (strides {c.stride()}) is not "
                                 f"[rows, {want[0]}, {want[1]}] with dense heads")
            if c.dtype != dtype:
                raise ValueError(f"KV store: {name} holds {c.dtype}, the q+k+v output is {dtype}")
        if self.k_cache.shape[0] != self.v_cache.shape[0] or self.k_cache.stride() != self.v_cache.stride():
            raise ValueError(f"KV store: k_cache {tuple(self.k_cache.shape)} (strides {self.k_cache.stride()}) and "
                             f"v_cache {tuple(self.v_cache.shape)} (strides {self.v_cache.stride()}) differ")
        if self.slots.numel() > rows or self.slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"KV store: {self.slots.numel()} slots ({self.slots.dtype}) for {rows} rows")


class QKV(NamedTuple):
    """A q+k+v output as two tensors in one buffer, as :func:`norm_linear_triton` with
    ``q_apart`` writes it: ``q``, the q heads (contiguous), then ``kv``, the k and v heads."""

    q: torch.Tensor
    kv: torch.Tensor

    @classmethod
    def of(cls, y: torch.Tensor, q_width: int) -> QKV:
        """The two tensors in the memory of ``y`` (contiguous, q+k+v columns): every row's q heads
        first, then every row's k and v heads."""
        lead, n = y.shape[:-1], y.shape[-1]
        flat = y.view(-1)
        at = flat.numel() // n * q_width
        return cls(flat[:at].view(*lead, q_width), flat[at:].view(*lead, n - q_width))


def split_qkv(qkv: torch.Tensor | QKV, q_size: int, kv_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v heads of a q+k+v output: column views of a tensor in the engines' layout, or
    of a :class:`QKV`'s two tensors."""
    if isinstance(qkv, QKV):
        return (qkv.q, *qkv.kv.split([kv_size, kv_size], dim=-1))
    return qkv.split([q_size, kv_size, kv_size], dim=-1)


def linear_q_apart(x: torch.Tensor, weight: torch.Tensor, q_width: int) -> QKV:
    """``x @ weight.T`` for a q+k+v weight (its first ``q_width`` rows the q heads'), as a
    :class:`QKV`: two GEMMs, one writing the q heads into a contiguous tensor and one the k and
    v heads after it, in one buffer.  For attention that wants q contiguous (SGLang's flashinfer
    backend copies a strided q first, in prefill and decode alike), at row counts where that copy
    costs more than a second GEMM (:func:`q_apart_linear_on`)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or not 0 < q_width < weight.shape[0]:
        raise ValueError(f"q apart: input {tuple(x.shape)}, weight {tuple(weight.shape)}, {q_width} q columns")
    out = QKV.of(x.new_empty(x.shape[0], weight.shape[0]), q_width)
    torch.mm(x, weight[:q_width].t(), out=out.q)
    torch.mm(x, weight[q_width:].t(), out=out.kv)
    return out


# --------------------------------------------------------------------------------------
# The kernel


def _norm_linear_src(
    x_ptr, r_ptr, s_ptr, nw_ptr, w_ptr, y_ptr,
    qw_ptr, kw_ptr, cs_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr,
    M, N, stride_x, stride_r, stride_s, stride_w, stride_y, stride_cs, stride_c, stride_ch, n_slots,
    eps, qk_eps,
    K: tl.constexpr, K_A: tl.constexpr, K_B: tl.constexpr,
    HAS_RES: tl.constexpr, SWIGLU: tl.constexpr,
    ROPE: tl.constexpr, HALF: tl.constexpr, Q_HEADS: tl.constexpr, NORM_HEADS: tl.constexpr, KV: tl.constexpr,
    LATE_CS: tl.constexpr, Q_APART: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    """y[m, n] = rmsnorm(x[m] (+ r[m])) . w[n]  (n < N; with SWIGLU: silu(. w[n]) * (. w[N + n]));
    s[m] = x[m] + r[m] written by the programs of column block 0.  K is covered by a block of
    K_A columns plus an optional K_B block (both powers of two), e.g. 144 = 128 + 16.

    With ROPE (q+k+v), each program's columns are one head of 2 * HALF: its first half (the
    BLOCK_N >= HALF columns from the head's start) and second half (HALF further on).  Heads
    below NORM_HEADS (q heads, then k heads) get their RMSNorm over the head (weight qw for
    the first Q_HEADS, kw after) and neox RoPE at the row's position (cs: cos | sin rows);
    v heads are stored as they come.  With KV (only with ROPE) the k and v heads also go to row
    slot[m] of the k / v cache (kc, vc: rows of stride_c, heads of stride_ch), none for slot < 0
    or m >= n_slots.  A row's cos | sin come in before the GEMM, or after it with LATE_CS (a
    float32 table, SGLang's: held through the GEMM, its two float32 tiles cost the q+k+v kernel
    twice its time at 256 rows on an H200, round 21).  With Q_APART (only with ROPE) y is two
    tensors, one after the other: the q heads (M rows of stride_y) and then the k and v heads
    (M rows of N - stride_y), so that the q heads reach attention as one contiguous tensor.

    With PDL (programmatic dependent launch, :func:`convgpt_core.kernels.pdl`) the program
    loads its weights, then waits for the kernels before it: nothing it reads or writes after
    that wait may be touched before it (positions, x, the residual, y, s)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_a = tl.arange(0, K_A)
    mask_a = offs_a < K
    if K_B > 0:
        offs_b = K_A + tl.arange(0, K_B)
        mask_b = offs_b < K
    if ROPE:  # a head's two halves
        offs_h = tl.arange(0, BLOCK_N)
        mask_n = offs_h < HALF
        offs_n = pid_n * (2 * HALF) + offs_h
        offs_2 = offs_n + HALF
    else:  # SWIGLU: the gate columns and the matching up columns
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_2 = offs_n + N

    # first what no earlier kernel writes: the weights (with PDL, while that kernel finishes)
    dot_ty = tl.float32 if UPCAST else w_ptr.dtype.element_ty
    cols = offs_n.to(tl.int64)
    wa = tl.load(w_ptr + cols[None, :] * stride_w + offs_a[:, None], mask=mask_a[:, None] & mask_n[None, :], other=0.0)
    na = tl.load(nw_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    if K_B > 0:
        wb = tl.load(w_ptr + cols[None, :] * stride_w + offs_b[:, None], mask=mask_b[:, None] & mask_n[None, :], other=0.0)
        nb = tl.load(nw_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)
    if SWIGLU or ROPE:
        cols_2 = offs_2.to(tl.int64)
        ua = tl.load(w_ptr + cols_2[None, :] * stride_w + offs_a[:, None], mask=mask_a[:, None] & mask_n[None, :], other=0.0)
        if K_B > 0:
            ub = tl.load(w_ptr + cols_2[None, :] * stride_w + offs_b[:, None], mask=mask_b[:, None] & mask_n[None, :], other=0.0)
    if ROPE:  # the head's q or k norm weight
        is_q = pid_n < Q_HEADS
        w_1 = tl.where(is_q, tl.load(qw_ptr + offs_h, mask=mask_n, other=0.0),
                       tl.load(kw_ptr + offs_h, mask=mask_n, other=0.0)).to(tl.float32)
        w_2 = tl.where(is_q, tl.load(qw_ptr + HALF + offs_h, mask=mask_n, other=0.0),
                       tl.load(kw_ptr + HALF + offs_h, mask=mask_n, other=0.0)).to(tl.float32)
    if PDL:  # the earlier kernels' writes are visible from here on; the next kernel may start
        gdc_wait()
        gdc_launch_dependents()
    if ROPE:  # each row's cos | sin, loaded before the GEMM (they do not depend on it)
        pos = tl.load(pos_ptr + rows, mask=mask_m, other=0).to(tl.int64)
        cs_rows = cs_ptr + pos[:, None] * stride_cs + offs_h[None, :]
        cs_mask = mask_m[:, None] & mask_n[None, :]
        if not LATE_CS:
            cos = tl.load(cs_rows, mask=cs_mask, other=0.0).to(tl.float32)
            sin = tl.load(cs_rows + HALF, mask=cs_mask, other=0.0).to(tl.float32)

    xa = tl.load(x_ptr + rows[:, None] * stride_x + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
    if HAS_RES:
        ra = tl.load(r_ptr + rows[:, None] * stride_r + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
        xa = (xa.to(tl.float32) + ra.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(s_ptr + rows[:, None] * stride_s + offs_a[None, :], xa, mask=mask_m[:, None] & mask_a[None, :])
    xa = xa.to(tl.float32)
    sq = tl.sum(xa * xa, axis=1)
    if K_B > 0:
        xb = tl.load(x_ptr + rows[:, None] * stride_x + offs_b[None, :], mask=mask_m[:, None] & mask_b[None, :], other=0.0)
        if HAS_RES:
            rb = tl.load(r_ptr + rows[:, None] * stride_r + offs_b[None, :], mask=mask_m[:, None] & mask_b[None, :], other=0.0)
            xb = (xb.to(tl.float32) + rb.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if pid_n == 0:
                tl.store(s_ptr + rows[:, None] * stride_s + offs_b[None, :], xb, mask=mask_m[:, None] & mask_b[None, :])
        xb = xb.to(tl.float32)
        sq += tl.sum(xb * xb, axis=1)
    rstd = 1.0 / tl.sqrt(sq / K + eps)

    # normalise and scale in float32, round to the weights' dtype for the tensor-core dots
    xa = (xa * rstd[:, None] * na[None, :]).to(w_ptr.dtype.element_ty).to(dot_ty)
    acc = tl.dot(xa, wa.to(dot_ty), input_precision=PRECISION)
    if K_B > 0:
        xb = (xb * rstd[:, None] * nb[None, :]).to(w_ptr.dtype.element_ty).to(dot_ty)
        acc = tl.dot(xb, wb.to(dot_ty), acc, input_precision=PRECISION)
    if SWIGLU or ROPE:
        acc_2 = tl.dot(xa, ua.to(dot_ty), input_precision=PRECISION)
        if K_B > 0:
            acc_2 = tl.dot(xb, ub.to(dot_ty), acc_2, input_precision=PRECISION)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_2
    if ROPE:
        if pid_n < NORM_HEADS:
            # columns past HALF hold zeros (masked weight rows): they add nothing to the sum
            qk_rstd = 1.0 / tl.sqrt((tl.sum(acc * acc, axis=1) + tl.sum(acc_2 * acc_2, axis=1)) / (2 * HALF) + qk_eps)
            x_1 = acc * qk_rstd[:, None] * w_1[None, :]
            x_2 = acc_2 * qk_rstd[:, None] * w_2[None, :]
            if LATE_CS:
                cos = tl.load(cs_rows, mask=cs_mask, other=0.0)
                sin = tl.load(cs_rows + HALF, mask=cs_mask, other=0.0)
            acc = x_1 * cos - x_2 * sin
            acc_2 = x_2 * cos + x_1 * sin
        if Q_APART:  # the head's place: in the q tensor, or in the k+v tensor after it
            in_kv = (pid_n >= Q_HEADS).to(tl.int64)
            y_ptr += in_kv * M * stride_y
            offs_n -= in_kv * stride_y
            offs_2 -= in_kv * stride_y
            stride_y += in_kv * (N - 2 * stride_y)
        tl.store(y_ptr + rows[:, None] * stride_y + offs_2[None, :], acc_2.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
        if KV:  # noqa: SIM102 - a constexpr test, then a run-time one
            if pid_n >= Q_HEADS:  # a k head (normalised and rotated above) or a v head
                if pid_n < NORM_HEADS:
                    head_ptr = kc_ptr + (pid_n - Q_HEADS) * stride_ch
                else:
                    head_ptr = vc_ptr + (pid_n - NORM_HEADS) * stride_ch
                has_slot = mask_m & (rows < n_slots)
                slot = tl.load(slot_ptr + rows, mask=has_slot, other=-1).to(tl.int64)
                at = head_ptr + slot[:, None] * stride_c + offs_h[None, :]
                keep = (has_slot & (slot >= 0))[:, None] & mask_n[None, :]
                tl.store(at, acc.to(kc_ptr.dtype.element_ty), mask=keep)
                tl.store(at + HALF, acc_2.to(kc_ptr.dtype.element_ty), mask=keep)
    tl.store(y_ptr + rows[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _silu_mul_src(g_ptr, y_ptr, M, N, stride_g, stride_y, BLOCK: tl.constexpr):
    """y[m, n] = silu(g[m, n]) * g[m, N + n], one row block of BLOCK columns per program."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(g_ptr + m * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(g_ptr + m * stride_g + N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_y + offs, (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul_torch(y: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the merged gate/up output (gate columns first) in torch's ops."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def _silu_mul(y: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the merged gate/up output in one pass (what the engines' activation
    kernels do) where Triton runs, torch's two ops elsewhere."""
    n = y.shape[-1] // 2
    if not kernel_takes(y):
        return silu_mul_torch(y)
    g2 = _as_rows(y)
    out = torch.empty(*y.shape[:-1], n, dtype=y.dtype, device=y.device)
    if out.numel():
        block = 1024
        jitted(_silu_mul_src)[(g2.shape[0], triton.cdiv(n, block))](
            g2, out.view(-1, n), g2.shape[0], n, g2.stride(0), n, BLOCK=block, num_warps=4)
    return out


@functools.cache
def _tiles(M: int, swiglu: bool, half_head: int = 0) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a fixed heuristic, from the sweeps of
    ``benchmarks/bench_norm_linear.py`` on an H200 (D = 144, N = 4096 and 2 x 3072; column
    blocks in round 6, every tile at 128 and 256 rows in round 14).  Rows in tiles of 16 (the
    tensor-core minimum) up to 16 rows, then 32.  Up to 32 rows, 32-wide column blocks spread
    the weight reads over the most SMs (q+k+v: 128 programs for one row); wider blocks win
    from 64 rows on: 128 from 65 rows (qkv 3.88 us at 128 rows where 64 x 64 tiles took 4.20).
    Past 128 rows q+k+v takes 64-row tiles (4.84 us at 256), SwiGLU, whose programs read two
    blocks of W, 32 x 64 (6.33 us where 64 x 64 on 8 warps took 7.82).  Four warps throughout:
    the fastest tile at each size swept ran four.

    With q/k norm + RoPE (``half_head``: half a head's width) a program takes one head, its two
    halves as two column blocks, and the rows go in tiles of 16 up to 192 rows, then 64.  Timed
    in the decode chain (round 22, ``benchmarks/gpu/probe_r22.py``, two machines), 16-row tiles
    took 0.94-0.97x the chain's time per layer at 128-192 rows against the 64-row tile, which
    spills ~1 KB a thread (round 21); alone and hot (round 15) all came within 2-7%.  At 256
    rows the 32- and 64-row tiles came within 2% of each other, and the 64-row one is the one
    measured end to end there (SGLang, round 22)."""
    if half_head:
        return (16 if M <= 192 else 64), max(16, triton.next_power_of_2(half_head)), 4
    bm = 64 if (M > 128 and not swiglu) else 16 if M <= 16 else 32
    bn = 32 if M <= 32 else 64 if (M <= 64 or (M > 128 and swiglu)) else 128
    return bm, bn, 4


def _launch(x2, r2, s2, norm_weight, weight, y2, eps, swiglu, rope, block_m, block_n, num_warps, pdl_ok=True,
            kv=None, q_apart=False):
    M, K = x2.shape
    N = y2.shape[1]
    k_a, k_b = _d_blocks(K)
    half = 0 if rope is None else rope.head_dim // 2
    bm, bn, nw = _tiles(M, swiglu, half)
    bm, nw = block_m or bm, num_warps or nw
    if rope is None:  # with RoPE a column block is half a head
        bn = block_n or bn
    upcast = _interpreting() and x2.dtype != torch.float32  # the interpreter multiplies 16-bit tiles as integers
    precision = "ieee" if x2.dtype == torch.float32 or upcast else "tf32"
    has_res = r2 is not None
    grid = (triton.cdiv(M, bm), N // (2 * half) if rope is not None else triton.cdiv(N, bn))
    on = pdl_ok and pdl(x2, M)
    qk = (x2, x2, x2, x2, 0, 0.0) if rope is None else (
        rope.q_weight, rope.k_weight, rope.cos_sin, rope.positions, rope.cos_sin.stride(0), float(rope.eps))
    cache = (y2, y2, x2, 0, 0, 0) if kv is None else (
        kv.k_cache, kv.v_cache, kv.slots, kv.k_cache.stride(0), kv.k_cache.stride(1), kv.slots.numel())
    jitted(_norm_linear_src)[grid](
        x2, r2 if has_res else x2, s2 if has_res else x2, norm_weight, weight, y2, *qk[:4], *cache[:3],
        M, N, x2.stride(0), r2.stride(0) if has_res else 0, s2.stride(0) if has_res else 0,
        weight.stride(0), rope.q_heads * rope.head_dim if q_apart else y2.stride(0), qk[4], *cache[3:], float(eps), qk[5],
        K=K, K_A=k_a, K_B=k_b, HAS_RES=has_res, SWIGLU=swiglu,
        ROPE=rope is not None, HALF=half, Q_HEADS=0 if rope is None else rope.q_heads,
        NORM_HEADS=0 if rope is None else rope.q_heads + rope.kv_heads, KV=kv is not None,
        LATE_CS=rope is not None and rope.cos_sin.dtype == torch.float32, Q_APART=q_apart, BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=precision, UPCAST=upcast, PDL=on, num_warps=nw, num_stages=1, **({"launch_pdl": True} if on else {}),
    )


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def norm_linear_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    swiglu: bool = False,
    rope: QKRope | None = None,
    *,
    kv: KVStore | None = None,
    q_apart: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor | QKV, torch.Tensor | None]:
    """The kernel launch behind :func:`norm_linear` (same arguments and results); with ``kv``
    (and ``rope``) it also writes the k and v heads into the KV cache (:class:`KVStore`).  With
    ``q_apart`` (and ``rope``) the q heads and the k+v heads come as two tensors (:class:`QKV`),
    the q heads contiguous: what attention backends that want a contiguous query take without
    a copy (SGLang's flashinfer decode copies a strided one, ~2.7 us a layer at 256 rows).  The
    keyword tile settings override the heuristic (benchmarks, tests; with ``rope`` a column
    block is half a head, whatever ``block_n`` says)."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("norm_linear_triton needs triton")
    K = weight.shape[1]
    if x.shape[-1] != K or (residual is not None and residual.shape != x.shape):
        raise ValueError(
            f"norm_linear: x {tuple(x.shape)}, residual {None if residual is None else tuple(residual.shape)} "
            f"and weight {tuple(weight.shape)} do not fit"
        )
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"norm_linear: a SwiGLU weight stacks gate and up rows, got {weight.shape[0]} rows")
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    copied = False  # the kernel reads its weights before its PDL wait: none may come from a copy just made
    if rope is not None:
        if swiglu:
            raise ValueError("norm_linear: q/k norm + RoPE applies to a q+k+v weight, not a SwiGLU one")
        rope.check(_rows(x), N)
        dense = rope._replace(q_weight=rope.q_weight.contiguous(), k_weight=rope.k_weight.contiguous(),
                              cos_sin=rope.cos_sin if rope.cos_sin.stride(-1) == 1 else rope.cos_sin.contiguous(),
                              positions=rope.positions.reshape(-1).contiguous())  # the kernel reads them densely
        copied = dense.q_weight is not rope.q_weight or dense.k_weight is not rope.k_weight
        rope = dense
    if kv is not None:
        if rope is None:
            raise ValueError("norm_linear: a KV store needs the q/k norm + RoPE epilogue (rope)")
        kv.check(_rows(x), rope, x.dtype)
        kv = kv._replace(slots=kv.slots.reshape(-1).contiguous())  # read after the PDL wait: a copy is safe
    if q_apart and rope is None:
        raise ValueError("norm_linear: q_apart splits the q heads of a q+k+v output (rope)")
    lead = x.shape[:-1]
    y = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    s = None if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    out = QKV.of(y, rope.q_heads * rope.head_dim) if q_apart else y
    if y.numel() == 0:
        return out, s
    nw = norm_weight.to(x.dtype)
    copied = copied or nw is not norm_weight
    if weight.stride(-1) != 1:
        weight, copied = weight.contiguous(), True
    _launch(_as_rows(x), None if residual is None else _as_rows(residual), None if s is None else s.view(-1, K),
            nw, weight, y.view(-1, N), eps, swiglu, rope, block_m, block_n, num_warps, pdl_ok=not copied, kv=kv,
            q_apart=q_apart)
    return out, s


def qk_norm_rope_torch(qkv: torch.Tensor, rope: QKRope) -> torch.Tensor:
    """:class:`QKRope` applied to a q+k+v output in torch's ops (float32 math or wider, one
    rounding), for Inductor to fuse in the graphs of larger steps."""
    hd, normed = rope.head_dim, rope.q_heads + rope.kv_heads
    acc = torch.promote_types(qkv.dtype, torch.float32)
    heads = qkv.reshape(-1, normed + rope.kv_heads, hd)
    qk = heads[:, :normed].to(acc)
    w = torch.cat((rope.q_weight.expand(rope.q_heads, hd), rope.k_weight.expand(rope.kv_heads, hd))).to(acc)
    qk = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + rope.eps) * w
    cos, sin = rope.cos_sin.index_select(0, rope.positions.reshape(-1)).to(acc)[:, None, :].chunk(2, dim=-1)
    x1, x2 = qk.chunk(2, dim=-1)
    qk = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((qk.to(qkv.dtype), heads[:, normed:]), dim=1).reshape(qkv.shape)


def norm_linear_torch(x, residual, norm_weight, eps, weight, swiglu=False, rope=None, *, silu_mul=None):
    """The same computation unfused (any device and dtype): the add, torch's RMSNorm, the
    GEMM (cuBLAS on CUDA) and a one-pass SiLU*mul or :func:`qk_norm_rope_torch`: what larger
    batches run.  ``silu_mul`` replaces the SiLU*mul (:mod:`convgpt_core.graph_pass` passes
    :func:`silu_mul_torch`, for Inductor to fuse)."""
    s = None if residual is None else x + residual
    h = F.rms_norm(x if s is None else s, (x.shape[-1],), norm_weight.to(x.dtype), eps)
    y = F.linear(h.to(weight.dtype), weight)
    if swiglu:
        y = (silu_mul or _silu_mul)(y)
    elif rope is not None:
        y = qk_norm_rope_torch(y, rope)
    return y, s


def _kernel_or_torch(x, residual, norm_weight, eps, weight, swiglu, rope=None):
    if _rows(x) <= MAX_ROWS:
        return norm_linear_triton(x, residual, norm_weight, eps, weight, swiglu, rope)
    return norm_linear_torch(x, residual, norm_weight, eps, weight, swiglu, rope)


# --------------------------------------------------------------------------------------
# The opaque custom op for torch.compile, and the dispatch the adapters call


def op_outputs(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, s)`` as ``convgpt::norm_linear`` returns them: an op returns tensors only, so a
    call without a residual gives an empty second output (the op's body, and the unfused path
    :mod:`convgpt_core.graph_pass` writes in its place)."""
    return y, (x.new_empty(0) if s is None else s)


def _op_impl(x, residual, norm_weight, eps, weight, swiglu):
    return op_outputs(x, *_kernel_or_torch(x, residual, norm_weight, eps, weight, swiglu))


def _op_fake(x, residual, norm_weight, eps, weight, swiglu):
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = x.new_empty(*x.shape[:-1], n)
    return y, (x.new_empty(0) if residual is None else torch.empty_like(x))


def _rope_op_impl(x, residual, norm_weight, eps, weight, *rope):
    return op_outputs(x, *_kernel_or_torch(x, residual, norm_weight, eps, weight, False, QKRope(*rope)))


def _rope_op_fake(x, residual, norm_weight, eps, weight, *rope):
    return _op_fake(x, residual, norm_weight, eps, weight, False)


_HAVE_OP = triton is not None and register_op(
    "norm_linear",
    "(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor weight, bool swiglu) -> (Tensor, Tensor)",
    _op_impl, _op_fake,
) and register_op(
    "norm_linear_rope",
    "(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor weight, Tensor q_weight, Tensor k_weight, "
    "float qk_eps, Tensor cos_sin, Tensor positions, int q_heads, int kv_heads) -> (Tensor, Tensor)",
    _rope_op_impl, _rope_op_fake,
)


# --------------------------------------------------------------------------------------
# The engine's KV cache, reached from inside a compiled graph


class KVCaches(Protocol):
    """An engine adapter's access to its layers' KV caches, for :func:`norm_linear` with
    ``kv_cache=True``.  A layer is named by its q+k+v weight: a graph input like every other
    parameter, so the compiled graphs of all layers stay alike (vLLM compiles identical pieces
    once), while the cache and the step's slots are looked up when the op runs, as the engine's
    own cache write looks them up."""

    def store(self, weight: torch.Tensor, rows: int) -> KVStore | None:
        """Where the q+k+v kernel may write this step's k and v heads itself; None: :meth:`write`."""

    def write(self, weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The engine's own cache write of this step's k and v heads (``[rows, kv_heads, head_dim]``)."""


_KV_CACHES: list[KVCaches] = []


def use_kv_caches(caches: KVCaches) -> None:
    """Make ``caches`` the ones :func:`norm_linear` with ``kv_cache=True`` writes (one adapter's
    per process, as one engine runs in it)."""
    _KV_CACHES[:] = [caches]


def _kv_caches() -> KVCaches:
    if not _KV_CACHES:
        raise RuntimeError("convgpt: norm_linear(kv_cache=True) needs the engine's KV caches (use_kv_caches)")
    return _KV_CACHES[0]


def kv_heads(qkv: torch.Tensor, q_heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k and v heads of a q+k+v output, as ``[rows, kv_heads, head_dim]`` views."""
    heads = qkv.reshape(-1, q_heads + 2 * kv_heads, qkv.shape[-1] // (q_heads + 2 * kv_heads))
    return heads[:, q_heads:q_heads + kv_heads], heads[:, q_heads + kv_heads:]


def _norm_linear_kv(x, residual, norm_weight, eps, weight, rope):
    """:func:`norm_linear` with ``rope`` that also writes the layer's KV cache: from the kernel
    where the engine's cache takes it (:meth:`KVCaches.store`), else by the engine's write after."""
    caches = _kv_caches()
    kv = caches.store(weight, _rows(x)) if norm_linear_available(x, weight) else None
    if kv is not None:
        return norm_linear_triton(x, residual, norm_weight, eps, weight, rope=rope, kv=kv)
    if norm_linear_available(x, weight, max_rows=None):
        y, s = _kernel_or_torch(x, residual, norm_weight, eps, weight, False, rope)
    else:
        y, s = norm_linear_torch(x, residual, norm_weight, eps, weight, rope=rope)
    caches.write(weight, *kv_heads(y, rope.q_heads, rope.kv_heads))
    return y, s


def _rope_kv_op_impl(x, residual, norm_weight, eps, weight, *rope):
    return op_outputs(x, *_norm_linear_kv(x, residual, norm_weight, eps, weight, QKRope(*rope)))


def _kv_write_op_impl(qkv, weight, q_heads, kv_heads_):
    _kv_caches().write(weight, *kv_heads(qkv, q_heads, kv_heads_))


_HAVE_KV_OPS = _HAVE_OP and register_op(
    "norm_linear_rope_kv",
    "(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor weight, Tensor q_weight, Tensor k_weight, "
    "float qk_eps, Tensor cos_sin, Tensor positions, int q_heads, int kv_heads) -> (Tensor, Tensor)",
    _rope_kv_op_impl, _rope_op_fake,
) and register_op(
    # The engine's cache write of a q+k+v output, for graphs that run the unfused ops
    # (graph_pass).  It declares qkv mutated, which it is not: that marks it as having an
    # effect, so that no dead-code pass removes it, and orders it before any later use of qkv.
    "kv_cache_write", "(Tensor(a!) qkv, Tensor weight, int q_heads, int kv_heads) -> ()",
    _kv_write_op_impl, lambda qkv, weight, q_heads, kv_heads_: None,
)


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    swiglu: bool = False,
    rope: QKRope | None = None,
    kv_cache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, s)``: ``s = x + residual`` (None without a residual) and
    ``y = rmsnorm(s or x) * norm_weight @ weight.T``; with ``swiglu`` the weight stacks the
    gate rows over the up rows and ``y = silu(gate) * up``; with ``rope`` (a q+k+v weight) the
    q and k heads of ``y`` come normalised and rotated (:class:`QKRope`).  One Triton kernel
    where :func:`norm_linear_available` (up to :data:`MAX_ROWS` rows; chosen at run time inside
    the custom op when compiled: ``convgpt::norm_linear``, ``convgpt::norm_linear_rope``), the
    unfused ops elsewhere.  ``kv_cache`` (with ``rope``): the k and v heads also go into the
    layer's KV cache, through the adapter's :class:`KVCaches` (``convgpt::norm_linear_rope_kv``)."""
    if kv_cache and rope is None:
        raise ValueError("norm_linear: writing the KV cache needs the q/k norm + RoPE epilogue (rope)")
    have_op = _HAVE_KV_OPS if kv_cache else _HAVE_OP
    compiled = have_op and torch.compiler.is_compiling() and norm_linear_available(x, weight, max_rows=None)
    if kv_cache and torch.compiler.is_compiling() and not compiled:
        raise ValueError("norm_linear: a compiled graph writes the KV cache in the kernel's op; it does not run here")
    if compiled and kv_cache:
        y, s = torch.ops.convgpt.norm_linear_rope_kv(x, residual, norm_weight, float(eps), weight,
                                                     *rope._replace(eps=float(rope.eps)))
    elif compiled and rope is not None:
        y, s = torch.ops.convgpt.norm_linear_rope(x, residual, norm_weight, float(eps), weight,
                                                  *rope._replace(eps=float(rope.eps)))
    elif compiled:
        y, s = torch.ops.convgpt.norm_linear(x, residual, norm_weight, float(eps), weight, swiglu)
    elif kv_cache:
        return _norm_linear_kv(x, residual, norm_weight, eps, weight, rope)
    elif not norm_linear_available(x, weight, max_rows=None):
        return norm_linear_torch(x, residual, norm_weight, eps, weight, swiglu, rope)
    else:
        return _kernel_or_torch(x, residual, norm_weight, eps, weight, swiglu, rope)
    return y, (None if residual is None else s)


def qk_rope_of(q_norm: tuple[torch.Tensor, float], k_weight: torch.Tensor, rotary, positions: torch.Tensor,
               q_heads: int, kv_heads: int) -> QKRope | None:
    """The :class:`QKRope` of an attention layer whose q/k norms are ``q_norm`` (weight, eps)
    and ``k_weight`` (same eps) and whose rotary embedding is ``rotary`` (vLLM's or SGLang's
    ``RotaryEmbedding``: neox style over the whole head, from its ``cos_sin_cache``); None when
    the rotary embedding is another kind, which the adapters then run themselves, and when
    ``CONVGPT_QK_ROPE=0`` is set."""
    q_weight, eps = q_norm
    hd = q_weight.shape[0]
    cache = getattr(rotary, "cos_sin_cache", None)
    if os.environ.get("CONVGPT_QK_ROPE", "1") == "0" or (not getattr(rotary, "is_neox_style", False) or getattr(rotary, "rotary_dim", None) != hd
            or getattr(rotary, "head_size", hd) != hd or cache is None or cache.dim() != 2 or cache.shape[1] != hd):
        return None
    return QKRope(q_weight, k_weight, eps, cache, positions, q_heads, kv_heads)


def kv_store_on() -> bool:
    """Whether the adapters hand the q+k+v kernel their KV cache (:class:`KVStore`);
    ``CONVGPT_KV_STORE=0`` leaves the cache write to the engine's attention, to rule it out or
    measure it."""
    return os.environ.get("CONVGPT_KV_STORE", "1") != "0"


def q_apart_on() -> bool:
    """Whether the q+k+v kernel that writes the KV cache (:class:`KVStore`) hands attention its q
    heads as a tensor of their own (``q_apart``); ``CONVGPT_Q_APART=0`` keeps them columns of the
    q+k+v output, to rule it out or measure it."""
    return os.environ.get("CONVGPT_Q_APART", "1") != "0"


# From this many rows on (prefill chunks, large decode steps on the engines' own layers) the
# q+k+v GEMM writes q apart (:func:`linear_q_apart`); below, one GEMM and attention's copy.
Q_APART_MIN_ROWS = 1024


def q_apart_linear_on(rows: int) -> bool:
    """Whether a q+k+v GEMM over ``rows`` rows writes the q heads apart (:func:`linear_q_apart`):
    eagerly from :data:`Q_APART_MIN_ROWS` rows on, unless ``CONVGPT_Q_APART=0``; a compiled
    graph (e.g. SGLang's piecewise CUDA graphs for prompts) keeps the engine's one GEMM, whose
    output views the compiler handles as its own."""
    return rows >= Q_APART_MIN_ROWS and q_apart_on() and not torch.compiler.is_compiling()


def fused_decoder_layer(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm1: tuple[torch.Tensor, float],
    qkv_weight: torch.Tensor,
    attend: Callable[[torch.Tensor, bool, bool], torch.Tensor],
    o_proj: Callable[[torch.Tensor], torch.Tensor],
    norm2: tuple[torch.Tensor, float],
    gate_up_weight: torch.Tensor,
    down: Callable[[torch.Tensor], torch.Tensor],
    qk_rope: QKRope | None = None,
    kv_store: Callable[[], KVStore | None] | None = None,
    kv_cache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer with both norms in :func:`norm_linear`, for the adapters: ``h`` is the
    previous sublayer's output (the embeddings when ``residual`` is None), ``norm1``/``norm2``
    are (weight, eps), ``attend(qkv, roped, stored)`` maps q/k/v (a tensor or a :class:`QKV`:
    :func:`split_qkv` takes both) to the heads' output, ``o_proj`` and
    ``down`` are the two linears back to the stream (the adapters pass
    :func:`convgpt_core.narrow_linear.narrow_linear` or the engine's row-parallel layer).
    With ``qk_rope`` the q/k norm and RoPE go into the q+k+v kernel's epilogue and ``attend``
    gets ``roped=True``: in a compiled graph (the op chooses kernel or unfused ops by rows) and
    eagerly up to :data:`MAX_ROWS` rows; larger eager steps leave them to ``attend`` (the
    engine's own fused q/k-norm and RoPE kernels).  ``kv_store`` gives the layer's KV cache
    (:class:`KVStore`, None where the engine's cache layout does not allow it): eagerly, where the
    kernel runs with ``qk_rope``, it then writes k and v into the cache too and ``attend`` gets
    ``stored=True`` (the engine must not write them again), and the q heads come as a contiguous
    tensor of their own (a :class:`QKV`; :func:`q_apart_on`).  ``kv_cache`` writes the cache in
    compiled graphs too, through the adapter's :class:`KVCaches` (the engine's own write where
    the kernel does not run).  Returns (MLP output, residual stream), what the engines' layers
    return."""
    compiling = torch.compiler.is_compiling()
    roped = qk_rope is not None and (compiling or _rows(h) <= MAX_ROWS)
    kv = None
    if roped and kv_store is not None and not compiling and norm_linear_available(h, qkv_weight):
        kv = kv_store()
    stored = kv is not None or (roped and kv_cache)
    if kv is not None:
        qkv, s = norm_linear_triton(h, residual, *norm1, qkv_weight, rope=qk_rope, kv=kv, q_apart=q_apart_on())
    else:
        qkv, s = norm_linear(h, residual, *norm1, qkv_weight, rope=qk_rope if roped else None, kv_cache=stored)
    residual = h if s is None else s
    act, residual = norm_linear(o_proj(attend(qkv, roped, stored)), residual, *norm2, gate_up_weight, swiglu=True)
    return down(act), residual
