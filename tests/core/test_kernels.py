"""The fused Triton compressor: on CPU through Triton's interpreter, and on CUDA when present.

Triton decides when ``triton`` is imported whether its language library runs
interpreted, so on a machine without CUDA ``TRITON_INTERPRET=1`` is set before
``triton`` is imported here (and restored right after; the tests set it again with
``monkeypatch``).  When another module imported triton first (``pytest tests/core``
does, through transformers/torch), or CUDA is present (the GPU tests need the compiler),
the kernel cannot be interpreted in this process: the interpreter tests then skip here
and ``test_kernels_in_fresh_interpreter_process`` runs this file in a fresh process with
``TRITON_INTERPRET=1`` (where the GPU tests skip instead).
"""

import functools
import os
import subprocess
import sys

import pytest
import torch

_PREIMPORTED = "triton" in sys.modules
_CUDA = torch.cuda.is_available()
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
_INTERPRETED_IMPORT = not _PREIMPORTED and os.environ.get("TRITON_INTERPRET") == "1"
try:
    triton = pytest.importorskip("triton", reason="triton is not installed")
finally:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS

from convgpt_core import kernels  # noqa: E402
from convgpt_core.compressor import CausalConvPool, ConvCompressor, Geometry, ScaleNorm, fold  # noqa: E402
from convgpt_core.kernels import compress  # noqa: E402
from naive import compress_loops, rms_norm, rope, scale_norm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GEOMETRIES = [(16, 3), (16, 1), (36, 5), (64, 5)]  # (F, k); e = int(sqrt(F)) // 2
TOKENS = [0, 1, 7, 33]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@functools.cache
def _interpreter_works() -> bool:
    """Whether the kernel runs interpreted in this process (see the module docstring)."""
    if _CUDA and not _INTERPRETED_IMPORT:
        return False  # triton's language library was loaded for the compiler
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        kernels.fused_compress(torch.ones(1, 256), torch.ones(256, 64), torch.ones(1), 1e-5)
        return True
    except Exception:  # e.g. "Cannot call @triton.jit'd outside of the scope of a kernel"
        return False
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture
def interp(monkeypatch):
    if not _interpreter_works():
        pytest.skip("triton was imported before TRITON_INTERPRET=1; covered by the fresh-process test")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@functools.cache
def _case(F: int, k: int, n: int = 33, seed: int = 0):
    """x (n, H), conv weight, g: all exactly representable in bfloat16 (float64 tensors),
    and the float64 reference output from the explicit loops in tests/naive.py."""
    geom = Geometry.from_values(F * F, k)
    gen = torch.Generator().manual_seed(seed + 100 * F + k)
    x = torch.randn(n, F * F, generator=gen).to(torch.bfloat16).double()
    w = (torch.randn(F, F, 1, k, generator=gen) * 0.1).to(torch.bfloat16).double()
    g = torch.tensor([1.75], dtype=torch.float64)
    want = scale_norm(compress_loops(x, w, geom.e), g)
    return geom, x, w, g, want


def _folded(w, geom, dtype, device="cpu"):
    """M.T (H x D), what CausalConvPool.refresh_fold stores for the kernel."""
    return fold(w, geom, torch.float32).T.contiguous().to(device, dtype)


def _run(x, w, g, geom, dtype, **kw):
    """fused_compress into a NaN-filled output buffer, so unwritten elements show."""
    out = torch.full((*x.shape[:-1], geom.D), float("nan"), dtype=dtype)
    got = kernels.fused_compress(x.to(dtype), _folded(w, geom, dtype), g.to(dtype), 1e-5, out=out, **kw)
    assert got is out and got.dtype == dtype and got.shape == (*x.shape[:-1], geom.D)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("F,k", GEOMETRIES)
def test_matches_float64_loops(interp, F, k, T, dtype):
    geom, x, w, g, want = _case(F, k)
    got = _run(x[:T], w, g, geom, dtype)
    assert bool(torch.isfinite(got).all())
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want[:T], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_leading_shape(interp, dtype):
    geom, x, w, g, want = _case(36, 5)
    got = _run(x[:6].reshape(2, 3, -1), w, g, geom, dtype)
    assert bool(torch.isfinite(got).all())
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want[:6].reshape(2, 3, -1), rtol=tol, atol=tol)
    # no out buffer, and a strided (non-contiguous) view of the tokens
    strided = x[:12].reshape(2, 6, -1)[:, ::2]
    assert not strided.is_contiguous()
    y = kernels.fused_compress(strided.to(dtype), _folded(w, geom, dtype), g.to(dtype), 1e-5)
    torch.testing.assert_close(y.double(), want[:12].reshape(2, 6, -1)[:, ::2], rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "opts",
    [
        dict(split_d=False),  # D = 144 padded to 256 instead of 128 + 16
        dict(block_t=32, block_h=128),  # H = 1296 leaves a remainder of 16 in the last chunk
        dict(block_t=64, block_h=32, num_warps=8, num_stages=2),
    ],
    ids=["padded-d", "bt32-bh128", "bt64-bh32"],
)
def test_tile_options(interp, opts):
    geom, x, w, g, want = _case(36, 5)
    got = _run(x, w, g, geom, torch.float32, **opts)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_d_blocks():
    assert kernels._d_blocks(144) == (128, 16)
    assert kernels._d_blocks(144, split_d=False) == (256, 0)
    assert kernels._d_blocks(64) == (64, 0)
    assert kernels._d_blocks(256) == (256, 0)
    assert kernels._d_blocks(100) == (128, 0)  # 64 + 64 saves nothing


def test_scale_norm_clamp(interp):
    geom, _, w, g, _ = _case(16, 3)
    x = torch.full((3, 256), 1e-12, dtype=torch.float64)
    got = _run(x, w, g, geom, torch.float32)
    want = compress_loops(x, w, geom.e) / 1e-5 * g
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-12)


def test_fold_buffer_is_rebuilt_after_loading():
    """The conv owns M.T as a buffer: absent until refresh_fold (the torch path runs), rebuilt
    from the current weight by the next refresh, never part of the state dict."""
    geom, x, w64, g, want = _case(16, 3)
    conv = CausalConvPool(geom, dtype=torch.float32)
    assert conv.folded_t is None and "folded_t" not in conv.state_dict()
    with torch.no_grad():
        conv.weight.copy_(w64)
    conv.refresh_fold(torch.float32)
    assert conv.folded_t.shape == (geom.H, geom.D) and conv.folded_t.dtype == torch.float32
    torch.testing.assert_close(conv.folded_t, fold(w64, geom, torch.float32).T)
    conv.refresh_fold(torch.bfloat16)
    assert conv.folded_t.dtype == torch.bfloat16
    with torch.no_grad():
        conv.weight.mul_(2)
    conv.refresh_fold(torch.float32)
    torch.testing.assert_close(conv.folded_t, 2 * fold(w64, geom, torch.float32).T)
    assert "folded_t" not in conv.state_dict()


