import gc
import os

import pytest

# The tests inspect the loaded model with LLM.apply_model, which ships a function to the
# engine process; that needs pickle-based serialization, set before engines start.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@pytest.fixture(scope="session")
def engines(tiny_dirs):
    """One vLLM engine per (checkpoint, options), started on first use and shared."""
    from vllm import LLM

    started = {}

    def get(preset: str, **opts):
        key = (preset, tuple(sorted(opts.items())))
        if key not in started:
            kwargs = dict(dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
            kwargs.update(opts)
            started[key] = LLM(model=tiny_dirs[preset], **kwargs)
        return started[key]

    yield get
    for llm in started.values():
        llm.llm_engine.engine_core.shutdown()
    started.clear()
    gc.collect()
