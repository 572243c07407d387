"""The convolution designs that led to PyConv, as layers with one common signature.

The seed articles tell how convnets got lighter by reshaping the kernel; each step is one layer
here, so a model can take its spatial convolution type from a config (:data:`CONV_DESIGNS`):

(``C`` in, ``O`` out, ``K`` = kernel_size; weights without bias)

* ``plain``: one KxK conv; ``K^2 C O``.
* ``stacked``: ``n = (K-1)/2`` 3x3 convs (ReLU between) covering KxK; ``9 C O + 9 (n-1) O^2``.
* ``bottleneck``: 1x1 reduce to ``B`` -> KxK -> 1x1 expand (ReLU between);
  ``C B + K^2 B^2 + B O``.
* ``grouped``: KxK conv in ``G`` groups; ``K^2 C O / G``.
* ``depthwise_separable``: depthwise KxK (multiplier ``M``) -> pointwise 1x1;
  ``K^2 C M + C M O``.
* ``spatially_separable``: Kx1 conv to ``H`` channels -> 1xK conv; ``K C H + K H O``.
* ``pyconv``: :class:`~pyconv_jax.layers.PyConv` with levels 3, 5, ..., K;
  ``sum_levels k^2 C f / g``.

Common signature: ``Cls(features=O, kernel_size=K, strides=s, **design_specific)`` applied to
``x`` ``[N, H, W, C]`` returns ``[N, ceil(H / s), ceil(W / s), O]``. No bias by default
(``use_bias=True`` adds one to every convolution of the design), symmetric 'same' padding
``(k - 1) // 2`` per kernel axis, so every design's receptive field is exactly KxK and a strided
design equals its stride-1 output subsampled (``y_s[i, j] = y_1[s i, s j]``). Where a design has
several convolutions, the stride goes where this stays true and is cheapest: on the last 3x3 of
``stacked``, on the KxK conv of ``bottleneck``, on the depthwise conv, split as (s, 1) and (1, s)
over the two convs of ``spatially_separable``.

Every design also reports its parameter and multiply-add counts by closed formula,
``Cls.count(in_features, features, kernel_size, strides=..., height=H, width=W, **fields)``
-> ``(params, macs)`` (MACs of one image; ``H, W`` is the input size). The tests check these
against the variables that ``init`` creates and the MACs of the traced forward pass.

``fit_groups=True`` (grouped, pyconv) replaces each group count ``g`` by
``gcd(g, in_channels, out_channels)``, so one configuration also fits a first layer that sees
3 RGB channels; the default ``False`` raises on a group count that does not divide.

Grouped and depthwise convolutions go through :func:`pyconv_jax.layers.lowering.grouped_conv`
(``lowering="auto"`` picks oneDNN or dense block-diagonal chunks on CPU, where XLA's grouped
conv is slow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyconv_jax.layers import lowering as lowering_lib
from pyconv_jax.layers.pyconv import PyConv, kaiming_normal_fan_out, positive_pair, pyramid_levels

Dtype = Any
Initializer = Any
Activation = Callable[[jax.Array], jax.Array]

#: PyConv's group count for each kernel size in the paper's first stage (3x3 g1 ... 9x9 g16).
PYCONV_PAPER_GROUPS = {3: 1, 5: 4, 7: 8, 9: 16}


def out_size(size: int, stride: int) -> int:
    """Output length of an odd-kernel conv with symmetric 'same' padding: ``ceil(size/stride)``."""
    return (size - 1) // stride + 1


def fitted_groups(groups: int, in_features: int, out_features: int) -> int:
    """The largest group count dividing ``groups``, the input and the output channels."""
    return math.gcd(math.gcd(groups, in_features), out_features)


def _conv_count(
    kh: int, kw: int, cin: int, cout: int, groups: int, out_h: int, out_w: int, use_bias: bool
) -> tuple[int, int]:
    """(params, MACs) of one grouped conv: ``kh kw cin/g cout`` weights, used per output pixel."""
    weights = kh * kw * (cin // groups) * cout
    return weights + (cout if use_bias else 0), weights * out_h * out_w


def conv2d(
    module: nn.Module,
    x: jax.Array,
    *,
    features: int,
    kernel_size: tuple[int, int],
    groups: int = 1,
    strides: tuple[int, int] = (1, 1),
    where: str = "",
) -> jax.Array:
    """Declares ``kernel`` (HWIO ``[kh, kw, C/g, O]``) and optional ``bias`` on ``module``; applies.

    ``module`` supplies use_bias, dtype, param_dtype, kernel_init, bias_init and lowering.
    """
    in_features = x.shape[-1]
    if in_features % groups or features % groups:
        raise ValueError(
            f"{where or type(module).__name__}: {in_features} input and {features} output "
            f"channels must both be divisible by {groups} groups; use multiples of {groups}, "
            "fewer groups, or fit_groups=True."
        )
    kh, kw = kernel_size
    kernel = module.param(
        "kernel", module.kernel_init, (kh, kw, in_features // groups, features), module.param_dtype
    )
    bias = (
        module.param("bias", module.bias_init, (features,), module.param_dtype)
        if module.use_bias
        else None
    )
    dtype = module.dtype if module.dtype is not None else jnp.result_type(x, kernel)
    x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
    y = lowering_lib.grouped_conv(
        x, kernel, groups=groups, strides=strides, lowering=module.lowering
    )
    if bias is not None:
        y = y + jnp.asarray(bias, dtype)
    return y


class Conv2D(nn.Module):
    """One (possibly grouped, strided, non-square) convolution; a building block of the designs."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    groups: int = 1
    strides: tuple[int, int] = (1, 1)
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = kaiming_normal_fan_out
    bias_init: Initializer = nn.initializers.zeros
    lowering: str = "auto"
    where: str = ""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d(
            self, x, features=self.features, kernel_size=tuple(self.kernel_size),
            groups=self.groups, strides=tuple(self.strides), where=self.where,
        )