def test_after_loading_fills_the_table_and_folds():
    from convgpt_core.compressor import after_loading, compressed_table

    geom, x, w64, g, want = _case(16, 3)
    conv, norm = CausalConvPool(geom, dtype=torch.float32), ScaleNorm(dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_(w64)
        norm.g.copy_(g)
    emb = x.float()
    table = torch.full((emb.shape[0], geom.D), float("nan"))
    after_loading(conv, norm, emb, table)
    torch.testing.assert_close(table, compressed_table(emb, conv.weight, norm.g, geom))
    torch.testing.assert_close(table.double(), want, rtol=1e-5, atol=1e-5)
    assert conv.folded_t is not None


def test_available(monkeypatch):
    x = torch.zeros(2, 256)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.fused_compress_available(x)  # CPU, no interpreter: torch path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.fused_compress_available(x)
    assert kernels.fused_compress_available(x.bfloat16())
    assert not kernels.fused_compress_available(x.double())  # no float64 dot: torch path
    monkeypatch.setattr(kernels, "triton", None)
    assert not kernels.triton_available() and not kernels.fused_compress_available(x)


def _recording_compressor(monkeypatch):
    geom, x, w, g, want = _case(16, 3)
    conv, norm = CausalConvPool(geom, dtype=torch.float32), ScaleNorm(dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_(w)
        norm.g.copy_(g)
    conv.refresh_fold(torch.float32)
    calls = []
    real = kernels.fused_compress

    def recording(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "fused_compress", recording)
    return conv, norm, x.float(), want, calls


def test_compress_dispatch_interpreter(interp, monkeypatch):
    conv, norm, x, want, calls = _recording_compressor(monkeypatch)
    got = compress(x[:5], conv, norm)
    assert calls == [torch.Size([5, 256])]
    torch.testing.assert_close(got.double(), want[:5], rtol=1e-5, atol=1e-5)
    compress(x[:5].double(), conv, norm)  # float64 keeps the torch path
    assert len(calls) == 1
    conv.folded_t = None  # not folded (not loaded through after_loading): the torch path
    torch.testing.assert_close(compress(x[:5], conv, norm).double(), want[:5], rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def test_compress_dispatch_torch_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    conv, norm, x, want, calls = _recording_compressor(monkeypatch)
    got = compress(x[:5], conv, norm)
    assert calls == []
    torch.testing.assert_close(got.double(), want[:5], rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_uses_custom_op(interp):
    """vLLM compiles the model forward: the kernel must be opaque to Dynamo."""
    geom, x, w, g, want = _case(16, 3)
    comp = ConvCompressor(geom, dtype=torch.float32)
    comp.load_state_dict({"conv.weight": w.float(), "norm_emb.g": g.float()})
    comp.conv.refresh_fold(torch.float32)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: compress(t, comp.conv, comp.norm_emb), fullgraph=True, backend="aot_eager")
    for n in (4, 9):
        torch.testing.assert_close(fn(x[:n].float()).double(), want[:n], rtol=1e-5, atol=1e-5)


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from convgpt_core import kernels\n"
        "assert not kernels.triton_available()\n"
        "assert not kernels.fused_compress_available(torch.zeros(1, 4))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_kernels_in_fresh_interpreter_process():
    if _interpreter_works():
        pytest.skip("the interpreter works in this process: the tests above ran here")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "passed" in summary and "failed" not in summary, proc.stdout[-6000:]


# --------------------------------------------------------------------------------------
# On the GPU (compiled kernel; skipped on CPU-only machines)


@pytest.fixture
def gpu(monkeypatch):
    if not _CUDA:
        pytest.skip("no CUDA device")
    if _INTERPRETED_IMPORT:
        pytest.skip("triton was imported for the interpreter; the GPU tests run in the parent process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("F,k", GEOMETRIES)
def test_gpu_matches_float64_loops(gpu, F, k, T, dtype):
    geom, x, w, g, want = _case(F, k)
    dev = "cuda"
    out = torch.full((T, geom.D), float("nan"), dtype=dtype, device=dev)
    got = kernels.fused_compress(x[:T].to(dev, dtype), _folded(w, geom, dtype, dev), g.to(dev, dtype), 1e-5, out=out)
    assert bool(torch.isfinite(got).all())
    tol = TOL[dtype]  # float32 must stay exact (input_precision="ieee", no TF32)
    torch.testing.assert_close(got.double().cpu(), want[:T], rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [5000, 20000])  # the heuristic picks 32- and 128-token tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_many_tokens(gpu, T, dtype):
    geom, _, w, g, _ = _case(36, 5)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, geom.H, generator=gen).to(torch.bfloat16).double()
    want = scale_norm(compress_loops(x, w, geom.e), g)
    got = kernels.fused_compress(x.to("cuda", dtype), _folded(w, geom, dtype, "cuda"), g.to("cuda", dtype), 1e-5)
    tol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "opts",
    [dict(split_d=False), dict(block_t=32, block_h=128), dict(block_t=128, block_h=32, num_warps=8, num_stages=4)],
    ids=["padded-d", "bt32-bh128", "bt128-bh32"],
)
def test_gpu_tile_options(gpu, opts):
    geom, x, w, g, want = _case(36, 5)
    got = kernels.fused_compress(x.to("cuda", torch.bfloat16), _folded(w, geom, torch.bfloat16, "cuda"),
                                 g.to("cuda", torch.bfloat16), 1e-5, **opts)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=2e-2)


def test_gpu_compress_under_torch_compile(gpu):
    geom, x, w, g, want = _case(36, 5)
    comp = ConvCompressor(geom, dtype=torch.bfloat16).cuda()
    comp.load_state_dict({"conv.weight": w.bfloat16(), "norm_emb.g": g.bfloat16()})
    comp.conv.refresh_fold(torch.bfloat16)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: compress(t, comp.conv, comp.norm_emb), fullgraph=True)
    for n in (4, 33):
        got = fn(x[:n].to("cuda", torch.bfloat16))
        torch.testing.assert_close(got.double().cpu(), want[:n], rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------
# norm_linear: residual add + RMSNorm + the linear after it (+ SwiGLU), one kernel

from convgpt_core import norm_linear as nl  # noqa: E402


def _nl_reference(x, r, nw, eps, w, swiglu):
    """float64, written from SPEC.md's decoder layer: s = x + r; RMSNorm(s) * weight; the
    linear; SiLU(gate) * up for the merged gate/up weight (gate rows first)."""
    s = x if r is None else x + r
    h = s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps) * nw
    y = h @ w.T
    if swiglu:
        n = w.shape[0] // 2
        gate, up = y[..., :n], y[..., n:]
        y = gate / (1 + torch.exp(-gate)) * up
    return y, s


@functools.cache
def _nl_case(M: int, K: int, N: int, swiglu: bool, seed: int = 0):
    """Inputs exactly representable in bfloat16 (float64 tensors) and the float64 result."""
    gen = torch.Generator().manual_seed(seed + M * 7 + K * 13 + N)
    rows = 2 * N if swiglu else N
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16).double()
    r = (torch.randn(M, K, generator=gen) * 3).to(torch.bfloat16).double()
    nw = (1 + 0.3 * torch.randn(K, generator=gen)).to(torch.bfloat16).double()
    w = (torch.randn(rows, K, generator=gen) * K**-0.5).to(torch.bfloat16).double()
    return x, r, nw, w


NL_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _nl_check(dtype, device, M, K, N, swiglu, residual, **tiles):
    x, r, nw, w = _nl_case(M, K, N, swiglu)
    want_y, want_s = _nl_reference(x, r if residual else None, nw, 1e-6, w, swiglu)
    to = dict(device=device, dtype=dtype)
    y, s = nl.norm_linear_triton(x.to(**to), r.to(**to) if residual else None, nw.to(**to), 1e-6, w.to(**to),
                                 swiglu, **tiles)
    assert y.shape == (M, N) and y.dtype == dtype and bool(torch.isfinite(y).all())
    tol = NL_TOL[dtype]
    torch.testing.assert_close(y.double().cpu(), want_y, rtol=tol, atol=tol)
    if residual:  # the stream is stored in the model dtype, rounded as torch rounds the sum
        want = x.to(dtype) + r.to(dtype)
        if device == "cuda":
            assert torch.equal(s.cpu(), want)
        else:  # Triton's interpreter casts float32 to bfloat16 by truncation: one unit off
            torch.testing.assert_close(s, want, rtol=2**-7, atol=0)
    else:
        assert s is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("swiglu", [False, True], ids=["linear", "swiglu"])
@pytest.mark.parametrize("residual", [True, False], ids=["add", "noadd"])
@pytest.mark.parametrize("M,K,N", [(1, 144, 96), (7, 64, 48), (33, 144, 80), (70, 256, 40)])
def test_norm_linear_matches_float64(interp, M, K, N, swiglu, residual, dtype):
    _nl_check(dtype, "cpu", M, K, N, swiglu, residual)


@pytest.mark.parametrize("tiles", [dict(block_m=32, block_n=16), dict(block_m=16, block_n=64, num_warps=8)],
                         ids=["m32-n16", "m16-n64"])
def test_norm_linear_tile_options(interp, tiles):
    _nl_check(torch.float32, "cpu", 33, 144, 80, True, True, **tiles)


def test_norm_linear_tiles_spread_decode_rows_over_the_gpu():
    # a decode step's few rows: narrow column blocks, so q+k+v (4096 columns) and gate/up
    # (3072) give 96-128 programs, most of an H100's / H200's 132 SMs
    for M in (1, 8, 16):
        for N, swiglu in ((4096, False), (3072, True)):
            bm, bn, _ = nl._tiles(M, swiglu)
            assert bm == 16 and triton.cdiv(N, bn) >= 96


def test_norm_linear_rejects_mismatched_shapes(interp):
    x, r, nw, w = _nl_case(3, 144, 40, True)
    f = torch.float32
    with pytest.raises(ValueError, match="do not fit"):
        nl.norm_linear_triton(x.to(f)[:, :100], None, nw.to(f), 1e-6, w.to(f))
    with pytest.raises(ValueError, match="do not fit"):
        nl.norm_linear_triton(x.to(f), r.to(f)[:2], nw.to(f), 1e-6, w.to(f))
    with pytest.raises(ValueError, match="gate and up"):
        nl.norm_linear_triton(x.to(f), None, nw.to(f), 1e-6, w.to(f)[:79], swiglu=True)


