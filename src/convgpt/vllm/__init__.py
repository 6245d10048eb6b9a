"""vLLM plugin for ConvGPT (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process before it parses ``config.json``: it
registers the ``convgpt`` config with transformers (so no remote code is needed, also for
hub copies carrying an ``auto_map``), the architecture, lazily, with vLLM, and ConvGPT's
prompt checks (:mod:`convgpt_core.inputs`) in vLLM's input processor.  vLLM 0.26 lets
negative token ids through offline, and neither 0.26 nor 0.32 looks for NaN/inf in
prompt embeddings (a request with them returned 200 and empty text); the check raises
``VLLMValidationError``, which both versions answer with HTTP 400.
"""

from __future__ import annotations

import functools

from convgpt_core.config import ARCHITECTURE, MODEL_TYPE, register_config
from convgpt_core.inputs import embeddings_problem, token_ids_problem

MODEL_CLASS = "convgpt.vllm.model:ConvGPTForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    _guard_prompts()


def _guard_prompts() -> None:
    """Wrap ``InputProcessor._validate_model_input`` (same signature in vLLM 0.26 and 0.32;
    it sees every prompt, online and offline, token ids or embeddings) once per process."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_model_input
    if getattr(original, "_convgpt", False):
        return

    @functools.wraps(original)
    def validate(self, prompt_input, prompt_type, *args, **kwargs):
        original(self, prompt_input, prompt_type, *args, **kwargs)
        config = self.model_config
        if getattr(config.hf_config, "model_type", None) != MODEL_TYPE:
            return
        if prompt_input["type"] == "embeds":
            param, problem = "prompt_embeds", embeddings_problem(
                prompt_input["prompt_embeds"], config.hf_config.hidden_size
            )
        else:
            param, problem = "prompt", token_ids_problem(
                prompt_input["prompt_token_ids"], config.hf_config.vocab_size
            )
        if problem:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(problem, parameter=param)

    validate._convgpt = True
    InputProcessor._validate_model_input = validate
