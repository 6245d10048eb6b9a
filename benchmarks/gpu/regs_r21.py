"""Round 21 probe, no GPU needed: registers and spills of norm_linear's kernel for an H100/H200
(sm_90a), from Triton's PTX and ptxas -v, for the tiles the decode step runs at 129-256 rows and
their neighbours.  Run it with the Triton the GPU host has (3.6.0) in a venv of its own; torch is
not needed (the kernel's source is taken from src/convgpt_core/norm_linear.py):

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    /tmp/t36/bin/python benchmarks/gpu/regs_r21.py
"""

import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def kernel():
    """``_norm_linear_src`` as a Triton kernel, from the module's text (the module imports torch)."""
    text = open(os.path.join(ROOT, "src", "convgpt_core", "norm_linear.py")).read()
    src = text[text.index("def _norm_linear_src("):text.index("def _silu_mul_src(")]
    path = os.path.join(tempfile.mkdtemp(), "nl_kernel.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n"
                "from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait\n\n\n@triton.jit\n" + src)
    spec = importlib.util.spec_from_file_location("nl_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._norm_linear_src


def ptxas_report(fn, rope: bool, table: str, late: bool, bm: int, warps: int) -> str:
    names = list(inspect.signature(fn.fn).parameters)
    const = dict(K=144, K_A=128, K_B=16, HAS_RES=True, SWIGLU=not rope, ROPE=rope, HALF=64 if rope else 0,
                 Q_HEADS=16 if rope else 0, NORM_HEADS=24 if rope else 0, KV=rope, LATE_CS=late, Q_APART=False,
                 BLOCK_M=bm, BLOCK_N=64, PRECISION="tf32", UPCAST=False, PDL=False)
    ints = {"M", "N", "n_slots"} | {n for n in names if n.startswith("stride_")}
    sig = {n: "constexpr" if n in const else "i32" if n in ints else "fp32" if n in ("eps", "qk_eps")
           else "*i64" if n in ("pos_ptr", "slot_ptr") else table if n == "cs_ptr" else "*bf16" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "k.ptx"), "w") as f:
        f.write(compiled.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"], cwd=folder,
                         capture_output=True, text=True, check=True).stderr
    return " | ".join(line.split("info    : ")[-1].strip() for line in out.splitlines()
                      if "registers" in line or "spill" in line)


def main() -> None:
    fn = kernel()
    print(f"norm_linear's kernel, sm_90a, Triton {triton.__version__}, D = 144, bf16, BLOCK_N 64 (half a head "
          "with RoPE), ptxas -v")
    cases = [  # (rope, cos|sin table, LATE_CS, BLOCK_M, warps)
        (True, "*bf16", False, 64, 4), (True, "*fp32", False, 64, 4), (True, "*fp32", True, 64, 4),
        (True, "*bf16", False, 32, 4), (True, "*fp32", True, 32, 4), (True, "*bf16", False, 16, 4),
        (True, "*bf16", False, 64, 8), (False, "*bf16", False, 16, 4), (False, "*bf16", False, 32, 4),
        (False, "*bf16", False, 64, 4)]
    for rope, table, late, bm, warps in cases:
        what = f"q+k+v+RoPE+KV, table {table[1:]}{' late' if late else ''}" if rope else "gate/up + SwiGLU"
        print(f"{what:34} BLOCK_M {bm:2} warps {warps}: {ptxas_report(fn, rope, table, late, bm, warps)}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