class ConvDesign(nn.Module):
    """Fields shared by every design; see the module docstring for the common contract.

    Attributes:
      features: output channels ``O``.
      kernel_size: the (odd) side ``K`` of the window every output pixel sees.
      strides: int or pair.
      use_bias: add a bias to every convolution of the design.
      dtype: compute dtype; ``None`` follows the input.
      param_dtype: storage dtype of the kernels.
      kernel_init / bias_init: initializers of every convolution.
      lowering: lowering of grouped convolutions (:data:`pyconv_jax.layers.lowering.LOWERINGS`).
    """

    features: int
    kernel_size: int = 3
    strides: int | Sequence[int] = 1
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = kaiming_normal_fan_out
    bias_init: Initializer = nn.initializers.zeros
    lowering: str = "auto"

    #: Key of the design in :data:`CONV_DESIGNS`.
    design: ClassVar[str] = ""
    #: Smallest kernel size the design is defined for.
    min_kernel_size: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        name = type(self).__name__
        k = self.kernel_size
        if not isinstance(k, int) or k < self.min_kernel_size or k % 2 == 0:
            raise ValueError(
                f"{name}: kernel_size must be an odd int >= {self.min_kernel_size} (symmetric "
                f"'same' padding), got {k!r}."
            )
        if self.features < 1:
            raise ValueError(f"{name}: features must be >= 1, got {self.features}.")
        positive_pair(self.strides, "strides", name)
        lowering_lib.check_lowering(self.lowering)

    @property
    def stride_pair(self) -> tuple[int, int]:
        return positive_pair(self.strides, "strides", type(self).__name__)

    def _conv(self, name: str, features: int, kernel_size: tuple[int, int], groups: int = 1,
              strides: tuple[int, int] = (1, 1)) -> Conv2D:
        return Conv2D(
            features=features, kernel_size=kernel_size, groups=groups, strides=strides,
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, bias_init=self.bias_init, lowering=self.lowering,
            where=f"{type(self).__name__} ({name})", name=name,
        )

    def _single(self, x: jax.Array, groups: int = 1) -> jax.Array:
        """One KxK conv whose ``kernel`` (and ``bias``) live directly on this module."""
        k = self.kernel_size
        return conv2d(
            self, x, features=self.features, kernel_size=(k, k), groups=groups,
            strides=self.stride_pair, where=type(self).__name__,
        )

    # ------------------------------------------------------------------ counting by formula
    def conv_counts(self, in_features: int, height: int, width: int) -> tuple[int, int]:
        """``(params, macs)`` of this layer on one ``[height, width, in_features]`` input.

        Every design in ``CONV_DESIGNS`` defines it; a new design must too.
        """
        raise TypeError(f"{type(self).__name__} does not define conv_counts; add its formula.")

    @classmethod
    def count(
        cls,
        in_features: int,
        features: int,
        kernel_size: int = 3,
        *,
        strides: int | Sequence[int] = 1,
        height: int = 1,
        width: int = 1,
        **fields: Any,
    ) -> tuple[int, int]:
        """``(params, macs)`` by formula for ``cls(features, kernel_size, strides, **fields)``.

        ``height`` x ``width`` is the input size (MACs are for one image; with the default 1 x 1
        and stride 1 they are the MACs per output pixel, equal to the weights without bias).
        """
        layer = cls(features=features, kernel_size=kernel_size, strides=strides, **fields)
        return layer.conv_counts(in_features, height, width)

    def _out_hw(self, height: int, width: int) -> tuple[int, int]:
        sh, sw = self.stride_pair
        return out_size(height, sh), out_size(width, sw)