def test_norm_linear_dispatch(monkeypatch):
    x, r, nw, w = _nl_case(5, 144, 40, True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not nl.norm_linear_available(x.float(), w.float())  # CPU without the interpreter
    want_y, want_s = _nl_reference(x, r, nw, 1e-6, w, True)
    y, s = nl.norm_linear(x, r, nw, 1e-6, w, swiglu=True)  # float64: the torch path
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(s, want_s)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert nl.norm_linear_available(x.float(), w.float()) == kernels.triton_available()
    assert not nl.norm_linear_available(x.float(), w.bfloat16())  # weight in another dtype
    assert not nl.norm_linear_available(torch.zeros(2, 1024), torch.zeros(8, 1024))  # rows too wide
    many = torch.zeros(nl.MAX_ROWS + 1, 144)
    assert not nl.norm_linear_available(many, w.float())  # prefill-sized: the unfused kernels
    assert not nl.norm_linear_available(many[:9], w.float(), max_rows=8)
    assert nl.norm_linear_available(many, w.float(), max_rows=None) == kernels.triton_available()


def _record_runs(monkeypatch, module, *names, calls=None):
    """Record (name, rows) in ``calls`` (a new list by default) for each call of ``module``'s
    functions ``names`` that runs (not while torch.compile traces through them)."""
    calls = [] if calls is None else calls

    def recorded(name, fn):
        def run(*a, **k):
            if not torch.compiler.is_compiling():
                calls.append((name, a[0].shape[0]))
            return fn(*a, **k)
        return run

    for name in names:
        monkeypatch.setattr(module, name, recorded(name, getattr(module, name)))
    return calls


def test_norm_linear_rows_pick_kernel_or_torch(interp, monkeypatch):
    """Decode-sized inputs run the kernel, larger ones torch's ops; both give the result."""
    calls = _record_runs(monkeypatch, nl, "norm_linear_triton")
    for M in (nl.MAX_ROWS, nl.MAX_ROWS + 1):
        x, r, nw, w = _nl_case(M, 144, 40, True)
        f = torch.float32
        y, s = nl.norm_linear(x.to(f), r.to(f), nw.to(f), 1e-6, w.to(f), swiglu=True)
        want_y, want_s = _nl_reference(x, r, nw, 1e-6, w, True)
        torch.testing.assert_close(y.double(), want_y, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(s.double(), want_s)
    assert calls == [("norm_linear_triton", nl.MAX_ROWS)]


def _one_graph_for_every_size(fn, inputs):
    """``fn`` compiled once, as vLLM compiles its model (rows dynamic), run on every input in
    turn; a recompilation for another size fails."""
    outs = []
    for i, args in enumerate(inputs):
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            outs.append(fn(*args))
    return outs


@pytest.mark.parametrize("residual", [True, False], ids=["add", "first-layer"])
def test_norm_linear_under_torch_compile(interp, monkeypatch, residual):
    """Inside vLLM's compiled forward (one graph for every batch size, its guards not checked):
    the op chooses by rows when it runs, the kernel for decode sizes and torch's unfused ops
    above MAX_ROWS; all match float64."""
    calls = _record_runs(monkeypatch, nl, "norm_linear_triton", "norm_linear_torch")
    x, r, nw, w = _nl_case(nl.MAX_ROWS + 3, 144, 40, True)
    f = torch.float32
    torch._dynamo.reset()
    fn = torch.compile(lambda a, *b: nl.norm_linear(a, b[0] if b else None, nw.to(f), 1e-6, w.to(f), True),
                       fullgraph=True, backend="aot_eager")
    sizes = (4, nl.MAX_ROWS + 3, 9, nl.MAX_ROWS)
    outs = _one_graph_for_every_size(fn, [(x[:m].to(f), r[:m].to(f)) if residual else (x[:m].to(f),) for m in sizes])
    for m, (y, s) in zip(sizes, outs):
        want_y, want_s = _nl_reference(x[:m], r[:m] if residual else None, nw, 1e-6, w, True)
        torch.testing.assert_close(y.double(), want_y, rtol=2e-5, atol=2e-5)
        if residual:
            torch.testing.assert_close(s.double(), want_s)
        else:
            assert s is None
    assert calls == [("norm_linear_triton" if m <= nl.MAX_ROWS else "norm_linear_torch", m) for m in sizes]


# --------------------------------------------------------------------------------------
# norm_linear with the q/k norm and RoPE in its epilogue (the q+k+v site)

THETA = 10000.0


@functools.cache
def _rope_case(M: int, hd: int, q_heads: int, kv_heads: int, max_pos: int = 512, seed: int = 3):
    """q/k norm weights (bfloat16-exact float64), M positions and the cos | sin table the engines
    hand over (float64 here; rounded to the tested dtype by the caller)."""
    gen = torch.Generator().manual_seed(seed + M + hd * 3 + q_heads * 5 + kv_heads)
    qw = (1 + 0.3 * torch.randn(hd, generator=gen)).to(torch.bfloat16).double()
    kw = (1 + 0.3 * torch.randn(hd, generator=gen)).to(torch.bfloat16).double()
    pos = torch.randint(0, max_pos, (M,), generator=gen)
    inv = THETA ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return qw, kw, pos, torch.cat((ang.cos(), ang.sin()), dim=-1)


def _qk_rope_reference(qkv, qw, kw, eps, pos, q_heads, kv_heads):
    """SPEC.md's attention inputs in float64 (tests/naive.py): q_norm / k_norm per head, then
    neox RoPE at each token's position; v as it is."""
    heads = qkv.reshape(qkv.shape[0], -1, qw.shape[0])
    q = rope(rms_norm(heads[:, :q_heads], qw, eps), pos, THETA)
    k = rope(rms_norm(heads[:, q_heads:q_heads + kv_heads], kw, eps), pos, THETA)
    return torch.cat((q, k, heads[:, q_heads + kv_heads:]), dim=1).reshape(qkv.shape)


def _qk_rope(M, hd, q_heads, kv_heads, table=None, **to):
    """The QKRope of :func:`_rope_case` in ``to``'s dtype, its cos | sin table in ``table``'s if given."""
    qw, kw, pos, cs = _rope_case(M, hd, q_heads, kv_heads)
    return nl.QKRope(qw.to(**to), kw.to(**to), 1e-6, cs.to(to.get("device"), table or to["dtype"]),
                     pos.to(to.get("device", "cpu")), q_heads, kv_heads)


def _rope_check(run, dtype, device, M, K, hd, q_heads, kv_heads, residual=True, tol=None, table=None):
    """``run(x, r, nw, eps, w, rope)`` (one of norm_linear's entry points) against float64."""
    x, r, nw, w = _nl_case(M, K, (q_heads + 2 * kv_heads) * hd, False)
    qw, kw, pos, _ = _rope_case(M, hd, q_heads, kv_heads)
    qkv, want_s = _nl_reference(x, r if residual else None, nw, 1e-6, w, False)
    want = _qk_rope_reference(qkv, qw, kw, 1e-6, pos, q_heads, kv_heads)
    to = dict(device=device, dtype=dtype)
    y, s = run(x.to(**to), r.to(**to) if residual else None, nw.to(**to), 1e-6, w.to(**to),
               _qk_rope(M, hd, q_heads, kv_heads, table, **to))
    tol = tol or NL_TOL[dtype]
    assert y.shape == want.shape and y.dtype == dtype
    torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol)
    if residual:
        torch.testing.assert_close(s.double().cpu(), want_s, rtol=2**-7, atol=0)


ROPE_SHAPES = [  # (M, K, head_dim, q heads, kv heads): GQA, MHA, a head whose half (12) is no power of two
    (1, 144, 32, 4, 2), (7, 64, 16, 2, 2), (33, 144, 24, 3, 1), (70, 96, 32, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["add", "noadd"])
@pytest.mark.parametrize("M,K,hd,nq,nkv", ROPE_SHAPES)
def test_norm_linear_rope_matches_float64(interp, M, K, hd, nq, nkv, residual, dtype):
    _rope_check(lambda *a: nl.norm_linear_triton(*a[:5], rope=a[5]), dtype, "cpu", M, K, hd, nq, nkv, residual)


@pytest.mark.parametrize("M,K,hd,nq,nkv", ROPE_SHAPES[:2])
def test_norm_linear_rope_float32_table_in_a_16bit_model(interp, M, K, hd, nq, nkv):
    """SGLang keeps its cos | sin table in float32 under a bfloat16 model: the kernel reads that
    table after its GEMM (LATE_CS) and matches float64 as with a table of the model's dtype."""
    _rope_check(lambda *a: nl.norm_linear_triton(*a[:5], rope=a[5]), torch.bfloat16, "cpu", M, K, hd, nq, nkv,
                table=torch.float32)


def test_norm_linear_rope_unfused_path_matches_float64():
    """Past MAX_ROWS, and in the graphs graph_pass rewrites: torch's ops, exact in float64."""
    _rope_check(lambda *a: nl.norm_linear_torch(*a[:5], rope=a[5]), torch.float64, "cpu", nl.MAX_ROWS + 5, 144,
                24, 3, 1, tol=1e-12)


def test_norm_linear_rope_rows_pick_kernel_or_torch(interp, monkeypatch):
    calls = _record_runs(monkeypatch, nl, "norm_linear_triton", "norm_linear_torch")
    for M in (nl.MAX_ROWS, nl.MAX_ROWS + 1):
        _rope_check(lambda *a: nl.norm_linear(*a[:5], rope=a[5]), torch.float32, "cpu", M, 64, 16, 2, 1)
    assert calls == [("norm_linear_triton", nl.MAX_ROWS), ("norm_linear_torch", nl.MAX_ROWS + 1)]


def test_norm_linear_rope_under_torch_compile(interp, monkeypatch):
    """``convgpt::norm_linear_rope`` in one graph for every size, choosing by rows at run time."""
    calls = _record_runs(monkeypatch, nl, "norm_linear_triton", "norm_linear_torch")
    big = nl.MAX_ROWS + 3
    x, r, nw, w = _nl_case(big, 64, 64, False)
    qw, kw, pos, cs = _rope_case(big, 16, 2, 1)
    f = torch.float32
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, p: nl.norm_linear(a, b, nw.to(f), 1e-6, w.to(f), rope=nl.QKRope(
        qw.to(f), kw.to(f), 1e-6, cs.to(f), p, 2, 1)), fullgraph=True, backend="aot_eager")
    sizes = (4, big, 9)
    outs = _one_graph_for_every_size(fn, [(x[:m].to(f), r[:m].to(f), pos[:m]) for m in sizes])
    for m, (y, _) in zip(sizes, outs):
        qkv, _ = _nl_reference(x[:m], r[:m], nw, 1e-6, w, False)
        want = _qk_rope_reference(qkv, qw, kw, 1e-6, pos[:m], 2, 1)
        torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5)
    assert calls == [("norm_linear_triton" if m <= nl.MAX_ROWS else "norm_linear_torch", m) for m in sizes]


def test_norm_linear_rope_rejects_what_does_not_fit(interp):
    x, r, nw, w = _nl_case(3, 64, 64, False)  # 64 columns: 2 q + 2 x 1 kv heads of 16
    f = torch.float32
    good = _qk_rope(3, 16, 2, 1, dtype=f)
    with pytest.raises(ValueError, match="heads of 16 do not fit 64"):
        nl.norm_linear_triton(x.to(f), None, nw.to(f), 1e-6, w.to(f), rope=good._replace(q_heads=3))
    with pytest.raises(ValueError, match="positions"):
        nl.norm_linear_triton(x.to(f), None, nw.to(f), 1e-6, w.to(f), rope=good._replace(positions=good.positions[:2]))
    with pytest.raises(ValueError, match="cos/sin rows"):
        nl.norm_linear_triton(x.to(f), None, nw.to(f), 1e-6, w.to(f), rope=good._replace(cos_sin=good.cos_sin[:, :8]))
    with pytest.raises(ValueError, match="not a SwiGLU"):
        nl.norm_linear_triton(x.to(f), None, nw.to(f), 1e-6, w.to(f), swiglu=True, rope=good)


# --------------------------------------------------------------------------------------
# the q+k+v kernel writing k and v into an engine's KV cache (KVStore)


