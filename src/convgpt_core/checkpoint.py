"""Checkpoint naming and validation: the published tensor names, shapes and counts.

This module is the single source of the names in a published ConvGPT checkpoint.
Engine adapters check what their loader saw with :func:`check_tensors`; the reference
model and ``convgpt inspect`` validate a folder with :func:`validate_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping

from .config import MODEL_TYPE, ConvGPTConfig

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint whose files, names or shapes do not match its config."""


def expected_tensors(config: ConvGPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` must hold, with its shape, in file order."""
    g = config.geometry
    H, D, V = g.H, g.D, config.vocab_size
    hd, nq, nkv, inter = (
        config.head_dim,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
    )
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, H),
        "model.conv.weight": (g.F, g.F, 1, g.k),
        "model.norm_emb.g": (1,),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (nq * hd, D)
        out[p + "self_attn.k_proj.weight"] = (nkv * hd, D)
        out[p + "self_attn.v_proj.weight"] = (nkv * hd, D)
        out[p + "self_attn.o_proj.weight"] = (D, nq * hd)
        out[p + "self_attn.q_norm.weight"] = (hd,)
        out[p + "self_attn.k_norm.weight"] = (hd,)
        out[p + "mlp.gate_proj.weight"] = (inter, D)
        out[p + "mlp.up_proj.weight"] = (inter, D)
        out[p + "mlp.down_proj.weight"] = (D, inter)
        out[p + "norm1.weight"] = (D,)
        out[p + "norm2.weight"] = (D,)
    head = config.head
    if head.tied:
        out["model.scale_up.gate_proj.weight"] = (head.scale_up_inner, D)
        out["model.scale_up.up_proj.weight"] = (head.scale_up_inner, D)
        out["model.scale_up.down_proj.weight"] = (H, head.scale_up_inner)
    out["model.norm.weight"] = (head.norm_width,)
    if not head.tied:
        out["lm_head.weight"] = (V, head.logits_width)
    return out


def parameter_count(config: ConvGPTConfig) -> int:
    return sum(math.prod(shape) for shape in expected_tensors(config).values())


# safetensors header dtype names -> torch dtypes (what a checkpoint may hold).
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Floating dtypes each one can be cast to without loss.
_LOSSLESS = {
    "float16": {"float16", "float32", "float64"},
    "bfloat16": {"bfloat16", "float32", "float64"},
    "float32": {"float32", "float64"},
    "float64": {"float64"},
    "float8_e4m3fn": {"float8_e4m3fn", "float16", "bfloat16", "float32", "float64"},
    "float8_e5m2": {"float8_e5m2", "float16", "bfloat16", "float32", "float64"},
}


def dtype_name(dtype) -> str:
    """``torch.bfloat16``, ``"BF16"`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.")
    return _ST_DTYPES.get(name, name)


def config_dtype(config: ConvGPTConfig) -> str | None:
    """The weight dtype config.json declares (``dtype`` or the older ``torch_dtype``), if any."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if value in (None, "auto") else dtype_name(value)


def dtype_problem(name: str, dtype, declared: str | None) -> str | None:
    """Why tensor ``name`` of ``dtype`` cannot be loaded, or None.

    Weights must be floating point (an integer or boolean tensor would be converted
    silently by every loader) and castable without loss to the ``declared`` dtype of
    config.json, when one is given."""
    have = dtype_name(dtype)
    if have not in _LOSSLESS:
        return f"{name} has dtype {have}; ConvGPT weights must be floating point"
    if declared in _LOSSLESS and declared not in _LOSSLESS[have]:
        return f"{name} has dtype {have}, which config.json's dtype {declared} cannot hold without loss"
    return None


def _problems(
    found: Mapping[str, tuple[tuple[int, ...], object]],
    expected: Mapping[str, tuple[int, ...]],
    config: ConvGPTConfig,
    complete: bool = True,
    declared: str | None = None,
) -> list[str]:
    """What is wrong with ``found`` ({name: (shape, dtype)}): missing (when it should be
    ``complete``), unexpected, misshapen or wrongly typed tensors (see
    :func:`dtype_problem`), one message each."""
    problems = []
    missing = [n for n in expected if n not in found] if complete else []
    unexpected = [n for n in found if n not in expected]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        hint = ""
        if "lm_head.weight" in unexpected and config.tie_word_embeddings:
            hint = " (lm_head.weight must be absent when tie_word_embeddings is true)"
        problems.append(f"unexpected tensors: {', '.join(unexpected)}{hint}")
    for name, (shape, dtype) in found.items():
        want = expected.get(name)
        if want is not None and tuple(shape) != want:
            problems.append(f"{name} has shape {tuple(shape)}, expected {want}")
        bad_dtype = dtype_problem(name, dtype, declared) if dtype is not None else None
        if bad_dtype:
            problems.append(bad_dtype)
    return problems


def _raise_if(problems: list[str], source: str) -> None:
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))


def check_tensors(
    found: Mapping[str, tuple[tuple[int, ...], object]], config: ConvGPTConfig, source: str = "checkpoint"
) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected, misshapen or
    non-floating tensor, and any the dtype config.json declares cannot hold
    (``found``: {name: (shape, dtype)})."""
    _raise_if(_problems(found, expected_tensors(config), config, declared=config_dtype(config)), source)


def read_config(path: str) -> ConvGPTConfig:
    """Parse ``config.json`` of a checkpoint folder; errors name the file and field."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if data.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{cfg_path}: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}"
        )
    data.pop("auto_map", None)  # remote code is never used
    try:
        return ConvGPTConfig.from_dict({k: v for k, v in data.items() if k != "model_type"})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from exc


def safetensors_files(path: str) -> list[str]:
    """The weight files of a checkpoint folder (single file or sharded index)."""
    index = os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        for file in files:
            if not os.path.isfile(file):
                raise CheckpointError(f"{index} names {os.path.basename(file)}, which is missing")
        return files
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def tensor_headers(files: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of the tensors in safetensors files, read from their headers only."""
    from safetensors import safe_open

    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if name in headers:
                        raise CheckpointError(f"{file}: tensor {name} appears in two files")
                    info = f.get_slice(name)
                    headers[name] = (tuple(info.get_shape()), dtype_name(info.get_dtype()))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                "ConvGPT loads safetensors only, never pickles"
            ) from exc
    return headers


