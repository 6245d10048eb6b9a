"""LoRA adapters in the PEFT layout: what make_adapter writes, merge_adapter's arithmetic
(checked against W + (alpha / r) B A computed here), and clear errors for adapters that do
not fit the checkpoint."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from convgpt_core.checkpoint import CheckpointError
from convgpt_core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, make_adapter, merge_adapter
from convgpt_core.tiny import make_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lora") / "base")
    make_checkpoint(path, preset="tiny-untied", seed=5)
    return path


def test_merge_adds_scaled_product_to_each_adapted_weight(base, tmp_path):
    adapter, merged = str(tmp_path / "a"), str(tmp_path / "m")
    make_adapter(base, adapter, rank=4, alpha=8, targets=("q_proj", "down_proj"), seed=1)
    merge_adapter(base, adapter, merged)
    w0, w1 = load_file(f"{base}/model.safetensors"), load_file(f"{merged}/model.safetensors")
    lora = load_file(f"{adapter}/{ADAPTER_WEIGHTS}")
    changed = set()
    for name in w0:
        module = name.removesuffix(".weight")
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(w0[name], w1[name]), name
            continue
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        expected = w0[name].double() + (8 / 4) * (b.double() @ a.double())
        assert torch.allclose(w1[name].double(), expected, rtol=1e-6, atol=1e-6), name
        assert not torch.allclose(w1[name], w0[name]), f"{name} did not change"
        changed.add(module.rsplit(".", 1)[1])
    assert changed == {"q_proj", "down_proj"}
    assert os.path.isfile(f"{merged}/tokenizer.json") and os.path.isfile(f"{merged}/config.json")


def test_adapter_errors_name_the_problem(base, tmp_path):
    adapter = str(tmp_path / "a")
    make_adapter(base, adapter, rank=4, seed=2)
    tensors = load_file(f"{adapter}/{ADAPTER_WEIGHTS}")

    def write(t):
        save_file(t, f"{adapter}/{ADAPTER_WEIGHTS}")

    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    write({k: v for k, v in tensors.items() if k != name})
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.q_proj has no lora_B"):
        merge_adapter(base, adapter, str(tmp_path / "m"))
    write(dict(tensors, **{name: tensors[name][:, :2].contiguous()}))
    with pytest.raises(CheckpointError, match=r"q_proj has A \(4, 64\), B \(256, 2\); expected \(4, 64\) and \(256, 4\)"):
        merge_adapter(base, adapter, str(tmp_path / "m"))
    write(dict(tensors, **{"base_model.model.model.scale_up.gate_proj.lora_A.weight": torch.zeros(4, 64)}))
    with pytest.raises(CheckpointError, match="scale_up.gate_proj.lora_A.weight does not adapt a ConvGPT decoder"):
        merge_adapter(base, adapter, str(tmp_path / "m"))
    write(tensors)
    cfg = json.load(open(f"{adapter}/{ADAPTER_CONFIG}"))
    json.dump(dict(cfg, use_rslora=True), open(f"{adapter}/{ADAPTER_CONFIG}", "w"))
    with pytest.raises(CheckpointError, match="only plain LoRA"):
        merge_adapter(base, adapter, str(tmp_path / "m"))
    with pytest.raises(ValueError, match="not ConvGPT decoder linears"):
        make_adapter(base, str(tmp_path / "b"), targets=("lm_head",))


def test_fused_linear_dims_are_the_engines_fused_shapes(base):
    """tiny-untied: D = 64, head_dim 64, 4 q heads, 2 kv heads, intermediate 128."""
    from convgpt_core.config import ConvGPTConfig
    from convgpt_core.lora import fused_linear_dims

    dims = fused_linear_dims(ConvGPTConfig.from_pretrained(base), layer=1)
    assert dims == {"qkv_proj": (64, 64 * (4 + 2 * 2)), "o_proj": (4 * 64, 64),
                    "gate_up_proj": (64, 2 * 128), "down_proj": (128, 64)}
