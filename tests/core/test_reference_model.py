import json
import os

import pytest
import torch

import naive
from convgpt_core.modeling import ConvGPTForCausalLM, register

PROMPTS = [[5, 77, 300, 12, 9, 401, 33], [260, 261], [100, 42, 42, 7, 8, 500, 2, 19, 64, 65, 66]]


@pytest.fixture(scope="module")
def models(tiny_dirs):
    register()
    return {p: ConvGPTForCausalLM.from_pretrained(d, dtype=torch.float64).eval() for p, d in tiny_dirs.items()}


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied", "tiny-sliding"])
def test_logits_match_independent_float64_forward(tiny_dirs, models, preset):
    cfg, w = naive.load(tiny_dirs[preset])
    # long enough to cross the sliding window (16) of tiny-sliding
    ids = [(i * 37 + 11) % cfg["vocab_size"] for i in range(40)]
    want = naive.forward(cfg, w, ids)
    with torch.no_grad():
        got = models[preset](torch.tensor([ids])).logits[0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert want.std() > 1.0  # the tiny weights give logits with a real spread


def test_inputs_embeds_equal_token_path(models):
    m = models["tiny"]
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        a = m(input_ids=ids).logits
        b = m(inputs_embeds=m.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-sliding"])
def test_no_token_leakage(models, preset):
    m = models[preset]
    ids = torch.tensor([[(i * 13 + 5) % 512 for i in range(24)]])
    with torch.no_grad():
        base = m(ids).logits[0]
        for t in (0, 7, 16, 23):
            changed = ids.clone()
            changed[0, t + 1 :] = (changed[0, t + 1 :] + 101) % 512
            if t + 1 < ids.shape[1]:
                changed[0, t + 1] = (changed[0, t + 1] + 1) % 512
            got = m(changed).logits[0]
            torch.testing.assert_close(got[: t + 1], base[: t + 1], rtol=0, atol=0)
            if t + 1 < ids.shape[1]:
                assert (got[t + 1 :] - base[t + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied", "tiny-sliding"])
def test_generate_with_cache_equals_full_recompute(models, preset):
    m = models[preset]
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    steps = 20  # prompt + steps crosses the sliding window
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                     eos_token_id=None, pad_token_id=0)
    new = out[:, width:]
    for row, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(steps):  # no cache, no padding: recompute the whole prefix each step
                seq.append(int(m(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        assert new[row].tolist() == seq[len(prompt):], f"prompt {row}"


def test_greedy_matches_naive_reference(tiny_dirs, models):
    cfg, w = naive.load(tiny_dirs["tiny-untied"])
    prompt = PROMPTS[0]
    want = naive.greedy(cfg, w, prompt, 6)
    out = models["tiny-untied"].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                         eos_token_id=None)
    assert out[0, len(prompt):].tolist() == want


def test_import_registers_with_transformers(tiny_dirs, tmp_path):
    """What README shows: `import convgpt_core`, then Auto* on a hub-style copy (auto_map to
    remote code): it loads with no prompt and no remote code, in a fresh interpreter."""
    import subprocess
    import sys

    from helpers import with_auto_map

    path = with_auto_map(tiny_dirs["tiny"], str(tmp_path / "hub"))
    code = ("import convgpt_core\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({path!r})\n"
            "print(type(m).__module__, type(m).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["convgpt_core.modeling", "ConvGPTForCausalLM"]


def test_auto_model_without_remote_code_ignores_auto_map(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    register()
    src = tiny_dirs["tiny"]
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), tmp_path / name)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["auto_map"] = {"AutoConfig": "configuration_convgpt.ConvGPTConfig",
                       "AutoModelForCausalLM": "modeling_convgpt.ConvGPTForCausalLM"}
    os.unlink(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(m, ConvGPTForCausalLM)
    assert not hasattr(m, "lm_head")  # tied: logits use the embedding itself


def test_parameter_count_of_published_geometry():
    from convgpt_core.checkpoint import parameter_count
    from convgpt_core.config import ConvGPTConfig
    from convgpt_core.tiny import PRESETS

    config = ConvGPTConfig(**PRESETS["published"])
    with torch.device("meta"):
        model = ConvGPTForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 163_952_769
    assert parameter_count(config) == 163_952_769
    # k = 3 gives the other published figure
    assert parameter_count(ConvGPTConfig(**dict(PRESETS["published"], conv_kernel_h_w=3))) == 163_950_177
