"""The ConvGPT compressor: per-token causal Conv2d(1 x k), e x e average pooling, ScaleNorm.

Everything happens inside one token: the H-wide embedding is viewed as an F x F grid
G[a][b], the row index ``a`` acts as the conv channel, the conv runs along ``b`` with
``k - 1`` zeros of left padding, then an e x e mean pool over (output channel, column)
gives (F/e)^2 = D values, which ScaleNorm rescales to RMS ``g``.

Because conv and pool are linear, they reduce to one fixed D x H matrix (:func:`fold`);
for token ids the whole compressor reduces to a vocab x D table
(:func:`compressed_table`).  After the weights load, :func:`after_loading` folds the conv
into a buffer the conv module owns (what the fused kernel multiplies by) and fills an
adapter's table.  The torch code here is the math; :mod:`convgpt_core.kernels` launches
the fused kernel.  This module imports nothing else of the package.

Parameter names match published checkpoints relative to ``model.``: a model holds
``conv`` (:class:`CausalConvPool`, ``conv.weight``) and ``norm_emb``
(:class:`ScaleNorm`, ``norm_emb.g``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ScaleNorm clamps the scaled L2 norm from below at this value (docs/model.md).
SCALE_NORM_EPS = 1e-5


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Geometry:
    """The compressor's shape: H = F * F input, D = (F / e) ** 2 output, kernel width k.

    ``H`` and ``D`` are the names the code uses for config.json's ``hidden_size`` and
    ``transformer_dim``."""

    H: int
    F: int
    e: int
    D: int
    k: int

    @classmethod
    def from_values(
        cls,
        hidden_size: int,
        conv_kernel_h_w: int,
        emb_dim_factor: int | None = None,
        emb_factor: int | None = None,
        transformer_dim: int | None = None,
    ) -> Geometry:
        """From config.json's fields; stored F, e, D are honoured, missing ones derived from
        ``hidden_size``, and any inconsistency raises ``ValueError`` naming the field."""
        H = positive_int("hidden_size", hidden_size)
        F = math.isqrt(H)
        if F * F != H:
            raise ValueError(
                f"hidden_size={H} is not a perfect square (sqrt = {math.sqrt(H):.4f}); "
                "ConvGPT views each embedding as an F x F grid"
            )
        if emb_dim_factor is not None and emb_dim_factor != F:
            raise ValueError(
                f"emb_dim_factor={emb_dim_factor} disagrees with hidden_size={H} (sqrt = {F})"
            )
        e = int(math.isqrt(F)) // 2 if emb_factor is None else emb_factor
        e = positive_int("emb_factor", e)
        if F % e:
            raise ValueError(
                f"emb_factor={e} does not divide emb_dim_factor={F}: the {e}x{e} pooling "
                f"would not tile the {F}x{F} grid"
            )
        D = (F // e) ** 2
        if transformer_dim is not None and transformer_dim != D:
            raise ValueError(
                f"transformer_dim={transformer_dim} disagrees with the pooled size "
                f"(emb_dim_factor / emb_factor)^2 = ({F}/{e})^2 = {D}"
            )
        k = positive_int("conv_kernel_h_w", conv_kernel_h_w)
        return cls(H=H, F=F, e=e, D=D, k=k)

    @classmethod
    def from_config(cls, config: Any) -> Geometry:
        return cls.from_values(
            hidden_size=config.hidden_size,
            conv_kernel_h_w=config.conv_kernel_h_w,
            emb_dim_factor=getattr(config, "emb_dim_factor", None),
            emb_factor=getattr(config, "emb_factor", None),
            transformer_dim=getattr(config, "transformer_dim", None),
        )


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
    eye = torch.eye(geometry.H, dtype=torch.float64, device=weight.device)
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
    return _compress_rows(embed_weight, fold(conv_weight, geometry, torch.float32), g, chunk)


def _compress_rows(embed_weight: torch.Tensor, m: torch.Tensor, g: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """``ScaleNorm(rows @ m.T)`` for every row of ``embed_weight``, in float32, chunk by chunk."""
    m = m.to(embed_weight.device)
    out = torch.empty(embed_weight.shape[0], m.shape[0], dtype=torch.float32, device=embed_weight.device)
    for start in range(0, embed_weight.shape[0], chunk):
        rows = embed_weight[start : start + chunk].to(torch.float32)
        out[start : start + chunk] = scale_norm(rows @ m.T, g)
    return out


class CausalConvPool(nn.Module):
    """Conv2d(F, F, (1, k)) with causal left padding, then e x e average pooling.

    Holds the checkpoint tensor ``conv.weight`` of shape (F, F, 1, k) and, once
    :meth:`refresh_fold` has run after loading, the buffer ``folded_t``: ``M.T`` (H x D,
    ``conv_pool(x) == x @ M.T``) in the model's dtype, what the fused kernel multiplies by.
    It is not part of the checkpoint, and is rebuilt whenever the weight changes.
    """

    folded_t: torch.Tensor | None

    def __init__(self, geometry: Geometry, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.geometry = geometry
        self.weight = nn.Parameter(
            torch.empty(geometry.F, geometry.F, 1, geometry.k, dtype=dtype), requires_grad=False
        )
        self.register_buffer("folded_t", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_pool(x, self.weight, self.geometry)

    @torch.no_grad()
    def refresh_fold(self, dtype: torch.dtype) -> torch.Tensor:
        """(Re)build ``folded_t`` from the current weight (folded in float64, stored in
        ``dtype``); returns the float32 D x H matrix it was made from."""
        m = fold(self.weight, self.geometry, torch.float32)
        self.folded_t = m.T.contiguous().to(dtype)
        return m

    def extra_repr(self) -> str:
        g = self.geometry
        return f"H={g.H} -> D={g.D}, F={g.F}, e={g.e}, k={g.k}"


class ScaleNorm(nn.Module):
    """ScaleNorm with one learned scalar ``g`` (checkpoint tensor ``norm_emb.g``)."""

    def __init__(self, eps: float = SCALE_NORM_EPS, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_norm(x, self.g, self.eps)


@torch.no_grad()
def after_loading(conv: CausalConvPool, norm: ScaleNorm, embed_weight: torch.Tensor, table: torch.Tensor) -> None:
    """The one post-load step of a serving model: fold the conv for the fused kernel (in the
    embedding's dtype) and fill ``table`` (rows of ``embed_weight``, e.g. one vocab shard)
    with the compressed embeddings that token ids look up."""
    m = conv.refresh_fold(embed_weight.dtype)  # folded once, for the kernel and the table
    table.copy_(_compress_rows(embed_weight, m, norm.g).to(table.dtype))


class ConvCompressor(nn.Module):
    """``conv`` + ``norm_emb`` as one module (state dict in the checkpoint's names), with the
    torch math as its forward."""

    def __init__(self, geometry: Geometry, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.geometry = geometry
        self.conv = CausalConvPool(geometry, dtype=dtype)
        self.norm_emb = ScaleNorm(dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_emb(self.conv(x))
