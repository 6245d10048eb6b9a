"""A compiled-graph pass: the custom ops' unfused torch path, written into graphs that only
ever see more rows than the kernels take.

Under ``torch.compile`` the adapters call ``convgpt::norm_linear`` (``norm_linear_rope`` at
the q+k+v site, ``norm_linear_rope_kv`` where it also writes the KV cache) and
``convgpt::narrow_linear``: opaque ops, so one graph serves every batch size and each call
chooses by rows when it runs (the kernels up to their row limits, the unfused ops above).
Above the limits that choice is paid for on the host: every call goes through the
dispatcher into Python and launches the unfused ops one by one from there, 128 calls per
forward of the published model.  vLLM runs prefill-sized steps without CUDA graphs, so its
prefill waited on exactly that host time (round 7: the GPU idle 174 of 219 ms).

An engine that compiles a separate graph for token counts above :data:`FUSED_UP_TO` (vLLM:
compile ranges) runs :func:`unfuse_ops` on that graph: each op call is replaced by the aten
ops of its unfused path (residual add, RMSNorm, the GEMM, SiLU*mul or the q/k norm and
RoPE, then ``convgpt::kv_cache_write`` for the KV cache; the plain GEMM for
``narrow_linear``), which Inductor then fuses and launches from its generated code, as it
does for the engine's own Qwen3.  Graphs for smaller counts keep the ops.
"""

from __future__ import annotations

import contextlib
import operator
import os

import torch
import torch.nn.functional as F

from . import narrow_linear as _narrow
from . import norm_linear as _norm

# Both ops run their unfused path for every row count above this.
FUSED_UP_TO = max(_norm.MAX_ROWS, _narrow.MAX_ROWS, _narrow.MAX_ROWS_LONG_K)

# The switches that change what a traced graph holds (read while the adapters' layers are
# traced, not when the ops run): which ops the graph calls and whether attention gets k and v.
# An engine that caches compiled graphs across starts must key them on these too.
GRAPH_SWITCHES = ("CONVGPT_NARROW_LINEAR", "CONVGPT_QK_ROPE", "CONVGPT_KV_STORE")


def graph_switches() -> str:
    """The :data:`GRAPH_SWITCHES` as this process has them, e.g. for a compile cache key."""
    return ",".join(f"{name}={'0' if os.environ.get(name) == '0' else '1'}" for name in GRAPH_SWITCHES)


def _norm_linear_aten(x, residual, norm_weight, eps, weight, swiglu, rope=None):
    """``convgpt::norm_linear``'s (``rope``: ``norm_linear_rope``'s) unfused path in plain aten
    ops, as the op returns it."""
    return _norm.op_outputs(
        x, *_norm.norm_linear_torch(x, residual, norm_weight, eps, weight, swiglu, rope,
                                    silu_mul=_norm.silu_mul_torch)
    )


def _norm_linear_rope_aten(x, residual, norm_weight, eps, weight, *rope):
    return _norm_linear_aten(x, residual, norm_weight, eps, weight, False, _norm.QKRope(*rope))


def _norm_linear_rope_kv_aten(x, residual, norm_weight, eps, weight, *rope):
    """``norm_linear_rope_kv``: the same, then the engine's cache write of its k and v heads."""
    y, s = _norm_linear_rope_aten(x, residual, norm_weight, eps, weight, *rope)
    torch.ops.convgpt.kv_cache_write(y, weight, rope[5], rope[6])
    return y, s


# op name -> (its number of arguments, its unfused path taking the op's arguments)
_UNFUSED = {
    "norm_linear": (6, _norm_linear_aten),
    "norm_linear_rope": (12, _norm_linear_rope_aten),
    "norm_linear_rope_kv": (12, _norm_linear_rope_kv_aten),
    "narrow_linear": (2, F.linear),
}


def _replacement(node: torch.fx.Node):
    """(function of the node's tensor inputs, those input nodes) for an op call this pass
    rewrites, or None.  The other arguments (floats, flags, head counts, a missing residual)
    are fixed in the function."""
    ops = torch.ops.convgpt
    if node.op != "call_function" or node.kwargs:  # the adapters pass every argument by position
        return None
    for name, (n_args, unfused) in _UNFUSED.items():
        if hasattr(ops, name) and node.target is getattr(ops, name).default and len(node.args) == n_args:
            args = node.args
            inputs = [a for a in args if isinstance(a, torch.fx.Node)]

            def fn(*vals, args=args, unfused=unfused):
                it = iter(vals)
                return unfused(*(next(it) if isinstance(a, torch.fx.Node) else a for a in args))

            return fn, inputs
    return None


def unfuse_ops(graph: torch.fx.Graph) -> int:
    """Replace every ``convgpt::norm_linear(_rope)`` / ``convgpt::narrow_linear`` call in ``graph`` (an
    Inductor post-grad graph: every node carries its fake value in ``meta["val"]``) by the
    aten ops of the op's unfused path, traced as Inductor traces its own replacements.  Only
    for a graph that runs with more than :data:`FUSED_UP_TO` rows: there the ops would take
    that path anyway.  Returns the number of calls replaced."""
    from torch._guards import detect_fake_mode
    from torch._inductor.pattern_matcher import fwd_only

    replaced = 0
    for node in list(graph.nodes):
        found = _replacement(node)
        if found is None:
            continue
        fn, inputs = found
        if node.args[0].meta["val"].dim() != 2:  # the adapters hand over (tokens, width) rows
            continue
        vals = [n.meta["val"] for n in inputs]
        fake_mode = detect_fake_mode(vals)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            sub = fwd_only(fn, vals)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            out = graph.graph_copy(sub.graph, dict(zip(placeholders, inputs)))
        if isinstance(out, (tuple, list)):  # (y, s): the op's users are getitem nodes
            for user in list(node.users):
                if user.op != "call_function" or user.target is not operator.getitem:
                    raise RuntimeError(f"unfuse_ops: unexpected user {user.format_node()} of {node.format_node()}")
                user.replace_all_uses_with(out[user.args[1]])
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(out)
        graph.erase_node(node)
        replaced += 1
    return replaced
