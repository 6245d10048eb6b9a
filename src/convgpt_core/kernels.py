"""Dispatch between Triton kernels (CUDA) and torch fallbacks (everywhere else).

The compressor (causal conv + e x e average pool + ScaleNorm) is linear up to the norm, so
for embeddings ``x[..., H]`` it is ``ScaleNorm(x @ M.T)`` with the fixed D x H matrix
``M = compressor.fold(conv.weight)``.  :func:`fused_compress` runs that as one Triton
kernel: each program takes ``BLOCK_T`` tokens, streams ``x`` and ``M.T`` over H in
``BLOCK_H`` chunks into fp32 tensor-core dots, and finishes with the row L2 norm over D,
the clamp at ``eps``, the multiply by ``g`` and the cast to ``x``'s dtype in registers.

``M`` is folded once per conv weight and cached (keyed on the weight tensor's identity,
storage pointer, in-place version, dtype and device), stored transposed (H x D_pad) in the
compute dtype with zero-padded columns, so the kernel needs no masks on it.  D does not
have to be a power of two: it is covered by a main block of ``D_A`` columns (a power of
two) plus an optional rest block ``D_B`` (a power of two >= 16), e.g. 144 = 128 + 16,
instead of padding 144 up to 256.

Triton is imported guardedly: without it this module still imports, and
:func:`fused_compress_available` is False.  The jit kernel is built on first use, once per
``TRITON_INTERPRET`` setting.  Triton's own library (``tl.zeros``, ``tl.sum``) is fixed
interpreted or compiled when ``triton`` is imported, so the interpreter (CPU tensors)
needs ``TRITON_INTERPRET=1`` set before that import.  Under ``torch.compile`` the call is
the opaque custom op ``convgpt::fused_compress``.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_compress_available(x: torch.Tensor) -> bool:
    """True when the fused Triton compressor can run on ``x`` (CUDA, or the interpreter).

    float64 inputs (no tensor-core dot) keep the torch path.
    """
    return triton_available() and (x.is_cuda or _interpreting()) and x.dtype in _SUPPORTED_DTYPES


# --------------------------------------------------------------------------------------
# The folded matrix, cached per conv weight


_FOLD_CACHE: dict[tuple, tuple[Any, torch.Tensor]] = {}
_FOLD_CACHE_MAX = 16


def _cached(conv_weight: torch.Tensor, geometry: Any, tag: tuple, build) -> torch.Tensor:
    """``build()`` cached per (weight storage, in-place version, layout, geometry, tag).

    A hit also needs the tensor that filled the entry to be alive with the same address
    and version: then the address still belongs to that storage, so an alias of the
    weight (as torch.compile may pass) hits, while a new tensor that reuses a freed
    weight's address misses.
    """
    ptr, version = conv_weight.data_ptr(), conv_weight._version
    key = (ptr, version, conv_weight.dtype, conv_weight.device, tuple(conv_weight.shape),
           conv_weight.stride(), geometry, tag)
    hit = _FOLD_CACHE.get(key)
    if hit is not None:
        owner = hit[0]()
        if owner is not None and owner.data_ptr() == ptr and owner._version == version:
            return hit[1]
    value = build()
    if len(_FOLD_CACHE) >= _FOLD_CACHE_MAX:
        _FOLD_CACHE.pop(next(iter(_FOLD_CACHE)))
    _FOLD_CACHE[key] = (weakref.ref(conv_weight), value)
    return value


def folded_weight(conv_weight: torch.Tensor, geometry: Any, dtype: torch.dtype) -> torch.Tensor:
    """The D x H matrix ``M`` (``conv_pool(x) == x @ M.T``) in ``dtype``; cached per weight."""
    from .compressor import fold

    return _cached(
        conv_weight, geometry, ("M", dtype),
        lambda: fold(conv_weight.detach(), geometry, dtype),
    )


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


def _packed_weight(conv_weight: torch.Tensor, geometry: Any, dtype: torch.dtype, width: int) -> torch.Tensor:
    """``M.T`` as a contiguous H x ``width`` matrix in ``dtype``, columns >= D zero."""

    def build() -> torch.Tensor:
        m = folded_weight(conv_weight, geometry, torch.float32)
        mt = torch.zeros(geometry.hidden_size, width, dtype=dtype, device=m.device)
        mt[:, : geometry.D] = m.T.to(dtype)
        return mt

    return _cached(conv_weight, geometry, ("MT", dtype, width), build)


# --------------------------------------------------------------------------------------
# The kernel


def _compress_kernel_src(
    x_ptr, mt_ptr, g_ptr, y_ptr,
    T, stride_xt, stride_yt,
    eps, inv_sqrt_d,
    H: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y[t, :D] = ScaleNorm(x[t, :H] @ MT[:H, :D]) for BLOCK_T tokens per program."""
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
        ma = tl.load(mt_ptr + hh[:, None] * (D_A + D_B) + offs_a[None, :], mask=mask_h[:, None], other=0.0)
        if UPCAST:  # the interpreter's dot cannot multiply bfloat16 (numpy has no bf16)
            xt = xt.to(tl.float32)
            ma = ma.to(tl.float32)
        acc_a = tl.dot(xt, ma, acc_a, input_precision=PRECISION)
        if D_B > 0:
            mb = tl.load(mt_ptr + hh[:, None] * (D_A + D_B) + offs_b[None, :], mask=mask_h[:, None], other=0.0)
            if UPCAST:
                mb = mb.to(tl.float32)
            acc_b = tl.dot(xt, mb, acc_b, input_precision=PRECISION)

    # ScaleNorm epilogue: padded columns hold exact zeros (zero weights), so they add
    # nothing to the sum of squares.
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


