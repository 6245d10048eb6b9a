"""Logits in float32 straight from the lm_head's GEMM.

The engines' samplers work on float32 logits.  Their heads get them in two kernels: a bf16 GEMM
that rounds every logit to bf16, then a cast into a float32 buffer (2 bytes read and 4 written
per logit, ~60 us a decode step at batch 256 over a 152k vocabulary on an H200, the same for
every model the engine serves).  :func:`float_logits` asks cuBLAS for the float32 result its
accumulator holds anyway (``torch.mm(..., out_dtype=torch.float32)``), written where the
engine wants it: one kernel, and logits that are not rounded to bf16 first.
"""

from __future__ import annotations

import os

import torch

SWITCH = "CONVGPT_FLOAT_LOGITS"


def float_logits_on() -> bool:
    """Whether the adapters compute float32 logits in the head's GEMM; ``CONVGPT_FLOAT_LOGITS=0``
    leaves the head to the engine (bf16 GEMM, then its cast), to rule it out or measure it."""
    return os.environ.get(SWITCH, "1") != "0"


def float_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``hidden @ weight.T`` (rows x width times vocab x width) as float32, from a bf16 or fp16
    GEMM with float32 output, into ``out`` when ``out`` is a contiguous float32 tensor with a row
    for each of ``hidden``'s (a new tensor otherwise).  ``out`` may have fewer columns than
    ``weight`` has rows: the engines pad the vocabulary to a multiple of 64 rows and keep the
    first ``vocab_size`` logits, their buffer's width; the padding rows are then not multiplied.  None where this does not apply, and the caller
    runs the engine's own head: the switch is off, the tensors are not on CUDA (cuBLAS has the
    float32-output GEMM; CPU's torch has not), or they are not both bf16 or both fp16."""
    if not (
        float_logits_on()
        and hidden.is_cuda
        and hidden.dim() == 2
        and weight.dim() == 2
        and hidden.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == hidden.dtype
    ):
        return None
    if out is not None:
        if (out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != hidden.shape[0]
                or not 0 < out.shape[1] <= weight.shape[0] or not out.is_contiguous()):
            out = None
        else:
            weight = weight[: out.shape[1]]  # the rows past it pad the vocab: the engine drops their logits
    return torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
