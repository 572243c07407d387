"""Parameter and multiply-add counts of a model, without compiling it.

Parameters come from ``jax.eval_shape`` of ``init``. MACs come from walking the jaxpr of a forward
pass (tracing only): every convolution and matrix product is counted from its shapes, so the count
is independent of how the model code is written. Grouped levels are traced with the ``grouped``
lowering so the count is the architecture's, not that of a speed-motivated dense form.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core


def count_params(model: nn.Module, image_size: int = 224) -> int:
    """Number of trainable parameters (the ``params`` collection) of ``model``."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False)
    )
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def _eqn_macs(eqn: Any) -> int:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars)
        out = eqn.outvars[0].aval
        dn = eqn.params["dimension_numbers"]
        rhs_spec = dn.rhs_spec  # (out_feature, in_feature, spatial...)
        in_per_group = rhs.shape[rhs_spec[1]]
        window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
        batch_groups = eqn.params.get("batch_group_count", 1)
        return math.prod(out.shape) * in_per_group * window // batch_groups
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        out = eqn.outvars[0].aval
        return math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
    return 0


def _jaxpr_macs(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    total += _jaxpr_macs(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    total += _jaxpr_macs(sub)
    return total


def count_macs(model: nn.Module, image_size: int = 224, batch_size: int = 1) -> int:
    """Conv and dense multiply-adds of one eval-mode forward pass over ``batch_size`` images."""
    if hasattr(model, "pyconv_lowering"):
        model = model.clone(pyconv_lowering="grouped")
    x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(x.shape), train=False))
    jaxpr = jax.make_jaxpr(lambda v, img: model.apply(v, img, train=False))(variables, x)
    return _jaxpr_macs(jaxpr.jaxpr)


def model_table(pattern: str | None = None, image_size: int = 224) -> str:
    """Markdown table of parameters and MACs of the registered models, with published figures."""
    from pyconv_jax.models import MODEL_SPECS, create_model, list_models

    rows = [
        f"| model | parameters | GMACs at {image_size} | published params | published GMACs (224) "
        "| published top-1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in list_models(pattern):
        model = create_model(name)
        published = MODEL_SPECS[name].published
        top1 = f"{published.top1:.2f}%" if published.top1 else ""
        rows.append(
            f"| {name} | {count_params(model, image_size):,} | "
            f"{count_macs(model, image_size) / 1e9:.3f} | {published.params:,} | "
            f"{published.gmacs:.3f} | {top1} |"
        )
    return "\n".join(rows)