def _sum_counts(*counts: tuple[int, int]) -> tuple[int, int]:
    return sum(p for p, _ in counts), sum(m for _, m in counts)


class PlainConv(ConvDesign):
    """A plain KxK convolution: ``K^2 C O`` weights."""

    design: ClassVar[str] = "plain"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._single(x)

    def conv_counts(self, in_features: int, height: int, width: int) -> tuple[int, int]:
        k = self.kernel_size
        return _conv_count(k, k, in_features, self.features, 1, *self._out_hw(height, width),
                           self.use_bias)


class StackedConv(ConvDesign):
    """``n = (K - 1) / 2`` stacked 3x3 convs that together see a KxK window (VGG).

    The first maps ``C -> hidden``, the others ``hidden -> hidden``, the last ``-> O``; an
    activation (ReLU) between them, none after the last. The stride is on the last conv so the
    receptive field stays exactly KxK. With ``C = O = c``: ``9 n c^2`` weights (two 3x3: ``18 c^2``
    for a 5x5 window instead of ``25 c^2``; three: ``27 c^2`` instead of ``49 c^2``).

    Attributes:
      hidden_features: width between the 3x3 convs (default ``features``).
      activation: applied between the convs (``None``: purely linear stack).
    """

    hidden_features: int | None = None
    activation: Activation | None = nn.relu

    design: ClassVar[str] = "stacked"
    min_kernel_size: ClassVar[int] = 3

    @property
    def num_convs(self) -> int:
        return (self.kernel_size - 1) // 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.hidden_features or self.features
        n = self.num_convs
        for i in range(1, n + 1):
            last = i == n
            x = self._conv(
                f"conv{i}", self.features if last else hidden, (3, 3),
                strides=self.stride_pair if last else (1, 1),
            )(x)
            if not last and self.activation is not None:
                x = self.activation(x)
        return x

    def conv_counts(self, in_features: int, height: int, width: int) -> tuple[int, int]:
        hidden = self.hidden_features or self.features
        n = self.num_convs
        counts, cin = [], in_features
        for i in range(1, n + 1):
            last = i == n
            cout = self.features if last else hidden
            oh, ow = self._out_hw(height, width) if last else (height, width)
            counts.append(_conv_count(3, 3, cin, cout, 1, oh, ow, self.use_bias))
            cin = cout
        return _sum_counts(*counts)


