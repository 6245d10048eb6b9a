"""LoRA adapters for ConvGPT's decoder linears, in the PEFT layout the engines load.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
tensors ``base_model.model.<module>.lora_A.weight`` (r x in) and ``.lora_B.weight``
(out x r) for each adapted module, where ``<module>`` is a checkpoint linear such as
``model.layers.0.self_attn.q_proj``.  The adapted weight is
``W + (lora_alpha / r) * B @ A``.

:func:`make_adapter` writes a random adapter (tests, examples); :func:`merge_adapter` writes
the checkpoint with an adapter folded into its weights (what an engine serving the adapter
must compute).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from .checkpoint import FUSED_LAYERS, WEIGHTS_NAME, CheckpointError, expected_tensors
from .config import ConvGPTConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The decoder layers' linears: what a LoRA adapter for ConvGPT may target.
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DECODER_MODULE = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(DECODER_LINEARS) + r")$")


def adapter_modules(config: ConvGPTConfig, targets: tuple[str, ...] = DECODER_LINEARS) -> dict[str, tuple[int, int]]:
    """The decoder linears named by ``targets`` -> (out, in) of their weight."""
    unknown = sorted(set(targets) - set(DECODER_LINEARS))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not ConvGPT decoder linears ({', '.join(DECODER_LINEARS)})")
    out = {}
    for name, shape in expected_tensors(config).items():
        module = name.removesuffix(".weight")
        if _DECODER_MODULE.match(module) and module.rsplit(".", 1)[1] in targets:
            out[module] = shape
    return out


def fused_linear_dims(config: ConvGPTConfig, layer: int = 0) -> dict[str, tuple[int, int]]:
    """(in, out) of layer ``layer``'s adaptable linears as the engines fuse them
    (``FUSED_LAYERS``: q/k/v -> qkv_proj, gate/up -> gate_up_proj), from the checkpoint shapes."""
    dims: dict[str, tuple[int, int]] = {}
    for module, (rows, cols) in adapter_modules(config).items():
        if not module.startswith(f"model.layers.{layer}."):
            continue
        part = module.rsplit(".", 1)[1]
        fused = next((name for name, parts in FUSED_LAYERS.items() if part in parts), part)
        dims[fused] = (cols, dims.get(fused, (cols, 0))[1] + rows)
    return dims


def make_adapter(
    checkpoint: str,
    out_dir: str,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = DECODER_LINEARS,
    seed: int = 0,
    scale: float = 0.5,
) -> None:
    """A random rank-``rank`` adapter for the checkpoint in ``checkpoint``.  Both factors are
    random (PEFT starts B at zero, which would change nothing), scaled so that the update
    ``(alpha / r) * B @ A`` has entries about ``scale`` times those of the weight it adapts."""
    from safetensors.torch import load_file, save_file

    config = ConvGPTConfig.from_pretrained(checkpoint)
    base = load_file(os.path.join(checkpoint, WEIGHTS_NAME))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (rows, cols) in adapter_modules(config, targets).items():
        w_std = float(base[module + ".weight"].float().std())
        # A ~ N(0, 1) and B ~ N(0, s^2): (B @ A) has std s * sqrt(rank); choose s so that
        # (alpha / rank) * B @ A has std scale * w_std.
        a = torch.randn(rank, cols, generator=gen)
        b = torch.randn(rows, rank, generator=gen) * (scale * w_std * rank / alpha / rank**0.5)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.abspath(checkpoint),
            "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(set(targets)), "modules_to_save": None, "use_rslora": False,
        }, f, indent=2)


def read_adapter(adapter: str, config: ConvGPTConfig) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(alpha / r, {module: (A, B)}) of an adapter folder, checked against ``config``."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter, ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_rslora") or cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{adapter}: only plain LoRA adapters (no rsLoRA, no bias) are supported")
    tensors = load_file(os.path.join(adapter, ADAPTER_WEIGHTS))
    shapes = adapter_modules(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"^" + re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight$", name)
        if not m or m.group(1) not in shapes:
            raise CheckpointError(f"{adapter}: tensor {name} does not adapt a ConvGPT decoder linear")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for module, ab in pairs.items():
        missing = sorted({"A", "B"} - set(ab))
        if missing:
            raise CheckpointError(f"{adapter}: {module} has no lora_{missing[0]} weight")
        rows, cols = shapes[module]
        a, b = ab["A"], ab["B"]
        if a.shape != (cfg["r"], cols) or b.shape != (rows, cfg["r"]):
            raise CheckpointError(f"{adapter}: {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                  f"expected ({cfg['r']}, {cols}) and ({rows}, {cfg['r']})")
        out[module] = (a, b)
    return cfg["lora_alpha"] / cfg["r"], out


def merge_adapter(checkpoint: str, adapter: str, out_dir: str) -> None:
    """Write ``checkpoint`` with ``adapter`` merged into its weights to ``out_dir`` (other
    files copied as they are); the update is computed in float64."""
    from safetensors.torch import load_file, save_file

    config = ConvGPTConfig.from_pretrained(checkpoint)
    scaling, pairs = read_adapter(adapter, config)
    weights = load_file(os.path.join(checkpoint, WEIGHTS_NAME))
    for module, (a, b) in pairs.items():
        w = weights[module + ".weight"]
        weights[module + ".weight"] = (w.double() + scaling * (b.double() @ a.double())).to(w.dtype)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(checkpoint):
        if name != WEIGHTS_NAME and os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copy(os.path.join(checkpoint, name), os.path.join(out_dir, name))
    save_file(weights, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
