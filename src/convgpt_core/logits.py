"""The head's bf16/fp16 logits widened to float32 in one bandwidth-bound kernel.

The engines sample from float32 logits, so each step's logits (a row per request, vocab wide)
are cast after the head's GEMM.  The GEMM's output rows are padded (the vocabulary to a multiple
of 64: 65,538 -> 65,600 in the published model) and the engine keeps the first ``vocab_size``
columns, so the cast reads a strided view.  SGLang 0.5.16 casts it with torch's ``copy_`` (into
its decode graphs' float32 buffer) or ``.float()``, which run element by element on a strided
input: 65 us a batch-256 step on an H200 (rounds 22-24), about 2.5x what reading 2 and writing 4
bytes a logit takes.  SGLang 0.5.23 has a kernel of its own for it on CUDA.
:func:`logits_to_float32` is ours, for where the engine has none: each program converts a block
of one row, loads and stores in order.
"""

from __future__ import annotations

import torch

from .kernels import jitted, kernel_takes, tl, triton

BLOCK = 2048  # columns a program converts


def _to_float32_src(src_ptr, out_ptr, N, stride_src, BLOCK: tl.constexpr):
    """out[m, n] = float32(src[m, n]) for n < N: row m = program 0, columns by program 1."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < N
    x = tl.load(src_ptr + row * stride_src + cols, mask=live)
    tl.store(out_ptr + row * N + cols, x.to(tl.float32), mask=live)


def float_cast_takes(logits: torch.Tensor) -> bool:
    """Whether :func:`logits_to_float32` runs its kernel on ``logits``: 2-D bf16 or fp16 with dense
    rows (the row stride is free), where Triton runs (CUDA or its interpreter)."""
    return (kernel_takes(logits) and logits.dtype in (torch.bfloat16, torch.float16) and logits.dim() == 2
            and logits.stride(-1) == 1)


def logits_to_float32(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``logits`` (rows x vocab) as float32, written into ``out`` (a contiguous float32 tensor of
    the same shape; a new one when None), which is returned: the kernel where
    :func:`float_cast_takes`, torch's ``copy_`` otherwise."""
    if out is None:
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    elif out.shape != logits.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"logits to float32: out {tuple(out.shape)} {out.dtype} (contiguous: {out.is_contiguous()}) "
                         f"for logits {tuple(logits.shape)}; it must be contiguous float32 of the same shape")
    if not float_cast_takes(logits):
        return out.copy_(logits)
    M, N = logits.shape
    if M and N:
        jitted(_to_float32_src)[(M, triton.cdiv(N, BLOCK))](logits, out, N, logits.stride(0), BLOCK=BLOCK)
    return out
