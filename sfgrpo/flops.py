"""FLOPs of a traced program, counted from its jaxpr with every loop body times its trip count.

XLA's ``cost_analysis()`` counts the body of a while loop once, whatever its trip count; the GRPO programs
are loops of loops (sampler steps, optimizer steps, micro-batches, window steps, and the transformer's
scan over its blocks), so its figure is short by those factors. Here the jaxpr is walked instead: a
``scan`` body counts ``length`` times, a ``cond`` its costliest branch, and a ``shard_map`` body (written
per shard) once per shard. Only matrix products and convolutions are counted (2 FLOPs per multiply-add):
they are nearly all of a transformer's and a VAE's work. What remat recomputes in the backward pass is
in the jaxpr, so it is counted.
"""

from __future__ import annotations

import math
from typing import Any

from jax.extend import core


def count(jaxpr: Any) -> tuple[float, int]:
    """(FLOPs, while loops of unknown trip count, each counted once) of a ``ClosedJaxpr`` or ``Jaxpr``."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    flops, unknown = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            flops += _dot_flops(eqn)
            continue
        if name == "conv_general_dilated":
            flops += _conv_flops(eqn)
            continue
        subs = [count(j) for j in _sub_jaxprs(eqn.params)]
        if not subs:
            continue
        if name == "cond":
            best = max(subs)
            flops, unknown = flops + best[0], unknown + best[1]
            continue
        times = 1
        if name == "scan":
            times = int(eqn.params["length"])
        elif name == "while":
            unknown += 1
        elif name == "shard_map":
            mesh = eqn.params["mesh"]
            manual = eqn.params.get("manual_axes", eqn.params.get("axis_names", mesh.axis_names))
            times = math.prod(mesh.shape[a] for a in manual)
        for f, u in subs:
            flops, unknown = flops + times * f, unknown + u
    return flops, unknown


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    out = []
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, core.ClosedJaxpr | core.Jaxpr):
                out.append(v)
    return out


def _dot_flops(eqn: Any) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn: Any) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    spec = dn.rhs_spec  # (out feature, in feature, spatial...) positions in the kernel's shape
    kernel = math.prod(rhs[d] for d in spec[2:]) * rhs[spec[1]]
    return 2.0 * math.prod(out) * kernel
