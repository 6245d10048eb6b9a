import math

import pytest
import torch

from convgpt_core.compressor import ConvCompressor, compressed_table, fold
from convgpt_core.config import Geometry
from naive import compress_loops, scale_norm

# (F, k) with e derived as int(sqrt(F)) // 2: F=16 -> e=2, F=36 -> e=3, F=64 -> e=4
CASES = [(16, 1), (16, 3), (16, 5), (36, 3), (36, 5), (64, 1), (64, 5)]


def _compressor(F, k, seed=0, dtype=torch.float64):
    geom = Geometry.from_values(F * F, k)
    comp = ConvCompressor(geom, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        comp.conv.weight.copy_(torch.randn(comp.conv.weight.shape, generator=gen, dtype=dtype))
        comp.norm_emb.g.fill_(1.7)
    return geom, comp


@pytest.mark.parametrize("F,k", CASES)
def test_compressor_matches_explicit_loops(F, k):
    geom, comp = _compressor(F, k)
    x = torch.randn(5, F * F, dtype=torch.float64)
    want = scale_norm(compress_loops(x, comp.conv.weight, geom.e), comp.norm_emb.g)
    got = comp(x)
    assert got.shape == (5, (F // geom.e) ** 2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("F,k", CASES)
def test_fold_and_table_match_explicit_loops(F, k):
    geom, comp = _compressor(F, k, seed=1)
    x = torch.randn(7, F * F, dtype=torch.float64)
    pooled = compress_loops(x, comp.conv.weight, geom.e)
    torch.testing.assert_close(x @ fold(comp.conv.weight, geom, torch.float64).T, pooled, rtol=1e-10, atol=1e-10)
    table = compressed_table(x, comp.conv.weight, comp.norm_emb.g, geom)
    assert table.dtype == torch.float32 and table.shape == (7, geom.D)
    torch.testing.assert_close(table.double(), scale_norm(pooled, comp.norm_emb.g), rtol=1e-5, atol=1e-5)


def test_causal_along_columns():
    """Conv output column b depends only on input columns <= b (left padding only)."""
    geom, comp = _compressor(16, 5)
    m = fold(comp.conv.weight, geom, torch.float64).reshape(8, 8, 16, 16)  # (p, q, a, b)
    for q in range(8):
        last_col = q * geom.e + geom.e - 1
        if last_col + 1 < 16:
            assert m[:, q, :, last_col + 1 :].abs().max() == 0
        assert m[:, q, :, : last_col + 1].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_leading_shape_and_dtype(dtype):
    geom, comp64 = _compressor(36, 5)
    comp = ConvCompressor(geom, dtype=dtype)
    comp.load_state_dict({k: v.to(dtype) for k, v in comp64.state_dict().items()})
    x = torch.randn(2, 3, 4, 1296, dtype=torch.float64)
    got = comp(x.to(dtype))
    assert got.shape == (2, 3, 4, 144) and got.dtype == dtype
    want = comp64(x.to(dtype).double())
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_scale_norm_clamps_small_inputs():
    geom, comp = _compressor(16, 3)
    x = torch.full((1, 256), 1e-12, dtype=torch.float64)
    got = comp(x)
    want = compress_loops(x, comp.conv.weight, geom.e) / 1e-5 * 1.7
    torch.testing.assert_close(got, want)
    assert math.isfinite(float(got.abs().max()))
