"""SGLang serves ConvGPT token for token like the float64 reference."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest
import torch

import servers
from conftest import ENGINE_DEFAULTS, HAS_CUDA
from helpers import (
    assert_matches_reference,
    free_port,
    prompts,
    reference_embeddings,
    sequence_checkpoints,
    with_auto_map,
)

STEPS = 24
SMALL_CHUNKS = dict(chunked_prefill_size=32)


def _greedy(llm, steps=STEPS, **inputs):
    params = {"temperature": 0, "max_new_tokens": steps, "ignore_eos": True}
    outs = llm.generate(sampling_params=params, return_logprob=True, **inputs)
    result = []
    for o in outs:
        lps = [lp for lp, _tok, _text in o["meta_info"]["output_token_logprobs"]]
        result.append((list(o["output_ids"]), lps, o["meta_info"]))
    return result


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied"])
def test_batch_of_mixed_lengths_matches_reference(engine, tiny_dirs, preset):
    ps = prompts(512, lengths=(3, 17, 60, 150, 1))
    outs = _greedy(engine(preset), input_ids=ps)
    for i, (p, (tokens, lps, _)) in enumerate(zip(ps, outs)):
        assert_matches_reference(tiny_dirs[preset], p, tokens, lps, STEPS, label=f"{preset} prompt {i}")


def test_chunked_prefill_forced_small(engine, tiny_dirs):
    ps = prompts(512, lengths=(150, 97, 5), seed=1)  # 150 tokens = 5 chunks of 32
    outs = _greedy(engine("tiny", **SMALL_CHUNKS), input_ids=ps)
    for i, (p, (tokens, lps, _)) in enumerate(zip(ps, outs)):
        assert_matches_reference(tiny_dirs["tiny"], p, tokens, lps, STEPS, label=f"chunked prompt {i}")


def test_radix_cache_with_shared_prefix(engine, tiny_dirs):
    llm = engine("tiny", **SMALL_CHUNKS)
    prefix = prompts(512, lengths=(80,), seed=2)[0]
    tails = prompts(512, lengths=(1, 9, 30), seed=3)
    first = _greedy(llm, input_ids=[prefix + tails[0]])
    rest = _greedy(llm, input_ids=[prefix + t for t in tails[1:]])
    assert all(meta["cached_tokens"] >= 64 for _, _, meta in rest), "the shared prefix was not served from cache"
    for t, (tokens, lps, _) in zip(tails, first + rest):
        assert_matches_reference(tiny_dirs["tiny"], prefix + t, tokens, lps, STEPS, label="shared prefix")


def test_checkpoints_one_after_another_each_match_reference(tmp_path):
    """Several different checkpoints served one after another in one process: each matches
    the float64 reference as if it were the only one (no state carries over)."""
    import sglang as sgl

    ps = prompts(512, lengths=(7, 40, 130), seed=7)
    for name, path in sequence_checkpoints(tmp_path).items():
        llm = sgl.Engine(model_path=path, **ENGINE_DEFAULTS)
        try:
            outs = _greedy(llm, steps=16, input_ids=ps)
        finally:
            llm.shutdown()
        for i, (p, (tokens, lps, _)) in enumerate(zip(ps, outs)):
            assert_matches_reference(path, p, tokens, lps, 16, label=f"{name} prompt {i}")


def _server_args(path, port):
    args = [sys.executable, "-m", "sglang.launch_server", "--model-path", path, "--port", str(port),
            "--dtype", "float32", "--context-length", "512", "--random-seed", "0"]
    if not HAS_CUDA:
        args += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                 "--mem-fraction-static", str(ENGINE_DEFAULTS["mem_fraction_static"])]
    return args


PROMPT = "The lighthouse keeper wrote"
MESSAGES = [{"role": "user", "content": "How many legs does a spider have?"}]


@pytest.fixture(scope="module")
def offline_texts(engine, tiny_dirs):
    """Offline greedy texts, taken before the server starts: SGLang's Engine.shutdown() kills
    every child process of the caller, which would include the server."""
    from transformers import AutoTokenizer

    llm = engine("tiny")
    params = {"temperature": 0, "max_new_tokens": 16}
    chat_prompt = AutoTokenizer.from_pretrained(tiny_dirs["tiny"]).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    return [llm.generate(prompt=p, sampling_params=params)["text"] for p in (PROMPT, chat_prompt)]


@pytest.fixture(scope="module")
def server(offline_texts, tiny_dirs, tmp_path_factory):
    """`convgpt serve sglang` on a hub-style copy (with auto_map), as a user would start it,
    with no SGLANG_EXTERNAL_MODEL_PACKAGE in its environment (the plugin names the package)."""
    path = with_auto_map(tiny_dirs["tiny"], str(tmp_path_factory.mktemp("hub") / "tiny"))
    os.environ.pop("SGLANG_EXTERNAL_MODEL_PACKAGE", None)
    # SGLang accepts input_embeds only with the radix cache off (the offline tests cover it on).
    server = servers.start("sglang", path, *servers.engine_args("sglang", embeds=True))
    try:
        yield server.base, path
    finally:
        server.stop()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_served_generate_completion_and_chat_equal_offline(server, offline_texts):
    from openai import OpenAI

    base, _ = server
    native = _post(f"{base}/generate", {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 16}})
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    comp = client.completions.create(model=servers.SERVED_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    chat = client.chat.completions.create(model=servers.SERVED_NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    assert native["text"] and native["text"] == comp.choices[0].text
    assert [comp.choices[0].text, chat.choices[0].message.content] == offline_texts


def test_input_embeds_equal_token_path(server, tiny_dirs):
    """`input_embeds` (H-wide) go through the compressor; ids through the compressed table."""
    base, _ = server
    ps = prompts(512, lengths=(12, 40), seed=4)
    params = {"temperature": 0, "max_new_tokens": STEPS, "ignore_eos": True}
    by_ids = _post(f"{base}/generate", {"input_ids": ps, "sampling_params": params, "return_logprob": True})
    embeds = [reference_embeddings(tiny_dirs["tiny"], p).to(torch.float32).tolist() for p in ps]
    by_embeds = _post(f"{base}/generate", {"input_embeds": embeds, "sampling_params": params, "return_logprob": True})
    for p, a, b in zip(ps, by_ids, by_embeds):
        assert a["output_ids"] == b["output_ids"]
        lpa = [x[0] for x in a["meta_info"]["output_token_logprobs"]]
        lpb = [x[0] for x in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(lpa, lpb)) < 1e-3
        assert_matches_reference(tiny_dirs["tiny"], p, a["output_ids"], lpa, STEPS, label="ids via server")


def test_malformed_checkpoint_fails_at_load_naming_the_tensor(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "bad")
    shutil.copytree(tiny_dirs["tiny-untied"], path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(256, 65)
    save_file(weights, os.path.join(path, "model.safetensors"))
    r = subprocess.run(_server_args(path, free_port()), capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, SGLANG_EXTERNAL_MODEL_PACKAGE="convgpt.sglang"))
    assert r.returncode != 0
    assert "model.layers.0.self_attn.q_proj.weight has shape (256, 65), expected (256, 64)" in r.stderr + r.stdout
