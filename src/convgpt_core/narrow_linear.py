"""The linears that write the D-wide stream (o_proj, down) as one split-K Triton kernel.

Each decoder layer ends its two sublayers with a linear whose output is only D = 144 wide
while its input is thousands wide (o_proj: 16 heads x 128, down: 3072).  At decode sizes
cuBLAS tiles such a product over its few output columns: round 5's vLLM trace at batch 1
shows a 3-CTA kernel for down (5.2 us) and a split-K kernel plus cuBLAS's separate reduce
kernel for o_proj (4.6 + 1.5 us), to read < 1 MB of weights.

:func:`narrow_linear` runs it as one kernel with enough programs to read the weight in
parallel: the grid is (row blocks, 16-wide column blocks, K splits).  Every program
multiplies its slice of K on tensor cores and writes an fp32 partial tile to a workspace;
the last program to finish a tile (an atomic counter per tile) sums the tile's partials in
split order, so the result does not depend on which program came last, rounds once to the
model dtype (as cuBLAS does), writes the output and resets the counter.  The counters live
in one zeroed buffer per device and stream that every call leaves zeroed again, so CUDA
graphs replay the kernel with nothing to reset.

Past :data:`MAX_ROWS` rows (:data:`MAX_ROWS_LONG_K` for K from :data:`LONG_K` up) the op runs
``F.linear`` (cuBLAS), which keeps every SM busy without splitting K once there are enough
rows.  Under ``torch.compile`` the call is the opaque custom op ``convgpt::narrow_linear``,
which chooses by rows when it runs (or, in a graph compiled only for larger steps,
:mod:`convgpt_core.graph_pass` writes in F.linear).  Only a
whole (unsharded, unquantized, LoRA-free) weight qualifies: the adapters check that and
otherwise call the engine's row-parallel layer, which also does the all-reduce.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .kernels import (
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
from .norm_linear import _as_rows, _rows

BLOCK_N = 16  # output columns per program: D = 144 is nine blocks
# Up to this many rows the kernel runs, cuBLAS above: H200, round 6, the kernel against
# cuBLAS (one CUDA graph replay each) for o_proj / down: 1 row 3.6 / 3.8 us vs 5.0 / 6.2;
# 128 rows 4.9 / 5.2 vs 5.1 / 6.5 (four K slices per program); 256 rows 6.3 / 6.4 vs 5.1 / 6.6.
MAX_ROWS = 128
# ... and up to MAX_ROWS_LONG_K rows where K is at least LONG_K: round 14's tile sweep
# (bench_norm_linear.py --tiles) at 256 rows, eight K slices per program: down (K = 3072)
# 5.61 us vs cuBLAS 6.58, o_proj (K = 2048) 5.35 vs 5.10, so o_proj keeps cuBLAS there.
LONG_K, MAX_ROWS_LONG_K = 3072, 256
_COUNTERS = 4096  # tile counters per buffer (tiles = row blocks x column blocks)


def narrow_linear_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when :func:`narrow_linear` runs the Triton kernel for this input and weight (the
    rows decide between the kernel and cuBLAS when it runs).  ``CONVGPT_NARROW_LINEAR=0`` in
    the environment turns the kernel off (cuBLAS everywhere), to rule it out or measure it."""
    return os.environ.get("CONVGPT_NARROW_LINEAR", "1") != "0" and kernel_takes(x, weight)


