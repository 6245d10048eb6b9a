import gc

import pytest

import drivers


@pytest.fixture(scope="session")
def engine(tiny_dirs, trained_dir):
    """The SGLang engine (tests/drivers.py) for (checkpoint, settings); one runs at a time,
    reused while unchanged."""
    current = {}
    paths = dict(tiny_dirs, trained=trained_dir)

    def get(preset: str, **settings):
        key = (preset, tuple(sorted(settings.items())))
        if current.get("key") != key:
            if current.get("driver") is not None:
                current["driver"].stop()
                gc.collect()
            current["driver"] = drivers.start("sglang", paths[preset], **settings)
            current["key"] = key
        return current["driver"]

    yield get
    if current.get("driver") is not None:
        current["driver"].stop()
