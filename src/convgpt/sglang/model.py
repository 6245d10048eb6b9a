"""ConvGPT for SGLang (0.5.16 on CUDA, 0.5.23 on CPU), written as an in-tree model would be.

Engine glue only: ``RadixAttention`` (per-layer sliding window), tensor-parallel
QKV/merged/row linears, fused residual ``RMSNorm``, ``get_rope``, vocab-parallel
embeddings, the tied lm_head, ``LogitsProcessor``, pipeline stages (``make_layers`` ranges,
``PPProxyTensors``) and the dims SGLang's LoRA manager asks for.  Math and names come from
:mod:`convgpt_core`.  The forward pass has no host syncs and no data-dependent shapes,
so CUDA graphs can capture it.

Token ids read a vocab x D table of compressed embeddings built after the weights load
(sharded like the embedding); ``input_embeds`` handed in by the engine go through the
compressor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
from sglang.srt.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_world_size
from sglang.srt.environ import envs
from sglang.srt.layers import logits_processor as sglang_logits
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.utils import PPMissingLayer
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, PPProxyTensors
from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.models.utils import apply_qk_norm
from sglang.srt.utils import add_prefix, make_layers
from torch import nn

from convgpt_core.checkpoint import check_served_checkpoint, load_published
from convgpt_core.compressor import CausalConvPool, ScaleNorm, after_loading
from convgpt_core.config import DECODER_NORM_EPS, ConvGPTConfig, heads_per_rank
from convgpt_core.decode_attention import decode_attention, decode_attention_takes
from convgpt_core.kernels import compress, warm_up
from convgpt_core.logits import float_cast_takes, logits_to_float32
from convgpt_core.lora import fused_linear_dims
from convgpt_core.narrow_linear import to_stream
from convgpt_core.norm_linear import (
    KVStore,
    QKRope,
    fused_decoder_layer,
    kv_store_on,
    linear_q_apart,
    norm_linear_available,
    q_apart_linear_on,
    qk_rope_of,
    split_qkv,
)

logger = logging.getLogger(__name__)
# 0.5.23 widens bf16/fp16 logits to float32 with a kernel of its own on CUDA; 0.5.16 with torch's copy
SGLANG_CASTS_LOGITS = hasattr(sglang_logits, "cast_to_float32_logits")
PAGED_PREFILL = "SGLANG_FLASHINFER_USE_PAGED"  # read by both versions' flashinfer backend at its start


def _prefix(prefix: str, name: str) -> str:
    return add_prefix(name, prefix)  # SGLang's helper takes (name, prefix)



def _plain(linear: nn.Module) -> bool:
    """An engine linear with its weight as loaded: not quantized, not wrapped for LoRA."""
    return isinstance(linear, LinearBase) and isinstance(linear.quant_method, UnquantizedLinearMethod)


class ConvGPTMLP(nn.Module):
    def __init__(self, size, inner, out, quant_config, prefix):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            size, [inner, inner], bias=False, quant_config=quant_config, prefix=_prefix(prefix, "gate_up_proj")
        )
        self.down_proj = RowParallelLinear(
            inner, out, bias=False, quant_config=quant_config, prefix=_prefix(prefix, "down_proj")
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


def _sglang_window(window: int | None) -> int:
    """A layer's attention window as SGLang counts it: without the query token itself; -1 for
    full attention."""
    return -1 if window is None else window - 1


def model_window(config: ConvGPTConfig) -> int | None:
    """The sliding-attention layers' window in SGLang's count, None without such layers (the
    config has one window for all of them, and drops it when no layer slides)."""
    return None if config.sliding_window is None else _sglang_window(config.sliding_window)


def prefill_windowed_layers_paged(config: ConvGPTConfig) -> None:
    """With sliding-window layers, ask SGLang's flashinfer backend (the CUDA default without FA3)
    for paged-only prefill.  In 0.5.16 and 0.5.23 it plans its ragged prefill kernel (the default
    for new tokens) without a window, so a prompt chunk longer than the window attends past it on
    the sliding layers; the paged kernel is planned with the window.  The variable is read when the
    backend starts, after the model is built; a value the user set is kept."""
    if model_window(config) is None:
        return
    os.environ.setdefault(PAGED_PREFILL, "1")
    if not envs.SGLANG_FLASHINFER_USE_PAGED.get():  # the backend's own reading of the setting
        logger.warning("%s=%s: SGLang's flashinfer prefill ignores the sliding window of %d tokens on "
                       "ConvGPT's sliding layers; leave it unset (or 1) for exact prefill",
                       PAGED_PREFILL, os.environ[PAGED_PREFILL], config.sliding_window)


def decode_attention_backend(args) -> str | None:
    """The decode attention backend SGLang builds for this model, as settled when the model is
    built (None outside a server).  0.5.23 resolves the pair, defaults included, when it publishes
    the server arguments (``runtime_context.attention_backends``); 0.5.16 resolves it into the
    server arguments themselves (``ServerArgs.get_attention_backends``)."""
    if args is None:
        return None
    try:
        from sglang.srt.runtime_context import attention_backends
    except ImportError:  # 0.5.16
        return args.get_attention_backends()[1]
    return attention_backends()[1]


def check_sliding_window(config: ConvGPTConfig, decode_backend: str | None) -> None:
    """Refuse the sliding windows SGLang would not serve as the model defines them:
    - a window of 1 token (each token attends to itself only): ``RadixAttention`` reads SGLang's
      count for it, 0, as full attention (``sliding_window_size or -1``, 0.5.16 and 0.5.23);
    - SGLang's triton backend as the decode backend (``decode_backend``).  In 0.5.16 and 0.5.23
      it decodes a sliding layer over ``min(seq_len, window - 1)`` keys (the new token's
      included) where the window holds ``window`` of them, and its decode kernel masks nothing
      itself, so every step past the window drops the oldest key in it (read in both sources;
      sgl-project/sglang PR 32087).  Its prefill masks by each layer's window and is exact, so
      triton for prefill alone is accepted."""
    window = model_window(config)
    if window is None:
        return
    if window == 0:
        raise ValueError(
            "ConvGPT: sliding_window = 1 (each token attends to itself only) cannot be served by "
            "SGLang: its RadixAttention reads that window as full attention"
        )
    if decode_backend == "triton":
        raise ValueError(
            f"ConvGPT: this checkpoint has sliding-window layers (window {config.sliding_window}), and "
            f"SGLang's triton attention backend decodes them over one key fewer than the window (its "
            f"decode drops the oldest key in the window), so the tokens would not be the model's. "
            f"Decode with another backend, e.g. --attention-backend flashinfer, or "
            f"--decode-attention-backend flashinfer to keep triton for prefill"
        )


def plain_kv_store(pool, forward_batch: ForwardBatch, layer_id: int, kv_heads: int, head_dim: int,
                   h: torch.Tensor) -> KVStore | None:
    """This layer's slice of SGLang's KV ``pool`` (the attention backend's, which both versions hand
    out as ``get_token_to_kv_pool()``) for the q+k+v kernel to write (:class:`KVStore`),
    where the pool is the plain one the attention backends write with one kernel per layer
    (0.5.16 and 0.5.23): ``MHATokenToKVPool`` itself (not a hybrid, sliding-window, paged-major or
    quantized subclass), its buffers in the model's dtype, one token per row ("nhd"), no
    layer-by-layer loading (hierarchical cache) and no decode-context-parallel mask, so that
    ``out_cache_loc`` is the row each new token's k and v go to, one per row of the layer's
    input ``h``.  None otherwise: attention then writes them as usual."""
    dtype, loc = h.dtype, forward_batch.out_cache_loc
    if (type(pool) is not MHATokenToKVPool or pool.is_quantized_kv_cache or pool.store_dtype != dtype
            or pool.dtype != dtype or getattr(pool, "kv_cache_layout", "nhd") != "nhd"
            or getattr(pool, "use_hnd", False) or pool.layer_transfer_counter is not None
            or getattr(forward_batch, "dcp_kv_mask", None) is not None or loc is None
            or loc.numel() != h.numel() // h.shape[-1]):
        return None
    k, v = pool.get_kv_buffer(layer_id)
    if any(t.dim() != 3 or tuple(t.shape[1:]) != (kv_heads, head_dim) for t in (k, v)):
        return None
    return KVStore(k, v, loc)


class ConvGPTAttention(nn.Module):
    def __init__(self, config: ConvGPTConfig, layer_id: int, quant_config, prefix: str) -> None:
        super().__init__()
        D, hd = config.geometry.D, config.head_dim
        self.num_heads, self.num_kv_heads = heads_per_rank(config, get_tensor_model_parallel_world_size())
        self.head_dim = hd
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.qkv_proj = QKVParallelLinear(
            D, hd, config.num_attention_heads, config.num_key_value_heads, bias=False,
            quant_config=quant_config, prefix=_prefix(prefix, "qkv_proj"),
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * hd, D, bias=False, quant_config=quant_config,
            prefix=_prefix(prefix, "o_proj"),
        )
        self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(
            hd, rotary_dim=hd, max_position=config.max_position_embeddings,
            base=config.rope_theta_value, is_neox_style=True,
        )
        self.attn = RadixAttention(
            self.num_heads, hd, hd**-0.5, num_kv_heads=self.num_kv_heads, layer_id=layer_id,
            sliding_window_size=_sglang_window(config.sliding_window_of(layer_id)),
            quant_config=quant_config, prefix=_prefix(prefix, "attn"),
        )

    def forward(self, positions: torch.Tensor, h: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        if _plain(self.qkv_proj) and q_apart_linear_on(h.shape[0]):
            qkv = linear_q_apart(h, self.qkv_proj.weight, self.q_size)  # no copy of q in attention
        else:
            qkv, _ = self.qkv_proj(h)
        out, _ = self.o_proj(self.attend(positions, qkv, forward_batch))
        return out

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, forward_batch: ForwardBatch,
               roped: bool = False, stored: bool = False) -> torch.Tensor:
        """Attention over q/k/v; ``roped``: the q/k norm and RoPE are in ``qkv`` already
        (:meth:`qk_rope`, in the q+k+v kernel); ``stored``: that kernel also wrote k and v into
        the KV cache (:meth:`kv_store`), so attention does not write them again."""
        q, k, v = split_qkv(qkv, self.q_size, self.kv_size)
        if not roped:
            # SGLang's Qwen3 path: one fused in-place q/k RMSNorm kernel on CUDA (per-head norm
            # otherwise); the generic RMSNorm over 128-wide rows was a third of prefill time.
            q, k = apply_qk_norm(q, k, self.q_norm, self.k_norm, self.head_dim)
            q, k = self.rotary_emb(positions, q, k)
        if stored and forward_batch.forward_mode.is_decode():
            out = self.decode(q, forward_batch)
            if out is not None:
                return out
        return self.attn(q, k, v, forward_batch, save_kv_cache=not stored)

    def decode(self, q: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor | None:
        """A decode step's attention by :func:`convgpt_core.decode_attention.decode_attention` where
        it takes the step (one request), over the cache the q+k+v kernel has just written (so the
        plain pool :func:`plain_kv_store` checked): the request's rows from SGLang's
        request-to-token table, its length with the new token.  None: SGLang's backend attends."""
        k_cache, v_cache = get_token_to_kv_pool().get_kv_buffer(self.attn.layer_id)
        if not decode_attention_takes(q, k_cache, self.head_dim):
            return None
        window = self.attn.sliding_window_size  # SGLang's count, without the query's own key; -1: none
        return decode_attention(q, k_cache, v_cache, get_req_to_token_pool().req_to_token,
                                forward_batch.req_pool_indices, forward_batch.seq_lens, self.attn.scaling,
                                window + 1 if window >= 0 else None)

    def kv_store(self, forward_batch: ForwardBatch, h: torch.Tensor) -> KVStore | None:
        """The KV cache for the q+k+v kernel reading ``h`` to write (None: attention writes it),
        unless ``CONVGPT_KV_STORE=0``."""
        if not kv_store_on():
            return None
        return plain_kv_store(get_token_to_kv_pool(), forward_batch, self.attn.layer_id, self.num_kv_heads,
                              self.head_dim, h)

    def qk_rope(self, positions: torch.Tensor) -> QKRope | None:
        """The q/k norm and RoPE for the q+k+v kernel's epilogue (None: run here)."""
        return qk_rope_of((self.q_norm.weight, self.q_norm.variance_epsilon), self.k_norm.weight, self.rotary_emb,
                          positions, self.num_heads, self.num_kv_heads)


