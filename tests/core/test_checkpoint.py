import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from convgpt_core.checkpoint import CheckpointError, validate_checkpoint
from convgpt_core.modeling import ConvGPTForCausalLM


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_weights(path, fn):
    f = os.path.join(path, "model.safetensors")
    w = load_file(f)
    fn(w)
    save_file(w, f)


def _edit_config(path, fn):
    f = os.path.join(path, "config.json")
    cfg = json.load(open(f))
    fn(cfg)
    json.dump(cfg, open(f, "w"))


def _drop(name):
    return lambda w: w.pop(name)


def _add(name, shape):
    return lambda w: w.__setitem__(name, torch.zeros(shape))


def _reshape(name, shape):
    return lambda w: w.__setitem__(name, torch.zeros(shape))


MALFORMED = [
    ("tiny", "weights", _drop("model.layers.1.self_attn.k_norm.weight"), "missing tensors: model.layers.1.self_attn.k_norm.weight"),
    ("tiny", "weights", _drop("model.conv.weight"), "missing tensors: model.conv.weight"),
    ("tiny", "weights", _drop("model.norm_emb.g"), "missing tensors: model.norm_emb.g"),
    ("tiny-untied", "weights", _drop("lm_head.weight"), "missing tensors: lm_head.weight"),
    ("tiny", "weights", _add("model.layers.0.self_attn.q_proj.bias", (256,)), "unexpected tensors: model.layers.0.self_attn.q_proj.bias"),
    ("tiny", "weights", _add("lm_head.weight", (512, 256)), "lm_head.weight must be absent"),
    ("tiny", "weights", _reshape("model.conv.weight", (16, 16, 1, 5)), "model.conv.weight has shape (16, 16, 1, 5), expected (16, 16, 1, 3)"),
    ("tiny", "weights", _reshape("model.norm.weight", (64,)), "model.norm.weight has shape (64,), expected (256,)"),
    ("tiny", "config", lambda c: c.update(transformer_dim=100), "transformer_dim=100"),
    ("tiny", "config", lambda c: c.update(conv_kernel_h_w=5), "model.conv.weight has shape (16, 16, 1, 3), expected (16, 16, 1, 5)"),
    ("tiny", "config", lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
    ("tiny", "config", lambda c: c.update(tie_word_embeddings=False), "missing tensors: lm_head.weight"),
]


@pytest.mark.parametrize("preset,part,edit,needle", MALFORMED, ids=[m[3][:48] for m in MALFORMED])
def test_malformed_checkpoint_is_rejected_naming_the_problem(tiny_dirs, tmp_path, preset, part, edit, needle):
    path = _copy(tiny_dirs[preset], tmp_path / "ckpt")
    (_edit_weights if part == "weights" else _edit_config)(path, edit)
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(path)
    assert needle in str(info.value)
    with pytest.raises(ValueError) as info:  # the reference model refuses it too
        ConvGPTForCausalLM.from_pretrained(path)
    assert needle in str(info.value)


def test_missing_and_corrupt_files(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["tiny"], tmp_path / "a")
    os.unlink(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        validate_checkpoint(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        validate_checkpoint(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        validate_checkpoint(path)
    os.unlink(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match="no config.json"):
        validate_checkpoint(path)


def test_sharded_checkpoint(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["tiny-untied"], tmp_path / "s")
    w = load_file(os.path.join(path, "model.safetensors"))
    os.unlink(os.path.join(path, "model.safetensors"))
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: w[k] for k in keys}, os.path.join(path, file))
        weight_map.update({k: file for k in keys})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    validate_checkpoint(path)
    model = ConvGPTForCausalLM.from_pretrained(path)
    torch.testing.assert_close(model.lm_head.weight, w["lm_head.weight"])
    os.unlink(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        validate_checkpoint(path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "convgpt.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_cli_make_tiny_and_inspect(tmp_path):
    out = str(tmp_path / "m")
    r = _cli("make-tiny", out, "--preset", "tiny-untied", "--seed", "3")
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    r = _cli("inspect", out)
    assert r.returncode == 0, r.stderr
    assert "residual D               64 (4x narrower)" in r.stdout
    assert "tied embeddings          False" in r.stdout
    _edit_weights(out, _drop("model.layers.0.mlp.up_proj.weight"))
    r = _cli("inspect", out)
    assert r.returncode == 1 and "model.layers.0.mlp.up_proj.weight" in r.stderr


def test_tokenizer_is_offline_and_has_chat_template(tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["tiny"])
    ids = tok("The lighthouse keeper wrote in her logbook")["input_ids"]
    assert tok.decode(ids) == "The lighthouse keeper wrote in her logbook"
    assert len(ids) < 20  # trained merges, not bytes
    assert len(tok) <= 512
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_same_seed_same_weights(tmp_path):
    from convgpt_core.tiny import make_checkpoint

    make_checkpoint(str(tmp_path / "a"), seed=4)
    make_checkpoint(str(tmp_path / "b"), seed=4)
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()


def test_streaming_checker_names_the_tensor_at_once():
    from convgpt_core.checkpoint import TensorChecker, expected_tensors
    from convgpt_core.config import ConvGPTConfig
    from convgpt_core.tiny import PRESETS

    config = ConvGPTConfig(**PRESETS["tiny"])
    shapes = expected_tensors(config)
    checker = TensorChecker(config)
    checker.see("model.conv.weight", shapes["model.conv.weight"])
    with pytest.raises(CheckpointError, match="model.norm.weight has shape \\(64,\\), expected \\(256,\\)"):
        checker.see("model.norm.weight", (64,))
    with pytest.raises(CheckpointError, match="unexpected tensors: lm_head.weight \\(lm_head.weight must be absent"):
        TensorChecker(config).see("lm_head.weight", (512, 256))
    with pytest.raises(CheckpointError, match="tensor model.conv.weight appears twice"):
        checker.see("model.conv.weight", shapes["model.conv.weight"])
    checker = TensorChecker(config)
    for name, shape in shapes.items():
        if name != "model.norm_emb.g":
            checker.see(name, shape)
    with pytest.raises(CheckpointError, match="missing tensors: model.norm_emb.g$"):
        checker.finish()
