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
the matching rows of the "up" half of W and writes ``silu(gate) * up`` directly.  No
cross-program reduction, no workspace, nothing to reset between calls: CUDA graphs capture
it as they capture a GEMM.

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
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .kernels import _d_blocks, _interpreting, jitted, kernel_takes, register_op, tl, triton

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


# --------------------------------------------------------------------------------------
# The kernel


def _norm_linear_src(
    x_ptr, r_ptr, s_ptr, nw_ptr, w_ptr, y_ptr,
    M, N, stride_x, stride_r, stride_s, stride_w, stride_y,
    eps,
    K: tl.constexpr, K_A: tl.constexpr, K_B: tl.constexpr,
    HAS_RES: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y[m, n] = rmsnorm(x[m] (+ r[m])) . w[n]  (n < N; with SWIGLU: silu(. w[n]) * (. w[N + n]));
    s[m] = x[m] + r[m] written by the programs of column block 0.  K is covered by a block of
    K_A columns plus an optional K_B block (both powers of two), e.g. 144 = 128 + 16."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)

    offs_a = tl.arange(0, K_A)
    mask_a = offs_a < K
    xa = tl.load(x_ptr + rows[:, None] * stride_x + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
    if HAS_RES:
        ra = tl.load(r_ptr + rows[:, None] * stride_r + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
        xa = (xa.to(tl.float32) + ra.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(s_ptr + rows[:, None] * stride_s + offs_a[None, :], xa, mask=mask_m[:, None] & mask_a[None, :])
    xa = xa.to(tl.float32)
    sq = tl.sum(xa * xa, axis=1)
    if K_B > 0:
        offs_b = K_A + tl.arange(0, K_B)
        mask_b = offs_b < K
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
    dot_ty = tl.float32 if UPCAST else w_ptr.dtype.element_ty
    na = tl.load(nw_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    xa = (xa * rstd[:, None] * na[None, :]).to(w_ptr.dtype.element_ty).to(dot_ty)
    if K_B > 0:
        nb = tl.load(nw_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)
        xb = (xb * rstd[:, None] * nb[None, :]).to(w_ptr.dtype.element_ty).to(dot_ty)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = offs_n.to(tl.int64)
    wa = tl.load(w_ptr + cols[None, :] * stride_w + offs_a[:, None], mask=mask_a[:, None] & mask_n[None, :], other=0.0)
    acc = tl.dot(xa, wa.to(dot_ty), input_precision=PRECISION)
    if K_B > 0:
        wb = tl.load(w_ptr + cols[None, :] * stride_w + offs_b[:, None], mask=mask_b[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xb, wb.to(dot_ty), acc, input_precision=PRECISION)
    if SWIGLU:
        up_cols = cols + N
        ua = tl.load(w_ptr + up_cols[None, :] * stride_w + offs_a[:, None], mask=mask_a[:, None] & mask_n[None, :], other=0.0)
        up = tl.dot(xa, ua.to(dot_ty), input_precision=PRECISION)
        if K_B > 0:
            ub = tl.load(w_ptr + up_cols[None, :] * stride_w + offs_b[:, None], mask=mask_b[:, None] & mask_n[None, :], other=0.0)
            up = tl.dot(xb, ub.to(dot_ty), up, input_precision=PRECISION)
        acc = acc * tl.sigmoid(acc) * up
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
def _tiles(M: int, swiglu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a fixed heuristic, from the sweeps of
    ``benchmarks/bench_norm_linear.py`` on an H200 (D = 144, N = 4096 and 2 x 3072; column
    blocks in round 6, every tile at 128 and 256 rows in round 14).  Rows in tiles of 16 (the
    tensor-core minimum) up to 16 rows, then 32.  Up to 32 rows, 32-wide column blocks spread
    the weight reads over the most SMs (q+k+v: 128 programs for one row); wider blocks win
    from 64 rows on: 128 from 65 rows (qkv 3.88 us at 128 rows where 64 x 64 tiles took 4.20).
    Past 128 rows q+k+v takes 64-row tiles (4.84 us at 256), SwiGLU, whose programs read two
    blocks of W, 32 x 64 (6.33 us where 64 x 64 on 8 warps took 7.82).  Four warps throughout:
    the fastest tile at each size swept ran four."""
    bm = 64 if (M > 128 and not swiglu) else 16 if M <= 16 else 32
    bn = 32 if M <= 32 else 64 if (M <= 64 or (M > 128 and swiglu)) else 128
    return bm, bn, 4


def _launch(x2, r2, s2, norm_weight, weight, y2, eps, swiglu, block_m, block_n, num_warps):
    M, K = x2.shape
    N = y2.shape[1]
    k_a, k_b = _d_blocks(K)
    bm, bn, nw = _tiles(M, swiglu)
    bm, bn, nw = block_m or bm, block_n or bn, num_warps or nw
    upcast = _interpreting() and x2.dtype != torch.float32  # the interpreter multiplies 16-bit tiles as integers
    precision = "ieee" if x2.dtype == torch.float32 or upcast else "tf32"
    has_res = r2 is not None
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    jitted(_norm_linear_src)[grid](
        x2, r2 if has_res else x2, s2 if has_res else x2, norm_weight, weight, y2,
        M, N, x2.stride(0), r2.stride(0) if has_res else 0, s2.stride(0) if has_res else 0,
        weight.stride(0), y2.stride(0), float(eps),
        K=K, K_A=k_a, K_B=k_b, HAS_RES=has_res, SWIGLU=swiglu, BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=precision, UPCAST=upcast, num_warps=nw, num_stages=1,
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
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel launch behind :func:`norm_linear` (same arguments and results); the
    keyword tile settings override the heuristic (benchmarks, tests)."""
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
    lead = x.shape[:-1]
    y = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    s = None if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.numel() == 0:
        return y, s
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    _launch(_as_rows(x), None if residual is None else _as_rows(residual), None if s is None else s.view(-1, K),
            norm_weight.to(x.dtype), weight, y.view(-1, N), eps, swiglu, block_m, block_n, num_warps)
    return y, s


def norm_linear_torch(x, residual, norm_weight, eps, weight, swiglu=False, *, silu_mul=None):
    """The same computation unfused (any device and dtype): the add, torch's RMSNorm, the
    GEMM (cuBLAS on CUDA) and a one-pass SiLU*mul: what larger batches run.  ``silu_mul``
    replaces the last (:mod:`convgpt_core.graph_pass` passes :func:`silu_mul_torch`, for
    Inductor to fuse)."""
    s = None if residual is None else x + residual
    h = F.rms_norm(x if s is None else s, (x.shape[-1],), norm_weight.to(x.dtype), eps)
    y = F.linear(h.to(weight.dtype), weight)
    return ((silu_mul or _silu_mul)(y) if swiglu else y), s


def _kernel_or_torch(x, residual, norm_weight, eps, weight, swiglu):
    if _rows(x) <= MAX_ROWS:
        return norm_linear_triton(x, residual, norm_weight, eps, weight, swiglu)
    return norm_linear_torch(x, residual, norm_weight, eps, weight, swiglu)


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


_HAVE_OP = triton is not None and register_op(
    "norm_linear",
    "(Tensor x, Tensor? residual, Tensor norm_weight, float eps, Tensor weight, bool swiglu) -> (Tensor, Tensor)",
    _op_impl, _op_fake,
)


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    swiglu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, s)``: ``s = x + residual`` (None without a residual) and
    ``y = rmsnorm(s or x) * norm_weight @ weight.T``; with ``swiglu`` the weight stacks the
    gate rows over the up rows and ``y = silu(gate) * up``.  One Triton kernel where
    :func:`norm_linear_available` (up to :data:`MAX_ROWS` rows; chosen at run time inside
    the custom op when compiled), the unfused ops elsewhere."""
    if not norm_linear_available(x, weight, max_rows=None):
        return norm_linear_torch(x, residual, norm_weight, eps, weight, swiglu)
    if _HAVE_OP and torch.compiler.is_compiling():
        y, s = torch.ops.convgpt.norm_linear(x, residual, norm_weight, float(eps), weight, swiglu)
        return y, (None if residual is None else s)
    return _kernel_or_torch(x, residual, norm_weight, eps, weight, swiglu)


def fused_decoder_layer(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm1: tuple[torch.Tensor, float],
    qkv_weight: torch.Tensor,
    attend: Callable[[torch.Tensor], torch.Tensor],
    o_proj: Callable[[torch.Tensor], torch.Tensor],
    norm2: tuple[torch.Tensor, float],
    gate_up_weight: torch.Tensor,
    down: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer with both norms in :func:`norm_linear`, for the adapters: ``h`` is the
    previous sublayer's output (the embeddings when ``residual`` is None), ``norm1``/``norm2``
    are (weight, eps), ``attend`` maps q/k/v to the heads' output, ``o_proj`` and ``down``
    are the two linears back to the stream (the adapters pass
    :func:`convgpt_core.narrow_linear.narrow_linear` or the engine's row-parallel layer).
    Returns (MLP output, residual stream), what the engines' layers return."""
    qkv, s = norm_linear(h, residual, *norm1, qkv_weight)
    residual = h if s is None else s
    act, residual = norm_linear(o_proj(attend(qkv)), residual, *norm2, gate_up_weight, swiglu=True)
    return down(act), residual
