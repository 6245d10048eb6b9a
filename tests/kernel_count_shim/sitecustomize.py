"""Test-only: record every launch of the core's decode kernels in an engine process.

Loaded through PYTHONPATH by ``judge.assert_decode_kernels_match_reference`` only, in the
process it starts and in any engine process that one starts (SGLang's scheduler).  With
``CONVGPT_TEST_KERNEL_LOG`` set, each call of ``norm_linear_triton``, ``narrow_linear_triton``
or ``norm_linear_torch`` (norm_linear's unfused path for large batches) appends that name
(with ``+rope`` when the q/k norm and RoPE ride along, ``+kv`` when it also writes the KV
cache) and its rows to the file, and so does each q+k+v step that writes the KV cache through
the adapter's caches (``_norm_linear_kv``, vLLM), and each q+k+v GEMM that writes the q heads
apart (``linear_q_apart``, SGLang's large steps), and each decode step's attention by the core's
kernel (``decode_attention``, SGLang at one request): the test then knows the engine went through
the kernels and not around them.  The functions themselves are untouched.
"""

import os

_LOG = os.environ.get("CONVGPT_TEST_KERNEL_LOG")
if _LOG:
    from convgpt_core import decode_attention, narrow_linear, norm_linear

    def _recorded(module, name):
        launch = getattr(module, name)

        def run(*args, **kwargs):
            roped = name.startswith("norm_linear") and (args[6] if len(args) > 6 else kwargs.get("rope")) is not None
            tags = ("+rope" if roped else "") + ("+kv" if kwargs.get("kv") is not None else "")
            with open(_LOG, "a") as f:  # name, rows (tokens)
                f.write(f"{name}{tags} {args[0].numel() // max(1, args[0].shape[-1])}\n")
            return launch(*args, **kwargs)

        setattr(module, name, run)

    _recorded(norm_linear, "norm_linear_triton")
    _recorded(norm_linear, "norm_linear_torch")
    _recorded(norm_linear, "_norm_linear_kv")
    _recorded(norm_linear, "linear_q_apart")
    _recorded(narrow_linear, "narrow_linear_triton")
    _recorded(decode_attention, "decode_attention")
