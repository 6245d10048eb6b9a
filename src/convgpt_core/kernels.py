"""The fused compressor kernel (Triton) and the dispatch the models call.

The compressor (causal conv + e x e average pool + ScaleNorm) is linear up to the norm, so
for embeddings ``x[..., H]`` it is ``ScaleNorm(x @ M.T)`` with the fixed D x H matrix
``M``; the conv module keeps ``M.T`` as its buffer ``folded_t`` once the weights are loaded
(:meth:`convgpt_core.compressor.CausalConvPool.refresh_fold`).  :func:`fused_compress`
launches one Triton kernel for that: each program takes ``BLOCK_T`` tokens, streams ``x``
and ``M.T`` over H in ``BLOCK_H`` chunks into fp32 tensor-core dots, and finishes with the
row L2 norm over D, the clamp at ``eps``, the multiply by ``g`` and the cast to ``x``'s
dtype in registers.  D does not have to be a power of two: it is covered by a main block
of ``D_A`` columns (a power of two) plus an optional rest block ``D_B`` (a power of two
>= 16), e.g. 144 = 128 + 16, instead of padding 144 up to 256.

:func:`compress` is what the models call: the kernel when it can run (CUDA or the
interpreter, a folded buffer present), the torch math of :mod:`convgpt_core.compressor`
otherwise.  Under ``torch.compile`` the launch is the opaque custom op
``convgpt::fused_compress(x, folded_t, g, eps)``.

Triton is imported guardedly: without it this module still imports, and
:func:`fused_compress_available` is False.  The jit kernel is built on first use, once per
``TRITON_INTERPRET`` setting.  Triton's own library (``tl.zeros``, ``tl.sum``) is fixed
interpreted or compiled when ``triton`` is imported, so the interpreter (CPU tensors)
needs ``TRITON_INTERPRET=1`` set before that import.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from .compressor import CausalConvPool, ScaleNorm

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None
try:  # grid dependency control (triton 3.3+): without it the kernels launch without PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_takes(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """True when this module's Triton kernels can run on ``x``: triton there, CUDA or the
    interpreter, a dtype with tensor-core dots (float64 keeps the torch paths); with ``weight``,
    also a 2-D matrix in ``x``'s dtype whose rows are as wide as ``x``'s."""
    return (
        triton_available()
        and (x.is_cuda or _interpreting())
        and x.dtype in _SUPPORTED_DTYPES
        and (weight is None or (weight.dtype == x.dtype and weight.dim() == 2 and x.shape[-1] == weight.shape[1]))
    )


def fused_compress_available(x: torch.Tensor) -> bool:
    """True when the fused Triton compressor can run on ``x`` (CUDA, or the interpreter).

    float64 inputs (no tensor-core dot) keep the torch path.
    """
    return kernel_takes(x)


def _d_blocks(D: int, split_d: bool = True) -> tuple[int, int]:
    """Column blocks (D_A, D_B) covering D: D_A a power of two, D_B 0 or a power of two >= 16."""
    full = max(16, triton.next_power_of_2(D))
    if not split_d or full == D:
        return full, 0
    d_a = max(16, full // 2)
    rest = D - d_a
    d_b = max(16, triton.next_power_of_2(rest))
    if d_a + d_b >= full:
        return full, 0
    return d_a, d_b


# --------------------------------------------------------------------------------------
# The kernel


def _compress_kernel_src(
    x_ptr, mt_ptr, g_ptr, y_ptr,
    T, stride_xt, stride_mh, stride_yt,
    eps, inv_sqrt_d,
    H: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y[t, :D] = ScaleNorm(x[t, :H] @ MT[:H, :D]) for BLOCK_T tokens per program; columns
    of the D_A + D_B blocks past D read as zeros."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_a = tl.arange(0, D_A)

    acc_a = tl.zeros((BLOCK_T, D_A), dtype=tl.float32)
    if D_B > 0:
        offs_b = D_A + tl.arange(0, D_B)
        acc_b = tl.zeros((BLOCK_T, D_B), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        mask_h = hh < H
        xt = tl.load(
            x_ptr + rows[:, None] * stride_xt + hh[None, :],
            mask=mask_t[:, None] & mask_h[None, :], other=0.0,
        )
        ma = tl.load(mt_ptr + hh[:, None] * stride_mh + offs_a[None, :],
                     mask=mask_h[:, None] & (offs_a[None, :] < D), other=0.0)
        if UPCAST:  # the interpreter's dot cannot multiply bfloat16 (numpy has no bf16)
            xt = xt.to(tl.float32)
            ma = ma.to(tl.float32)
        acc_a = tl.dot(xt, ma, acc_a, input_precision=PRECISION)
        if D_B > 0:
            mb = tl.load(mt_ptr + hh[:, None] * stride_mh + offs_b[None, :],
                         mask=mask_h[:, None] & (offs_b[None, :] < D), other=0.0)
            if UPCAST:
                mb = mb.to(tl.float32)
            acc_b = tl.dot(xt, mb, acc_b, input_precision=PRECISION)

    # ScaleNorm epilogue: columns past D were loaded as zeros, so they add nothing to the
    # sum of squares.
    sq = tl.sum(acc_a * acc_a, axis=1)
    if D_B > 0:
        sq += tl.sum(acc_b * acc_b, axis=1)
    norm = tl.sqrt(sq) * inv_sqrt_d
    g = tl.load(g_ptr).to(tl.float32)
    scale = g / tl.maximum(norm, eps)

    y_rows = y_ptr + rows[:, None] * stride_yt
    ya = acc_a * scale[:, None]
    tl.store(y_rows + offs_a[None, :], ya.to(y_ptr.dtype.element_ty),
             mask=mask_t[:, None] & (offs_a[None, :] < D))
    if D_B > 0:
        yb = acc_b * scale[:, None]
        tl.store(y_rows + offs_b[None, :], yb.to(y_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & (offs_b[None, :] < D))


_JITTED: dict[tuple[Any, bool], Any] = {}


def jitted(src):
    """``src`` as a Triton kernel for the current TRITON_INTERPRET setting (built once per
    setting): the compressor's, norm_linear's and narrow_linear's kernels."""
    key = (src, _interpreting())
    k = _JITTED.get(key)
    if k is None:
        k = _JITTED[key] = triton.jit(src)
    return k


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


