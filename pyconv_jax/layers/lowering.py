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
- ``onednn``: oneDNN's grouped conv, called through XLA's FFI (CPU, float32;
  :mod:`pyconv_jax.layers.onednn_conv`). Real groups, every core, fast gradients: the fastest
  on CPU wherever the library is built.

On CPU, ``dense`` and ``split`` convs go through :func:`pyconv_jax.layers.cpu_conv.conv`, which
runs narrow convs as batch slices so that XLA:CPU uses every core, and whose backward pass avoids
XLA:CPU's slow weight and strided input gradients (a ``custom_vjp``: reverse mode only).
``grouped`` is always XLA's own conv, so it is the lowering to pick for forward-mode
differentiation (``jax.jvp``, ``jax.jacfwd``).

Every lowering computes the same function (up to float rounding); the choice is a speed decision
only, and gradients flow through each of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pyconv_jax.layers import cpu_conv, onednn_conv
from pyconv_jax.layers.epilogue import Epilogue

LOWERINGS = ("auto", "grouped", "dense", "split", "onednn")

#: ``split`` chunks have at least this many input channels: measured on XLA:CPU, narrower dense
#: convs (down to one group per chunk) lose more to poor kernel efficiency than they save in MACs.
SPLIT_MIN_CHANNELS = 32


def check_lowering(lowering: str) -> None:
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown conv lowering {lowering!r}; choose one of {list(LOWERINGS)}.")


def choose_lowering(groups: int, backend: str | None = None, dtype=jnp.float32) -> str:
    """The ``auto`` policy: the native ``grouped`` conv on GPU/TPU. On CPU, ``onednn`` where it
    is built and supports ``dtype`` and the program runs on one device, else ``split``.

    Several CPU devices get ``split``: XLA's SPMD partitioner cannot split an FFI call over the
    batch, so it gathers the sharded batch and every device would compute all of it.
    ``groups`` is part of the signature for policies that depend on it; with one group every
    lowering is a plain convolution (on CPU ``onednn`` and ``split`` still have the faster
    backward passes).
    """
    del groups
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "grouped"
    if onednn_conv.available() and onednn_conv.supports(dtype) and jax.device_count() == 1:
        return "onednn"
    return "split"


def resolve(lowering: str, groups: int = 1, dtype=jnp.float32) -> str:
    """The lowering that ``lowering`` (possibly ``"auto"``) runs here."""
    check_lowering(lowering)
    return choose_lowering(groups, dtype=dtype) if lowering == "auto" else lowering


def fuses_epilogue(lowering: str, dtype=jnp.float32) -> bool:
    """Whether convs of this lowering apply an :class:`Epilogue` inside their own output pass
    (``onednn``), so that an inference BatchNorm + ReLU costs no pass of its own."""
    return resolve(lowering, dtype=dtype) == "onednn"


def split_chunks(in_features: int, groups: int) -> int:
    """How many chunks ``split`` cuts a level into: the most that divide ``groups`` while each
    keeps at least :data:`SPLIT_MIN_CHANNELS` input channels (at least one chunk)."""
    limit = max(1, in_features // SPLIT_MIN_CHANNELS)
    return max(c for c in range(1, min(groups, limit) + 1) if groups % c == 0)


def check_onednn_backend() -> None:
    """Raises in the user's terms when the ``onednn`` lowering is asked for off CPU."""
    if jax.default_backend() != "cpu":
        raise ValueError(f"the 'onednn' conv lowering runs on CPU only, not on "
                         f"{jax.default_backend()}; use lowering='auto'.")


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
    siblings: int = 1,
    epilogue: Epilogue | None = None,
) -> jax.Array:
    """Convolves ``x`` ``[N, H, W, C]`` with a grouped HWIO ``kernel`` ``[k, k, C/g, O]``.

    Padding is symmetric, ``dilation * (k - 1) // 2`` per side, as PyTorch's ``padding=k//2``.
    ``siblings``: how many independent convs (this one included) the CPU conv runs alongside.
    ``epilogue``: applied to the output, inside the conv's own pass where the lowering can
    (:func:`fuses_epilogue`).
    """
    lowering = resolve(lowering, groups, jnp.result_type(x, kernel))
    if epilogue is not None and lowering != "onednn":
        return epilogue.apply(grouped_conv(x, kernel, groups=groups, strides=strides,
                                           dilation=dilation, lowering=lowering))
    if lowering == "split":
        chunks = split_chunks(x.shape[-1], groups)
        if chunks > 1:
            parts = zip(jnp.split(x, chunks, axis=-1), jnp.split(kernel, chunks, axis=-1))
            return jnp.concatenate([
                grouped_conv(xc, kc, groups=groups // chunks, strides=strides, dilation=dilation,
                             lowering="dense", siblings=chunks) for xc, kc in parts], axis=-1)
        lowering = "dense"
    kh, kw = kernel.shape[:2]
    padding = ((dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2)
    if lowering == "onednn":
        check_onednn_backend()
        return onednn_conv.conv_with_epilogue(x, kernel, epilogue, strides=tuple(strides),
                                              padding=padding, dilation=(dilation, dilation),
                                              groups=groups)
    if lowering == "dense":
        kernel, groups = block_diagonal_kernel(kernel, groups), 1
        if jax.default_backend() == "cpu":
            return cpu_conv.conv(x, kernel, tuple(strides), padding, (dilation, dilation),
                                 siblings)
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=(dilation, dilation),
        dimension_numbers=cpu_conv.DIMENSION_NUMBERS, feature_group_count=groups)
