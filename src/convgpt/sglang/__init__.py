"""SGLang external model package for ConvGPT.

Run ``SGLANG_EXTERNAL_MODEL_PACKAGE=convgpt.sglang python -m sglang.launch_server
--model-path DIR``.  SGLang imports each direct submodule of this package and registers
its ``EntryClass`` (``model.py``); the config is registered earlier, by the
``sglang.srt.plugins`` entry point (``plugin.py``), because SGLang parses
``config.json`` before it imports external models.
"""
