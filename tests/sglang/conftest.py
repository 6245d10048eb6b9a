import gc
import os

import pytest

HAS_CUDA = os.environ.get("SGLANG_USE_CPU_ENGINE") != "1"
ENGINE_DEFAULTS = dict(dtype="float32", log_level="warning", random_seed=0, context_length=512)
if not HAS_CUDA:
    ENGINE_DEFAULTS.update(device="cpu", attention_backend="torch_native", disable_cuda_graph=True,
                           mem_fraction_static=0.05)


@pytest.fixture(scope="session")
def engine(tiny_dirs):
    """The SGLang engine for (checkpoint, options); one runs at a time, reused while unchanged."""
    import sglang as sgl

    current = {}

    def get(preset: str, **opts):
        key = (preset, tuple(sorted(opts.items())))
        if current.get("key") != key:
            if current.get("engine") is not None:
                current["engine"].shutdown()
                gc.collect()
            current["engine"] = sgl.Engine(model_path=tiny_dirs[preset], **dict(ENGINE_DEFAULTS, **opts))
            current["key"] = key
        return current["engine"]

    yield get
    if current.get("engine") is not None:
        current["engine"].shutdown()
