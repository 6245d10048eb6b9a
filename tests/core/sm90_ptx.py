"""Compile the decode kernels for an H100 (sm_90) with and without programmatic dependent
launch and print their PTX lines (predicates stripped) as one JSON line: the input of
``test_kernels.py::test_pdl_kernels_wait_before_they_write``.  Runs without a GPU; needs a
process where triton compiles (``TRITON_INTERPRET`` unset)."""

import inspect
import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from convgpt_core import decode_attention as da
from convgpt_core import narrow_linear as nar
from convgpt_core import norm_linear as nl

NL_TYPES = dict(x_ptr="*bf16", r_ptr="*bf16", s_ptr="*bf16", nw_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16",
                qw_ptr="*bf16", kw_ptr="*bf16", cs_ptr="*bf16", pos_ptr="*i64", kc_ptr="*bf16", vc_ptr="*bf16",
                slot_ptr="*i64", M="i32", N="i32", stride_x="i32", stride_r="i32", stride_s="i32", stride_w="i32",
                stride_y="i32", stride_cs="i32", stride_c="i32", stride_ch="i32", n_slots="i32", eps="fp32",
                qk_eps="fp32")
NL_ROPE = dict(K=144, K_A=128, K_B=16, HAS_RES=True, SWIGLU=False, ROPE=True, HALF=64, Q_HEADS=16,
               NORM_HEADS=24, KV=False, LATE_CS=False, Q_APART=False, BLOCK_M=16, BLOCK_N=64, PRECISION="tf32",
               UPCAST=False)
NL_ROPE_KV = dict(NL_ROPE, KV=True)
NL_ROPE_KV_APART = dict(NL_ROPE_KV, Q_APART=True)  # SGLang's decode: the q heads in a tensor of their own
NL_SWIGLU = dict(NL_ROPE, SWIGLU=True, ROPE=False, HALF=0, Q_HEADS=0, NORM_HEADS=0, BLOCK_N=32)
NAR_TYPES = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", part_ptr="*fp32", count_ptr="*i32", M="i32",
                 N="i32", K="i32", stride_x="i32", stride_w="i32", stride_y="i32")
NAR = dict(K_PER_SPLIT=256, SPLIT=8, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, PRECISION="tf32", UPCAST=False)
DA_TYPES = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", table_ptr="*i32", req_ptr="*i64",
                lens_ptr="*i64", part_ptr="*fp32", count_ptr="*i32", scale="fp32", window="i32",
                **{n: "i32" for n in ("stride_qm", "stride_qh", "stride_kr", "stride_kh", "stride_vr", "stride_vh",
                                      "stride_om", "stride_oh", "stride_table")})
DA = dict(GROUP=2, GROUP_P2=2, GROUP_PAD=16, HEAD_DIM=128, BLOCK_T=64, SPLITS=32, UPCAST=False,
          PRECISION="tf32")  # the published attention (16 q / 8 kv heads of 128), one request


def ptx(src, types: dict, constexprs: dict, pdl: bool) -> list[str]:
    names = list(inspect.signature(src).parameters)
    consts = dict(constexprs, PDL=pdl)
    sig = {n: types.get(n, "constexpr") for n in names}
    ast = ASTSource(triton.jit(src), sig, {(names.index(n),): v for n, v in consts.items()})
    out = triton.compile(ast, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "num_stages": 3, "launch_pdl": pdl})
    assert out.metadata.launch_pdl is pdl
    return [re.sub(r"^@!?%p\d+\s+", "", line.strip()) for line in out.asm["ptx"].splitlines()]


if __name__ == "__main__":
    kernels = {"norm_linear_rope": (nl._norm_linear_src, NL_TYPES, NL_ROPE),
               "norm_linear_rope_kv": (nl._norm_linear_src, NL_TYPES, NL_ROPE_KV),
               "norm_linear_rope_kv_apart": (nl._norm_linear_src, NL_TYPES, NL_ROPE_KV_APART),
               "norm_linear_swiglu": (nl._norm_linear_src, NL_TYPES, NL_SWIGLU),
               "narrow_linear": (nar._narrow_linear_src, NAR_TYPES, NAR),
               "decode_attention": (da._decode_attention_src, DA_TYPES, DA)}
    out = {}
    for name, (src, types, consts) in kernels.items():
        out[name] = ptx(src, types, consts, True)
        out[name + "_plain"] = ptx(src, types, consts, False)
    print(json.dumps(out))