def _narrow_linear_src(
    x_ptr, w_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, stride_x, stride_w, stride_y,
    K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    """y[m, n] = x[m] . w[n].  Program (i, j, s) covers rows i*BLOCK_M.., columns j*BLOCK_N..
    and K from s*K_PER_SPLIT (a multiple of BLOCK_K; a constant, so that the interpreter, too,
    loops over a plain integer).  With SPLIT > 1 it writes its fp32 tile to part[s], and the
    tile's last program sums part[0..SPLIT) into y.  With PDL it loads its first block of w,
    then waits for the kernels before it (:func:`convgpt_core.kernels.pdl`) before it touches
    x, y, the partials or the counters."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    dot_ty = tl.float32 if UPCAST else w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    if PDL:  # the first block of w while the kernel before finishes; x and the rest after it
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        b = tl.load(w_ptr + cols[None, :] * stride_w + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        gdc_wait()
        gdc_launch_dependents()
        a = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(a.to(dot_ty), b.to(dot_ty), acc, input_precision=PRECISION)
    for k0 in range(BLOCK_K if PDL else 0, K_PER_SPLIT, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a.to(dot_ty), b.to(dot_ty), acc, input_precision=PRECISION)

    out = y_ptr + rows[:, None] * stride_y + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tile = rows[:, None] * N + cols[None, :]  # partials: [SPLIT, M, N] fp32
        tl.store(part_ptr + pid_k * M * N + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the counter is raised
        counter = count_ptr + pid_m * tl.num_programs(1) + pid_n
        done = tl.atomic_add(counter, 1, sem="acq_rel")
        if done == SPLIT - 1:  # the tile's last program: the other partials are visible
            tl.debug_barrier()
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(part_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter, 0)


_COUNTER_BUFFERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor:
    """The zeroed tile counters for this device and stream (calls on one stream run one after
    another; each leaves its counters at zero)."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTER_BUFFERS.get(key)
    if buf is None:
        buf = _COUNTER_BUFFERS[key] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return buf


def max_rows(K: int) -> int:
    """The most rows the kernel takes for an input K wide (cuBLAS above)."""
    return MAX_ROWS_LONG_K if K >= LONG_K else MAX_ROWS


@functools.cache
def _tiles(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, blocks of K per split, num_warps): a fixed heuristic from the K-split
    sweeps of ``benchmarks/bench_norm_linear.py`` on an H200 (o_proj K = 2048, down K = 3072,
    rounds 6 and 14).  Rows in tiles of 16 (the tensor-core minimum) up to 64; K in slices of
    128, two per program up to 32 rows (72-108 programs for one row: 3.6-3.8 us, cuBLAS
    5.0-6.2), four up to 128 rows (the 64-row tiles do more work per slice), eight above."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    return bm, 128, 2 if M <= 32 else 4 if M <= 128 else 8, 4


def narrow_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    block_m: int | None = None,
    block_k: int | None = None,
    k_blocks_per_split: int | None = None,
    num_warps: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The kernel launch behind :func:`narrow_linear`; the keyword tile settings override the
    heuristic (benchmarks, tests)."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("narrow_linear_triton needs triton")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"narrow_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    N, K = weight.shape
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if K == 0:
        return y.zero_()
    x2 = _as_rows(x)
    M = x2.shape[0]
    copied = weight.stride(-1) != 1  # a copy just made: not read before a PDL wait
    if copied:
        weight = weight.contiguous()
    bm, bk, kps, nw = _tiles(M)
    bm, bk, kps, nw = block_m or bm, block_k or bk, k_blocks_per_split or kps, num_warps or nw
    bn = block_n or BLOCK_N
    k_per_split = kps * bk
    split = triton.cdiv(K, k_per_split)
    grid_mn = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if grid_mn > _COUNTERS:
        split, k_per_split = 1, triton.cdiv(K, bk) * bk
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    upcast = _interpreting() and x.dtype != torch.float32  # the interpreter multiplies 16-bit tiles as integers
    on = not copied and pdl(x2, M)
    jitted(_narrow_linear_src)[(triton.cdiv(M, bm), triton.cdiv(N, bn), split)](
        x2, weight, y.view(-1, N), part, _counters(x.device),
        M, N, K, x2.stride(0), weight.stride(0), N,
        K_PER_SPLIT=k_per_split, SPLIT=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast, PDL=on,
        num_warps=nw, num_stages=3, **({"launch_pdl": True} if on else {}),
    )
    return y


def _kernel_or_cublas(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if _rows(x) <= max_rows(weight.shape[1]):
        return narrow_linear_triton(x, weight)
    return F.linear(x, weight)


_HAVE_OP = triton is not None and register_op(  # the body looked up when called: tests watch it
    "narrow_linear", "(Tensor x, Tensor weight) -> Tensor", lambda x, weight: _kernel_or_cublas(x, weight),
    lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0]),
)


def narrow_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: the split-K kernel up to :func:`max_rows` rows where
    :func:`narrow_linear_available` (chosen at run time inside the custom op when compiled),
    ``F.linear`` elsewhere."""
    if not narrow_linear_available(x, weight):
        return F.linear(x, weight)
    if _HAVE_OP and torch.compiler.is_compiling():
        return torch.ops.convgpt.narrow_linear(x, weight)
    return _kernel_or_cublas(x, weight)


def to_stream(linear: torch.nn.Module, plain: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """o_proj or down on the adapters' fused path: :func:`narrow_linear` when the engine's
    linear is ``plain`` (unquantized, not wrapped for LoRA: the adapter's check against its
    engine's classes) and holds the whole 2-D weight (one tensor-parallel rank), otherwise the
    engine's row-parallel layer itself, which also all-reduces (both engines' linears return
    ``(output, bias)``)."""
    weight = getattr(linear, "weight", None)
    if plain and weight is not None and weight.dim() == 2 and weight.shape[1] == getattr(linear, "input_size", -1):
        return lambda x: narrow_linear(x, weight)
    return lambda x: linear(x)[0]
