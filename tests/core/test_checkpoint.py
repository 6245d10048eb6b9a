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


def _retype(name, dtype):
    return lambda w: w.__setitem__(name, w[name].to(dtype))


def _unset(field):
    return lambda c: c.pop(field)


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
    # integer or boolean weights would be cast silently by every loader
    ("tiny", "weights", _retype("model.layers.0.mlp.up_proj.weight", torch.int32),
     "model.layers.0.mlp.up_proj.weight has dtype int32; ConvGPT weights must be floating point"),
    ("tiny", "weights", _retype("model.norm_emb.g", torch.bool), "model.norm_emb.g has dtype bool"),
    ("tiny-untied", "weights", _retype("lm_head.weight", torch.int64), "lm_head.weight has dtype int64"),
    # wider than the dtype config.json declares (float32): the cast would lose precision
    ("tiny", "weights", _retype("model.conv.weight", torch.float64),
     "model.conv.weight has dtype float64, which config.json's dtype float32 cannot hold without loss"),
    # a required field absent is named as missing, not replaced by the class default
    ("tiny", "config", _unset("hidden_size"), "lacks required field hidden_size"),
    ("tiny", "config", _unset("conv_kernel_h_w"), "lacks required field conv_kernel_h_w"),
    ("tiny", "config", _unset("vocab_size"), "lacks required field vocab_size"),
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


def test_lossless_dtypes_and_missing_architectures_load(tiny_dirs, tmp_path):
    """bfloat16 weights fit a float32 config; a config without `architectures` is ConvGPT's."""
    from transformers import AutoConfig

    from convgpt_core import register_config

    path = _copy(tiny_dirs["tiny"], tmp_path / "ok")
    _edit_weights(path, _retype("model.layers.1.mlp.down_proj.weight", torch.bfloat16))
    _edit_config(path, _unset("architectures"))
    validate_checkpoint(path)
    register_config()
    assert AutoConfig.from_pretrained(path).architectures == ["ConvGPTForCausalLM"]


def test_tokenizer_ids_beyond_vocab_size_are_rejected(tiny_dirs, tmp_path):
    """A tokenizer that can emit ids without an embedding row would crash the first request."""
    path = _copy(tiny_dirs["tiny"], tmp_path / "v")
    _edit_config(path, lambda c: c.update(vocab_size=300))
    _edit_weights(path, lambda w: w.update({"model.embed_tokens.weight": w["model.embed_tokens.weight"][:300]}))
    with pytest.raises(CheckpointError, match=r"tokenizer has token ids up to 511 \('.*'\) but config.json's vocab_size is 300"):
        validate_checkpoint(path)
    with pytest.raises(ValueError, match="vocab_size is 300"):
        ConvGPTForCausalLM.from_pretrained(path)


def test_non_finite_weights_are_reported(tiny_dirs, tmp_path):
    from convgpt_core.checkpoint import TensorChecker, non_finite_tensors, read_config

    path = _copy(tiny_dirs["tiny"], tmp_path / "nan")
    _edit_weights(path, lambda w: w["model.layers.0.norm2.weight"].__setitem__(3, float("nan")))
    assert non_finite_tensors(path) == ["model.layers.0.norm2.weight"]
    r = _cli("inspect", path)
    assert r.returncode == 0 and "NaN or inf in model.layers.0.norm2.weight" in r.stdout
    checker = TensorChecker(read_config(path))
    for name, t in load_file(os.path.join(path, "model.safetensors")).items():
        checker.see_tensor(name, t)
    assert checker.non_finite == ["model.layers.0.norm2.weight"]


def test_missing_and_corrupt_files(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["tiny"], tmp_path / "a")
    os.unlink(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        validate_checkpoint(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        validate_checkpoint(path)
    torch.save({"x": torch.zeros(3)}, os.path.join(path, "model.safetensors"))  # a pickle, renamed
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*never pickles"):
        validate_checkpoint(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(os.urandom(4096))
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
    # an existing checkpoint is kept unless --force; a file in the way is a one-line error
    r = _cli("make-tiny", out)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "pass --force" in r.stderr
    assert _cli("make-tiny", out, "--force").returncode == 0
    assert _cli("inspect", out).returncode == 0
    open(tmp_path / "file", "w").close()
    r = _cli("make-tiny", str(tmp_path / "file"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is not a folder" in r.stderr


def test_cli_make_tiny_train_continues_the_shipped_text(tmp_path):
    """`make-tiny --train`: the reference model then continues a line of the shipped text."""
    from transformers import AutoTokenizer

    from helpers import LINE_NEXT, LINE_START

    out = str(tmp_path / "t")
    r = _cli("make-tiny", out, "--train")
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(out)
    model = ConvGPTForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    ids = tok(LINE_START, return_tensors="pt")["input_ids"]
    new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert tok.decode(new).startswith(LINE_NEXT), tok.decode(new)


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
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype int8"):
        TensorChecker(config).see_tensor("model.norm.weight", torch.ones(256, dtype=torch.int8))


def test_cli_help_and_version_import_no_torch(tmp_path):
    """`convgpt --help` stays quick: the CLI imports torch only for a subcommand's work (and
    not to report a mistake found before it, like an OUT that already holds a checkpoint)."""
    from convgpt import __version__
    from convgpt.cli import PRESET_NAMES
    from convgpt_core.tiny import PRESETS

    assert tuple(PRESETS) == PRESET_NAMES
    code = ("import sys\nfrom convgpt.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    for args in (["--help"], ["serve", "--help"], ["--version"]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"convgpt {__version__}"
    (tmp_path / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-c", code, "make-tiny", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0 and "pass --force" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "convgpt", "inspect", "/nonexistent"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no config.json" in r.stderr