# PDL up to this many rows: round 16's chain of 32 layers in one CUDA graph (H200,
# bench_norm_linear.py --only chain, two runs) saved 3.6-3.7 / 2.7 / 2.8 / 2.4 / 1.8-1.9 us per
# layer at 1 / 16 / 64 / 96 / 128 rows, 0.4-0.5 at 160 and 192, 0.1 at 224 and nothing at 256
# (-0.2, -0.3), where the kernels run long enough to hide their own launches.
PDL_MAX_ROWS = 192


def pdl(x: torch.Tensor, rows: int) -> bool:
    """True when a decode kernel (:mod:`convgpt_core.norm_linear`,
    :mod:`convgpt_core.narrow_linear`) over ``rows`` rows of ``x`` launches with programmatic
    dependent launch: CUDA on Hopper or newer, not the interpreter, ``CONVGPT_PDL`` not ``0``,
    and at most :data:`PDL_MAX_ROWS` rows.

    A kernel launched so may start while the kernel before it on the stream is finishing: it
    loads what no earlier kernel writes (its weights), then waits (``gdc_wait``) until the
    kernels before it have completed and their writes are visible, and only then reads its
    inputs or writes anything.  Right after that wait it lets the next such kernel start.  In
    a decode step's chain of small kernels this hides each launch and weight load behind the
    previous kernel's tail; CUDA graphs keep the dependency when they capture the launch.  A
    launch whose weights were just copied (another dtype, a non-contiguous tensor) goes without
    PDL: the copy's writes are certain to be visible only after the wait."""
    return (
        rows <= PDL_MAX_ROWS
        and x.is_cuda
        and not _interpreting()
        and torch.version.cuda is not None
        and gdc_wait is not None
        and os.environ.get("CONVGPT_PDL", "1") != "0"
        and _capability(x.device)[0] >= 9
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: pretend an H100


def _default_tiles(T: int, H: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps, num_stages): a fixed heuristic, no autotuning.

    Every program streams all of M (H x width) plus its BLOCK_T token rows; BLOCK_T is
    picked to minimise the bytes the busiest SM streams, ceil(programs / SMs) *
    (M + BLOCK_T rows): 16-token tiles (the tensor-core minimum) spread small batches
    over more SMs, 128-token tiles re-read M less often on large ones.
    """
    elt = torch.empty((), dtype=dtype).element_size()
    n_sm = _sm_count(device)
    choices = (16, 32, 64) if dtype == torch.float32 else (16, 32, 64, 128)
    best = min(
        choices,
        key=lambda bt: (-(-triton.cdiv(T, bt) // n_sm) * (H * width + bt * H) * elt, -bt),
    )
    num_warps = 8 if best >= 128 else 4
    num_stages = 2 if dtype == torch.float32 else 3
    return best, 64, num_warps, num_stages


def fused_compress(
    x: torch.Tensor,
    folded_t: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    block_t: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_d: bool = True,
) -> torch.Tensor:
    """``ScaleNorm(x @ folded_t)`` for ``x[..., H]`` and ``folded_t`` (H x D) -> ``[..., D]``
    in ``x.dtype``, one launch.

    ``out`` (contiguous, ``[..., D]``, ``x.dtype``) receives the result if given.  The
    keyword tile settings override the built-in heuristic (for benchmarking);
    ``split_d=False`` covers D with one power-of-two block instead of two.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("fused_compress needs triton")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fused_compress supports float32/bfloat16/float16, got {x.dtype}")
    H, D = folded_t.shape
    if x.shape[-1] != H:
        raise ValueError(f"expected x[..., {H}], got shape {tuple(x.shape)}")
    if folded_t.dtype != x.dtype or folded_t.stride(-1) != 1:
        folded_t = folded_t.to(x.dtype).contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if out is None:
        out = torch.empty(*lead, D, dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, D) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous [..., D] tensor of x's dtype")
    if T == 0:
        return out
    y2 = out.view(-1, D)

    d_a, d_b = _d_blocks(D, split_d)
    g1 = g.reshape(-1)[:1]
    bt, bh, nw, ns = _default_tiles(T, H, d_a + d_b, x.dtype, x.device)
    bt = block_t or bt
    bh = block_h or bh
    nw = num_warps or nw
    ns = num_stages or ns
    # Triton's interpreter multiplies bfloat16 tiles as raw uint16: upcast them there.
    upcast = _interpreting() and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"
    grid = (triton.cdiv(T, bt),)
    jitted(_compress_kernel_src)[grid](
        x2, folded_t, g1, y2,
        T, x2.stride(0), folded_t.stride(0), y2.stride(0),
        float(eps), float(D) ** -0.5,
        H=H, D=D, BLOCK_T=bt, BLOCK_H=bh, D_A=d_a, D_B=d_b, PRECISION=precision, UPCAST=upcast,
        num_warps=nw, num_stages=ns,
    )
    return out


# --------------------------------------------------------------------------------------
# The same as an opaque custom op, for torch.compile; the dispatch the models call


_LIBRARY: Any = None


def register_op(name: str, schema: str, impl, fake) -> bool:
    """Define ``convgpt::<name><schema>`` with ``impl`` as its CUDA and CPU kernel (CPU: the
    Triton interpreter) and ``fake`` for tracing, straight on a ``torch.library.Library``, as
    vLLM registers its own ops.  ``torch.library.custom_op`` runs Python dispatch logic around
    every call: on CI's 2-core CPU (best of 5 x 5000 calls) ``narrow_linear`` cost 26 us more
    than its bare implementation through it and 7 us through the Library, ``norm_linear`` 70
    and 27 us; vLLM's prefill-sized forward runs without CUDA graphs and calls these ops 128
    times.  True when the op is there (also when it was registered before, the module run
    again)."""
    global _LIBRARY
    if not hasattr(torch, "library") or not hasattr(torch.library, "register_fake"):  # pragma: no cover
        return False
    try:
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library("convgpt", "FRAGMENT")
        _LIBRARY.define(name + schema)
    except RuntimeError:  # pragma: no cover - already defined (module re-executed)
        return hasattr(torch.ops.convgpt, name)
    for key in ("CUDA", "CPU"):
        _LIBRARY.impl(name, impl, key)
    torch.library.register_fake(f"convgpt::{name}", lib=_LIBRARY)(fake)
    return True


_HAVE_OP = register_op(
    "fused_compress", "(Tensor x, Tensor folded_t, Tensor g, float eps) -> Tensor",
    lambda x, folded_t, g, eps: fused_compress(x, folded_t, g, eps),
    lambda x, folded_t, g, eps: x.new_empty(*x.shape[:-1], folded_t.shape[1]),
)


def compress(x: torch.Tensor, conv: CausalConvPool, norm: ScaleNorm) -> torch.Tensor:
    """H-wide embeddings ``[..., H]`` to the normalised D-wide residual ``[..., D]``: one
    fused kernel where it can run and the conv has been folded, the torch math elsewhere."""
    if conv.folded_t is not None and fused_compress_available(x):
        if _HAVE_OP and torch.compiler.is_compiling():
            return torch.ops.convgpt.fused_compress(x, conv.folded_t, norm.g, float(norm.eps))
        return fused_compress(x, conv.folded_t, norm.g, norm.eps)
    return norm(conv(x))


@torch.no_grad()
def warm_up(conv: CausalConvPool, norm: ScaleNorm, dtype: torch.dtype) -> None:
    """Run :func:`compress` once on ``dtype`` input, so the kernel compiles at load time, not
    inside a CUDA-graph capture or a compiled region later."""
    compress(torch.ones(1, conv.geometry.H, dtype=dtype, device=conv.weight.device), conv, norm)
