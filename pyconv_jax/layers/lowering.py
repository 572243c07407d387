"""Lowerings of a grouped convolution with identical numerics, and the policy that picks one.

- ``grouped``: one ``feature_group_count`` convolution. The right op on GPU/TPU, but XLA:CPU
  lowers it very slowly, above all its backward pass (a 9x9 level with 16 groups: 0.46 s forward
  and 13.7 s forward+backward, against 0.03 s and 0.09 s dense; docs/benchmarks.md).
- ``dense``: one plain convolution whose kernel is block-diagonal. Fast per MAC on CPU, but it
  multiplies the level's MACs by its group count.
- ``split``: the channels cut into a few chunks of at least :data:`SPLIT_MIN_CHANNELS` input
  channels, each a ``dense`` conv over its own groups, outputs concatenated. It keeps the dense
  form's fast kernels while cutting its wasted MACs by the chunk count; measured 1.3-5.6x faster
  than ``dense`` forward+backward on the PyConvResNet levels (docs/benchmarks.md).

``dense`` and ``split`` also run stride-2 levels with kernels of :data:`S2D_MIN_KERNEL` or more as
a stride-1 conv over a space-to-depth input (:func:`space_to_depth_conv`): XLA:CPU's backward pass
of a strided conv is slow (9x9, 64->16 channels at 16x112x112: 866 ms forward+backward strided,
332 ms this way), while for 3x3 the 78% extra MACs cost more than they save.

Every lowering computes the same function (up to float rounding); the choice is a speed decision
only, and gradients flow through each of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

LOWERINGS = ("auto", "grouped", "dense", "split")

#: ``split`` chunks have at least this many input channels: measured on XLA:CPU, narrower dense
#: convs (down to one group per chunk) lose more to poor kernel efficiency than they save in MACs.
SPLIT_MIN_CHANNELS = 32

#: Stride-2 ``dense``/``split`` convs with kernels at least this large use space-to-depth
#: (measured forward+backward on XLA:CPU: 7x7 555 -> 305 ms, 9x9 866 -> 332 ms; 3x3 slower).
S2D_MIN_KERNEL = 7

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def check_lowering(lowering: str) -> None:
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown conv lowering {lowering!r}; choose one of {list(LOWERINGS)}.")


def choose_lowering(groups: int, backend: str | None = None) -> str:
    """The ``auto`` policy: ``split`` on CPU, the native ``grouped`` conv on GPU/TPU.

    ``groups`` is part of the signature for policies that depend on it; with one group every
    lowering is a plain convolution (on CPU ``split`` still picks space-to-depth when strided).
    """
    del groups
    backend = backend or jax.default_backend()
    return "split" if backend == "cpu" else "grouped"


def split_chunks(in_features: int, groups: int) -> int:
    """How many chunks ``split`` cuts a level into: the most that divide ``groups`` while each
    keeps at least :data:`SPLIT_MIN_CHANNELS` input channels (at least one chunk)."""
    limit = max(1, in_features // SPLIT_MIN_CHANNELS)
    return max(c for c in range(1, min(groups, limit) + 1) if groups % c == 0)


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


def space_to_depth_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-2 conv of odd square ``kernel`` (padding ``k // 2``) as a stride-1 conv.

    Each 2x2 block of pixels becomes one pixel with 4x the channels, and the kernel is rearranged
    to match (tap ``a = 2 q + r + k // 2`` of the original lands at block offset ``q``, pixel
    ``r``), so the result equals the strided conv's while XLA differentiates a stride-1 conv.
    """
    k, _, c, out = kernel.shape
    p = k // 2
    n, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))  # zeros, as the conv's own padding
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(n, h2, 2, w2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h2, w2, 4 * c)
    first, last = -((p + 1) // 2), p // 2  # block offsets q the kernel reaches
    taps = last - first + 1
    lead = -(2 * first + p)  # 0 or 1 zero taps in front, so that taps pair up as (q, r)
    kernel = jnp.pad(kernel, ((lead, 2 * taps - k - lead),) * 2 + ((0, 0), (0, 0)))
    kernel = kernel.reshape(taps, 2, taps, 2, c, out).transpose(0, 2, 1, 3, 4, 5)
    return lax.conv_general_dilated(
        x, kernel.reshape(taps, taps, 4 * c, out), window_strides=(1, 1),
        padding=[(-first, last)] * 2, dimension_numbers=_DIMENSION_NUMBERS)


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
    if lowering == "split":
        chunks = split_chunks(x.shape[-1], groups)
        if chunks > 1:
            parts = zip(jnp.split(x, chunks, axis=-1), jnp.split(kernel, chunks, axis=-1))
            return jnp.concatenate([
                grouped_conv(xc, kc, groups=groups // chunks, strides=strides, dilation=dilation,
                             lowering="dense") for xc, kc in parts], axis=-1)
        lowering = "dense"
    kh, kw = kernel.shape[:2]
    padding = [(dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2]
    if lowering == "dense":
        kernel, feature_groups = block_diagonal_kernel(kernel, groups), 1
        if (tuple(strides) == (2, 2) and dilation == 1 and kh == kw and kh % 2
                and kh >= S2D_MIN_KERNEL):
            return space_to_depth_conv(x, kernel)
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
