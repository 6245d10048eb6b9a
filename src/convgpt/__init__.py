"""convgpt: serve ConvGPT checkpoints with vLLM (``convgpt.vllm``) and SGLang (``convgpt.sglang``)."""

__version__ = "0.1.0"
