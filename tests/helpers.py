"""Shared by the engine test suites: prompts and the reference's greedy run with logprobs."""

from __future__ import annotations

import functools
import os
import socket

import torch


def prompts(vocab: int, lengths=(3, 17, 60, 150), seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths (ids avoid the 4 special tokens at 0..3)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(4, vocab, (n,), generator=gen)).tolist() for n in lengths]


def _version(path: str) -> float:
    """Part of the reference caches' keys: a folder rewritten with another checkpoint misses."""
    return os.path.getmtime(os.path.join(path, "model.safetensors"))


@functools.lru_cache(maxsize=8)
def _reference_model(path: str, version: float):
    from convgpt_core.modeling import ConvGPTForCausalLM

    return ConvGPTForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@functools.lru_cache(maxsize=256)
def _reference_greedy(path: str, version: float, prompt: tuple[int, ...], steps: int):
    from transformers.cache_utils import DynamicCache

    model = _reference_model(path, version)
    cache = DynamicCache()
    tokens, logprobs = [], []
    step_ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):  # raw argmax, EOS included (engines run with ignore_eos)
            logits = model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits[0, -1]
            logprobs.append(torch.log_softmax(logits.double(), -1))
            tokens.append(int(logits.argmax()))
            step_ids = torch.tensor([[tokens[-1]]])
    return tokens, logprobs


def reference_greedy(path: str, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of the float64 reference and the log-softmax over the vocab at each step."""
    return _reference_greedy(path, _version(path), tuple(prompt), steps)


def reference_embeddings(path: str, ids: list[int]) -> torch.Tensor:
    """The H-wide input embeddings of ``ids`` (what a user would hand in as prompt embeds)."""
    return _reference_model(path, _version(path)).model.embed_tokens.weight[torch.tensor(ids)].detach().clone()


def assert_matches_reference(path, prompt, tokens, logprobs, steps, tol=1e-3, label=""):
    """``tokens`` equal the reference's greedy tokens; chosen-token logprobs within ``tol``."""
    want, ref_lp = reference_greedy(path, list(prompt), steps)
    assert tokens == want, f"{label}: first divergence at step {_first_diff(tokens, want)}"
    if logprobs is not None:
        for step, (tok, lp) in enumerate(zip(tokens, logprobs)):
            assert abs(lp - float(ref_lp[step][tok])) < tol, f"{label}: step {step} logprob {lp} vs {float(ref_lp[step][tok])}"


# Checkpoints an engine loads one after another in one process (each must match the
# reference as if loaded alone): the pair once reported to interfere on vLLM (a one-layer
# F = 64, e = 4, k = 2 model, then H = 1296 with a 4-token sliding window), then another.
SEQUENCE = {
    "F64-e4-k2-1layer": dict(hidden_size=4096, emb_factor=4, conv_kernel_h_w=2, num_hidden_layers=1),
    "H1296-sliding4": dict(hidden_size=1296, conv_kernel_h_w=5, num_hidden_layers=2,
                           layer_types=["full_attention", "sliding_attention"], sliding_window=4),
    "F16-untied-sliding16": dict(tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention"],
                                 sliding_window=16),
}


def sequence_checkpoints(root) -> dict[str, str]:
    from convgpt_core.tiny import make_checkpoint

    out = {}
    for i, (name, fields) in enumerate(SEQUENCE.items()):
        out[name] = os.path.join(str(root), name)
        make_checkpoint(out[name], preset="tiny", seed=50 + i, **fields)
    return out


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_auto_map(src: str, dst: str) -> str:
    """A copy of checkpoint ``src`` whose config.json carries a hub-style ``auto_map``."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["auto_map"] = {
        "AutoConfig": "configuration_convgpt.ConvGPTConfig",
        "AutoModelForCausalLM": "modeling_convgpt.ConvGPTForCausalLM",
    }
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return dst