def _kv_cache(rows: int, kv_heads: int, hd: int, dtype, seed: int = 7, layout: str = "split", device="cpu"):
    """A k and a v cache as an engine holds them, one slot per row, filled with what earlier
    tokens left (noise), in one buffer: "split" holds a slot's k heads, then its v heads
    (SGLang's two buffers are each a [slots, heads, head_dim] block), "side_by_side" each head's
    k then v (vLLM's FlashAttention cache in its NHD layout), so heads are strided too."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "split":
        full = torch.randn(rows, 2, kv_heads, hd, generator=gen).to(device, dtype)
        return full[:, 0], full[:, 1]
    full = torch.randn(rows, kv_heads, 2 * hd, generator=gen).to(device, dtype)
    return full[..., :hd], full[..., hd:]


def _kv_slots(M: int, cache_rows: int) -> torch.Tensor:
    """M distinct cache rows in no order, the middle one -1 (a padded row, as engines mark them)."""
    slots = torch.randperm(cache_rows, generator=torch.Generator().manual_seed(M))[:M]
    if M > 1:
        slots[M // 2] = -1
    return slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["split", "side_by_side"])
@pytest.mark.parametrize("M, K, hd, nq, nkv, short, q_apart", [(1, 144, 32, 4, 2, 0, False), (7, 64, 16, 2, 2, 2, True),
                                                               (33, 144, 24, 3, 1, 0, True)])
def test_norm_linear_writes_k_and_v_into_the_kv_cache(interp, M, K, hd, nq, nkv, short, q_apart, layout, dtype):
    """With a KVStore the q+k+v kernel also writes each row's k heads (normalised and rotated)
    and v heads into the cache row its slot names: the model's k and v (float64 reference),
    bit for bit what the kernel returns for attention.  A padded row (slot -1), the rows past
    the last slot (``short`` of them) and every other cache row are left as they were.  With
    ``q_apart`` the q heads come as a contiguous tensor and the k and v heads as another."""
    _kv_check("cpu", dtype, M, K, hd, nq, nkv, layout, short, q_apart)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["split", "side_by_side"])
@pytest.mark.parametrize("q_apart", [False, True])
@pytest.mark.parametrize("M", [1, 64, 256])
def test_gpu_norm_linear_writes_k_and_v_into_the_kv_cache(gpu, M, q_apart, layout, dtype):
    # the published q+k+v (16 q and 8 kv heads of 128 from D = 144), with PDL up to its row limit
    _kv_check("cuda", dtype, M, 144, 128, 16, 8, layout, short=M // 8, q_apart=q_apart)


def _kv_check(device, dtype, M, K, hd, nq, nkv, layout="split", short=0, q_apart=False):
    x, r, nw, w = _nl_case(M, K, (nq + 2 * nkv) * hd, False)
    qw, kw, pos, _ = _rope_case(M, hd, nq, nkv)
    qkv, _ = _nl_reference(x, r, nw, 1e-6, w, False)
    want = _qk_rope_reference(qkv, qw, kw, 1e-6, pos, nq, nkv).reshape(M, -1, hd)
    cache_rows = 3 * M + 4
    kc, vc = _kv_cache(cache_rows, nkv, hd, dtype, layout=layout, device=device)
    old_k, old_v = kc.clone(), vc.clone()
    slots = _kv_slots(M, cache_rows)[:M - short].to(device)
    to = dict(device=device, dtype=dtype)
    y, _ = nl.norm_linear_triton(x.to(**to), r.to(**to), nw.to(**to), 1e-6, w.to(**to),
                                 rope=_qk_rope(M, hd, nq, nkv, **to), kv=nl.KVStore(kc, vc, slots), q_apart=q_apart)
    if q_apart:
        assert isinstance(y, nl.QKV) and y.q.is_contiguous() and y.q.shape == (M, nq * hd)
        q, k, v = nl.split_qkv(y, nq * hd, nkv * hd)
        assert k.shape == v.shape == (M, nkv * hd)
        y = torch.cat((q, k, v), dim=-1)
    heads = y.reshape(M, -1, hd)
    torch.testing.assert_close(heads.double().cpu(), want, rtol=NL_TOL[dtype], atol=NL_TOL[dtype])
    live = slots >= 0
    assert torch.equal(kc[slots[live]], heads[:M - short][live, nq:nq + nkv])
    assert torch.equal(vc[slots[live]], heads[:M - short][live, nq + nkv:])
    untouched = torch.ones(cache_rows, dtype=torch.bool, device=device)
    untouched[slots[live]] = False
    assert torch.equal(kc[untouched], old_k[untouched]) and torch.equal(vc[untouched], old_v[untouched])


def test_norm_linear_kv_store_rejects_what_does_not_fit(interp):
    x, _, nw, w = _nl_case(3, 64, 64, False)  # 64 columns: 2 q + 2 x 1 kv heads of 16
    f = torch.float32
    rope = _qk_rope(3, 16, 2, 1, dtype=f)
    kc, vc = _kv_cache(8, 1, 16, f)
    good = nl.KVStore(kc, vc, torch.arange(3))

    def run(kv, rope=rope):
        nl.norm_linear_triton(x.to(f), None, nw.to(f), 1e-6, w.to(f), rope=rope, kv=kv)

    with pytest.raises(ValueError, match="needs the q/k norm"):
        run(good, rope=None)
    with pytest.raises(ValueError, match=r"k_cache \(8, 2, 8\).*\[rows, 1, 16\]"):
        run(good._replace(k_cache=torch.zeros(8, 2, 8)))
    with pytest.raises(ValueError, match="v_cache holds torch.bfloat16"):
        run(good._replace(v_cache=vc.to(torch.bfloat16)))
    with pytest.raises(ValueError, match=r"v_cache \(5, 1, 16\).*differ"):
        run(good._replace(v_cache=vc[:5]))
    with pytest.raises(ValueError, match=r"strides \(32, 16, 1\).*differ"):
        run(good._replace(k_cache=kc.contiguous()))
    with pytest.raises(ValueError, match="4 slots"):
        run(good._replace(slots=torch.arange(4)))
    with pytest.raises(ValueError, match="torch.float32"):
        run(good._replace(slots=torch.arange(3.0)))


def test_fused_decoder_layer_hands_the_kv_cache_to_the_kernel_where_it_runs(interp, monkeypatch):
    """The adapters' layer asks for the KV store only where its q+k+v kernel runs with the q/k
    norm and RoPE (eagerly, up to MAX_ROWS rows): there the kernel writes k and v and attention
    is told so (``stored``), and gets the q heads as a tensor of their own (unless
    ``CONVGPT_Q_APART=0``); a larger step leaves the cache to attention and never asks."""
    layer = _Layer(nl.MAX_ROWS + 1, (16, 2, 1), 32, 48, device="cpu", dtype=torch.float32)
    kc, vc = _kv_cache(2 * nl.MAX_ROWS + 8, 1, 16, torch.float32)
    asked, told = [], []
    layer.attend_seen = told
    for m in (3, nl.MAX_ROWS + 1):
        slots = _kv_slots(m, kc.shape[0])
        layer.store = lambda m=m, slots=slots: asked.append(m) or nl.KVStore(kc, vc, slots)
        y, s = layer(*layer.inputs(m))
        layer.assert_matches(m, y, s, 1e-4)
        if m == 3:  # the cache holds the step's k and v (float64 reference via the layer's q+k+v)
            want = layer.qkv_reference(m)[0].reshape(m, -1, 16)
            live = slots >= 0
            torch.testing.assert_close(kc[slots[live]].double(), want[live, 2:3], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(vc[slots[live]].double(), want[live, 3:], rtol=1e-4, atol=1e-4)
    assert asked == [3] and told == [(3, True, True), (nl.MAX_ROWS + 1, False)]
    monkeypatch.setenv("CONVGPT_Q_APART", "0")
    told.clear()
    layer.store = lambda: nl.KVStore(kc, vc, _kv_slots(3, kc.shape[0]))
    layer.assert_matches(3, *layer(*layer.inputs(3)), 1e-4)
    assert told == [(3, True)]
    monkeypatch.delenv("CONVGPT_Q_APART")
    monkeypatch.setenv("CONVGPT_KV_STORE", "0")
    assert not nl.kv_store_on()
    monkeypatch.delenv("CONVGPT_KV_STORE")
    assert nl.kv_store_on()


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu", "gpu"])
def test_linear_q_apart_writes_q_heads_as_a_tensor_of_their_own(device, monkeypatch):
    """SGLang's large steps: the q+k+v GEMM as two, the q heads into a contiguous tensor and the
    k and v heads after it (what attention takes without copying q), equal to x @ W.T computed in
    float64; from Q_APART_MIN_ROWS rows on, eagerly, unless CONVGPT_Q_APART=0."""
    if device == "cuda" and not _CUDA:
        pytest.skip("no CUDA device")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    M, K, q_width, kv = 37, 144, 256, 128
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(M, K, generator=gen, dtype=torch.float64), torch.randn(q_width + 2 * kv, K, generator=gen, dtype=torch.float64)
    out = nl.linear_q_apart(x.to(device, dtype), w.to(device, dtype), q_width)
    assert isinstance(out, nl.QKV) and out.q.is_contiguous() and out.kv.is_contiguous()
    assert out.q.data_ptr() + M * q_width * out.q.element_size() == out.kv.data_ptr()  # one buffer, q first
    q, k, v = nl.split_qkv(out, q_width, kv)
    want = x @ w.T
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.25)
    for got, cols in ((q, slice(0, q_width)), (k, slice(q_width, q_width + kv)), (v, slice(q_width + kv, None))):
        torch.testing.assert_close(got.double().cpu(), want[:, cols], **tol)
    with pytest.raises(ValueError, match="q apart"):
        nl.linear_q_apart(x.to(device, dtype), w.to(device, dtype), q_width + 2 * kv)
    assert nl.q_apart_linear_on(nl.Q_APART_MIN_ROWS) and not nl.q_apart_linear_on(nl.Q_APART_MIN_ROWS - 1)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not nl.q_apart_linear_on(nl.Q_APART_MIN_ROWS)
    monkeypatch.setenv("CONVGPT_Q_APART", "0")
    assert not nl.q_apart_linear_on(nl.Q_APART_MIN_ROWS)


class _Caches:
    """An engine's KV caches as the q+k+v op reaches them (``nl.KVCaches``): one layer's cache
    (vLLM's FlashAttention layout), named by the layer's q+k+v weight.  ``kernel``: it hands the
    kernel a KVStore; else it writes k and v itself, as the engine's write would.  Logs what
    it was asked."""

    def __init__(self, layer: "_Layer", kernel: bool):
        self.layer, self.kernel, self.log, self.slots, self.used = layer, kernel, [], {}, 0
        self.kc, self.vc = _kv_cache(6 * layer.x.shape[0] + 8, layer.nkv, layer.hd, layer.to["dtype"],
                                     layout="side_by_side", device=layer.to["device"])

    def _slots(self, weight, rows):
        """Each step's slots from cache rows no earlier step had, so that every step's rows stay."""
        assert weight.data_ptr() == self.layer.p[1].data_ptr()  # the layer's q+k+v weight
        if rows not in self.slots:
            slots = _kv_slots(rows, 2 * rows + 2)
            self.slots[rows] = torch.where(slots >= 0, slots + self.used, slots).to(self.kc.device)
            self.used += 2 * rows + 2
        return self.slots[rows]

    def store(self, weight, rows):
        self.log.append(("store", rows))
        slots = self._slots(weight, rows)
        return nl.KVStore(self.kc, self.vc, slots) if self.kernel else None

    def write(self, weight, k, v):
        self.log.append(("write", k.shape[0]))
        slots = self._slots(weight, k.shape[0])
        live = slots >= 0
        self.kc[slots[live]], self.vc[slots[live]] = k[live], v[live]

    def assert_holds(self, m: int, tol: float) -> None:
        """The cache rows of the m-row step hold its k and v (float64 reference)."""
        nq, nkv = self.layer.nq, self.layer.nkv
        want = self.layer.qkv_reference(m)[0].reshape(m, -1, self.layer.hd)
        slots = self.slots[m].cpu()
        live = slots >= 0
        k, v = (c.cpu()[slots[live]].double() for c in (self.kc, self.vc))
        torch.testing.assert_close(k, want[live, nq:nq + nkv], rtol=tol, atol=tol)
        torch.testing.assert_close(v, want[live, nq + nkv:], rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-stores", "engine-writes"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_decoder_layer_writes_the_kv_cache_through_the_engines_caches(interp, monkeypatch, kernel, compiled):
    """``kv_cache=True`` (vLLM): the q+k+v op writes the layer's KV cache wherever it runs with
    the q/k norm and RoPE, found through the registered caches at run time: the kernel stores
    k and v where the caches offer a KVStore (up to MAX_ROWS rows), the engine's write takes
    them otherwise.  Compiled, one graph for every size does that at every size; eagerly a
    larger step leaves the cache to attention.  Attention hears ``stored`` accordingly."""
    big = nl.MAX_ROWS + 1
    layer = _Layer(big, (16, 2, 1), 32, 48, device="cpu", dtype=torch.float32)
    caches = _Caches(layer, kernel)
    monkeypatch.setattr(nl, "_KV_CACHES", [caches])
    layer.kv_cache, told = True, []
    sizes = (3, big)
    if compiled:
        torch._dynamo.reset()
        outs = _one_graph_for_every_size(torch.compile(layer, fullgraph=True, backend="aot_eager"),
                                         [layer.inputs(m) for m in sizes])
    else:
        layer.attend_seen = told
        outs = [layer(*layer.inputs(m)) for m in sizes]
    for m, (y, s) in zip(sizes, outs):
        layer.assert_matches(m, y, s, 1e-4)
    small = [("store", 3)] + ([] if kernel else [("write", 3)])
    assert caches.log == small + ([("write", big)] if compiled else [])
    caches.assert_holds(3, 1e-4)
    if compiled:
        caches.assert_holds(big, 1e-4)
    else:
        assert told == [(3, True), (big, False)]


def test_norm_linear_kv_cache_needs_the_engines_caches(interp, monkeypatch):
    x, r, nw, w = _nl_case(3, 64, 64, False)
    f = torch.float32
    monkeypatch.setattr(nl, "_KV_CACHES", [])
    with pytest.raises(RuntimeError, match="needs the engine's KV caches"):
        nl.norm_linear(x.to(f), r.to(f), nw.to(f), 1e-6, w.to(f), rope=_qk_rope(3, 16, 2, 1, dtype=f), kv_cache=True)
    with pytest.raises(ValueError, match="needs the q/k norm"):
        nl.norm_linear(x.to(f), r.to(f), nw.to(f), 1e-6, w.to(f), kv_cache=True)


class _Rotary:
    """The attributes both engines' RotaryEmbedding carry."""

    def __init__(self, hd, rotary_dim=None, neox=True):
        self.head_size, self.rotary_dim, self.is_neox_style = hd, rotary_dim or hd, neox
        self.cos_sin_cache = _rope_case(1, hd, 1, 1)[3].float()


def test_qk_rope_of_takes_whole_head_neox_rotary_only(monkeypatch):
    w = torch.ones(16)
    pos = torch.arange(3)
    got = nl.qk_rope_of((w, 1e-6), w, _Rotary(16), pos, 2, 1)
    assert got is not None and (got.head_dim, got.q_heads, got.kv_heads) == (16, 2, 1)
    assert nl.qk_rope_of((w, 1e-6), w, _Rotary(16, rotary_dim=8), pos, 2, 1) is None  # partial rotary
    assert nl.qk_rope_of((w, 1e-6), w, _Rotary(16, neox=False), pos, 2, 1) is None  # GPT-J style pairs
    assert nl.qk_rope_of((w, 1e-6), w, object(), pos, 2, 1) is None  # no cos/sin table
    monkeypatch.setenv("CONVGPT_QK_ROPE", "0")
    assert nl.qk_rope_of((w, 1e-6), w, _Rotary(16), pos, 2, 1) is None


@pytest.mark.parametrize("residual", [True, False], ids=["add", "first-layer"])
def test_fused_decoder_layer_composes_both_sublayers(interp, residual):
    """What the adapters run per layer: norm1 + q/k/v, attention (a stand-in here), the add,
    norm2 + gate/up + SiLU*mul, down; against the same layer in float64."""
    x, r, nw1, wqkv = _nl_case(5, 144, 288, False)
    _, _, nw2, wgu = _nl_case(5, 144, 40, True)
    wd = _nl_case(5, 40, 144, False)[3]
    f = torch.float32
    attend = lambda qkv, roped, stored: qkv[..., :160] * 0.5  # noqa: E731 - q/k/v -> the heads' output
    o_proj = lambda heads: heads[..., :144] - heads[..., 16:]  # noqa: E731 - back to D wide
    down = lambda act: act @ wd.to(act.dtype).T  # noqa: E731
    y, s = nl.fused_decoder_layer(x.to(f), r.to(f) if residual else None, (nw1.to(f), 1e-6), wqkv.to(f), attend,
                                  o_proj, (nw2.to(f), 1e-6), wgu.to(f), down)
    qkv, s1 = _nl_reference(x, r if residual else None, nw1, 1e-6, wqkv, False)
    act, want_s = _nl_reference(o_proj(attend(qkv, False, False)), s1, nw2, 1e-6, wgu, True)
    torch.testing.assert_close(y.double(), down(act), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("swiglu", [False, True], ids=["linear", "swiglu"])
@pytest.mark.parametrize("M", [1, 16, 100, 256, 2048])
def test_gpu_norm_linear_matches_float64(gpu, M, swiglu, dtype):
    # the published geometry's shapes: D = 144 into q+k+v (4096) or gate/up (2 x 3072)
    _nl_check(dtype, "cuda", M, 144, 3072 if swiglu else 4096, swiglu, True)
    _nl_check(dtype, "cuda", M, 144, 3072 if swiglu else 4096, swiglu, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 16, 64, 100, 192, 256, 2048])
def test_gpu_norm_linear_rope_matches_float64(gpu, M, dtype):
    # the published q+k+v: 16 q and 8 kv heads of 128 from D = 144; 2048 rows: the unfused path
    _rope_check(lambda *a: nl.norm_linear(*a[:5], rope=a[5]), dtype, "cuda", M, 144, 128, 16, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_norm_linear_many_rows_unfused(gpu, dtype):
    """Past MAX_ROWS: torch's add, RMSNorm and GEMM, then the one-pass SiLU*mul kernel."""
    x, r, nw, w = _nl_case(nl.MAX_ROWS * 8 + 5, 144, 3072, True)
    to = dict(device="cuda", dtype=dtype)
    y, s = nl.norm_linear(x.to(**to), r.to(**to), nw.to(**to), 1e-6, w.to(**to), swiglu=True)
    want_y, _ = _nl_reference(x, r, nw, 1e-6, w, True)
    torch.testing.assert_close(y.double().cpu(), want_y, rtol=NL_TOL[dtype], atol=NL_TOL[dtype])
    assert torch.equal(s.cpu(), x.to(dtype) + r.to(dtype))


# --------------------------------------------------------------------------------------
# narrow_linear: the split-K kernel for the linears that write the D-wide stream

from convgpt_core import narrow_linear as nar  # noqa: E402


def _nar_case(M: int, K: int, N: int, seed: int = 1):
    """bfloat16-exact float64 inputs: x (M x K) and the weight (N x K)."""
    gen = torch.Generator().manual_seed(seed + M * 5 + K * 3 + N)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16).double()
    w = (torch.randn(N, K, generator=gen) * K**-0.5).to(torch.bfloat16).double()
    return x, w


def _nar_check(dtype, device, M, K, N, **tiles):
    x, w = _nar_case(M, K, N)
    to = dict(device=device, dtype=dtype)
    y = nar.narrow_linear_triton(x.to(**to), w.to(**to), **tiles)
    assert y.shape == (M, N) and y.dtype == dtype
    tol = NL_TOL[dtype]
    torch.testing.assert_close(y.double().cpu(), x @ w.T, rtol=tol, atol=tol)
    # every tile counter is back at zero for the next call (and the next CUDA graph replay)
    assert not nar._counters(y.device).any()
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 2048, 144), (7, 300, 40), (33, 512, 144), (70, 200, 24)])
def test_narrow_linear_matches_float64(interp, M, K, N, dtype):
    _nar_check(dtype, "cpu", M, K, N)


