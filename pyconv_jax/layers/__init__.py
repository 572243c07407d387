"""Convolution layers: the pyramidal convolution and its lowerings."""

from pyconv_jax.layers.lowering import LOWERINGS, block_diagonal_kernel, choose_lowering, grouped_conv
from pyconv_jax.layers.pyconv import (
    ConvLevel,
    PyConv,
    kaiming_normal_fan_out,
    pyramid_levels,
    split_features,
)

__all__ = [
    "LOWERINGS",
    "ConvLevel",
    "PyConv",
    "block_diagonal_kernel",
    "choose_lowering",
    "grouped_conv",
    "kaiming_normal_fan_out",
    "pyramid_levels",
    "split_features",
]
