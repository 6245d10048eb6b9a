import pytest


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny checkpoints built offline once per session: {preset: folder}."""
    from convgpt_core.tiny import make_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for preset in ("tiny", "tiny-untied", "tiny-sliding"):
        out[preset] = str(root / preset)
        make_checkpoint(out[preset], preset=preset, seed=1)
    return out