class ConvGPTDecoderLayer(nn.Module):
    def __init__(self, config: ConvGPTConfig, layer_id: int, quant_config, prefix: str) -> None:
        super().__init__()
        D = config.geometry.D
        self.self_attn = ConvGPTAttention(config, layer_id, quant_config, _prefix(prefix, "self_attn"))
        self.mlp = ConvGPTMLP(D, config.intermediate_size, D, quant_config, _prefix(prefix, "mlp"))
        self.norm1 = RMSNorm(D, eps=DECODER_NORM_EPS)
        self.norm2 = RMSNorm(D, eps=DECODER_NORM_EPS)

    def fusable(self, h: torch.Tensor) -> bool:
        """Whether both norms run fused with the linear after them (``norm_linear``): plain
        unquantized weights (no LoRA wrapper, no fp8), a device the kernel runs on, and a
        decode-sized batch (up to ``MAX_ROWS`` tokens; larger ones keep SGLang's fused add +
        RMSNorm, cuBLAS and SiLU*mul).  At 256 rows the kernel takes 4.7 us for q/k/v and 6.2 for
        gate/up (round 14, H200 micro-benchmark) where SGLang's kernels took 2.4 + 4.7 and
        2.4 + 4.2 + 2.2 (its batch-256 decode trace, per layer)."""
        qkv, gate_up = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        return _plain(qkv) and _plain(gate_up) and norm_linear_available(h, qkv.weight)

    def forward(self, positions, h, forward_batch, residual):
        if self.fusable(h):
            attn, mlp = self.self_attn, self.mlp
            return fused_decoder_layer(
                h, residual, (self.norm1.weight, self.norm1.variance_epsilon), attn.qkv_proj.weight,
                lambda qkv, roped, stored: attn.attend(positions, qkv, forward_batch, roped, stored),
                to_stream(attn.o_proj, _plain(attn.o_proj)),
                (self.norm2.weight, self.norm2.variance_epsilon), mlp.gate_up_proj.weight,
                to_stream(mlp.down_proj, _plain(mlp.down_proj)), attn.qk_rope(positions),
                lambda: attn.kv_store(forward_batch, h),
            )
        if residual is None:
            residual = h
            h = self.norm1(h)
        else:
            h, residual = self.norm1(h, residual)
        h = self.self_attn(positions, h, forward_batch)
        h, residual = self.norm2(h, residual)
        return self.mlp(h), residual


