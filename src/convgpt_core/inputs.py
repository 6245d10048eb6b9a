"""What a ConvGPT model accepts as a prompt: the checks both engine adapters put in front
of the model, so that a bad request is refused with a message instead of reaching (and
killing) the engine.

Each function returns ``None`` for a good input, else one sentence naming what is wrong;
the adapters raise it as the error type their engine turns into an HTTP 400.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def token_ids_problem(ids: Sequence[int], vocab_size: int) -> str | None:
    """Token ids must be a non-empty sequence of integers in ``[0, vocab_size)``."""
    if len(ids) == 0:
        return "the prompt is empty: at least one token is needed"
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        return f"token id {bad} is out of range: this model's ids are 0..{vocab_size - 1} (vocab_size {vocab_size})"
    return None


def embeddings_problem(rows: torch.Tensor | Sequence, hidden_size: int) -> str | None:
    """Prompt embeddings must be a non-empty ``tokens x hidden_size`` matrix of finite numbers
    (one H-wide token embedding per row: the compressor runs on them, so D-wide rows are wrong)."""
    if isinstance(rows, torch.Tensor):
        if rows.ndim != 2:
            return f"embeddings must be a (tokens, {hidden_size}) matrix, got shape {tuple(rows.shape)}"
        widths = {rows.shape[1]} if rows.shape[0] else set()
        count = rows.shape[0]
    else:
        if not all(isinstance(r, Sequence) and not isinstance(r, str) for r in rows):
            return f"embeddings must be a list of rows of {hidden_size} numbers"
        widths = {len(r) for r in rows}
        count = len(rows)
    if count == 0:
        return "the embeddings are empty: at least one row is needed"
    if len(widths) > 1:
        return f"the embedding rows have different widths ({', '.join(map(str, sorted(widths)))})"
    (width,) = widths
    if width != hidden_size:
        return (
            f"embedding rows are {width} wide; this model takes hidden_size = {hidden_size}-wide "
            "token embeddings (the compressor's input)"
        )
    if isinstance(rows, torch.Tensor):
        if not rows.is_floating_point():
            return f"embeddings must be floating point, got {rows.dtype}"
        finite = bool(torch.isfinite(rows).all())
    else:
        try:
            finite = all(math.isfinite(v) for r in rows for v in r)
        except TypeError:
            return "embeddings must hold numbers only"
    if not finite:
        return "the embeddings hold NaN or infinite values"
    return None


def top_logprobs_problem(count: int, vocab_size: int) -> str | None:
    """A request may ask for at most ``vocab_size`` top logprobs per step."""
    if not 0 <= count <= vocab_size:
        return f"top_logprobs_num={count} is out of range: at most vocab_size = {vocab_size} tokens exist"
    return None
