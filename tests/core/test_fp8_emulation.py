"""The fp8 rounding the parity judge applies to the reference for fp8 runs (tests/fp8.py)."""

import pytest
import torch

import fp8
from convgpt_core.modeling import ConvGPTForCausalLM, register


@pytest.fixture(scope="module")
def models(tiny_dirs):
    register()
    return {p: ConvGPTForCausalLM.from_pretrained(tiny_dirs[p], dtype=torch.float64).eval()
            for p in ("tiny", "tiny-untied")}


def test_quantize_gives_e4m3_values_times_the_scale():
    x = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    s = fp8.scale_of(x)
    q = fp8.quantize(x, s) / s  # e4m3 values, up to float64 rounding of the scaling
    torch.testing.assert_close(q, q.to(torch.float8_e4m3fn).to(torch.float64), rtol=1e-12, atol=0)
    assert abs(q.abs().max() - fp8.E4M3_MAX) < 1e-9  # the largest input lands on the largest e4m3 value
    rel = ((fp8.quantize(x, s) - x).abs() / x.abs()).masked_select(x.abs() > 64 * s)
    assert rel.max() <= 2.0**-4  # 3 mantissa bits: half a step, relative


@pytest.mark.parametrize("preset,head", [("tiny", "scale_up"), ("tiny-untied", None)])
def test_emulation_rounds_the_engines_linears_and_restores_them(models, preset, head):
    m = models[preset]
    groups = fp8.quantized_linears(m)
    fused = [g for gs in groups.values() for g in gs if len(g) > 1]
    layers = m.config.num_hidden_layers + (head is not None)
    assert sorted(map(tuple, fused)).count(("q_proj", "k_proj", "v_proj")) == m.config.num_hidden_layers
    assert sorted(map(tuple, fused)).count(("gate_proj", "up_proj")) == layers
    assert not any("lm_head" in g for gs in groups.values() for g in gs)
    assert any(p.endswith("scale_up") for p in groups) == (head is not None)
    ids = torch.tensor([[5, 77, 300, 12, 9, 401, 33]])
    before = {n: p.clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        exact = m(ids).logits
        with fp8.emulate(m):
            rounded = m(ids).logits
            w = m.model.layers[0].self_attn.q_proj.weight
            assert not torch.equal(w, before["model.layers.0.self_attn.q_proj.weight"])
        again = m(ids).logits
    torch.testing.assert_close(again, exact, rtol=0, atol=0)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    diff = (rounded - exact).abs().max()
    assert 1e-3 < diff < exact.std()  # moved by the rounding, not turned into noise