@pytest.mark.parametrize("tiles", [dict(block_k=64, k_blocks_per_split=1),  # one K slice per program
                                   dict(block_k=32, k_blocks_per_split=3),  # K = 300 in 4 uneven splits
                                   dict(block_m=32, k_blocks_per_split=100)],  # no split: written directly
                         ids=["split-many", "split-uneven", "no-split"])
def test_narrow_linear_split_options(interp, tiles):
    _nar_check(torch.float32, "cpu", 20, 300, 40, **tiles)


def test_narrow_linear_splits_decode_rows_over_the_gpu():
    # one decode row into D = 144 from o_proj (2048) or down (3072): the grid has most of an
    # H100's / H200's 132 SMs, where cuBLAS ran 3 or 9 CTAs
    for K in (2048, 3072):
        bm, bk, kps, _ = nar._tiles(1)
        programs = triton.cdiv(144, nar.BLOCK_N) * triton.cdiv(triton.cdiv(K, bk), kps)
        assert bm == 16 and 64 <= programs <= 2 * 132


def test_narrow_linear_rejects_mismatched_shapes(interp):
    x, w = _nar_case(3, 64, 16)
    with pytest.raises(ValueError, match="do not fit"):
        nar.narrow_linear_triton(x.float()[:, :60], w.float())


