"""Dispatch between Triton kernels (CUDA) and torch fallbacks (everywhere else)."""

from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_compress_available(x: torch.Tensor) -> bool:
    """True when the fused Triton compressor can run on ``x`` (CUDA, or the interpreter)."""
    return (x.is_cuda or _interpreting()) and triton_available() and _HAVE_KERNEL


_HAVE_KERNEL = False


def fused_compress(x, conv_weight, g, geometry, eps):  # pragma: no cover - replaced below
    raise NotImplementedError
