"""``sglang.srt.plugins`` entry point: make transformers parse ``model_type: convgpt``
without remote code (hub copies' ``auto_map`` is ignored) in every SGLang process."""

from __future__ import annotations

from convgpt_core.config import register_config


def register() -> None:
    register_config()
