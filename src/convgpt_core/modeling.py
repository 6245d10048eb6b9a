"""Reference ConvGPT model for transformers (>= 5): ``ConvGPTForCausalLM``.

Plain torch, written for clarity and exactness rather than speed: it is what the engine
adapters are checked against.  It loads published checkpoints strictly (see
:mod:`convgpt_core.checkpoint`), generates with transformers' KV cache, and is registered
with the Auto classes by :func:`register`, so ``AutoModelForCausalLM.from_pretrained(DIR)``
needs no remote code (a hub ``auto_map`` is ignored).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .compressor import CausalConvPool, ScaleNorm
from .config import DECODER_NORM_EPS, ConvGPTConfig, register_config

# transformers 5.24 renamed the output field ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (float64 for float64 input), weight applied after the cast back."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, size: int, inner: int, out: int | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(size, inner, bias=False)
        self.up_proj = nn.Linear(size, inner, bias=False)
        self.down_proj = nn.Linear(inner, size if out is None else out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Neox-style RoPE tables for ``positions`` (B, T), computed in float64."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    )
    freqs = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class ConvGPTAttention(nn.Module):
    def __init__(self, config: ConvGPTConfig, layer_idx: int) -> None:
        super().__init__()
        D, hd = config.geometry.D, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.sliding_window = config.sliding_window_of(layer_idx)
        self.q_proj = nn.Linear(D, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, h, cos, sin, key_mask, cache: Cache | None, cache_end: int):
        B, T, _ = h.shape
        q = self.q_norm(self.q_proj(h).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Mask in cache-slot space: the S returned keys are the S most recent slots.
        S = k.shape[-2]
        q_slot = torch.arange(cache_end - T, cache_end, device=h.device)[:, None]
        k_slot = torch.arange(cache_end - S, cache_end, device=h.device)[None, :]
        allowed = k_slot <= q_slot
        if self.sliding_window is not None:
            allowed = allowed & (q_slot - k_slot < self.sliding_window)
        allowed = allowed[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, -S:]
            allowed = allowed | (k_slot == q_slot)  # padding queries attend to themselves only
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.to(torch.float32 if q.dtype != torch.float64 else q.dtype), -1)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out)


class ConvGPTDecoderLayer(nn.Module):
    def __init__(self, config: ConvGPTConfig, layer_idx: int) -> None:
        super().__init__()
        D = config.geometry.D
        self.self_attn = ConvGPTAttention(config, layer_idx)
        self.mlp = SwiGLU(D, config.intermediate_size)
        self.norm1 = RMSNorm(D, DECODER_NORM_EPS)
        self.norm2 = RMSNorm(D, DECODER_NORM_EPS)

    def forward(self, h, cos, sin, key_mask, cache, cache_end):
        h = h + self.self_attn(self.norm1(h), cos, sin, key_mask, cache, cache_end)
        return h + self.mlp(self.norm2(h))


class ConvGPTPreTrainedModel(PreTrainedModel):
    config_class = ConvGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["ConvGPTDecoderLayer"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' init helpers skip tensors already loaded from a checkpoint; some
        # 5.x releases (5.12) run this after loading, so plain in-place writes would
        # overwrite the checkpoint.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, CausalConvPool)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ScaleNorm):
            init.ones_(module.g)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class ConvGPTModel(ConvGPTPreTrainedModel):
    def __init__(self, config: ConvGPTConfig) -> None:
        super().__init__(config)
        geometry, head = config.geometry, config.head
        self.embed_tokens = nn.Embedding(config.vocab_size, geometry.H)
        self.conv = CausalConvPool(geometry)
        self.norm_emb = ScaleNorm()
        self.layers = nn.ModuleList(
            ConvGPTDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        if head.tied:
            self.scale_up = SwiGLU(geometry.D, head.scale_up_inner, geometry.H)
        self.norm = RMSNorm(head.norm_width, DECODER_NORM_EPS)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if cache_position is not None:
            past = int(cache_position[0])
        elif past_key_values is not None:
            past = past_key_values.get_seq_length()
        else:
            past = 0
        cache_end = past + T
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != cache_end:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions, expected "
                    f"{cache_end} (past {past} + new {T})"
                )
            key_mask = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if position_ids is None:
            position_ids = torch.arange(past, cache_end, device=inputs_embeds.device)[None].expand(B, T)

        h = self.norm_emb(self.conv(inputs_embeds))  # the compressor's torch math, always
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta_value, h.dtype)
        cache = past_key_values if use_cache else None
        for layer in self.layers:
            h = layer(h, cos, sin, key_mask, cache, cache_end)
        if self.config.tie_word_embeddings:
            h = self.scale_up(h)
        h = self.norm(h)
        return BaseModelOutputWithPast(last_hidden_state=h, **{_CACHE_FIELD: cache})


class ConvGPTForCausalLM(ConvGPTPreTrainedModel, GenerationMixin):
    """ConvGPT with its output head: the tied embedding (after scale_up) or ``lm_head``."""

    def __init__(self, config: ConvGPTConfig) -> None:
        super().__init__(config)
        self.model = ConvGPTModel(config)
        if not config.head.tied:
            self.lm_head = nn.Linear(config.head.logits_width, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load strictly: a checkpoint is validated tensor by tensor before transformers loads it."""
        from .checkpoint import validate_checkpoint

        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            validate_checkpoint(path, config=kwargs.get("config"))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        if any(info.values()):
            raise ValueError(f"{path}: checkpoint did not load cleanly: {info}")
        return (model, info) if want_info else model


def register() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM`` resolve ``model_type: convgpt`` locally."""
    from transformers import AutoModelForCausalLM

    register_config()
    AutoModelForCausalLM.register(ConvGPTConfig, ConvGPTForCausalLM, exist_ok=True)
