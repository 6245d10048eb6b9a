"""An independent float64 ConvGPT forward pass, written from docs/model.md for the tests.

It shares no code with ``convgpt_core``: it reads ``config.json`` as a dict and the
weights with safetensors, and spells every step out (the compressor with explicit loops
over output channel, column and kernel tap).
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file


def load(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    weights = {k: v.to(torch.float64) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    return cfg, weights


def compress_loops(x: torch.Tensor, conv_w: torch.Tensor, e: int) -> torch.Tensor:
    """docs/model.md steps 2-3 for x of shape (T, H): conv with causal left padding, then e x e mean pool."""
    T, H = x.shape
    F = math.isqrt(H)
    k = conv_w.shape[-1]
    grid = x.reshape(T, F, F)  # grid[t, a, b] = x[t, a * F + b]
    conv = torch.zeros(T, F, F, dtype=x.dtype)
    for o in range(F):
        for b in range(F):
            acc = torch.zeros(T, dtype=x.dtype)
            for j in range(k):
                col = b + j - (k - 1)
                if col < 0:
                    continue  # left padding reads as zero
                acc = acc + grid[:, :, col] @ conv_w[o, :, 0, j]
            conv[:, o, b] = acc
    side = F // e
    pooled = torch.zeros(T, side, side, dtype=x.dtype)
    for p in range(side):
        for q in range(side):
            pooled[:, p, q] = conv[:, p * e : (p + 1) * e, q * e : (q + 1) * e].mean(dim=(1, 2))
    return pooled.reshape(T, side * side)


def scale_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    D = x.shape[-1]
    n = torch.sqrt((x * x).sum(-1, keepdim=True)) * D**-0.5
    return x / torch.clamp(n, min=1e-5) * g


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotation of x (T, heads, hd) at integer positions pos (T,)."""
    hd = x.shape[-1]
    half = hd // 2
    inv = torch.tensor([theta ** (-2 * i / hd) for i in range(half)], dtype=torch.float64)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]  # (T, half)
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def forward(cfg: dict, w: dict[str, torch.Tensor], ids: list[int] | None = None,
            embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (T, vocab) for one sequence, positions 0..T-1, everything float64."""
    H = cfg["hidden_size"]
    F = math.isqrt(H)
    e = cfg.get("emb_factor") or math.isqrt(F) // 2
    x = w["model.embed_tokens.weight"][torch.tensor(ids)] if embeds is None else embeds.to(torch.float64)
    T = x.shape[0]
    h = scale_norm(compress_loops(x, w["model.conv.weight"], e), w["model.norm_emb.g"])
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    eps = cfg["rms_norm_eps"]
    pos = torch.arange(T)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        window = None
        if cfg.get("layer_types") and cfg["layer_types"][i] == "sliding_attention":
            window = cfg["sliding_window"]
        a = rms_norm(h, w[p + "norm1.weight"], 1e-6)
        q = (a @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
        q = rope(rms_norm(q, w[p + "self_attn.q_norm.weight"], eps), pos, theta)
        k = rope(rms_norm(k, w[p + "self_attn.k_norm.weight"], eps), pos, theta)
        out = torch.zeros(T, nh, hd, dtype=torch.float64)
        for head in range(nh):
            kv = head // (nh // nkv)
            for t in range(T):
                lo = 0 if window is None else max(0, t - window + 1)
                s = (k[lo : t + 1, kv] @ q[t, head]) / math.sqrt(hd)
                pr = torch.softmax(s, dim=0)
                out[t, head] = pr @ v[lo : t + 1, kv]
        h = h + out.reshape(T, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        m = rms_norm(h, w[p + "norm2.weight"], 1e-6)
        gate = silu(m @ w[p + "mlp.gate_proj.weight"].T)
        h = h + (gate * (m @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    if cfg["tie_word_embeddings"]:
        gate = silu(h @ w["model.scale_up.gate_proj.weight"].T)
        h = (gate * (h @ w["model.scale_up.up_proj.weight"].T)) @ w["model.scale_up.down_proj.weight"].T
        h = rms_norm(h, w["model.norm.weight"], 1e-6)
        return h @ w["model.embed_tokens.weight"].T
    h = rms_norm(h, w["model.norm.weight"], 1e-6)
    return h @ w["lm_head.weight"].T


def greedy(cfg: dict, w: dict[str, torch.Tensor], ids: list[int], steps: int) -> list[int]:
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(forward(cfg, w, seq)[-1].argmax()))
    return seq[len(ids):]