class ConvGPTModel(nn.Module):
    def __init__(self, config: ConvGPTConfig, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        geometry, head = config.geometry, config.head
        self.pp_group = pp = get_pp_group()
        # Pipeline stages: the first holds the input side (embedding, compressed table,
        # compressor), the last the head (scale_up, final norm, and the embedding again when
        # the lm_head is tied to it); each holds its range of decoder layers.
        if pp.is_first_rank or (head.tied and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, geometry.H, quant_config=quant_config,
                prefix=_prefix(prefix, "embed_tokens"),
            )
        else:
            self.embed_tokens = PPMissingLayer()
        if pp.is_first_rank:
            # Not a checkpoint tensor: the compressor applied to every embedding row.
            self.embed_compressed = VocabParallelEmbedding(
                config.vocab_size, geometry.D, prefix=_prefix(prefix, "embed_compressed")
            )
            self.conv = CausalConvPool(geometry)
            self.norm_emb = ScaleNorm()
        else:
            self.embed_compressed, self.conv, self.norm_emb = PPMissingLayer(), PPMissingLayer(), PPMissingLayer()
        self.layers, self.start_layer, self.end_layer = make_layers(
            config.num_hidden_layers,
            lambda idx, prefix: ConvGPTDecoderLayer(config, idx, quant_config, prefix),
            pp_rank=pp.rank_in_group, pp_size=pp.world_size, prefix=_prefix(prefix, "layers"),
        )
        if pp.is_last_rank:
            self.scale_up = (
                ConvGPTMLP(geometry.D, head.scale_up_inner, geometry.H, quant_config, _prefix(prefix, "scale_up"))
                if head.tied else None
            )
            self.norm = RMSNorm(head.norm_width, eps=DECODER_NORM_EPS)
        else:
            self.scale_up, self.norm = PPMissingLayer(), PPMissingLayer(return_tuple=True)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        if not self.pp_group.is_first_rank:
            h, residual = pp_proxy_tensors["hidden_states"], pp_proxy_tensors["residual"]
        elif input_embeds is not None:
            # SGLang's runner hands the model `forward_batch.input_embeds.bfloat16()`; the
            # batch still holds the request's float32 embeddings, so compress those instead.
            original = getattr(forward_batch, "input_embeds", None)
            if original is not None and original.shape == input_embeds.shape:
                input_embeds = original
            h, residual = compress(input_embeds.to(self.conv.weight.dtype), self.conv, self.norm_emb), None
        else:
            # Requests are checked before they get here (plugin.py); the clamp keeps any id
            # that slips through from indexing outside the table.
            h, residual = self.embed_compressed(input_ids.clamp(0, self.config.vocab_size - 1)), None
        for i in range(self.start_layer, self.end_layer):
            h, residual = self.layers[i](positions, h, forward_batch, residual)
        if not self.pp_group.is_last_rank:
            return PPProxyTensors({"hidden_states": h, "residual": residual})
        if self.scale_up is not None:
            return h + residual  # the tied head's scale_up runs in the logits processor, on kept rows
        h, _ = self.norm(h, residual)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The tied head's widening (scale_up SwiGLU, then RMSNorm over H) of the rows the
        logits are computed for; the identity for an untied head (its norm is in forward)."""
        return h if self.scale_up is None else self.norm(self.scale_up(h))

    def after_loading(self) -> None:
        """Fold the conv and fill the compressed table (vocab shard), then compile the kernel
        (the first pipeline stage's input side; nothing on the others)."""
        if not self.pp_group.is_first_rank:
            return
        after_loading(self.conv, self.norm_emb, self.embed_tokens.weight, self.embed_compressed.weight)
        warm_up(self.conv, self.norm_emb, self.embed_tokens.weight.dtype)


class ConvGPTLogitsProcessor(LogitsProcessor):
    """SGLang's logits processor, with ConvGPT's head applied to the rows it keeps: a prefill
    without input logprobs keeps one row per request, so the tied head widens only those.
    ``_get_logits(hidden_states, lm_head, metadata, ...)`` is where every path (sampled rows,
    input-logprob chunks, scoring) turns rows into logits, in 0.5.16 and 0.5.23 alike.

    The logits are widened to float32 by :func:`convgpt_core.logits.logits_to_float32` where
    SGLang has no kernel for it (0.5.16: torch's strided copy, 2.5x slower; Triton's interpreter
    on CPU), in ``_copy_logits_to_buffer(logits, metadata, use_buffer=True)`` (both versions;
    0.5.23 adds ``softcap``, left to SGLang when set): into the decode graphs' float32 buffer
    where its shape fits, as SGLang would, else into a new tensor."""

    def __init__(self, config: ConvGPTConfig, head) -> None:
        super().__init__(config)
        self.head = head

    def _get_logits(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return super()._get_logits(self.head(hidden_states), *args, **kwargs)

    def _copy_logits_to_buffer(self, logits: torch.Tensor, logits_metadata, use_buffer: bool = True,
                               **kwargs) -> torch.Tensor:
        kept = logits[:, : self.vocab_size]
        if (kwargs.get("softcap") is None and not (SGLANG_CASTS_LOGITS and logits.is_cuda)
                and float_cast_takes(kept)):
            buffer = logits_metadata.next_token_logits_buffer if use_buffer else None
            return logits_to_float32(kept, buffer if buffer is not None and buffer.shape == kept.shape else None)
        return super()._copy_logits_to_buffer(logits, logits_metadata, use_buffer, **kwargs)


class ConvGPTForCausalLM(nn.Module):
    def __init__(self, config: ConvGPTConfig, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        from sglang.srt.runtime_context import get_server_args  # same in 0.5.16 and 0.5.23

        args = get_server_args()
        if args is not None and args.load_format != "dummy":  # dummy: random weights, no files
            check_served_checkpoint(args.model_path, args.tokenizer_path)
        padded = getattr(config, "original_total_num_kv_heads", config.num_key_value_heads)
        if padded != config.num_key_value_heads:
            raise ValueError(
                f"SGLang's CPU backend padded the attention heads to fit tensor parallelism (kv heads "
                f"{padded} -> {config.num_key_value_heads}); ConvGPT does not load padded heads. On CPU "
                f"use a --tp-size that divides num_key_value_heads ({padded})"
            )
        check_sliding_window(config, decode_attention_backend(args))
        prefill_windowed_layers_paged(config)
        self.config = config
        self.quant_config = quant_config
        self.pp_group = get_pp_group()
        self.model = ConvGPTModel(config, quant_config, _prefix(prefix, "model"))
        if not self.pp_group.is_last_rank:
            self.lm_head = PPMissingLayer()
        elif config.head.tied:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.head.logits_width, quant_config=quant_config,
                prefix=_prefix(prefix, "lm_head"),
            )
        self.logits_processor = ConvGPTLogitsProcessor(config, self.model.head)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_attention_sliding_window_size(self) -> int | None:
        """The sliding-attention layers' window (SGLang's count), None without such layers.
        SGLang's CUDA attention backends (flashinfer, triton, FA3) take the window from here, once
        per model, and build a windowed plan for the layers whose ``RadixAttention`` has one;
        without it they plan no window for any layer (CPU's backends read each layer's own)."""
        return model_window(self.config)

    # LoRA (SGLang's LoRA manager asks the model): adapters target the decoder layers' linears,
    # which work at width D, not at the config's hidden_size (H); scale_up is not adaptable.
    def get_hidden_dim(self, module_name: str, layer_idx: int) -> tuple[int, int]:
        dims = fused_linear_dims(self.config, layer_idx)
        if module_name not in dims:
            raise NotImplementedError(f"ConvGPT has no LoRA-adaptable module {module_name}")
        return dims[module_name]

    def should_apply_lora(self, module_name: str) -> bool:
        return module_name.startswith("model.layers.")

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch: ForwardBatch, input_embeds=None,
                get_embedding: bool = False, pp_proxy_tensors: PPProxyTensors | None = None):
        if get_embedding:
            raise ValueError("ConvGPTForCausalLM is a generation model; it has no embedding output")
        hidden = self.model(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        if not self.pp_group.is_last_rank:
            return hidden
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    @property
    def start_layer(self) -> int:  # SGLang sizes this stage's KV cache by these
        return self.model.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.end_layer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the published names strictly: raises naming any missing/unexpected/misshapen
        tensor (the whole checkpoint is checked; a pipeline stage keeps its own modules')."""
        params = dict(self.named_parameters())
        elsewhere = (lambda name: name not in params) if self.pp_group.world_size > 1 else None
        load_published(params, weights, self.config, default_weight_loader, elsewhere=elsewhere)
        self.model.after_loading()


EntryClass = ConvGPTForCausalLM