def test_narrow_linear_rows_pick_kernel_or_cublas(interp, monkeypatch):
    calls = _record_runs(monkeypatch, nar, "narrow_linear_triton")
    for M in (nar.MAX_ROWS, nar.MAX_ROWS + 1):
        x, w = _nar_case(M, 96, 24)
        torch.testing.assert_close(nar.narrow_linear(x.float(), w.float()).double(), x @ w.T, rtol=2e-5, atol=2e-5)
    assert calls == [("narrow_linear_triton", nar.MAX_ROWS)]
    calls.clear()
    monkeypatch.setattr(nar, "LONG_K", 96)  # a K this long keeps the kernel up to MAX_ROWS_LONG_K rows
    for M, K in ((nar.MAX_ROWS_LONG_K, 96), (nar.MAX_ROWS_LONG_K + 1, 96), (nar.MAX_ROWS + 1, 95)):
        x, w = _nar_case(M, K, 24)
        torch.testing.assert_close(nar.narrow_linear(x.float(), w.float()).double(), x @ w.T, rtol=2e-5, atol=2e-5)
    assert calls == [("narrow_linear_triton", nar.MAX_ROWS_LONG_K)]
    monkeypatch.setenv("CONVGPT_NARROW_LINEAR", "0")  # switched off: cuBLAS (F.linear) at any size
    assert not nar.narrow_linear_available(x.float(), w.float())
    monkeypatch.delenv("CONVGPT_NARROW_LINEAR")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not nar.narrow_linear_available(x.float(), w.float())  # CPU without the interpreter
    torch.testing.assert_close(nar.narrow_linear(x, w), x @ w.T)  # float64: F.linear


def test_narrow_linear_under_torch_compile(interp, monkeypatch):
    """As norm_linear: one graph, the op's body chooses the kernel or F.linear by rows."""
    calls = _record_runs(monkeypatch, nar, "_kernel_or_cublas")  # the op's body
    x, w = _nar_case(nar.MAX_ROWS + 3, 96, 24)
    torch._dynamo.reset()
    fn = torch.compile(lambda a: nar.narrow_linear(a, w.float()), fullgraph=True, backend="aot_eager")
    sizes = (2, nar.MAX_ROWS + 3, 9)
    for m, y in zip(sizes, _one_graph_for_every_size(fn, [(x[:m].float(),) for m in sizes])):
        torch.testing.assert_close(y.double(), x[:m] @ w.T, rtol=2e-5, atol=2e-5)
    assert calls == [("_kernel_or_cublas", m) for m in sizes]


def test_fused_decoder_layer_with_narrow_linears(interp):
    """The adapters' fused layer with o_proj and down as narrow_linear, against float64."""
    x, r, nw1, wqkv = _nl_case(5, 144, 288, False)
    _, _, nw2, wgu = _nl_case(5, 144, 40, True)
    wo, wd = _nar_case(5, 288, 144)[1], _nar_case(5, 40, 144)[1]
    f = torch.float32
    y, s = nl.fused_decoder_layer(x.to(f), r.to(f), (nw1.to(f), 1e-6), wqkv.to(f), lambda qkv, roped, stored: qkv,
                                  lambda heads: nar.narrow_linear(heads, wo.to(f)), (nw2.to(f), 1e-6), wgu.to(f),
                                  lambda act: nar.narrow_linear(act, wd.to(f)))
    qkv, s1 = _nl_reference(x, r, nw1, 1e-6, wqkv, False)
    act, want_s = _nl_reference(qkv @ wo.T, s1, nw2, 1e-6, wgu, True)
    torch.testing.assert_close(y.double(), act @ wd.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), want_s, rtol=1e-5, atol=1e-5)


class _Layer:
    """The fused layer as the adapters run it (``nl.fused_decoder_layer`` with ``narrow_linear``
    back to the stream and the q/k norm + RoPE of ``rope_heads`` = (head_dim, q heads, kv heads)
    over the q+k+v columns; attention stood in by q/k/v's first ``heads`` columns),
    bfloat16-exact inputs for up to ``rows`` tokens, and its float64 reference."""

    def __init__(self, rows: int, rope_heads: tuple[int, int, int], heads: int, inner: int, **to):
        self.hd, self.nq, self.nkv = rope_heads
        self.x, self.r, self.nw1, self.wqkv = _nl_case(rows, 144, (self.nq + 2 * self.nkv) * self.hd, False)
        _, _, self.nw2, self.wgu = _nl_case(rows, 144, inner, True)
        self.wo, self.wd = _nar_case(5, heads, 144)[1], _nar_case(5, inner, 144)[1]
        self.rope = _qk_rope(rows, self.hd, self.nq, self.nkv, **to)
        self.heads, self.to = heads, to
        self.p = [t.to(**to) for t in (self.nw1, self.wqkv, self.wo, self.nw2, self.wgu, self.wd)]
        self.store, self.attend_seen = None, None  # the KV store to hand over; (rows, stored[, q apart]) per attention
        self.kv_cache = False  # the q+k+v op writes the KV cache through the registered nl.KVCaches

    def __call__(self, h, res, pos):
        p, rope = self.p, self.rope._replace(positions=pos)

        def attend(qkv, roped, stored):  # an engine's own q/k norm + RoPE where the kernel left them out
            apart = isinstance(qkv, nl.QKV)  # the q heads as a contiguous tensor of their own
            if apart:
                assert qkv.q.is_contiguous()
                qkv = torch.cat(nl.split_qkv(qkv, self.nq * self.hd, self.nkv * self.hd), dim=-1)
            if self.attend_seen is not None:
                self.attend_seen.append((qkv.shape[0], stored) + ((apart,) if apart else ()))
            return (qkv if roped else nl.qk_norm_rope_torch(qkv, rope))[..., :self.heads]

        return nl.fused_decoder_layer(h, res, (p[0], 1e-6), p[1], attend,
                                      lambda heads: nar.narrow_linear(heads, p[2]), (p[3], 1e-6), p[4],
                                      lambda act: nar.narrow_linear(act, p[5]), rope, self.store, self.kv_cache)

    def inputs(self, m: int):
        return self.x[:m].to(**self.to), self.r[:m].to(**self.to), self.rope.positions[:m]

    def qkv_reference(self, m: int):
        """float64: the first m rows' q/k/v as attention reads them (q/k normalised and rotated)
        and the residual sum."""
        qkv, s1 = _nl_reference(self.x[:m], self.r[:m], self.nw1, 1e-6, self.wqkv, False)
        qw, kw, pos, _ = _rope_case(self.x.shape[0], self.hd, self.nq, self.nkv)
        return _qk_rope_reference(qkv, qw, kw, 1e-6, pos[:m], self.nq, self.nkv), s1

    def assert_matches(self, m: int, y, s, tol: float) -> None:
        qkv, s1 = self.qkv_reference(m)
        act, want_s = _nl_reference(qkv[:, :self.heads] @ self.wo.T, s1, self.nw2, 1e-6, self.wgu, True)
        torch.testing.assert_close(y.double().cpu(), act @ self.wd.T, rtol=tol, atol=tol)
        torch.testing.assert_close(s.double().cpu(), want_s, rtol=tol, atol=tol)


