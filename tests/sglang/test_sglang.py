"""SGLang integration: the external model package inside SGLang, `convgpt serve sglang` (its
/generate and OpenAI routes, input_embeds), strict loading, and several checkpoints in one
process.  Numerical parity in every serving situation is the parity matrix's (tests/parity)."""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import psutil
import pytest
import torch

import drivers
import servers
from convgpt.serve import cuda_available, sglang_command
from convgpt_core.tiny import PRESETS
from helpers import (
    LINE_NEXT,
    LINE_START,
    free_port,
    prompts,
    reference_embeddings,
    with_auto_map,
)
from judge import assert_matches_reference, assert_sequence_matches_reference

STEPS = 24


def test_checkpoints_one_after_another_each_match_reference(tmp_path):
    """Three different checkpoints, one after another in one process, each equal to the
    reference (see helpers.SEQUENCE); runs before the server tests: Engine.shutdown() ends
    every child process of the caller."""
    assert_sequence_matches_reference("sglang", tmp_path)


PROMPT = LINE_START
MESSAGES = [{"role": "user", "content": "How many legs does a spider have?"}]


@pytest.fixture(scope="module")
def offline_texts(engine, trained_dir):
    """Offline greedy texts, taken before the server starts: SGLang's Engine.shutdown() kills
    every child process of the caller, which would include the server."""
    from transformers import AutoTokenizer

    llm = engine("trained").llm
    params = {"temperature": 0, "max_new_tokens": 16}
    chat_prompt = AutoTokenizer.from_pretrained(trained_dir).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    return [llm.generate(prompt=p, sampling_params=params)["text"] for p in (PROMPT, chat_prompt)]


@pytest.fixture(scope="module")
def server(offline_texts, trained_dir, tmp_path_factory):
    """`convgpt serve sglang` on a hub-style copy (with auto_map) of the trained tiny checkpoint,
    as a user would start it, with no SGLANG_EXTERNAL_MODEL_PACKAGE in its environment (the
    plugin names the package)."""
    path = with_auto_map(trained_dir, str(tmp_path_factory.mktemp("hub") / "tiny"))
    os.environ.pop("SGLANG_EXTERNAL_MODEL_PACKAGE", None)
    # SGLang accepts input_embeds only with the radix cache off (the offline tests cover it on).
    server = servers.start("sglang", path, *servers.engine_args("sglang", embeds=True))
    try:
        yield server
    finally:
        server.stop()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_served_generate_completion_and_chat_equal_offline(server, offline_texts):
    from openai import OpenAI

    base = server.base
    native = _post(f"{base}/generate", {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 16}})
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    comp = client.completions.create(model=servers.SERVED_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    chat = client.chat.completions.create(model=servers.SERVED_NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    # the trained model continues the line it learned: the whole stack, read as text
    assert native["text"].startswith(LINE_NEXT), native["text"]
    assert native["text"] == comp.choices[0].text
    assert [comp.choices[0].text, chat.choices[0].message.content] == offline_texts


def test_input_embeds_equal_token_path(server, trained_dir):
    """`input_embeds` (H-wide) go through the compressor; ids through the compressed table;
    both match the reference."""
    base = server.base
    ps = prompts(512, lengths=(12, 40), seed=4)
    common = {"sampling_params": {"temperature": 0, "max_new_tokens": STEPS, "ignore_eos": True},
              "return_logprob": True, "top_logprobs_num": 5}
    by_ids = _post(f"{base}/generate", dict(common, input_ids=ps))
    embeds = [reference_embeddings(trained_dir, p).to(torch.float32).tolist() for p in ps]
    by_embeds = _post(f"{base}/generate", dict(common, input_embeds=embeds))
    for label, outputs in (("ids", by_ids), ("input_embeds", by_embeds)):
        records = [drivers.sglang_record(p, o, 5) for p, o in zip(ps, outputs)]
        assert_matches_reference(trained_dir, ps, records, STEPS, label=f"{label} via server")


@pytest.mark.skipif(cuda_available(), reason="the CPU default (sleep_on_idle) is what is tested")
def test_idle_server_leaves_the_cpu_free(server):
    """An idle `convgpt serve sglang` on a CPU machine sleeps: SGLang's scheduler otherwise polls
    its sockets in a busy loop, a whole core taken from the work of every other process."""
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    for p in procs:
        p.cpu_percent(None)
    time.sleep(3)
    busy = {f"{p.pid} {p.name()}": p.cpu_percent(None) for p in procs if p.is_running()}
    assert sum(busy.values()) < 30, f"an idle server used {sum(busy.values()):.0f}% CPU: {busy}"


def test_malformed_checkpoint_fails_at_load_naming_the_tensor(tiny_dirs, tmp_path):
    """SGLang's own launcher (no `convgpt serve` pre-check): the model's loader names the tensor."""
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "bad")
    shutil.copytree(tiny_dirs["tiny-untied"], path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(256, 65)
    save_file(weights, os.path.join(path, "model.safetensors"))
    cmd = sglang_command(path, ["--port", str(free_port()), "--dtype", "float32"], cuda_available())
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode != 0
    assert "model.layers.0.self_attn.q_proj.weight has shape (256, 65), expected (256, 64)" in r.stderr + r.stdout


def test_lora_adapter_matches_merged_reference(tiny_dirs, tmp_path, monkeypatch):
    """A LoRA adapter on every decoder linear (q/k/v/o, gate/up/down) of the tiny checkpoint.
    On CPU SGLang's LoRA layers pin host memory, which needs CUDA: the scheduler process gets
    tests/sglang/cpu_lora_shim (pinning dropped, no value changed) and the torch_native backend."""
    from judge import assert_lora_matches_merged_reference

    if not cuda_available():
        shim = os.path.join(os.path.dirname(__file__), "cpu_lora_shim")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [shim, os.environ.get("PYTHONPATH")])))
    assert_lora_matches_merged_reference("sglang", tiny_dirs["tiny"], tmp_path)


