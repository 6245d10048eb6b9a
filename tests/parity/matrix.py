"""The parity matrix: geometries x situations, shared by every engine's runner.

Each runner (reference, vLLM, SGLang) runs every cell and writes
``build/parity/<engine>.json``: for each cell, for each request, the greedy tokens and the
top-5 logprobs at each step.  ``compare.py`` checks them against each other.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = Path(os.environ.get("CONVGPT_PARITY_DIR", ROOT / "build" / "parity"))
CKPT_DIR = OUT_DIR / "ckpt"
STEPS = 16
TOP = 5
MAX_LEN = 512
CHUNK = 64  # prefill token budget per step: prompts longer than this are chunked
BLOCK = 32  # KV block size (prefix caching granularity)

_BASE = dict(vocab_size=512, num_hidden_layers=2, head_dim=64, intermediate_size=128,
             max_position_embeddings=1024)
# Each geometry is one checkpoint (and one engine start per engine).
GEOMETRIES: dict[str, dict] = {
    # F=16, e=2, D=64, k=3, tied, GQA 4 q / 2 kv
    "tied-F16-k3": dict(_BASE, hidden_size=256, conv_kernel_h_w=3, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=True),
    # F=36, e=3, D=144 (the published grid), k=5, untied, GQA with a single kv head
    "untied-F36-k5-kv1": dict(_BASE, hidden_size=1296, conv_kernel_h_w=5, num_attention_heads=4,
                              num_key_value_heads=1, tie_word_embeddings=False),
    # F=64, e=4, D=256, k=1, tied, kv heads = heads (plain MHA)
    "tied-F64-k1-mha": dict(_BASE, hidden_size=4096, conv_kernel_h_w=1, num_attention_heads=4,
                            num_key_value_heads=4, tie_word_embeddings=True),
    # F=16, k=5, tied, first layer sliding-window attention (window 32)
    "tied-F16-k5-sliding": dict(_BASE, hidden_size=256, conv_kernel_h_w=5, num_attention_heads=4,
                                num_key_value_heads=2, tie_word_embeddings=True,
                                layer_types=["sliding_attention", "full_attention"], sliding_window=32),
}


def _ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 512, (n,), generator=gen).tolist()


PREFIX = _ids(96, 100)
# Each situation is a list of request waves; requests in one wave go to the engine together.
SITUATIONS: dict[str, list[list[list[int]]]] = {
    "single": [[_ids(20, 1)]],
    "batch": [[_ids(1, 2), _ids(9, 3), _ids(45, 4), _ids(130, 5)]],
    # first wave fills the prefix cache, the second must hit it
    "prefix": [[PREFIX + _ids(1, 6)], [PREFIX + _ids(7, 7), PREFIX + _ids(25, 8)]],
    "chunked": [[_ids(200, 9)]],
    "long": [[_ids(MAX_LEN - STEPS - 6, 10)]],
    # the same token ids, handed to the engine as H-wide embedding rows
    "embeds": [[_ids(12, 11), _ids(40, 12)]],
}


def cells() -> list[tuple[str, str]]:
    return [(g, s) for g in GEOMETRIES for s in SITUATIONS]


def checkpoints() -> dict[str, str]:
    """Build the matrix's checkpoints once (shared by all runners); returns {geometry: dir}.

    CONVGPT_PARITY_GEOMETRIES (comma-separated names) restricts a run to some geometries."""
    from convgpt_core.tiny import make_checkpoint

    stamp = CKPT_DIR / "matrix.json"
    spec = json.dumps(GEOMETRIES, sort_keys=True)
    if not (stamp.exists() and stamp.read_text() == spec):
        for i, (name, fields) in enumerate(GEOMETRIES.items()):
            make_checkpoint(str(CKPT_DIR / name), preset="tiny", seed=1000 + i, **fields)
        stamp.write_text(spec)
    only = [g for g in os.environ.get("CONVGPT_PARITY_GEOMETRIES", "").split(",") if g]
    for name in only:
        if name not in GEOMETRIES:
            raise SystemExit(f"unknown geometry {name!r}; choose from {', '.join(GEOMETRIES)}")
    return {name: str(CKPT_DIR / name) for name in GEOMETRIES if not only or name in only}


def engine_starts():
    """The engine starts of a run, in order: (geometry, checkpoint dir, embeddings engine?,
    [(situation, waves)]).  Each checkpoint gets one engine for the token situations and one
    set up for embeddings input (the engines need different settings for that)."""
    for name, path in checkpoints().items():
        for embeds in (False, True):
            yield name, path, embeds, [(s, w) for s, w in SITUATIONS.items() if (s == "embeds") == embeds]


def embeddings(path: str, ids: list[int]) -> torch.Tensor:
    """H-wide float32 embedding rows of ``ids``, read straight from the checkpoint."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        table = f.get_tensor("model.embed_tokens.weight")
    return table[torch.tensor(ids)].to(torch.float32)


def write(engine: str, results: dict, meta: dict) -> Path:
    """``results[geometry][situation]`` = list of requests, each
    {"prompt_len", "tokens": [...], "top": [[[id, logprob], ...] per step], "cached": int|None}."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{engine}.json"
    path.write_text(json.dumps({"engine": engine, "meta": meta, "steps": STEPS, "results": results}))
    print(f"wrote {path} ({sum(len(v) for v in results.values())} cells)", file=sys.stderr)
    return path
