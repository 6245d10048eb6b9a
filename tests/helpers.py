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


@functools.lru_cache(maxsize=8)
def _reference_model(path: str):
    from convgpt_core.modeling import ConvGPTForCausalLM

    return ConvGPTForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@functools.lru_cache(maxsize=256)
def _reference_greedy(path: str, prompt: tuple[int, ...], steps: int):
    from transformers.cache_utils import DynamicCache

    model = _reference_model(path)
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
    return _reference_greedy(path, tuple(prompt), steps)


def reference_embeddings(path: str, ids: list[int]) -> torch.Tensor:
    """The H-wide input embeddings of ``ids`` (what a user would hand in as prompt embeds)."""
    return _reference_model(path).model.embed_tokens.weight[torch.tensor(ids)].detach().clone()


def assert_matches_reference(path, prompt, tokens, logprobs, steps, tol=1e-3, label=""):
    """``tokens`` equal the reference's greedy tokens; chosen-token logprobs within ``tol``."""
    want, ref_lp = reference_greedy(path, list(prompt), steps)
    assert tokens == want, f"{label}: first divergence at step {_first_diff(tokens, want)}"
    if logprobs is not None:
        for step, (tok, lp) in enumerate(zip(tokens, logprobs)):
            assert abs(lp - float(ref_lp[step][tok])) < tol, f"{label}: step {step} logprob {lp} vs {float(ref_lp[step][tok])}"


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
