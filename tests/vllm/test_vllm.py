"""vLLM serves ConvGPT token for token like the float64 reference."""

import os
import subprocess
import sys

import pytest
import torch

import servers
from helpers import (
    assert_matches_reference,
    prompts,
    reference_embeddings,
    sequence_checkpoints,
    with_auto_map,
)

STEPS = 24
# Small chunks, prefix caching with small blocks, prompt embeddings: one engine for all three.
CHUNKED = dict(enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=8,
               enable_prefix_caching=True, block_size=32, enable_prompt_embeds=True)


def _greedy(llm, requests, steps=STEPS):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=1)
    outs = llm.generate(requests, sp, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
        result.append((list(c.token_ids), lps, o))
    return result


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied"])
def test_batch_of_mixed_lengths_matches_reference(engines, tiny_dirs, preset):
    ps = prompts(512, lengths=(3, 17, 60, 150, 1))
    outs = _greedy(engines(preset), [{"prompt_token_ids": p} for p in ps])
    for i, (p, (tokens, lps, _)) in enumerate(zip(ps, outs)):
        assert_matches_reference(tiny_dirs[preset], p, tokens, lps, STEPS, label=f"{preset} prompt {i}")


def test_chunked_prefill_forced_small(engines, tiny_dirs):
    ps = prompts(512, lengths=(150, 97, 5), seed=1)  # 150 tokens = 5 chunks of 32
    outs = _greedy(engines("tiny", **CHUNKED), [{"prompt_token_ids": p} for p in ps])
    for i, (p, (tokens, lps, _)) in enumerate(zip(ps, outs)):
        assert_matches_reference(tiny_dirs["tiny"], p, tokens, lps, STEPS, label=f"chunked prompt {i}")


def test_prefix_caching_with_shared_prefix(engines, tiny_dirs):
    llm = engines("tiny", **CHUNKED)
    prefix = prompts(512, lengths=(80,), seed=2)[0]
    tails = prompts(512, lengths=(1, 9, 30), seed=3)
    first = _greedy(llm, [{"prompt_token_ids": prefix + tails[0]}])
    rest = _greedy(llm, [{"prompt_token_ids": prefix + t} for t in tails[1:]])
    assert all(o.num_cached_tokens >= 64 for _, _, o in rest), "the shared prefix was not served from cache"
    for t, (tokens, lps, _) in zip(tails, first + rest):
        assert_matches_reference(tiny_dirs["tiny"], prefix + t, tokens, lps, STEPS, label="shared prefix")


def test_prompt_embeds_equal_token_path(engines, tiny_dirs):
    llm = engines("tiny", **CHUNKED)
    ps = prompts(512, lengths=(12, 40), seed=4)
    by_ids = _greedy(llm, [{"prompt_token_ids": p} for p in ps])
    embeds = [reference_embeddings(tiny_dirs["tiny"], p).to(torch.float32) for p in ps]
    by_embeds = _greedy(llm, [{"prompt_embeds": e} for e in embeds])
    for (a, lpa, _), (b, lpb, _) in zip(by_ids, by_embeds):
        assert a == b
        assert max(abs(x - y) for x, y in zip(lpa, lpb)) < 1e-3


def test_checkpoints_one_after_another_each_match_reference(tmp_path):
    """Several different checkpoints served one after another in one process: each matches
    the float64 reference as if it were the only one (no state carries over)."""
    from vllm import LLM

    ps = prompts(512, lengths=(7, 40, 130), seed=7)
    for name, path in sequence_checkpoints(tmp_path).items():
        llm = LLM(model=path, dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
        try:
            outs = _greedy(llm, [{"prompt_token_ids": p} for p in ps], steps=16)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
        for i, (p, (tokens, lps, _)) in enumerate(zip(ps, outs)):
            assert_matches_reference(path, p, tokens, lps, 16, label=f"{name} prompt {i}")


def _embed_shape(model):
    return tuple(model.embed_input_ids(torch.tensor([5, 6, 7])).shape)


def test_embed_input_ids_is_hidden_size_wide(engines, tiny_dirs):
    """The engine sizes its embeds buffer by hidden_size: embed_input_ids must return H wide."""
    assert engines("tiny").apply_model(_embed_shape) == [(3, 256)]


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    """`convgpt serve vllm` on a hub-style copy (with auto_map), as a user would start it."""
    path = with_auto_map(tiny_dirs["tiny"], str(tmp_path_factory.mktemp("hub") / "tiny"))
    server = servers.start("vllm", path, "--max-model-len", "512", "--enforce-eager")
    try:
        yield f"{server.base}/v1", path
    finally:
        server.stop()


def test_served_completion_and_chat_equal_offline(server, engines):
    from openai import OpenAI
    from vllm import SamplingParams

    url, path = server
    client = OpenAI(base_url=url, api_key="none")
    prompt = "The lighthouse keeper wrote"
    comp = client.completions.create(model="convgpt", prompt=prompt, max_tokens=16, temperature=0)
    assert comp.choices[0].text
    messages = [{"role": "user", "content": "How many legs does a spider have?"}]
    chat = client.chat.completions.create(model="convgpt", messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content is not None

    llm = engines("tiny")
    sp = SamplingParams(temperature=0, max_tokens=16)
    assert llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].text == comp.choices[0].text
    offline_chat = llm.chat(messages, sp, use_tqdm=False)[0].outputs[0].text
    assert offline_chat == chat.choices[0].message.content


def test_malformed_checkpoint_fails_at_load_naming_the_tensor(tiny_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "bad")
    shutil.copytree(tiny_dirs["tiny"], path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, os.path.join(path, "model.safetensors"))
    code = ("from vllm import LLM\n"
            "if __name__ == '__main__':\n"
            f"    LLM(model={path!r}, dtype='float32', max_model_len=512, enforce_eager=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "missing tensors: model.layers.1.mlp.down_proj.weight" in r.stderr + r.stdout