def test_decode_kernels_inside_the_engine_match_reference(tmp_path):
    """The path CUDA takes: norm_linear into q/k/v and gate/up, narrow_linear for o_proj and
    down, with the engine's attention in between, here in Triton's interpreter."""
    from judge import assert_decode_kernels_match_reference

    assert_decode_kernels_match_reference("sglang", tmp_path)


def test_installed_wheel_works_as_a_user_would(tmp_path):
    """This environment holds SGLang and the built wheel (`convgpt serve` above ran from it)."""
    from users import assert_wheel_works_as_a_user_would

    assert_wheel_works_as_a_user_would(tmp_path)


WINDOW_CASES = {"sliding": PRESETS["tiny-sliding"], "full": PRESETS["tiny"],
                "window-but-no-sliding-layer": dict(PRESETS["tiny"], layer_types=["full_attention"] * 2,
                                                    sliding_window=16)}


def _expected_window(fields: dict) -> int | None:
    """SGLang counts the window without the query token: keys with q_pos - k_pos < sliding_window."""
    return fields["sliding_window"] - 1 if "sliding_attention" in fields.get("layer_types", ()) else None


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sglang_takes_the_sliding_window_from_the_model(case):
    """SGLang's CUDA attention backends (flashinfer, triton, FA3) read one window per model from
    ``get_attention_sliding_window_size`` and give every layer full attention without it: on the
    H200 every sliding-window parity cell failed that way (round 13), while CPU's backends, which
    read each layer's window, passed.  Here SGLang's own resolver asks our model class."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.model_runner_components.load_model_utils import resolve_sliding_window_size
    from torch import nn

    from convgpt.sglang.model import ConvGPTForCausalLM
    from convgpt_core.config import ConvGPTConfig

    model = ConvGPTForCausalLM.__new__(ConvGPTForCausalLM)  # the method reads the config only
    nn.Module.__init__(model)
    model.config = ConvGPTConfig(**WINDOW_CASES[case])
    not_swa = SimpleNamespace(is_hybrid_swa=False, sliding_window_size=None, attention_chunk_size=None)
    assert resolve_sliding_window_size(model, not_swa) == _expected_window(WINDOW_CASES[case])


def _published_server_args(path: str, **backends):
    """SGLang's own server arguments for a CPU server of the checkpoint at ``path``, resolved and
    published as its scheduler does before it builds the model (0.5.23's runtime context)."""
    from sglang.srt.runtime_context import create_context, use_context
    from sglang.srt.server_args import ServerArgs

    from convgpt_core.config import register_config

    register_config()  # what the plugin does in every SGLang process
    args = ServerArgs(model_path=path, device="cpu", load_format="dummy", **backends)
    return use_context(create_context(args, role="scheduler"))


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sliding_layers_refuse_sglangs_triton_decode(case, tmp_path):
    """SGLang's triton backend decodes sliding layers over one key fewer than the window: building
    a model with such layers under server arguments whose decode backend resolves to triton
    (named in either of SGLang's two settings) fails with an error that names the way out;
    triton for prefill alone is accepted, and a model without sliding layers takes any backend.
    The server arguments are SGLang's own, resolved and published the way its scheduler does."""
    from sglang.srt.runtime_context import get_server_args

    from convgpt.sglang.model import ConvGPTForCausalLM, check_sliding_window, decode_attention_backend
    from convgpt_core.config import ConvGPTConfig
    from convgpt_core.tiny import make_checkpoint

    fields = WINDOW_CASES[case]
    make_checkpoint(str(tmp_path), preset="tiny", seed=1, **fields)
    config = ConvGPTConfig(**fields)
    sliding = _expected_window(fields) is not None
    for backends, refused in (({"attention_backend": "triton"}, sliding),
                              ({"attention_backend": "torch_native", "decode_attention_backend": "triton"}, sliding),
                              ({"attention_backend": "triton", "decode_attention_backend": "torch_native"}, False),
                              ({"attention_backend": "torch_native"}, False)):
        with _published_server_args(str(tmp_path), **backends):
            decode = decode_attention_backend(get_server_args())
            assert decode == backends.get("decode_attention_backend", backends["attention_backend"])
            if refused:  # the model's own constructor refuses, before it builds any layer
                with pytest.raises(ValueError, match="sliding-window layers.*triton.*--decode-attention-backend"):
                    ConvGPTForCausalLM(config)
            else:
                check_sliding_window(config, decode)
    assert decode_attention_backend(None) is None


def test_one_token_window_is_refused_on_sglang(tmp_path):
    """SGLang's RadixAttention takes a window of 0 (SGLang's count for a 1-token window) as full
    attention, so such a model is refused before it could attend past its window."""
    from sglang.srt.layers.radix_attention import RadixAttention

    from convgpt.sglang.model import ConvGPTForCausalLM, model_window
    from convgpt_core.config import ConvGPTConfig
    from convgpt_core.tiny import make_checkpoint

    fields = dict(PRESETS["tiny-sliding"], sliding_window=1)
    make_checkpoint(str(tmp_path), preset="tiny", seed=1, **fields)
    config = ConvGPTConfig(**fields)
    assert RadixAttention(2, 8, 1.0, 1, 0, sliding_window_size=model_window(config)).sliding_window_size == -1
    with (_published_server_args(str(tmp_path), attention_backend="torch_native"),
          pytest.raises(ValueError, match="sliding_window = 1 .* full attention")):
        ConvGPTForCausalLM(config)  # before any layer is built


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_sliding_layers_get_sglangs_paged_prefill(case, monkeypatch, caplog):
    """SGLang's flashinfer backend plans its ragged prefill kernel without the window (the paged
    one with it), so building a model with sliding layers asks for paged-only prefill, as SGLang's
    own setting reads it; a model without them leaves the setting alone, and so does a user's own
    value, with a warning."""
    from sglang.srt.environ import envs

    from convgpt.sglang.model import PAGED_PREFILL, prefill_windowed_layers_paged
    from convgpt_core.config import ConvGPTConfig

    config = ConvGPTConfig(**WINDOW_CASES[case])
    sliding = _expected_window(WINDOW_CASES[case]) is not None
    monkeypatch.setenv(PAGED_PREFILL, "")  # recorded first, so the test leaves the environment as it found it
    monkeypatch.delenv(PAGED_PREFILL)
    prefill_windowed_layers_paged(config)
    assert envs.SGLANG_FLASHINFER_USE_PAGED.get() is sliding
    monkeypatch.setenv(PAGED_PREFILL, "no")
    prefill_windowed_layers_paged(config)
    assert envs.SGLANG_FLASHINFER_USE_PAGED.get() is False
    assert (PAGED_PREFILL in caplog.text) is sliding
    caplog.clear()
    monkeypatch.setenv(PAGED_PREFILL, "yes")  # SGLang's word for on: no warning
    prefill_windowed_layers_paged(config)
    assert PAGED_PREFILL not in caplog.text


def test_kv_store_writes_where_sglangs_own_cache_write_does():
    """The q+k+v kernel writes k and v into SGLang's KV pool itself (attention is then told not
    to): the rows it is handed are the ones SGLang's own ``set_kv_buffer`` writes for the same
    tokens, in the layer's own buffers, which attention reads.  Pools it cannot write that way
    (fp8 storage, a model dtype other than the pool's, other head shapes, layer-by-layer loading,
    a decode-context-parallel mask) and steps whose rows do not each have a slot are left to
    SGLang (None)."""
    from types import SimpleNamespace

    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from convgpt.sglang.model import plain_kv_store

    def pool(dtype=torch.bfloat16):
        return MHATokenToKVPool(size=16, page_size=1, dtype=dtype, head_num=2, head_dim=8, layer_num=3,
                                device="cpu", enable_memory_saver=False)

    ours, sglang = pool(), pool()
    loc = torch.tensor([5, 9, 0])  # 0: SGLang's slot for padded rows
    k, v = torch.randn(3, 2, 8).bfloat16(), torch.randn(3, 2, 8).bfloat16()
    sglang.set_kv_buffer(SimpleNamespace(layer_id=1), loc, k, v)
    batch = SimpleNamespace(out_cache_loc=loc, dcp_kv_mask=None)
    h = torch.zeros(3, 16, dtype=torch.bfloat16)  # the layer's input: one row per new token
    kv = plain_kv_store(ours, batch, 1, 2, 8, h)
    kv.k_cache[kv.slots], kv.v_cache[kv.slots] = k, v  # what the kernel stores, row by row
    for layer in range(3):
        assert torch.equal(ours.get_key_buffer(layer), sglang.get_key_buffer(layer))
        assert torch.equal(ours.get_value_buffer(layer), sglang.get_value_buffer(layer))
    assert ours.get_key_buffer(1)[5].abs().sum() > 0

    assert plain_kv_store(ours, batch, 1, 2, 8, h.half()) is None
    assert plain_kv_store(ours, batch, 1, 4, 8, h) is None
    assert plain_kv_store(ours, batch, 1, 2, 8, h[:2]) is None  # rows without a slot each
    masked = SimpleNamespace(out_cache_loc=loc, dcp_kv_mask=torch.ones(3, dtype=torch.bool))
    assert plain_kv_store(ours, masked, 1, 2, 8, h) is None
    assert plain_kv_store(pool(torch.float8_e4m3fn), batch, 1, 2, 8, h) is None
    ours.layer_transfer_counter = object()  # hierarchical cache: layers arrive one by one
    assert plain_kv_store(ours, batch, 1, 2, 8, h) is None


def test_logits_are_widened_to_float32_where_sglang_has_no_kernel(monkeypatch):
    """The head's bf16 logits (rows padded past the vocabulary) become the float32 logits SGLang
    samples from: through ``logits_to_float32`` (here in Triton's interpreter) into the decode
    graphs' buffer where its shape fits, else a new tensor, equal to the exact conversion of the
    first vocab_size columns; where the kernel does not run (the CPU without the interpreter)
    SGLang's own copy."""
    from types import SimpleNamespace

    from torch import nn

    from convgpt.sglang import model

    processor = model.ConvGPTLogitsProcessor.__new__(model.ConvGPTLogitsProcessor)
    nn.Module.__init__(processor)  # only what the copy reads: SGLang's __init__ wants a running server
    processor.vocab_size = 300
    logits = (torch.randn(3, 320) * 30).bfloat16()
    want = logits[:, :300].float()
    cast, calls = model.logits_to_float32, []
    monkeypatch.setattr(model, "logits_to_float32", lambda *a: calls.append(a) or cast(*a))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    buffer = torch.full((3, 300), float("nan"))
    out = processor._copy_logits_to_buffer(logits, SimpleNamespace(next_token_logits_buffer=buffer))
    assert out is buffer and torch.equal(out, want)
    for meta, use in ((SimpleNamespace(next_token_logits_buffer=buffer), False),
                      (SimpleNamespace(next_token_logits_buffer=torch.empty(4, 300)), True)):
        out = processor._copy_logits_to_buffer(logits, meta, use)
        assert out is not buffer and out.dtype == torch.float32 and torch.equal(out, want)
    assert len(calls) == 3
    monkeypatch.delenv("TRITON_INTERPRET")
    buffer = torch.full((3, 300), float("nan"))
    out = processor._copy_logits_to_buffer(logits, SimpleNamespace(next_token_logits_buffer=buffer))
    assert out is buffer and torch.equal(out, want) and len(calls) == 3  # SGLang's copy_ on the CPU
