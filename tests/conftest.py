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


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """The tiny checkpoint fitted to the package's text (`convgpt make-tiny --train`): it
    continues the text's lines, so a served answer can be read for correctness."""
    from convgpt_core.tiny import make_checkpoint, train_on_corpus

    path = str(tmp_path_factory.mktemp("trained") / "tiny")
    make_checkpoint(path, preset="tiny", seed=1)
    train_on_corpus(path)
    return path