@pytest.mark.parametrize("kv_cache", [False, True], ids=["", "kv-cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fused_decoder_layer_under_inductor(gpu, monkeypatch, dtype, kv_cache):
    """What vLLM compiles on CUDA: the fused layer (published widths) in one Inductor graph for
    every size, the ops choosing the kernels or the unfused ops by rows; against float64.
    ``kv_cache``: the q+k+v op also writes the KV cache (the kernel up to MAX_ROWS rows)."""
    calls = _record_runs(monkeypatch, nl, "norm_linear_triton", "norm_linear_torch")
    _record_runs(monkeypatch, nar, "_kernel_or_cublas", calls=calls)
    big = 2 * nl.MAX_ROWS + 3
    layer = _Layer(big, (128, 12, 4), 2048, 3072, device="cuda", dtype=dtype)  # q: 12 heads, k: 4
    caches = _Caches(layer, kernel=True)
    monkeypatch.setattr(nl, "_KV_CACHES", [caches])
    layer.kv_cache = kv_cache
    torch._dynamo.reset()
    fn = torch.compile(layer, fullgraph=True)
    sizes = (3, big, 64)
    for m, (y, s) in zip(sizes, _one_graph_for_every_size(fn, [layer.inputs(m) for m in sizes])):
        layer.assert_matches(m, y, s, 2 * NL_TOL[dtype])
        if kv_cache:
            caches.assert_holds(m, 2 * NL_TOL[dtype])
    assert caches.log == ([("store", 3), ("write", big), ("store", 64)] if kv_cache else [])
    norm = ["norm_linear_triton" if m <= nl.MAX_ROWS else "norm_linear_torch" for m in sizes]
    want = [(name, m) for m, n in zip(sizes, norm) for name in (n, n, "_kernel_or_cublas", "_kernel_or_cublas")]
    assert sorted(calls) == sorted(want)  # per size: two norm_linear and two narrow_linear


def _check_unfused_above_kernel_rows(monkeypatch, device, dtype, kv_cache=False):
    """The fused layer compiled by Inductor with ``graph_pass.unfuse_ops`` as its post-grad
    pass, as vLLM compiles its graph for token counts above the kernels' limits: one graph for
    every such size, no call reaches an op's body (Inductor runs the unfused ops itself), and
    the results match float64.  ``kv_cache``: the q+k+v op that writes the KV cache becomes the
    unfused ops and the engine's write (``convgpt::kv_cache_write``), which Inductor must keep
    although nothing reads what it writes."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from convgpt_core import graph_pass

    class Unfuse(CustomGraphPass):
        def __call__(self, graph):
            graph_pass.unfuse_ops(graph)

        def uuid(self):
            return "convgpt-test-unfuse"

    calls = _record_runs(monkeypatch, nl, "_kernel_or_torch")
    _record_runs(monkeypatch, nar, "_kernel_or_cublas", calls=calls)
    big = 2 * graph_pass.FUSED_UP_TO + 3
    layer = _Layer(big, (32, 6, 3), 256, 320, device=device, dtype=dtype)  # q+k+v 384 wide; q and k: 256
    caches = _Caches(layer, kernel=True)
    monkeypatch.setattr(nl, "_KV_CACHES", [caches])
    layer.kv_cache = kv_cache
    torch._dynamo.reset()
    sizes = (graph_pass.FUSED_UP_TO + 1, big)
    with torch._inductor.config.patch(post_grad_custom_post_pass=Unfuse(), force_disable_caches=True):
        fn = torch.compile(layer, fullgraph=True)
        outs = _one_graph_for_every_size(fn, [layer.inputs(m) for m in sizes])
    for m, (y, s) in zip(sizes, outs):
        layer.assert_matches(m, y, s, 2 * NL_TOL[dtype])
    assert calls == []
    assert caches.log == ([("write", m) for m in sizes] if kv_cache else [])
    for m in sizes if kv_cache else ():
        caches.assert_holds(m, 2 * NL_TOL[dtype])
    if kv_cache:
        return
    # the same layer run eagerly goes through the ops' bodies: the recording sees calls
    layer(*layer.inputs(big))
    assert sorted(calls) == sorted([("_kernel_or_torch", big)] * 2 + [("_kernel_or_cublas", big)] * 2)


@pytest.mark.parametrize("kv_cache", [False, True], ids=["", "kv-cache"])
def test_ops_unfused_in_graphs_above_kernel_rows(interp, monkeypatch, kv_cache):
    _check_unfused_above_kernel_rows(monkeypatch, "cpu", torch.float32, kv_cache)


@pytest.mark.parametrize("kv_cache", [False, True], ids=["", "kv-cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_ops_unfused_in_graphs_above_kernel_rows(gpu, monkeypatch, dtype, kv_cache):
    _check_unfused_above_kernel_rows(monkeypatch, "cuda", dtype, kv_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [2048, 3072], ids=["o_proj", "down"])
@pytest.mark.parametrize("M", [1, 16, 100, 256, 2048])
def test_gpu_narrow_linear_matches_float64(gpu, M, K, dtype):
    _nar_check(dtype, "cuda", M, K, 144)


def test_gpu_narrow_linear_in_a_cuda_graph(gpu):
    """Captured once, replayed on new inputs: the counters reset themselves every replay."""
    x, w = _nar_case(4, 3072, 144)
    xs = x.to("cuda", torch.bfloat16)
    wc = w.to("cuda", torch.bfloat16)
    nar.narrow_linear(xs, wc)  # warm-up: compile, counters allocated outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nar.narrow_linear(xs, wc)
    for seed in range(3):
        x2 = _nar_case(4, 3072, 144, seed=seed + 10)[0]
        xs.copy_(x2.to(xs.dtype))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.double().cpu(), x2 @ w.T, rtol=3e-2, atol=3e-2)


def test_to_stream_takes_the_kernel_only_for_a_whole_plain_weight(monkeypatch):
    """The adapters' o_proj/down: narrow_linear for a plain weight holding all of K, the engine's
    layer (its (output, bias) answer, and its all-reduce under TP) for a shard or a wrapped one."""

    class Linear(torch.nn.Module):
        def __init__(self, k_local: int, k_total: int):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, k_local), requires_grad=False)
            self.input_size = k_total

        def forward(self, x):
            return torch.full((*x.shape[:-1], 8), 7.0), None  # the engine's own path, recognisable

    calls = []
    monkeypatch.setattr(nar, "narrow_linear", lambda x, w: calls.append(w) or x @ w.T)
    whole, shard = Linear(16, 16), Linear(16, 32)
    x = torch.randn(3, 16)
    torch.testing.assert_close(nar.to_stream(whole, plain=True)(x), x @ whole.weight.T)
    assert calls == [whole.weight]
    for linear, plain in ((whole, False), (shard, True)):
        assert torch.equal(nar.to_stream(linear, plain)(x), torch.full((3, 8), 7.0))
    assert len(calls) == 1


# --------------------------------------------------------------------------------------
# Programmatic dependent launch (the decode kernels on Hopper and newer)


def test_pdl_only_on_hopper_cuda_for_decode_rows_and_switchable(monkeypatch):
    """PDL needs CUDA and compute capability 9+, and is taken up to PDL_MAX_ROWS rows; the
    interpreter and ``CONVGPT_PDL=0`` keep plain launches (what capability a CPU tensor has is
    never asked)."""
    monkeypatch.delenv("CONVGPT_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    class Cuda:  # a CUDA tensor as kernels.pdl reads it
        is_cuda, device = True, "cuda:0"

    asked = []
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    for cap, want in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(kernels, "_capability", lambda d, cap=cap: asked.append(d) or cap)
        assert kernels.pdl(Cuda(), 1) is want
    assert asked == ["cuda:0"] * 3
    assert kernels.pdl(Cuda(), kernels.PDL_MAX_ROWS) is False  # (8, 9) still patched in
    monkeypatch.setattr(kernels, "_capability", lambda d: (9, 0))
    assert kernels.pdl(Cuda(), kernels.PDL_MAX_ROWS) and not kernels.pdl(Cuda(), kernels.PDL_MAX_ROWS + 1)
    assert not kernels.pdl(torch.zeros(1), 1)
    monkeypatch.setenv("CONVGPT_PDL", "0")
    assert not kernels.pdl(Cuda(), 1)
    monkeypatch.delenv("CONVGPT_PDL")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels.pdl(Cuda(), 1)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.version, "cuda", None)  # ROCm
    assert not kernels.pdl(Cuda(), 1)


def test_pdl_never_reads_weights_the_launch_just_copied(monkeypatch):
    """A kernel reads its weights before its PDL wait, and a copy kernel's writes are certain to
    be visible only after it: a launch that had to convert one of them right before (a norm
    weight in another dtype, a non-contiguous weight or q/k norm weight) goes without PDL."""
    launches = []

    class Launcher:  # records what each launch asked for instead of running it
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((kw["PDL"], kw.get("launch_pdl", False)))

    for module in (nl, nar):
        monkeypatch.setattr(module, "jitted", lambda src: Launcher())
        monkeypatch.setattr(module, "pdl", lambda x, rows: True)
    bf = dict(dtype=torch.bfloat16)
    x, nw, w = torch.randn(3, 64, **bf), torch.ones(64, **bf), torch.randn(96, 64, **bf)
    strided = torch.randn(64, 96, **bf).t()  # a 96 x 64 weight whose rows are not contiguous
    rope = _qk_rope(3, 16, 2, 2, **bf)
    cases = [
        (lambda: nl.norm_linear_triton(x, x, nw, 1e-6, w), True),
        (lambda: nl.norm_linear_triton(x, x, nw.float(), 1e-6, w), False),
        (lambda: nl.norm_linear_triton(x, x, nw, 1e-6, strided), False),
        (lambda: nl.norm_linear_triton(x, x, nw, 1e-6, w, swiglu=True), True),
        (lambda: nl.norm_linear_triton(x, x, nw, 1e-6, w, rope=rope), True),
        (lambda: nl.norm_linear_triton(x, x, nw, 1e-6, w, rope=rope._replace(
            q_weight=torch.randn(32, **bf)[::2])), False),
        (lambda: nl.norm_linear_triton(x, x, nw, 1e-6, w, rope=rope._replace(
            positions=torch.stack((rope.positions, rope.positions), 1)[:, 0])), True),  # read after the wait
        (lambda: nar.narrow_linear_triton(x, w), True),
        (lambda: nar.narrow_linear_triton(x, strided), False),
    ]
    for i, (launch, want) in enumerate(cases):
        launches.clear()
        launch()
        assert launches == [(want, want)], i


@pytest.fixture(scope="module")
def sm90_ptx():
    """The decode kernels compiled for an H100 (sm_90, with and without PDL), in a fresh process
    where triton compiles (this one may have imported it for the interpreter): no GPU needed."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "sm90_ptx.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("which", ["norm_linear_rope", "norm_linear_rope_kv", "norm_linear_rope_kv_apart",
                                   "norm_linear_swiglu", "narrow_linear"])
def test_pdl_kernels_wait_before_they_write(sm90_ptx, which):
    """Compiled for sm_90 with PDL, each decode kernel waits once for the kernels before it
    (``griddepcontrol.wait``) and lets the next one start; before that wait it stores nothing
    and takes no atomic (the outputs, the split-K partials and counters); it does load (its
    weights, which no kernel of the step writes).  Without PDL neither instruction is there."""
    ptx = sm90_ptx[which]
    waits = [i for i, line in enumerate(ptx) if line.startswith("griddepcontrol.wait")]
    assert len(waits) == 1
    assert sum(line.startswith("griddepcontrol.launch_dependents") for line in ptx) == 1
    before = ptx[:waits[0]]
    assert not [line for line in before if line.startswith(("st.global", "atom.", "red."))]
    assert any(line.startswith("ld.global") for line in before)
    assert not [line for line in sm90_ptx[which + "_plain"] if line.startswith("griddepcontrol")]


def test_pdl_decode_attention_waits_before_it_touches_memory(sm90_ptx):
    """The decode attention kernel reads keys and queries that the q+k+v kernel before it has just
    written: compiled for sm_90 with PDL it waits once (``griddepcontrol.wait``) before any
    global load, store or atomic, and lets the next kernel start; without PDL neither
    instruction is there."""
    ptx = sm90_ptx["decode_attention"]
    waits = [i for i, line in enumerate(ptx) if line.startswith("griddepcontrol.wait")]
    assert len(waits) == 1
    assert sum(line.startswith("griddepcontrol.launch_dependents") for line in ptx) == 1
    assert not [line for line in ptx[:waits[0]] if line.startswith(("ld.global", "st.global", "atom.", "red."))]
    assert any(line.startswith("atom.") for line in ptx[waits[0]:])  # the splits' counter
    assert not [line for line in sm90_ptx["decode_attention_plain"] if line.startswith("griddepcontrol")]


def test_fused_mlp_prototype_computes_the_sublayer(interp):
    """``benchmarks/bench_fused_mlp.py``: the MLP sublayer as one kernel (gate/up, SwiGLU and down
    with an ordered sum over intermediate slices), measured in round 17 at 2.3-2.9x the shipped
    pair's time and kept with that measurement: it must still compute the sublayer (float64
    evaluation, and the shipped pair's residual sum bit for bit) for the result to be
    reproducible."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_fused_mlp

    for dtype in (torch.float32, torch.bfloat16):
        bench_fused_mlp.check(torch.device("cpu"), dtype, inner=256, tiles=bench_fused_mlp.TILES[:2])


def test_gpu_layers_with_pdl_in_a_cuda_graph_match_plain_launches(gpu, monkeypatch):
    """Four fused layers (published widths: q+k+v with the q/k norm + RoPE, o_proj, gate/up +
    SwiGLU, down), an engine kernel between q+k+v and o_proj as attention stands in: captured in
    one CUDA graph with PDL (up to PDL_MAX_ROWS rows) and replayed on new inputs, each replay equals the same layers
    launched eagerly without PDL, bit for bit (PDL changes when kernels start, never what they
    compute; a kernel reading its input early would differ)."""
    if not kernels.pdl(torch.zeros(1, device="cuda"), 1):
        pytest.skip("PDL needs compute capability 9.0+")
    for m in (1, 64, kernels.PDL_MAX_ROWS, 256):  # 256: plain launches, the comparison still holds
        layer = _Layer(m, (128, 16, 8), 2048, 3072, device="cuda", dtype=torch.bfloat16)

        def layers(h, res, pos, layer=layer):
            for _ in range(4):
                h, res = layer(h * 1.0, res, pos)  # "* 1.0": one engine kernel before each layer
            return h, res

        x, r, pos = (t.clone() for t in layer.inputs(m))
        layers(x, r, pos)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layers(x, r, pos)
        for seed in range(3):
            gen = torch.Generator(device="cuda").manual_seed(seed)
            x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
            r.copy_(torch.randn(r.shape, generator=gen, device="cuda"))
            pos.copy_(torch.randint(0, 500, pos.shape, generator=gen, device="cuda"))
            graph.replay()
            monkeypatch.setenv("CONVGPT_PDL", "0")
            want = layers(x, r, pos)
            monkeypatch.delenv("CONVGPT_PDL")
            torch.cuda.synchronize()
            for got, ref in zip(out, want):
                assert torch.equal(got, ref), (m, seed)


# --------------------------------------------------------------------------------------
# Decode attention over a token-paged KV cache (convgpt_core.decode_attention), against attention
# evaluated in float64 from its definition: each request's query heads attend, with softmax(q k^T
# * scale), to the keys its table row lists (the last ``window`` of them with a window), each
# query head reading the kv head of its group.

from convgpt_core import decode_attention as da  # noqa: E402


def _attention_f64(q, k_cache, v_cache, table, req, lens, scale, window=None):
    n, heads, hd = q.shape
    group = heads // k_cache.shape[1]
    out = torch.zeros(n, heads, hd, dtype=torch.float64)
    for b in range(n):
        length = int(lens[b])
        lo = max(0, length - window) if window else 0
        rows = table[int(req[b]), lo:length].long().cpu()
        k = k_cache.cpu()[rows].double().repeat_interleave(group, 1)
        v = v_cache.cpu()[rows].double().repeat_interleave(group, 1)
        p = (torch.einsum("hd,thd->ht", q[b].cpu().double(), k) * scale).softmax(-1)
        out[b] = torch.einsum("ht,thd->hd", p, v)
    return out.view(n, heads * hd)


def _attention_case(requests, heads, kv_heads, hd, lens, dtype, device="cpu", seed=0, side_by_side=False):
    """Queries, a cache of scattered rows (k and v heads of a row side by side in one buffer
    when ``side_by_side``, as some engines keep them), a table with a row per request (in shuffled
    order) and the lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lens) + 8
    rows = (requests + 2) * width
    if side_by_side:
        kv = torch.randn(rows, kv_heads, 2 * hd, generator=gen).to(dtype).to(device)
        k_cache, v_cache = kv[..., :hd], kv[..., hd:]
    else:
        k_cache = torch.randn(rows, kv_heads, hd, generator=gen).to(dtype).to(device)
        v_cache = torch.randn(rows, kv_heads, hd, generator=gen).to(dtype).to(device)
    table = torch.randperm(rows, generator=gen)[: (requests + 2) * width].view(requests + 2, width).int().to(device)
    req = torch.randperm(requests + 2, generator=gen)[:requests].to(device)
    q = torch.randn(requests, heads, hd, generator=gen).to(dtype).to(device)
    return q, k_cache, v_cache, table, req, torch.tensor(lens, device=device)


ATTENTION_CASES = [  # requests, heads, kv heads, head_dim, lengths, window, splits
    (1, 4, 2, 32, [1], None, None),  # the new token alone
    (1, 4, 2, 32, [200], None, None),  # blocks of keys over several splits, the last one partial
    (1, 4, 2, 32, [200], None, 2),  # more blocks than splits: a split loops
    (1, 4, 2, 32, [200], None, 1),  # one split: no partials
    (1, 4, 2, 32, [64], None, 8),  # fewer blocks than splits
    (3, 8, 2, 16, [70, 1, 129], None, 4),  # group of 4, requests of different lengths
    (2, 4, 4, 32, [90, 33], None, None),  # one query head per kv head
    (2, 6, 2, 32, [150, 20], None, 2),  # group of 3 (padded to 4)
    (2, 4, 2, 32, [150, 20], 16, None),  # a sliding window of 16 keys
    (1, 4, 1, 64, [300], 100, 4),  # one kv head, a window over several blocks
]


@pytest.mark.parametrize("requests, heads, kv_heads, hd, lens, window, splits", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_attention_equals_float64(interp, requests, heads, kv_heads, hd, lens, window, splits, dtype):
    q, k, v, table, req, n = _attention_case(requests, heads, kv_heads, hd, lens, dtype, side_by_side=requests == 3)
    scale = hd**-0.5
    got = da.decode_attention(q, k, v, table, req, n, scale, window, splits=splits)
    assert got.shape == (requests, heads * hd) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), _attention_f64(q, k, v, table, req, n, scale, window), rtol=tol, atol=tol)
    # every counter is back at zero (a CUDA graph replays the kernel with nothing to reset)
    assert not da._counters(q.device).any()


