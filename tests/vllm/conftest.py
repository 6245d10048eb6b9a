import gc
import os

import pytest

import drivers

# The tests inspect the loaded model with LLM.apply_model, which ships a function to the
# engine process; that needs pickle-based serialization, set before engines start.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@pytest.fixture(scope="session")
def engines(tiny_dirs, trained_dir):
    """One vLLM engine (tests/drivers.py) per (checkpoint, settings), started on first use and shared."""
    started = {}
    paths = dict(tiny_dirs, trained=trained_dir)

    def get(preset: str, **settings):
        key = (preset, tuple(sorted(settings.items())))
        if key not in started:
            started[key] = drivers.start("vllm", paths[preset], **settings)
        return started[key]

    yield get
    for driver in started.values():
        driver.stop()
    started.clear()
    gc.collect()
