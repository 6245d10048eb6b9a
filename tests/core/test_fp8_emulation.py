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


def test_row_scales_put_each_rows_largest_value_on_e4m3_max():
    w = torch.randn(32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w[3] *= 1e5  # one row far larger: with one scale for all, the others fall to e4m3 subnormals
    q = fp8.quantize(w, fp8.row_scales(w)) / fp8.row_scales(w)
    torch.testing.assert_close(q.abs().amax(dim=1), torch.full((32,), fp8.E4M3_MAX, dtype=torch.float64))
    others = torch.arange(32) != 3
    err_rows = (fp8.quantize(w, fp8.row_scales(w)) - w)[others].abs().mean()
    err_tensor = (fp8.quantize(w, fp8.scale_of(w)) - w)[others].abs().mean()
    assert err_tensor > 10 * err_rows


@pytest.mark.parametrize("preset,head", [("tiny", "scale_up"), ("tiny-untied", None)])
@pytest.mark.parametrize("scheme", fp8.SCHEMES)
def test_emulation_rounds_the_engines_linears_and_restores_them(models, preset, head, scheme):
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
        with fp8.emulate(m, scheme):
            rounded = m(ids).logits
            w = m.model.layers[0].self_attn.q_proj.weight
            assert not torch.equal(w, before["model.layers.0.self_attn.q_proj.weight"])
        again = m(ids).logits
    torch.testing.assert_close(again, exact, rtol=0, atol=0)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    diff = (rounded - exact).abs().max()
    assert 1e-3 < diff < exact.std()  # moved by the rounding, not turned into noise


def test_channel_scheme_rounds_each_token_alone_and_tensor_scheme_per_batch(models):
    """SGLang's per-token input scales make a request's rounding independent of its batch;
    vLLM's per-call scale does not (the reason batched fp8 cells cannot match exactly)."""
    m = models["tiny"]
    alone = torch.tensor([[5, 77, 300, 12, 9, 401, 33]])
    batch = torch.cat([alone, torch.tensor([[1, 2, 3, 4, 5, 6, 7]])])
    with torch.no_grad():
        moved = {}
        for scheme in fp8.SCHEMES:
            with fp8.emulate(m, scheme):
                moved[scheme] = (m(alone).logits[0] - m(batch).logits[0]).abs().max()
    assert moved["channel"] < 1e-10  # float64 arithmetic only
    assert moved["tensor"] > 1e-4  # the other request's activations set some inputs' scale


def test_reference_for_a_run_follows_its_engines_scheme():
    assert fp8.reference_name({"vllm": "0.26.0", "quantization": "fp8"}) == "reference-fp8-tensor"
    assert fp8.reference_name({"sglang": "0.5.16", "quantization": "fp8"}) == "reference-fp8-channel"
    assert fp8.reference_name({"sglang": "0.5.16", "quantization": None, "kv_cache_dtype": "fp8"}) == "reference"
    with pytest.raises(ValueError, match="scheme 'block'"), fp8.emulate(torch.nn.Linear(2, 2), "block"):
        pass