class Bottleneck1x1(ConvDesign):
    """1x1 reduce ``C -> B``, KxK ``B -> B`` (strided), 1x1 expand ``B -> O`` (Inception/ResNet).

    ``C B + K^2 B^2 + B O`` weights: 256-32-256 with a 3x3 is 8,192 + 9,216 + 8,192 = 25,600
    against 589,824 for a plain 3x3 256->256 conv.

    Attributes:
      bottleneck_features: ``B``; default ``max(1, features // reduction)``.
      reduction: ``O / B`` when ``bottleneck_features`` is not given (256 / 32 = 8).
      activation: applied after the reduce and the KxK conv (``None``: linear).
    """

    bottleneck_features: int | None = None
    reduction: int = 8
    activation: Activation | None = nn.relu

    design: ClassVar[str] = "bottleneck"

    @property
    def inner_features(self) -> int:
        return self.bottleneck_features or max(1, self.features // self.reduction)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, b = self.kernel_size, self.inner_features
        x = self._conv("reduce", b, (1, 1))(x)
        if self.activation is not None:
            x = self.activation(x)
        x = self._conv("conv", b, (k, k), strides=self.stride_pair)(x)
        if self.activation is not None:
            x = self.activation(x)
        return self._conv("expand", self.features, (1, 1))(x)

    def conv_counts(self, in_features: int, height: int, width: int) -> tuple[int, int]:
        k, b = self.kernel_size, self.inner_features
        oh, ow = self._out_hw(height, width)
        return _sum_counts(
            _conv_count(1, 1, in_features, b, 1, height, width, self.use_bias),
            _conv_count(k, k, b, b, 1, oh, ow, self.use_bias),
            _conv_count(1, 1, b, self.features, 1, oh, ow, self.use_bias),
        )


class GroupedConv(ConvDesign):
    """A KxK conv in ``groups`` groups (AlexNet, ResNeXt): ``K^2 C O / G`` weights.

    512->512 in 2 groups: ``2 K^2 256^2`` instead of ``K^2 512^2``.

    Attributes:
      groups: ``G``; it must divide the input and output channels (or set ``fit_groups``).
      fit_groups: use ``gcd(G, C, O)`` groups instead of raising when ``G`` does not divide.
    """

    groups: int = 2
    fit_groups: bool = False

    design: ClassVar[str] = "grouped"

    def _validate(self) -> None:
        super()._validate()
        if self.groups < 1:
            raise ValueError(f"GroupedConv: groups must be >= 1, got {self.groups}.")

    def groups_for(self, in_features: int) -> int:
        if self.fit_groups:
            return fitted_groups(self.groups, in_features, self.features)
        return self.groups

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._single(x, groups=self.groups_for(x.shape[-1]))

    def conv_counts(self, in_features: int, height: int, width: int) -> tuple[int, int]:
        k = self.kernel_size
        return _conv_count(k, k, in_features, self.features, self.groups_for(in_features),
                           *self._out_hw(height, width), self.use_bias)


class DepthwiseSeparableConv(ConvDesign):
    """Depthwise KxK conv (one filter per channel) then a pointwise 1x1 conv (Xception, MobileNet).

    ``K^2 C M + C M O`` weights instead of ``K^2 C O`` (with ``C = O = c``, ``M = 1``:
    ``c K^2 + c^2`` vs ``c^2 K^2``). The stride is on the depthwise conv.

    Attributes:
      depth_multiplier: ``M``, depthwise output channels per input channel.
      activation: applied between the depthwise and the pointwise conv (default none, as
        Keras's ``SeparableConv2D``).
    """

    depth_multiplier: int = 1
    activation: Activation | None = None

    design: ClassVar[str] = "depthwise_separable"

    def _validate(self) -> None:
        super()._validate()
        if self.depth_multiplier < 1:
            raise ValueError(
                "DepthwiseSeparableConv: depth_multiplier must be >= 1, got "
                f"{self.depth_multiplier}."
            )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x.shape[-1]
        x = self._conv("depthwise", c * self.depth_multiplier, (k, k), groups=c,
                       strides=self.stride_pair)(x)
        if self.activation is not None:
            x = self.activation(x)
        return self._conv("pointwise", self.features, (1, 1))(x)

    def conv_counts(self, in_features: int, height: int, width: int) -> tuple[int, int]:
        k, c, m = self.kernel_size, in_features, self.depth_multiplier
        oh, ow = self._out_hw(height, width)
        return _sum_counts(
            _conv_count(k, k, c, c * m, c, oh, ow, self.use_bias),
            _conv_count(1, 1, c * m, self.features, 1, oh, ow, self.use_bias),
        )


class SpatiallySeparableConv(ConvDesign):
    """A Kx1 conv to ``hidden`` channels then a 1xK conv (Inception-v3's factorisation).

    ``K C H + K H O`` weights: with ``C = H = O = c``, ``2 K c^2`` instead of ``K^2 c^2``
    (3x1 + 1x3: ``6 c^2`` vs ``9 c^2``). The stride is split: ``(s, 1)`` on the Kx1 conv and
    ``(1, s)`` on the 1xK conv.

    Attributes:
      hidden_features: channels between the two convs (default ``features``).
      activation: applied between them (default none: a rank-factorised KxK kernel).
    """

    hidden_features: int | None = None
    activation: Activation | None = None

    design: ClassVar[str] = "spatially_separable"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, (sh, sw) = self.kernel_size, self.stride_pair
        x = self._conv("conv_kx1", self.hidden_features or self.features, (k, 1),
                       strides=(sh, 1))(x)
        if self.activation is not None:
            x = self.activation(x)
        return self._conv("conv_1xk", self.features, (1, k), strides=(1, sw))(x)

    def conv_counts(self, in_features: int, height: int, width: int) -> tuple[int, int]:
        k, (sh, sw) = self.kernel_size, self.stride_pair
        hidden = self.hidden_features or self.features
        oh, ow = out_size(height, sh), out_size(width, sw)
        return _sum_counts(
            _conv_count(k, 1, in_features, hidden, 1, oh, width, self.use_bias),
            _conv_count(1, k, hidden, self.features, 1, oh, ow, self.use_bias),
        )


def default_pyramid(kernel_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Levels ``3, 5, ..., K`` with the paper's groups (3: 1, 5: 4, 7: 8, 9: 16); K < 3: (K,)."""
    if kernel_size < 3:
        return (kernel_size,), (1,)
    kernels = tuple(range(3, kernel_size + 1, 2))
    if kernel_size not in PYCONV_PAPER_GROUPS:
        raise ValueError(
            f"PyConvDesign: the paper's pyramid goes up to 9x9 (levels 3, 5, 7, 9); for "
            f"kernel_size={kernel_size} pass kernel_sizes and groups explicitly."
        )
    return kernels, tuple(PYCONV_PAPER_GROUPS[k] for k in kernels)


class PyConvDesign(ConvDesign):
    """:class:`~pyconv_jax.layers.PyConv` behind the common signature.

    ``kernel_size=K`` builds the pyramid ``3, 5, ..., K`` with the paper's groups (1, 4, 8, 16)
    and channel split (halves for 2 levels, 1/4 1/4 1/2 for 3, quarters for 4): ``K=5`` is the
    seed article's 3x3 (g1) + 5x5 (g4). ``kernel_sizes`` / ``groups`` / ``level_features``
    override it; ``kernel_size`` must then be the largest level (the receptive field). The layer
    is the child ``pyconv`` (parameters ``pyconv/kernel`` or ``pyconv/conv2_i/kernel``).

    Attributes:
      kernel_sizes: explicit pyramid levels.
      groups: group count per level.
      level_features: output channels per level (default: the paper's split of ``features``).
      fit_groups: use ``gcd(g, C, f)`` groups per level instead of raising.
    """

    kernel_sizes: Sequence[int] | None = None
    groups: Sequence[int] | None = None
    level_features: Sequence[int] | None = None
    fit_groups: bool = False

    design: ClassVar[str] = "pyconv"

    def _validate(self) -> None:
        super()._validate()
        self.levels()

    def levels(self, in_features: int | None = None) -> tuple[tuple[int, int, int], ...]:
        """``(kernel, groups, features)`` per level; group counts fitted to ``in_features``."""
        if self.kernel_sizes is None:
            kernels, groups = default_pyramid(self.kernel_size)
            if self.groups is not None:
                groups = tuple(self.groups)
        else:
            kernels = tuple(self.kernel_sizes)
            groups = tuple(self.groups) if self.groups is not None else (1,) * len(kernels)
            if max(kernels) != self.kernel_size:
                raise ValueError(
                    f"PyConvDesign: kernel_size={self.kernel_size} must equal the largest level "
                    f"of kernel_sizes={list(kernels)} (it is the layer's receptive field)."
                )
        features = tuple(self.level_features) if self.level_features is not None else self.features
        specs = pyramid_levels(features, kernels, groups)
        if sum(f for _, _, f in specs) != self.features:
            raise ValueError(
                f"PyConvDesign: level_features {[f for _, _, f in specs]} sum to "
                f"{sum(f for _, _, f in specs)}, not features={self.features}."
            )
        if in_features is not None and self.fit_groups:
            specs = tuple((k, fitted_groups(g, in_features, f), f) for k, g, f in specs)
        return specs

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        specs = self.levels(x.shape[-1])
        return PyConv(
            features=tuple(f for _, _, f in specs),
            kernel_sizes=tuple(k for k, _, _ in specs),
            groups=tuple(g for _, g, _ in specs),
            strides=self.strides,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            lowering=self.lowering,
            name="pyconv",
        )(x)

    def conv_counts(self, in_features: int, height: int, width: int) -> tuple[int, int]:
        oh, ow = self._out_hw(height, width)
        return _sum_counts(*(
            _conv_count(k, k, in_features, f, g, oh, ow, self.use_bias)
            for k, g, f in self.levels(in_features)
        ))


#: Design key -> layer class; every class takes ``(features, kernel_size, strides, **kwargs)``.
CONV_DESIGNS: dict[str, type[ConvDesign]] = {
    cls.design: cls
    for cls in (
        PlainConv,
        StackedConv,
        Bottleneck1x1,
        GroupedConv,
        DepthwiseSeparableConv,
        SpatiallySeparableConv,
        PyConvDesign,
    )
}


def get_conv_design(name: str) -> type[ConvDesign]:
    """The layer class registered as ``name`` in :data:`CONV_DESIGNS`."""
    try:
        return CONV_DESIGNS[name]
    except KeyError:
        raise ValueError(
            f"unknown conv design {name!r}; choose one of {list(CONV_DESIGNS)}."
        ) from None


def count_conv_design(
    name: str, in_features: int, features: int, kernel_size: int = 3, **kwargs: Any
) -> tuple[int, int]:
    """``(params, macs)`` by formula of design ``name``; see :meth:`ConvDesign.count`."""
    return get_conv_design(name).count(in_features, features, kernel_size, **kwargs)


__all__ = [
    "CONV_DESIGNS",
    "Bottleneck1x1",
    "Conv2D",
    "ConvDesign",
    "DepthwiseSeparableConv",
    "GroupedConv",
    "PlainConv",
    "PyConvDesign",
    "SpatiallySeparableConv",
    "StackedConv",
    "count_conv_design",
    "default_pyramid",
    "fitted_groups",
    "get_conv_design",
    "out_size",
]
