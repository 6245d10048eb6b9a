"""Float32 logits from the head's GEMM (convgpt_core.logits): against a float64 product of the same
bf16/fp16 values on a GPU; where it does not apply (CPU, mixed dtypes, the switch off) it hands
the head back to the engine (None)."""

import pytest
import torch

from convgpt_core.logits import SWITCH, float_logits

_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not _CUDA, reason="no CUDA device")


def _inputs(rows, width, vocab, dtype, device):
    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    h = torch.randn(rows, width, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, width, generator=gen) * width**-0.5).to(device, dtype)
    return h, w


def test_engine_keeps_the_head_where_float_logits_do_not_apply(monkeypatch):
    h, w = _inputs(3, 16, 40, torch.bfloat16, "cpu")
    assert float_logits(h, w) is None  # CPU: torch has no float32-output GEMM there
    if _CUDA:
        hc, wc = h.cuda(), w.cuda()
        assert float_logits(hc, wc.half()) is None  # mixed dtypes
        assert float_logits(hc.float(), wc.float()) is None  # float32 models: the engine's GEMM is it
        monkeypatch.setenv(SWITCH, "0")
        assert float_logits(hc, wc) is None


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 256])
def test_gpu_float_logits_match_float64_into_the_engines_buffer(rows, dtype):
    """Float32 logits of the same 16-bit values as a float64 product (only the float32
    accumulation differs), written into the float32 buffer handed in, also one narrower than the
    (padded) vocab; a buffer of another shape or dtype is left alone."""
    h, w = _inputs(rows, 1296, 5000, dtype, "cuda")
    want = h.double() @ w.double().T
    buf = torch.full((rows, 5000), float("nan"), device="cuda")
    got = float_logits(h, w, buf)
    assert got.dtype == torch.float32 and got.data_ptr() == buf.data_ptr()
    tol = 1e-5 * want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= tol, err
    # the engine's path rounds each logit to 16 bits first: the float32 ones are closer
    rounded = (h @ w.T).double()
    assert err < (rounded - want).abs().max().item()
    padded = torch.empty(rows, 4990, device="cuda")  # the vocab past 4990 rows is the weight's padding
    narrow = float_logits(h, w, padded)
    assert narrow.data_ptr() == padded.data_ptr() and (narrow.double() - want[:, :4990]).abs().max() <= tol
    for other in (torch.zeros(rows + 1, 5000, device="cuda"), torch.zeros(rows, 5001, device="cuda"),
                  torch.zeros(rows, 5000, device="cuda", dtype=dtype)):
        fresh = float_logits(h, w, other)
        assert fresh.data_ptr() != other.data_ptr() and (fresh.double() - want).abs().max() <= tol
        assert not other.any()


@gpu
def test_gpu_copying_the_buffer_onto_itself_launches_nothing():
    """SGLang 0.5.16 copies the logits into its float32 buffer (``buffer.copy_(logits)``); when the
    head wrote them there already, that copy must be free: torch returns at once for a tensor
    copied onto itself, launching no kernel."""
    buf = torch.randn(256, 5000, device="cuda")
    before = buf.clone()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        buf.copy_(buf)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels == [], [e.name for e in kernels]
    assert torch.equal(buf, before)
