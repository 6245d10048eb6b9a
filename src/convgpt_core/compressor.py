"""The ConvGPT compressor: per-token causal Conv2d(1 x k), e x e average pooling, ScaleNorm.

Everything happens inside one token: the H-wide embedding is viewed as an F x F grid
G[a][b], the row index ``a`` acts as the conv channel, the conv runs along ``b`` with
``k - 1`` zeros of left padding, then an e x e mean pool over (output channel, column)
gives (F/e)^2 = D values, which ScaleNorm rescales to RMS ``g``.

Because conv and pool are linear, they reduce to one fixed D x H matrix (:func:`fold`);
for token ids the whole compressor reduces to a vocab x D table
(:func:`compressed_table`).  Adapters use those two for speed.

Parameter names match published checkpoints relative to ``model.``: a model holds
``conv`` (:class:`CausalConvPool`, ``conv.weight``) and ``norm_emb``
(:class:`ScaleNorm`, ``norm_emb.g``).  :class:`ConvCompressor` bundles the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SCALE_NORM_EPS, Geometry


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in float32, or in float64 when the input is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_pool(x: torch.Tensor, weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Causal conv + average pool of ``x[..., H]`` to ``[..., D]`` with torch ops."""
    g = geometry
    lead = x.shape[:-1]
    grid = x.reshape(-1, g.F, g.F)  # (N, channel a, column b)
    grid = F.pad(grid, (g.k - 1, 0))  # causal along b
    conv = F.conv1d(grid, weight.reshape(g.F, g.F, g.k).to(x.dtype))  # (N, o, b)
    pooled = F.avg_pool2d(conv.unsqueeze(1), kernel_size=g.e, stride=g.e)
    return pooled.reshape(*lead, g.D)


def scale_norm(x: torch.Tensor, g: torch.Tensor, eps: float = SCALE_NORM_EPS) -> torch.Tensor:
    """``x / max(||x||_2 * D**-0.5, eps) * g`` over the last dim (reduction in fp32+)."""
    xf = x.to(_compute_dtype(x.dtype))
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True) * (x.shape[-1] ** -0.5)
    return (xf / norm.clamp(min=eps) * g.to(xf.dtype)).to(x.dtype)


def fold(weight: torch.Tensor, geometry: Geometry, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The D x H matrix M with ``conv_pool(x) == x @ M.T`` (computed in float64)."""
    eye = torch.eye(geometry.hidden_size, dtype=torch.float64, device=weight.device)
    return conv_pool(eye, weight.to(torch.float64), geometry).T.contiguous().to(dtype)


@torch.no_grad()
def compressed_table(
    embed_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    g: torch.Tensor,
    geometry: Geometry,
    chunk: int = 16384,
) -> torch.Tensor:
    """The compressor applied to every row of an embedding table: ``rows x D`` in float32.

    Row ``i`` equals ``ScaleNorm(conv_pool(embed_weight[i]))``; token-id lookups into this
    table replace the whole compressor.  Computed in float32 chunk by chunk through the
    folded matrix, whatever the embedding's dtype.
    """
    m = fold(conv_weight, geometry, torch.float32).to(embed_weight.device)
    out = torch.empty(embed_weight.shape[0], geometry.D, dtype=torch.float32, device=embed_weight.device)
    for start in range(0, embed_weight.shape[0], chunk):
        rows = embed_weight[start : start + chunk].to(torch.float32)
        out[start : start + chunk] = scale_norm(rows @ m.T, g)
    return out


class CausalConvPool(nn.Module):
    """Conv2d(F, F, (1, k)) with causal left padding, then e x e average pooling.

    Holds the checkpoint tensor ``conv.weight`` of shape (F, F, 1, k).
    """

    def __init__(self, geometry: Geometry, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.geometry = geometry
        self.weight = nn.Parameter(
            torch.empty(geometry.F, geometry.F, 1, geometry.k, dtype=dtype), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_pool(x, self.weight, self.geometry)

    def fold(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fold(self.weight, self.geometry, dtype)

    def extra_repr(self) -> str:
        g = self.geometry
        return f"H={g.hidden_size} -> D={g.D}, F={g.F}, e={g.e}, k={g.k}"


class ScaleNorm(nn.Module):
    """ScaleNorm with one learned scalar ``g`` (checkpoint tensor ``norm_emb.g``)."""

    def __init__(self, eps: float = SCALE_NORM_EPS, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_norm(x, self.g, self.eps)


def compress(x: torch.Tensor, conv: CausalConvPool, norm: ScaleNorm) -> torch.Tensor:
    """H-wide embeddings ``[..., H]`` to the normalised D-wide residual ``[..., D]``.

    On CUDA with Triton available this is one fused kernel; elsewhere torch ops.
    """
    from . import kernels

    if kernels.fused_compress_available(x):
        return kernels.fused_compress(x, conv.weight, norm.g, conv.geometry, norm.eps)
    return norm(conv(x))


@torch.no_grad()
def prepare_compress(conv: CausalConvPool, norm: ScaleNorm, dtype: torch.dtype) -> None:
    """Run the compressor once on ``dtype`` input right after the weights load, so that the
    fused kernel's folded matrix is built (and its kernel compiled) then, not inside a
    CUDA-graph capture or a compiled region later."""
    x = torch.ones(1, conv.geometry.hidden_size, dtype=dtype, device=conv.weight.device)
    compress(x, conv, norm)


class ConvCompressor(nn.Module):
    """``conv`` + ``norm_emb`` as one module; its state dict uses the checkpoint names."""

    def __init__(self, geometry: Geometry, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.geometry = geometry
        self.conv = CausalConvPool(geometry, dtype=dtype)
        self.norm_emb = ScaleNorm(dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compress(x, self.conv, self.norm_emb)

    def fold(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.conv.fold(dtype)

    def table(self, embed_weight: torch.Tensor) -> torch.Tensor:
        return compressed_table(embed_weight, self.conv.weight, self.norm_emb.g, self.geometry)
