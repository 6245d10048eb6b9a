"""Run the parity matrix through the float64 reference model; writes build/parity/reference.json.

``--fp8``: the reference with the engines' fp8 weight quantization emulated (``tests/fp8.py``),
written as reference-fp8.json; ``compare.py`` judges runs with ``quantization="fp8"`` against it."""

from __future__ import annotations

import sys
from contextlib import ExitStack

import torch

import fp8
import judge
import matrix
from convgpt_core.modeling import ConvGPTForCausalLM


def main(argv: list[str]) -> None:
    emulate_fp8 = "--fp8" in argv
    results = {}
    for name, path in matrix.checkpoints().items():
        model = ConvGPTForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        with ExitStack() as stack:
            if emulate_fp8:
                stack.enter_context(fp8.emulate(model))
            results[name] = {
                situation: [judge.reference_record(model, p, matrix.STEPS, matrix.TOP) for wave in waves for p in wave]
                for situation, waves in matrix.SITUATIONS.items()
            }
    matrix.write("reference-fp8" if emulate_fp8 else "reference", results,
                 {"dtype": "float64", "torch": torch.__version__, "emulated": "fp8 weights" if emulate_fp8 else None})


if __name__ == "__main__":
    main(sys.argv[1:])