def test_decode_attention_takes_flat_query_heads_and_int32_lengths(interp):
    """The adapters hand the q heads flattened ([requests, heads * head_dim], a view of the q+k+v
    output) and the engines' lengths come as int32 or int64."""
    q, k, v, table, req, n = _attention_case(2, 4, 2, 32, [40, 77], torch.float32, seed=3)
    qkv = torch.cat([q.view(2, -1), torch.randn(2, 64)], 1)  # q then other columns, as in q|k|v
    got = da.decode_attention(qkv[:, :128], k, v, table, req, n.int(), 0.2)
    torch.testing.assert_close(got.double(), _attention_f64(q, k, v, table, req, n, 0.2), rtol=1e-5, atol=1e-5)


def test_decode_attention_takes_one_request_in_the_models_dtype(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(1, 4 * 32, dtype=torch.bfloat16)
    cache = torch.zeros(10, 2, 32, dtype=torch.bfloat16)
    assert da.decode_attention_takes(q, cache, 32)
    assert not da.decode_attention_takes(torch.zeros(da.MAX_ROWS + 1, 128, dtype=torch.bfloat16), cache, 32)
    assert not da.decode_attention_takes(q, cache.float(), 32)  # a cache in another dtype (fp8 KV)
    assert not da.decode_attention_takes(q.view(1, -1)[:, :96], cache[..., :24], 24)  # head_dim not a power of 2
    assert not da.decode_attention_takes(q.double(), cache.double(), 32)
    monkeypatch.setenv("CONVGPT_DECODE_ATTENTION", "0")
    assert not da.decode_attention_takes(q, cache, 32)


def test_decode_attention_splits_are_powers_of_two_within_the_cap():
    cpu = torch.device("cpu")  # the interpreter's stand-in: 132 SMs
    got = [da.splits_for(n, 8, cpu) for n in (1, 2, 4, 8, 16, 64, 512)]
    assert all(s & (s - 1) == 0 and 1 <= s <= da.MAX_SPLITS for s in got)
    assert got == sorted(got, reverse=True) and got[0] == da.MAX_SPLITS and got[-1] == 1


def test_decode_attention_refuses_heads_that_do_not_fit_the_cache(interp):
    q, k, v, table, req, n = _attention_case(1, 4, 2, 32, [10], torch.float32)
    with pytest.raises(ValueError, match="decode attention"):
        da.decode_attention(q[:, :3], k, v, table, req, n, 0.1)  # 3 query heads over 2 kv heads


@pytest.mark.parametrize("lens, window", [([1], None), ([192], None), ([1000], None), ([4100], None), ([700], 128)])
def test_gpu_decode_attention_equals_float64_and_replays_for_other_lengths(gpu, lens, window):
    """The published attention (16 q / 8 kv heads of 128, bf16) on the GPU, captured once in a
    CUDA graph and replayed after the request grew: the graph's grid is fixed, the split of the
    keys is the kernel's."""
    q, k, v, table, req, n = _attention_case(1, 16, 8, 128, [lens[0] + 300], torch.bfloat16, device="cuda", seed=lens[0])
    n.fill_(lens[0])
    scale = 128**-0.5
    out = da.decode_attention(q, k, v, table, req, n, scale, window)
    torch.testing.assert_close(out.double().cpu(), _attention_f64(q, k, v, table, req, n, scale, window), rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, k, v, table, req, n, scale, window)
    for grown in (lens[0] + 1, lens[0] + 300):
        n.fill_(grown)
        q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        want = _attention_f64(q, k, v, table, req, n, scale, window)
        torch.testing.assert_close(out.double().cpu(), want, rtol=2e-2, atol=2e-2)
    assert not da._counters(q.device).any()
