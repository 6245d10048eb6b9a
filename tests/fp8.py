"""fp8 weight quantization as the engines serve it, applied to the float64 reference.

``quantization="fp8"`` on an unquantized checkpoint quantizes every decoder linear (and the
tied head's scale_up) to float8_e4m3fn at load; the embedding, the conv and the lm_head stay
in the serving dtype.  The two engines scale differently (their fp8 linear methods):

- ``"tensor"`` (vLLM 0.26, ``Fp8OnlineLinearMethod``): one weight scale per fused layer (q/k/v
  as qkv, gate/up as gate_up) and each input dynamically, one scale per call (max |x| / 448),
  so a request's rounding depends on the requests batched with it;
- ``"channel"`` (SGLang 0.5.16 on CUDA with CUTLASS fp8, ``Fp8LinearMethod``): one weight
  scale per output row and one input scale per token.

:func:`emulate` makes the reference compute the same rounding in float64, so an fp8 run can be
judged against the reference it should reproduce (the rounding itself moves logprobs by more
than the bf16 tolerance; what is left is the engine's bf16 arithmetic and, for "tensor", the
input scale shared within a batch).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from convgpt_core.checkpoint import FUSED_LAYERS

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to float8_e4m3fn with ``scale`` and scaled back (in t's dtype)."""
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(t.dtype) * scale


def scale_of(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.stack([t.abs().max() for t in tensors]).max().clamp(min=1e-12) / E4M3_MAX


def row_scales(t: torch.Tensor) -> torch.Tensor:
    """One scale per row (the last dimension reduced): per output channel of a weight, per token
    of an input."""
    return t.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX


SCHEMES = ("tensor", "channel")
ENGINE_SCHEME = {"vllm": "tensor", "sglang": "channel"}


def reference_name(meta: dict) -> str:
    """The reference file (without .json) a parity run described by ``meta`` is judged against."""
    if meta.get("quantization") != "fp8":
        return "reference"
    engine = next(e for e in ENGINE_SCHEME if e in meta)
    return f"reference-fp8-{ENGINE_SCHEME[engine]}"


def quantized_linears(model: nn.Module) -> dict[str, list[str]]:
    """{module path: the names of its quantized linears, grouped as the engines fuse them}
    (``lm_head`` and everything outside the decoder layers' and scale_up's SwiGLU/attention stay)."""
    groups: dict[str, list[list[str]]] = {}
    for path, module in model.named_modules():
        children = {n for n, c in module.named_children() if isinstance(c, nn.Linear) and n != "lm_head"}
        if not children:
            continue
        fused = [list(parts) for parts in FUSED_LAYERS.values() if set(parts) <= children]
        single = [[n] for n in sorted(children - {p for g in fused for p in g})]
        groups[path] = fused + single
    return groups


@contextmanager
def emulate(model: nn.Module, scheme: str = "tensor"):
    """Within the block, ``model``'s decoder linears compute fp8(x) @ fp8(W)^T as an engine's fp8
    serving does (``scheme``: see the module's docstring)."""
    if scheme not in SCHEMES:
        raise ValueError(f"fp8 scheme {scheme!r}: expected one of {SCHEMES}")
    saved = []
    for path, groups in quantized_linears(model).items():
        parent = model.get_submodule(path)
        for group in groups:
            linears = [getattr(parent, n) for n in group]
            w_scale = scale_of(*(lin.weight for lin in linears))
            for lin in linears:
                saved.append((lin, lin.weight.data, lin.forward))
                w = lin.weight.data
                lin.weight.data = quantize(w, w_scale if scheme == "tensor" else row_scales(w))
                lin.forward = _fp8_forward(lin, scale_of if scheme == "tensor" else row_scales)
    try:
        yield model
    finally:
        for lin, weight, forward in saved:
            lin.weight.data = weight
            lin.forward = forward


def _fp8_forward(lin: nn.Linear, input_scale):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(quantize(x, input_scale(x)), lin.weight, lin.bias)

    return forward
