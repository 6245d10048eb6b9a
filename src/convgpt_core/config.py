"""ConvGPT configuration and geometry validation.

The geometry of a ConvGPT checkpoint is four numbers derived from ``hidden_size``:

* ``F = sqrt(H)``: the token embedding is viewed as an F x F grid;
* ``e``: the average-pooling window (the reference derives ``int(sqrt(F)) // 2``);
* ``D = (F / e) ** 2``: width of the residual stream;
* ``k``: width of the causal conv kernel.

Checkpoints store ``emb_dim_factor`` (F), ``emb_factor`` (e) and ``transformer_dim`` (D)
explicitly because the original config class derived them from its default
``hidden_size``.  Stored values are honoured; missing ones are derived from the real
``hidden_size``; any disagreement is rejected with a ``ValueError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from .compressor import Geometry, positive_int

MODEL_TYPE = "convgpt"
ARCHITECTURE = "ConvGPTForCausalLM"
LAYER_TYPES = ("full_attention", "sliding_attention")
# Decoder-layer RMSNorms and the final norm use this eps whatever the config says (docs/model.md).
DECODER_NORM_EPS = 1e-6
# Fields a config.json must state: their class defaults would silently describe another
# model (the reference class's defaults were a trap; see the module docstring).
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "conv_kernel_h_w",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "intermediate_size",
)


# The published ConvGPT-SYNTH-250B-EC (163,952,769 parameters): the class defaults, the
# `published` preset of `convgpt make-tiny` and the benchmarks' geometry.
PUBLISHED: dict[str, Any] = dict(
    vocab_size=65538,
    hidden_size=1296,  # F = 36, e = 3, D = 144
    conv_kernel_h_w=5,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)

# The tied head's scale_up SwiGLU is D -> SCALE_UP_FACTOR * H -> H (docs/model.md).
SCALE_UP_FACTOR = 4


@dataclass(frozen=True)
class HeadLayout:
    """The output head (docs/model.md, step 6), the one definition every model builds from.

    tied: ``scale_up`` (SwiGLU D -> ``scale_up_inner`` -> H), RMSNorm over H, logits
    against ``embed_tokens`` (H wide).  Untied: RMSNorm over D, ``lm_head`` (vocab x D).
    """

    tied: bool
    norm_width: int  # the final RMSNorm: H when tied, D when untied
    scale_up_inner: int | None  # SCALE_UP_FACTOR * H when tied, else None
    logits_width: int  # width of the hidden state the vocab projection reads

    @classmethod
    def of(cls, config: Any) -> HeadLayout:
        g = Geometry.from_config(config)
        if config.tie_word_embeddings:
            return cls(tied=True, norm_width=g.H, scale_up_inner=SCALE_UP_FACTOR * g.H, logits_width=g.H)
        return cls(tied=False, norm_width=g.D, scale_up_inner=None, logits_width=g.D)


class ConvGPTConfig(PretrainedConfig):
    """Configuration of a ConvGPT checkpoint (``model_type = "convgpt"``).

    Defaults are the published ConvGPT-SYNTH-250B-EC geometry.  Construction validates
    the whole config (see :meth:`validate_convgpt`); fields of the original config that
    play no part in the forward pass (``conv_activation``, ``dropout``,
    ``laplace_attn_fn``, ``num_experts``, ...) are accepted and kept but ignored.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = PUBLISHED["vocab_size"],
        hidden_size: int = PUBLISHED["hidden_size"],
        emb_dim_factor: int | None = None,
        emb_factor: int | None = None,
        transformer_dim: int | None = None,
        conv_kernel_h_w: int = PUBLISHED["conv_kernel_h_w"],
        num_hidden_layers: int = PUBLISHED["num_hidden_layers"],
        num_attention_heads: int = PUBLISHED["num_attention_heads"],
        num_key_value_heads: int | None = PUBLISHED["num_key_value_heads"],
        head_dim: int | None = PUBLISHED["head_dim"],
        intermediate_size: int = PUBLISHED["intermediate_size"],
        hidden_act: str = "silu",
        max_position_embeddings: int = PUBLISHED["max_position_embeddings"],
        rms_norm_eps: float = 1e-6,
        rope_theta: float = PUBLISHED["rope_theta"],
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        max_window_layers: int | None = None,
        attention_bias: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = PUBLISHED["tie_word_embeddings"],
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.conv_kernel_h_w = conv_kernel_h_w
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_attention_heads if num_key_value_heads is None else num_key_value_heads
        )
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        if layer_types is None:
            first_sliding = num_hidden_layers if max_window_layers is None else max_window_layers
            layer_types = [
                "sliding_attention" if sliding_window and i >= first_sliding else "full_attention"
                for i in range(num_hidden_layers)
            ]
        self.layer_types = list(layer_types)
        if "sliding_attention" not in self.layer_types:
            # A window no layer uses is dropped (as transformers' Qwen3 config drops it without
            # use_sliding_window): an engine that reads one model-level window would put it on
            # every layer (vLLM 0.26 does when the layer types are all alike).
            self.sliding_window = None
        self.rope_parameters = _rope_parameters(rope_parameters, rope_scaling, rope_theta)
        geometry = Geometry.from_values(
            hidden_size=hidden_size,
            conv_kernel_h_w=conv_kernel_h_w,
            emb_dim_factor=emb_dim_factor,
            emb_factor=emb_factor,
            transformer_dim=transformer_dim,
        )
        self.emb_dim_factor = geometry.F
        self.emb_factor = geometry.e
        self.transformer_dim = geometry.D
        if head_dim is None:
            head_dim = geometry.D // num_attention_heads if num_attention_heads else 0
        self.head_dim = head_dim
        if not kwargs.get("architectures"):  # engines dispatch on architectures[0]
            kwargs["architectures"] = [ARCHITECTURE]
        # Validate before the base class runs transformers' own (less specific) validators.
        self.validate_convgpt()
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        # transformers may rewrite rope fields while initialising the base class.
        self.rope_parameters = _rope_parameters(
            getattr(self, "rope_parameters", None), None, rope_theta
        )
        self.validate_convgpt()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """Build from a parsed ``config.json`` (what ``AutoConfig`` and the engines call);
        a required field that is absent is named as missing instead of defaulted."""
        missing = [f for f in REQUIRED_FIELDS if f not in config_dict and f not in kwargs]
        if missing:
            raise ValueError(
                f"config.json lacks required field{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} (model_type {MODEL_TYPE!r})"
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_config(self)

    @property
    def head(self) -> HeadLayout:
        return HeadLayout.of(self)

    @property
    def rope_theta_value(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    def validate_convgpt(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        Geometry.from_config(self)
        for name in (
            "vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (ConvGPT uses 'silu')")
        if self.attention_bias:
            raise ValueError(
                "attention_bias=True is not supported: published ConvGPT checkpoints have no "
                "attention biases"
            )
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ValueError(
                    f"layer_types[{i}]={kind!r} is not one of {', '.join(LAYER_TYPES)}"
                )
        if "sliding_attention" in self.layer_types:
            positive_int("sliding_window (layer_types contains 'sliding_attention')", self.sliding_window)
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported: ConvGPT uses plain "
                "(neox-style) RoPE"
            )
        theta = self.rope_parameters.get("rope_theta")
        if not (isinstance(theta, (int, float)) and theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {theta!r}")

    def sliding_window_of(self, layer_idx: int) -> int | None:
        """The attention window of one layer (keys with q_pos - k_pos < window), or None."""
        if self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return None


def _rope_parameters(
    rope_parameters: dict | None, rope_scaling: dict | None, rope_theta: float
) -> dict:
    params = dict(rope_parameters or {})
    if rope_scaling:
        params.update(rope_scaling)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", rope_theta)
    return params


def register_config() -> None:
    """Register :class:`ConvGPTConfig` with transformers' ``AutoConfig`` (idempotent)."""
    from transformers import AutoConfig

    AutoConfig.register(MODEL_TYPE, ConvGPTConfig, exist_ok=True)


def heads_per_rank(config: ConvGPTConfig, tp_size: int) -> tuple[int, int]:
    """(query heads, kv heads) held by one tensor-parallel rank; kv heads are replicated
    when there are fewer of them than ranks.  Raises naming the numbers when impossible."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % tp_size:
        raise ValueError(f"num_attention_heads={heads} is not divisible by tensor parallel size {tp_size}")
    if kv % tp_size and tp_size % kv:
        raise ValueError(
            f"num_key_value_heads={kv} and tensor parallel size {tp_size}: one must divide the other"
        )
    return heads // tp_size, max(1, kv // tp_size)