def tokenizer_max_id(path: str) -> tuple[int, str] | None:
    """The largest token id of the tokenizer stored in ``path`` and its token, or None
    when the folder has no ``tokenizer.json``."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(file).get_vocab(with_added_tokens=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: not a readable tokenizer ({exc})") from exc
    if not vocab:
        return None
    token, top = max(vocab.items(), key=lambda item: item[1])
    return top, token


def check_tokenizer(path: str, config: ConvGPTConfig) -> None:
    """Raise when the tokenizer in ``path`` can produce ids the model has no row for."""
    found = tokenizer_max_id(path)
    if found is not None and found[0] >= config.vocab_size:
        top, token = found
        raise CheckpointError(
            f"{path}: the tokenizer has token ids up to {top} ({token!r}) but config.json's "
            f"vocab_size is {config.vocab_size}; every id must be < vocab_size"
        )


def validate_checkpoint(
    path: str, config: ConvGPTConfig | None = None, tokenizer_path: str | None = None
) -> ConvGPTConfig:
    """Check a checkpoint folder: config, weight files, tensor names, shapes and dtypes, and
    the tokenizer's ids against ``vocab_size`` (``tokenizer_path`` if the tokenizer lives
    elsewhere)."""
    config = read_config(path) if config is None else config
    check_tensors(tensor_headers(safetensors_files(path)), config, source=path)
    check_tokenizer(tokenizer_path or path, config)
    return config


def check_served_checkpoint(model: str, tokenizer: str | None = None) -> None:
    """What an engine adapter runs when it builds the model: when ``model`` is a local
    folder, :func:`validate_checkpoint` on it (config, files, names, shapes, dtypes) and on
    the tokenizer the engine will use, so that a bad checkpoint fails before any weight is
    read, with the tensor or field named.  Hub ids are left to the streaming checks."""
    if os.path.isdir(model):
        validate_checkpoint(model, tokenizer_path=tokenizer if tokenizer and os.path.isdir(tokenizer) else None)


def non_finite_tensors(path: str) -> list[str]:
    """Names of the tensors in a checkpoint folder holding NaN or infinite values."""
    import torch
    from safetensors import safe_open

    bad = []
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(name)
    return bad


class TensorChecker:
    """Strict bookkeeping for engine loaders that stream ``(name, tensor)`` pairs.

    ``see`` raises at once for an unexpected, misshapen or non-floating tensor (before the
    engine's loader reports a bare size mismatch or casts it); ``finish`` raises for
    anything never seen.  Tensors holding NaN or inf are collected in ``non_finite``.
    """

    def __init__(self, config: ConvGPTConfig, source: str = "checkpoint") -> None:
        self.expected = expected_tensors(config)
        self.config = config
        self.source = source
        self.seen: dict[str, tuple[tuple[int, ...], object]] = {}
        self.non_finite: list[str] = []

    def see(self, name: str, shape: Iterable[int], dtype=None) -> None:
        entry = (tuple(shape), dtype)
        if name in self.seen:
            raise CheckpointError(f"{self.source}: tensor {name} appears twice")
        self.seen[name] = entry
        _raise_if(_problems({name: entry}, self.expected, self.config, complete=False), self.source)

    def see_tensor(self, name: str, tensor) -> None:
        """:meth:`see` for a loaded tensor: also notes whether it is all finite."""
        self.see(name, tensor.shape, tensor.dtype)
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            self.non_finite.append(name)

    def finish(self) -> None:
        _raise_if(_problems(self.seen, self.expected, self.config), self.source)


# The fused layers both engines build from checkpoint tensors (their QKV and merged-column
# linears): {engine layer name: the checkpoint layers it holds, in shard order}.  The
# adapters name their layers so and hand this to their engine (vLLM's
# packed_modules_mapping); the shard ids are the ones those layers' weight loaders take.
FUSED_LAYERS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
SHARD_IDS: dict[str, str | int] = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": 0, "up_proj": 1}


def stacked_param(name: str) -> tuple[str, str | int | None]:
    """Checkpoint name -> (engine parameter name, shard id or None) for fused layers."""
    for fused, parts in FUSED_LAYERS.items():
        for part in parts:
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), SHARD_IDS[part]
    return name, None


def load_published(
    params: Mapping[str, object],
    weights: Iterable[tuple[str, object]],
    config: ConvGPTConfig,
    default_loader,
    elsewhere=None,
) -> set[str]:
    """Stream checkpoint tensors into engine parameters, strictly.

    ``params`` maps engine parameter names to parameters (fused q/k/v and gate/up, see
    :func:`stacked_param`); each parameter's own ``weight_loader`` is used when it has one
    (tensor-parallel sharding), else ``default_loader(param, tensor)``.  Raises
    :class:`CheckpointError` for any missing, unexpected or misshapen tensor.  Returns the
    engine parameter names loaded.  ``elsewhere(param_name)`` says which parameters live on
    another pipeline stage: their tensors are checked like every other, but not loaded here.
    """
    checker = TensorChecker(config, source="ConvGPT checkpoint")
    loaded: set[str] = set()
    for name, tensor in weights:
        checker.see_tensor(name, tensor)
        target, shard = stacked_param(name)
        if elsewhere is not None and elsewhere(target):
            continue
        param = params.get(target)
        if param is None:
            raise CheckpointError(
                f"the engine model has no parameter {target} for checkpoint tensor {name} "
                "(adapters must name their fused layers as convgpt_core.checkpoint.FUSED_LAYERS says)"
            )
        loader = getattr(param, "weight_loader", default_loader)
        if shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard)
        loaded.add(target)
    checker.finish()
    if checker.non_finite:
        logger.warning("ConvGPT checkpoint: NaN or inf values in %s", ", ".join(checker.non_finite))
    return loaded
