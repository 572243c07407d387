"""The pyramidal convolution (PyConv) layer.

A PyConv analyses one input with a pyramid of kernels (e.g. 3x3, 5x5, 7x7, 9x9). Larger kernels use
more groups so that the whole pyramid costs about as much as one 3x3 convolution. The levels run in
parallel on the same input and their outputs are concatenated on the channel axis (Duta et al.,
arXiv 2006.11538).

Parameter layout mirrors the published PyTorch checkpoints: a one-level PyConv holds its kernel
directly (``kernel``, like ``conv2.weight``); a multi-level PyConv holds one child per level named
``conv2_1``, ``conv2_2``, ... (like ``conv2.conv2_1.weight``), each with a grouped kernel of shape
``[k, k, in_channels // groups, level_features]`` (HWIO).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyconv_jax.layers import lowering as lowering_lib
from pyconv_jax.layers.epilogue import Epilogue

Dtype = Any
Initializer = Any

# PyTorch's kaiming_normal_(mode="fan_out", nonlinearity="relu"), as the published models use it.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: Name of the i-th (1-based) level's child module, as in the published checkpoints.
LEVEL_NAME = "conv2_{}"


def split_features(total: int, num_levels: int) -> tuple[int, ...]:
    """Splits ``total`` output channels over the pyramid levels by the paper's rule.

    4 levels: quarters; 3 levels: 1/4, 1/4, 1/2; 2 levels: halves; 1 level: all.
    """
    if num_levels == 1:
        return (total,)
    if num_levels == 2:
        parts = (total // 2, total // 2)
    elif num_levels == 3:
        parts = (total // 4, total // 4, total // 2)
    elif num_levels == 4:
        parts = (total // 4,) * 4
    else:
        raise ValueError(
            f"PyConv: the paper's channel split is defined for 1 to 4 levels, got {num_levels}; "
            "pass `features` as a per-level sequence instead."
        )
    if sum(parts) != total:
        raise ValueError(
            f"PyConv: features={total} cannot be split evenly over {num_levels} levels "
            f"(the paper's rule gives {list(parts)}); use a multiple of "
            f"{ {2: 2, 3: 4, 4: 4}[num_levels] } or pass a per-level sequence."
        )
    return parts


def pyramid_levels(
    features: int | Sequence[int],
    kernel_sizes: Sequence[int],
    groups: Sequence[int] | None = None,
) -> tuple[tuple[int, int, int], ...]:
    """Validates a pyramid spec; returns ``(kernel_size, groups, features)`` per level.

    Raises ``ValueError`` naming the offending level and numbers for: no levels, mismatched
    lengths, even or non-positive kernels, output channels not divisible by the level's groups.
    """
    kernels = tuple(int(k) for k in kernel_sizes)
    if not kernels:
        raise ValueError("PyConv: kernel_sizes is empty; give at least one pyramid level.")
    groups = tuple(int(g) for g in groups) if groups is not None else (1,) * len(kernels)
    if len(groups) != len(kernels):
        raise ValueError(
            f"PyConv: {len(kernels)} kernel sizes {list(kernels)} but {len(groups)} group "
            f"counts {list(groups)}; give one group count per level."
        )
    if isinstance(features, int):
        features = split_features(features, len(kernels))
    else:
        features = tuple(int(f) for f in features)
        if len(features) != len(kernels):
            raise ValueError(
                f"PyConv: {len(kernels)} kernel sizes {list(kernels)} but {len(features)} "
                f"per-level features {list(features)}; give one output width per level."
            )
    for level, (k, g, f) in enumerate(zip(kernels, groups, features), start=1):
        if k < 1 or k % 2 == 0:
            raise ValueError(
                f"PyConv level {level}: kernel size {k} must be a positive odd number "
                "(symmetric 'same' padding needs an odd kernel)."
            )
        if g < 1:
            raise ValueError(f"PyConv level {level}: groups must be >= 1, got {g}.")
        if f < 1:
            raise ValueError(f"PyConv level {level}: output channels must be >= 1, got {f}.")
        if f % g:
            raise ValueError(
                f"PyConv level {level} (kernel {k}x{k}): {f} output channels are not "
                f"divisible by {g} groups; use a multiple of {g} or fewer groups."
            )
    return tuple(zip(kernels, groups, features))


def positive_pair(value: int | Sequence[int], what: str, owner: str = "PyConv") -> tuple[int, int]:
    """``value`` (an int or a pair of ints, e.g. strides) as a pair; raises, naming ``owner`` and
    ``what``, unless both are positive."""
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{owner}: {what} must be a positive int or pair, got {value!r}.")
    return pair  # type: ignore[return-value]


class PyConv(nn.Module):
    """Pyramidal convolution: parallel convolutions with growing kernels, concatenated.

    Attributes:
      features: total output channels, split over the levels by the paper's rule, or a
        per-level sequence of output channels.
      kernel_sizes: odd kernel size of each level, e.g. ``(3, 5, 7, 9)``.
      groups: group count of each level, e.g. ``(1, 4, 8, 16)``; default 1 for every level.
      strides: stride of every level (int or pair).
      dilation: kernel dilation of every level.
      use_bias: whether each level adds a bias.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` follows the input.
      param_dtype: storage dtype of the kernels.
      kernel_init: initializer of each level's grouped kernel.
      lowering: how XLA computes the grouped levels: ``"auto"`` (per backend and dtype, see
        :mod:`pyconv_jax.layers.lowering`), ``"grouped"``, ``"dense"``, ``"split"`` or
        ``"onednn"``. Results are equal up to float rounding.

    Call with ``x`` of shape ``[N, H, W, C]``; returns ``[N, H', W', sum(level features)]``, with
    symmetric padding ``dilation * (k - 1) // 2`` so output sizes match PyTorch's.
    """

    features: int | Sequence[int]
    kernel_sizes: Sequence[int] = (3,)
    groups: Sequence[int] | None = None
    strides: int | Sequence[int] = 1
    dilation: int = 1
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = kaiming_normal_fan_out
    bias_init: Initializer = nn.initializers.zeros
    lowering: str = "auto"

    def __post_init__(self) -> None:
        # Validate at construction so a bad spec fails in the user's terms, not inside XLA.
        self.level_specs()
        positive_pair(self.strides, "strides")
        if self.dilation < 1:
            raise ValueError(f"PyConv: dilation must be >= 1, got {self.dilation}.")
        lowering_lib.check_lowering(self.lowering)
        super().__post_init__()

    def level_specs(self) -> tuple[tuple[int, int, int], ...]:
        """Returns ``(kernel_size, groups, features)`` for each level, validating the spec."""
        return pyramid_levels(self.features, self.kernel_sizes, self.groups)

    @property
    def out_features(self) -> int:
        return sum(f for _, _, f in self.level_specs())

    @nn.compact
    def __call__(self, x: jax.Array, epilogue: Epilogue | None = None, *,
                 pieces: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        """Applies every level to ``x`` ``[N, H, W, C]`` and concatenates their outputs, each
        level with its channels of ``epilogue`` (e.g. a folded inference BatchNorm and ReLU).

        With ``pieces``, returns the levels' outputs as a tuple instead, unconcatenated: for a
        :class:`~pyconv_jax.layers.norm.BatchNorm` to take as they are, whose backward pass then
        writes each level's gradient without slicing a concatenated one.
        """
        specs = self.level_specs()
        if len(specs) == 1:
            y = _conv_level(self, x, *specs[0], level=1, epilogue=epilogue)
            return (y,) if pieces else y
        starts = [sum(f for _, _, f in specs[:i]) for i in range(len(specs) + 1)]
        outputs = [
            ConvLevel(
                features=f,
                kernel_size=k,
                groups=g,
                strides=self.strides,
                dilation=self.dilation,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                lowering=self.lowering,
                level=i,
                name=LEVEL_NAME.format(i),
            )(x, None if epilogue is None else epilogue.channels(starts[i - 1], starts[i]))
            for i, (k, g, f) in enumerate(specs, start=1)
        ]
        return tuple(outputs) if pieces else jnp.concatenate(outputs, axis=-1)


class ConvLevel(nn.Module):
    """One pyramid level: a (possibly grouped, strided, dilated) KxK convolution."""

    features: int
    kernel_size: int
    groups: int = 1
    strides: int | Sequence[int] = 1
    dilation: int = 1
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = kaiming_normal_fan_out
    bias_init: Initializer = nn.initializers.zeros
    lowering: str = "auto"
    level: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, epilogue: Epilogue | None = None) -> jax.Array:
        return _conv_level(self, x, self.kernel_size, self.groups, self.features, level=self.level,
                           epilogue=epilogue)


def _conv_level(
    module: PyConv | ConvLevel, x: jax.Array, kernel_size: int, groups: int, features: int,
    level: int, epilogue: Epilogue | None = None,
) -> jax.Array:
    """Declares one level's parameters on ``module`` and applies the convolution (and
    ``epilogue``)."""
    in_features = x.shape[-1]
    if in_features % groups:
        raise ValueError(
            f"PyConv level {level} (kernel {kernel_size}x{kernel_size}): {in_features} input "
            f"channels are not divisible by {groups} groups; use a multiple of {groups} input "
            "channels or fewer groups."
        )
    kernel = module.param(
        "kernel",
        module.kernel_init,
        (kernel_size, kernel_size, in_features // groups, features),
        module.param_dtype,
    )
    bias = module.param("bias", module.bias_init, (features,), module.param_dtype) if module.use_bias else None
    dtype = module.dtype if module.dtype is not None else jnp.result_type(x, kernel)
    x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
    bias = None if bias is None else jnp.asarray(bias, dtype)
    conv = functools.partial(lowering_lib.grouped_conv, x, kernel, groups=groups,
                             strides=positive_pair(module.strides, "strides"),
                             dilation=module.dilation, lowering=module.lowering)
    if epilogue is not None:
        return conv(epilogue=epilogue.after_bias(bias))
    y = conv()
    return y if bias is None else y + bias


__all__ = ["PyConv", "ConvLevel", "pyramid_levels", "split_features", "kaiming_normal_fan_out"]
