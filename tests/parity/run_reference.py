"""Run the parity matrix through the float64 reference model; writes build/parity/reference.json."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

import matrix
from convgpt_core.modeling import ConvGPTForCausalLM


@torch.no_grad()
def greedy(model, prompt: list[int]) -> dict:
    cache = DynamicCache()
    ids = torch.tensor([prompt])
    tokens, top = [], []
    for _ in range(matrix.STEPS):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        lp = torch.log_softmax(logits, -1)
        best = torch.topk(lp, matrix.TOP)
        top.append([[int(i), float(v)] for i, v in zip(best.indices, best.values)])
        tokens.append(int(best.indices[0]))
        ids = torch.tensor([[tokens[-1]]])
    return {"prompt_len": len(prompt), "tokens": tokens, "top": top, "cached": None}


def main() -> None:
    results = {}
    for name, path in matrix.checkpoints().items():
        model = ConvGPTForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        results[name] = {
            situation: [greedy(model, p) for wave in waves for p in wave]
            for situation, waves in matrix.SITUATIONS.items()
        }
    matrix.write("reference", results, {"dtype": "float64", "torch": torch.__version__})


if __name__ == "__main__":
    main()