_KERNELS: dict[bool, Any] = {}


def _kernel():
    """The jit kernel for the current TRITON_INTERPRET setting (built once per setting)."""
    interp = _interpreting()
    k = _KERNELS.get(interp)
    if k is None:
        k = _KERNELS[interp] = triton.jit(_compress_kernel_src)
    return k


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
    conv_weight: torch.Tensor,
    g: torch.Tensor,
    geometry: Any,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    block_t: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_d: bool = True,
) -> torch.Tensor:
    """``ScaleNorm(conv_pool(x))`` for ``x[..., H]`` -> ``[..., D]`` in ``x.dtype``, one launch.

    Matches :func:`convgpt_core.compressor.compress`.  ``out`` (contiguous, ``[..., D]``,
    ``x.dtype``) receives the result if given.  The keyword tile settings override the
    built-in heuristic (for benchmarking); ``split_d=False`` pads D to a power of two
    instead of splitting it into two column blocks.

    Under ``torch.compile`` (vLLM compiles the model's forward) the call goes through the
    opaque custom op ``torch.ops.convgpt.fused_compress``, so Dynamo never traces the
    weight cache or the launch.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("fused_compress needs triton")
    if _HAVE_OP and torch.compiler.is_compiling():
        if out is not None or block_t or block_h or num_warps or num_stages or not split_d:
            raise ValueError("fused_compress options are not supported under torch.compile")
        gm = geometry
        return torch.ops.convgpt.fused_compress(x, conv_weight, g, gm.hidden_size, gm.F, gm.e, gm.D, gm.k, float(eps))
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fused_compress supports float32/bfloat16/float16, got {x.dtype}")
    H, D = geometry.hidden_size, geometry.D
    if x.shape[-1] != H:
        raise ValueError(f"expected x[..., {H}], got shape {tuple(x.shape)}")
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
    mt = _packed_weight(conv_weight, geometry, x.dtype, d_a + d_b)
    if mt.device != x.device:  # pragma: no cover - weights live with the activations
        mt = mt.to(x.device)
    g1 = g.reshape(-1)[:1]
    if g1.device != x.device:  # pragma: no cover
        g1 = g1.to(x.device)

    bt, bh, nw, ns = _default_tiles(T, H, d_a + d_b, x.dtype, x.device)
    bt = block_t or bt
    bh = block_h or bh
    nw = num_warps or nw
    ns = num_stages or ns
    # Triton's interpreter multiplies bfloat16 tiles as raw uint16: upcast them there.
    upcast = _interpreting() and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"
    grid = (triton.cdiv(T, bt),)
    _kernel()[grid](
        x2, mt, g1, y2,
        T, x2.stride(0), y2.stride(0),
        float(eps), float(D) ** -0.5,
        H=H, D=D, BLOCK_T=bt, BLOCK_H=bh, D_A=d_a, D_B=d_b, PRECISION=precision, UPCAST=upcast,
        num_warps=nw, num_stages=ns,
    )
    return out


# --------------------------------------------------------------------------------------
# The same as an opaque custom op, for torch.compile


def _op_impl(
    x: torch.Tensor, conv_weight: torch.Tensor, g: torch.Tensor,
    hidden_size: int, F: int, e: int, D: int, k: int, eps: float,
) -> torch.Tensor:
    from .config import Geometry

    return fused_compress(x, conv_weight, g, Geometry(hidden_size, F, e, D, k), eps)


def _op_fake(x, conv_weight, g, hidden_size, F, e, D, k, eps):
    return x.new_empty(*x.shape[:-1], D)


_HAVE_OP = False
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    try:
        _op = torch.library.custom_op(
            "convgpt::fused_compress", _op_impl, mutates_args=(),
            schema="(Tensor x, Tensor conv_weight, Tensor g, int hidden_size, int F, int e, "
            "int D, int k, float eps) -> Tensor",
        )
        _op.register_fake(_op_fake)
        _HAVE_OP = True
    except RuntimeError:  # pragma: no cover - already registered (module re-executed)
        _HAVE_OP = hasattr(torch.ops.convgpt, "fused_compress")
