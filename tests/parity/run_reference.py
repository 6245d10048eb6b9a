"""Run the parity matrix through the float64 reference model; writes build/parity/reference.json."""

from __future__ import annotations

import torch

import judge
import matrix
from convgpt_core.modeling import ConvGPTForCausalLM


def main() -> None:
    results = {}
    for name, path in matrix.checkpoints().items():
        model = ConvGPTForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        results[name] = {
            situation: [judge.reference_record(model, p, matrix.STEPS, matrix.TOP) for wave in waves for p in wave]
            for situation, waves in matrix.SITUATIONS.items()
        }
    matrix.write("reference", results, {"dtype": "float64", "torch": torch.__version__})


if __name__ == "__main__":
    main()
