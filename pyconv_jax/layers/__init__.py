"""Convolution layers: the pyramidal convolution, its lowerings, and the seed articles' designs."""

from pyconv_jax.layers.designs import (
    CONV_DESIGNS,
    Bottleneck1x1,
    ConvDesign,
    DepthwiseSeparableConv,
    GroupedConv,
    PlainConv,
    PyConvDesign,
    SpatiallySeparableConv,
    StackedConv,
    count_conv_design,
    get_conv_design,
)
from pyconv_jax.layers.lowering import LOWERINGS, block_diagonal_kernel, choose_lowering, grouped_conv
from pyconv_jax.layers.pointwise import PointwiseConv
from pyconv_jax.layers.pyconv import (
    ConvLevel,
    PyConv,
    kaiming_normal_fan_out,
    pyramid_levels,
    split_features,
)

__all__ = [
    "CONV_DESIGNS",
    "Bottleneck1x1",
    "ConvDesign",
    "DepthwiseSeparableConv",
    "GroupedConv",
    "PlainConv",
    "PyConvDesign",
    "SpatiallySeparableConv",
    "StackedConv",
    "count_conv_design",
    "get_conv_design",
    "LOWERINGS",
    "ConvLevel",
    "PointwiseConv",
    "PyConv",
    "block_diagonal_kernel",
    "choose_lowering",
    "grouped_conv",
    "kaiming_normal_fan_out",
    "pyramid_levels",
    "split_features",
]
