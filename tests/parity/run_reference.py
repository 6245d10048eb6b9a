"""Run the parity matrix through the float64 reference model; writes build/parity/reference.json.

``--fp8``: the reference with each engine's fp8 weight quantization emulated (``tests/fp8.py``),
written as reference-fp8-tensor.json (vLLM's scales) and reference-fp8-channel.json (SGLang's);
``compare.py`` judges a run with ``quantization="fp8"`` against its engine's."""

from __future__ import annotations

import sys
from contextlib import ExitStack

import torch

import fp8
import judge
import matrix
from convgpt_core.modeling import ConvGPTForCausalLM


def run(scheme: str | None) -> None:
    """The matrix through the float64 reference, its linears rounded by fp8 ``scheme`` (None: exact)."""
    results = {}
    for name, path in matrix.checkpoints().items():
        model = ConvGPTForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        with ExitStack() as stack:
            if scheme:
                stack.enter_context(fp8.emulate(model, scheme))
            results[name] = {
                situation: [judge.reference_record(model, p, matrix.STEPS, matrix.TOP) for wave in waves for p in wave]
                for situation, waves in matrix.SITUATIONS.items()
            }
    matrix.write(f"reference-fp8-{scheme}" if scheme else "reference", results,
                 {"dtype": "float64", "torch": torch.__version__, "emulated": f"fp8 weights, {scheme} scales" if scheme else None})


def main(argv: list[str]) -> None:
    for scheme in fp8.SCHEMES if "--fp8" in argv else (None,):
        run(scheme)


if __name__ == "__main__":
    main(sys.argv[1:])
