"""Test-only shim for SGLang's LoRA on a machine without CUDA (loaded by the scheduler process
SGLang starts, through PYTHONPATH, in tests/sglang's LoRA test only).

SGLang's LoRA layers allocate pinned host buffers (``torch.tensor(..., pin_memory=True)`` in
sglang/srt/lora/layers.py, 0.5.16 and 0.5.23), and pinning needs a CUDA driver, so SGLang cannot
serve LoRA on CPU at all.  Pinning only speeds up host-to-device copies; on CPU there is no
device, so dropping it changes no value.  With it dropped, the test exercises what this project
provides (the model's LoRA hooks, module names and weight layout) on the CPU engine; users on
CPU still cannot use SGLang's LoRA, as README says.
"""

import functools

import torch

if not torch.cuda.is_available():
    def _unpinned(factory):
        @functools.wraps(factory)
        def make(*args, **kwargs):
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return make

    for _name in ("tensor", "empty", "zeros", "ones", "full"):
        setattr(torch, _name, _unpinned(getattr(torch, _name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
