"""Lowerings of a grouped convolution with identical numerics, and the policy that picks one.

XLA lowers ``feature_group_count`` convolutions very slowly on CPU (see docs/benchmarks.md and
shared measurements: a 9x9 level with 16 groups runs ~11x slower grouped than as one dense conv
whose kernel is block-diagonal). The dense form multiplies the level's MACs by its group count, so
it pays only for small group counts. Every lowering computes the same function; the choice is a
speed decision only and gradients flow through each of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

LOWERINGS = ("auto", "grouped", "dense")

#: On CPU, levels with at most this many groups run as a dense block-diagonal conv (measured:
#: 4, 8 and 16 groups are 8-11x faster dense than grouped on XLA:CPU).
CPU_DENSE_MAX_GROUPS = 16

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def check_lowering(lowering: str) -> None:
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown conv lowering {lowering!r}; choose one of {list(LOWERINGS)}.")


def choose_lowering(groups: int, backend: str | None = None) -> str:
    """The ``auto`` policy: which lowering to use for a level with ``groups`` groups."""
    if groups == 1:
        return "grouped"  # a plain convolution; both lowerings are the same op
    backend = backend or jax.default_backend()
    if backend == "cpu" and groups <= CPU_DENSE_MAX_GROUPS:
        return "dense"
    return "grouped"


def block_diagonal_kernel(kernel: jax.Array, groups: int) -> jax.Array:
    """Expands a grouped HWIO kernel ``[kh, kw, C/g, O]`` into a dense ``[kh, kw, C, O]`` one.

    Output channels of group ``j`` read only input channels of group ``j``: the dense kernel is
    block-diagonal in (input group, output group), zero elsewhere.
    """
    if groups == 1:
        return kernel
    kh, kw, cin_g, cout = kernel.shape
    per_group = kernel.reshape(kh, kw, cin_g, groups, cout // groups)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    dense = jnp.einsum("hwigo,Gg->hwGigo", per_group, eye)
    return dense.reshape(kh, kw, groups * cin_g, cout)


def grouped_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    groups: int,
    strides: tuple[int, int] = (1, 1),
    dilation: int = 1,
    lowering: str = "auto",
) -> jax.Array:
    """Convolves ``x`` ``[N, H, W, C]`` with a grouped HWIO ``kernel`` ``[k, k, C/g, O]``.

    Padding is symmetric, ``dilation * (k - 1) // 2`` per side, as PyTorch's ``padding=k//2``.
    """
    check_lowering(lowering)
    if lowering == "auto":
        lowering = choose_lowering(groups)
    kh, kw = kernel.shape[:2]
    padding = [(dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2]
    if lowering == "dense":
        kernel, feature_groups = block_diagonal_kernel(kernel, groups), 1
    else:
        feature_groups = groups
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=feature_groups,
    )
