"""The head's logits widened to float32 (convgpt_core.logits): what the engines sample from.

bf16 and fp16 values are all exact in float32, so the kernel's output must equal the conversion
exactly, from a strided view (the engines' padded vocabulary) as from a dense tensor."""

import pytest
import torch

from convgpt_core import logits as lg
from convgpt_core.kernels import _interpreting

CUDA = torch.cuda.is_available()


def _padded(rows, vocab, pad, dtype, device):
    """The first ``vocab`` columns of a ``vocab + pad`` wide tensor, as the engines keep them."""
    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    full = (torch.randn(rows, vocab + pad, generator=gen) * 30).to(dtype).to(device)
    return full[:, :vocab]


@pytest.mark.parametrize("rows, vocab, pad", [(1, 5000, 62), (3, 2048, 0), (5, 4097, 7), (0, 300, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_equals_the_exact_conversion(monkeypatch, rows, vocab, pad, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _padded(rows, vocab, pad, dtype, "cpu")
    assert lg.float_cast_takes(x)
    out = torch.full((rows, vocab), float("nan"))
    assert lg.logits_to_float32(x, out) is out
    assert torch.equal(out, x.float())
    assert torch.equal(lg.logits_to_float32(x), x.float())


@pytest.mark.parametrize("rows, vocab, pad", [(1, 65538, 62), (256, 65538, 62), (64, 151936, 0)])
def test_gpu_kernel_equals_the_exact_conversion(rows, vocab, pad):
    if not CUDA or _interpreting():
        pytest.skip("no CUDA device")
    x = _padded(rows, vocab, pad, torch.bfloat16, "cuda")
    out = torch.full((rows, vocab), float("nan"), device="cuda")
    lg.logits_to_float32(x, out)
    assert torch.equal(out, x.float())


def test_where_the_kernel_does_not_run_torch_casts(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = _padded(2, 100, 3, torch.bfloat16, "cpu")
    if not CUDA:  # CPU tensors without the interpreter: torch's copy
        assert not lg.float_cast_takes(x)
    assert not lg.float_cast_takes(x.float()) and not lg.float_cast_takes(x.t())
    assert torch.equal(lg.logits_to_float32(x), x.float())


@pytest.mark.parametrize("out", [torch.empty(2, 99), torch.empty(2, 100, dtype=torch.float16), torch.empty(100, 2).t()])
def test_an_out_that_does_not_fit_is_refused(out):
    with pytest.raises(ValueError, match="logits to float32"):
        lg.logits_to_float32(_padded(2, 100, 3, torch.bfloat16, "cpu"), out)
