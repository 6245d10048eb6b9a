"""Shared by the test suites: prompts, checkpoints, embeddings, ports."""

from __future__ import annotations

import os
import socket

import torch

# A line of the shipped text (src/convgpt_core/data/corpus.txt): its first words, and what
# follows them; a model trained with `make-tiny --train` continues it.
LINE_START = "The lighthouse keeper wrote in her logbook"
LINE_NEXT = " every evening, noting the wind"


def prompts(vocab: int, lengths=(3, 17, 60, 150), seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths (ids avoid the 4 special tokens at 0..3)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(4, vocab, (n,), generator=gen)).tolist() for n in lengths]


def reference_embeddings(path: str, ids: list[int]) -> torch.Tensor:
    """The H-wide input embeddings of ``ids`` (what a user would hand in as prompt embeds)."""
    from judge import reference_model

    return reference_model(path).model.embed_tokens.weight[torch.tensor(ids)].detach().clone()


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
