"""vLLM plugin for ConvGPT (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process before it parses ``config.json``: it
registers the ``convgpt`` config with transformers (so no remote code is needed, also for
hub copies carrying an ``auto_map``) and the architecture, lazily, with vLLM.
"""

from __future__ import annotations

from convgpt_core.config import ARCHITECTURE, register_config

MODEL_CLASS = "convgpt.vllm.model:ConvGPTForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
