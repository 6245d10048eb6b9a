import json

import pytest

from convgpt_core.config import ConvGPTConfig, Geometry, register_config


@pytest.mark.parametrize(
    "H,k,F,e,D",
    [(256, 3, 16, 2, 64), (1296, 5, 36, 3, 144), (4096, 1, 64, 4, 256), (64, 3, 8, 1, 64)],
)
def test_geometry_derived_from_hidden_size(H, k, F, e, D):
    assert Geometry.from_values(H, k) == Geometry(H, F, e, D, k)
    c = ConvGPTConfig(hidden_size=H, conv_kernel_h_w=k, num_hidden_layers=1)
    assert (c.emb_dim_factor, c.emb_factor, c.transformer_dim) == (F, e, D)


def test_stored_values_are_honoured():
    # e = 2 is not the derived value for F = 36 (3) but it divides F: honour it.
    c = ConvGPTConfig(hidden_size=1296, emb_dim_factor=36, emb_factor=2, transformer_dim=324, conv_kernel_h_w=3)
    assert c.geometry == Geometry(1296, 36, 2, 324, 3)


def test_reference_default_hidden_size_is_not_used():
    """The original config class derived F, e, D from 1296 whatever hidden_size said."""
    c = ConvGPTConfig(hidden_size=256, num_hidden_layers=1)
    assert c.geometry.D == 64


BAD = [
    (dict(hidden_size=1000), "hidden_size=1000"),
    (dict(hidden_size=1296, emb_dim_factor=35), "emb_dim_factor=35"),
    (dict(hidden_size=1296, emb_factor=5), "emb_factor=5"),
    (dict(hidden_size=1296, transformer_dim=160), "transformer_dim=160"),
    (dict(conv_kernel_h_w=0), "conv_kernel_h_w"),
    (dict(num_attention_heads=16, num_key_value_heads=5), "num_key_value_heads=5"),
    (dict(num_hidden_layers=2, layer_types=["full_attention", "global"]), "layer_types[1]='global'"),
    (dict(num_hidden_layers=2, layer_types=["full_attention"]), "layer_types has 1"),
    (dict(num_hidden_layers=1, layer_types=["sliding_attention"], sliding_window=None), "sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(vocab_size=0), "vocab_size"),
]


@pytest.mark.parametrize("fields,needle", BAD, ids=[b[1] for b in BAD])
def test_inconsistent_config_is_rejected_naming_the_field(fields, needle):
    with pytest.raises(ValueError) as info:
        ConvGPTConfig(**fields)
    assert needle in str(info.value)


def test_auto_config_registration_is_idempotent_and_ignores_auto_map(tmp_path):
    from transformers import AutoConfig

    register_config()
    register_config()
    c = ConvGPTConfig(hidden_size=256, num_hidden_layers=2, conv_kernel_h_w=5)
    c.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["auto_map"] = {"AutoConfig": "configuration_convgpt.ConvGPTConfig"}  # file does not exist
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ConvGPTConfig)
    assert loaded.geometry == c.geometry


def test_legacy_rope_fields():
    c = ConvGPTConfig(rope_theta=5e5, rope_scaling=None)
    assert c.rope_theta_value == 5e5
    c = ConvGPTConfig(rope_scaling={"type": "default"}, rope_theta=1e4)
    assert c.rope_parameters["rope_type"] == "default"


def test_layer_types_from_max_window_layers():
    c = ConvGPTConfig(num_hidden_layers=4, sliding_window=8, max_window_layers=2)
    assert c.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert [c.sliding_window_of(i) for i in range(4)] == [None, None, 8, 8]


@pytest.mark.parametrize("fields", [
    dict(num_hidden_layers=2, layer_types=["full_attention"] * 2, sliding_window=16),
    dict(num_hidden_layers=2, sliding_window=16),  # no layer_types, max_window_layers unset: all full
    dict(num_hidden_layers=2, layer_types=["sliding_attention"] * 2, sliding_window=16),
    dict(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"], sliding_window=16),
    dict(num_hidden_layers=2),
], ids=["window-all-full", "window-no-layer-types", "all-sliding", "mixed", "no-window"])
def test_model_level_window_is_every_layers_window(fields, tmp_path):
    """vLLM 0.26 puts one model-level window on every layer whose own window is None when the
    layer types are all alike (engine/arg_utils.py: ``if not is_interleaved(hf_text_config):
    sliding_window = model_config.get_sliding_window()``, i.e. the config's ``sliding_window``).
    Under that rule every layer must still get its own window from the config, before and after
    a save and reload."""
    c = ConvGPTConfig(**fields)
    c.save_pretrained(tmp_path)
    for cfg in (c, ConvGPTConfig.from_pretrained(tmp_path)):
        windows = [cfg.sliding_window_of(i) for i in range(cfg.num_hidden_layers)]
        interleaved = len(set(cfg.layer_types)) > 1  # vLLM's is_interleaved
        if not interleaved:
            assert windows == [cfg.sliding_window] * cfg.num_hidden_layers
        assert windows == [16 if t == "sliding_attention" else None for t in cfg.layer_types]


def test_heads_per_tensor_parallel_rank():
    from convgpt_core.config import heads_per_rank

    c = ConvGPTConfig(num_attention_heads=16, num_key_value_heads=8)
    assert heads_per_rank(c, 1) == (16, 8)
    assert heads_per_rank(c, 4) == (4, 2)
    assert heads_per_rank(c, 16) == (1, 1)  # kv heads replicated across ranks
    with pytest.raises(ValueError, match="num_attention_heads=16 is not divisible by tensor parallel size 3"):
        heads_per_rank(c, 3)
    c = ConvGPTConfig(num_attention_heads=12, num_key_value_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads=4 and tensor parallel size 6"):
        heads_per_rank(c, 6)


def test_class_defaults_are_the_published_model():
    """One published geometry: the class defaults, the `published` preset and the spec's
    parameter count (163,952,769 with k = 5) agree."""
    from convgpt_core.checkpoint import parameter_count
    from convgpt_core.config import PUBLISHED
    from convgpt_core.tiny import PRESETS

    c = ConvGPTConfig()
    assert PRESETS["published"] is PUBLISHED
    assert all(getattr(c, k) == v for k, v in PUBLISHED.items() if k != "rope_theta")
    assert c.rope_theta_value == PUBLISHED["rope_theta"]
    assert c.geometry == Geometry(1296, 36, 3, 144, 5)
    assert parameter_count(c) == 163_952_769
