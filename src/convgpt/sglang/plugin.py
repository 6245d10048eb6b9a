"""``sglang.srt.plugins`` entry point, run by SGLang in every process it starts (server,
``sgl.Engine``, schedulers) before it parses ``config.json``:

* registers the ``convgpt`` config with transformers (no remote code; a hub copy's
  ``auto_map`` is ignored);
* names this package as SGLang's external model package, so a user needs no
  ``SGLANG_EXTERNAL_MODEL_PACKAGE`` (a value the user set is kept);
* puts ConvGPT's request checks (:mod:`convgpt_core.inputs`) in front of the scheduler.
  SGLang 0.5.16 and 0.5.23 check neither token ids against the vocabulary nor
  ``input_embeds`` shapes, and a bad one kills the scheduler and with it the server; the
  checks run in the tokenizer manager, where a ``ValueError`` becomes an HTTP 400.
"""

from __future__ import annotations

import os

from convgpt_core.config import MODEL_TYPE, register_config
from convgpt_core.inputs import embeddings_problem, token_ids_problem, top_logprobs_problem

PACKAGE = "convgpt.sglang"
# Hook targets; both exist with these signatures in SGLang 0.5.16 and 0.5.23.
VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
NORMALIZE_REQUEST = "sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments"


def register() -> None:
    os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", PACKAGE)
    register_config()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(VALIDATE_REQUEST, check_request, HookType.BEFORE)
    HookRegistry.register(NORMALIZE_REQUEST, check_embeds_not_empty, HookType.BEFORE)


def check_request(manager, obj, input_ids, *args, **kwargs) -> None:
    """Before SGLang's own per-request validation: refuse what would crash a ConvGPT model."""
    config = manager.model_config
    if getattr(config.hf_config, "model_type", None) != MODEL_TYPE:
        return
    if getattr(obj, "input_embeds", None) is not None:
        problem = embeddings_problem(obj.input_embeds, config.hidden_size)
    else:
        problem = token_ids_problem(input_ids if input_ids is not None else [], config.vocab_size)
    top = getattr(obj, "top_logprobs_num", None)
    if problem is None and getattr(obj, "return_logprob", False) and isinstance(top, int):
        problem = top_logprobs_problem(top, config.vocab_size)
    if problem:
        raise ValueError(problem)


def check_embeds_not_empty(request, *args, **kwargs) -> None:
    """SGLang indexes ``input_embeds[0][0]`` to find the batch size: an empty list would be
    an IndexError (HTTP 500) there."""
    embeds = getattr(request, "input_embeds", None)
    if embeds is not None and (len(embeds) == 0 or (isinstance(embeds[0], list) and len(embeds[0]) == 0)):
        raise ValueError("input_embeds is empty: at least one row is needed")
