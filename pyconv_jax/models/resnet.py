"""One residual network module that builds ResNet, PyConvResNet and PyConvHGResNet.

Every spatial convolution is a :class:`~pyconv_jax.layers.PyConv` (a plain 3x3 conv is a one-level
PyConv), so the three families differ only in the fields set by
:mod:`pyconv_jax.models.specs`: pyramid per stage, widths, expansion, stem pool, stage strides and
shortcut style. Submodule names follow the published PyTorch checkpoints (``conv1``, ``bn1``,
``layer{s}_{i}/conv2/conv2_1``, ``downsample_conv``, ``downsample_bn``, ``fc``) so conversion is a
fixed renaming (:mod:`pyconv_jax.convert`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyconv_jax.layers import PointwiseConv, PyConv, pyramid_levels
from pyconv_jax.layers.lowering import check_lowering, fuses_epilogue
from pyconv_jax.layers.norm import BatchNorm
from pyconv_jax.layers.pooling import max_pool

Dtype = Any

BLOCKS = ("basic", "bottleneck")
SHORTCUTS = ("projection", "pool")

# PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_batch_norm(conv: nn.Module, bn: BatchNorm, x: jax.Array, features: int, fold: bool,
                    residual: jax.Array | None = None) -> jax.Array:
    """``bn(conv(x), residual)`` (``bn`` with its ReLU); with ``fold`` the BatchNorm is folded
    into the conv and applied in the conv's own output pass instead (inference only). A PyConv
    hands its levels' outputs to the BatchNorm unconcatenated, so that the backward pass needs no
    slicing of their gradient."""
    if fold:
        return conv(x, bn(jax.ShapeDtypeStruct((features,), jnp.float32), residual, fold=True))
    return bn(conv(x, pieces=True) if isinstance(conv, PyConv) else conv(x), residual)


class ResidualBlock(nn.Module):
    """A basic (expansion 1) or bottleneck residual block whose spatial conv is a PyConv.

    ``x`` ``[N, H, W, C]`` -> ``[N, H / stride, W / stride, width * expansion]``.
    """

    block: str
    width: int
    expansion: int
    strides: int
    kernels: Sequence[int]
    groups: Sequence[int]
    shortcut: str
    basic_second_kernel: int = 3
    zero_init_last: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = self.width * self.expansion
        conv1x1 = functools.partial(PointwiseConv, dtype=self.dtype, param_dtype=self.param_dtype,
                                    lowering=self.lowering)
        pyconv = functools.partial(
            PyConv, dtype=self.dtype, param_dtype=self.param_dtype, lowering=self.lowering,
        )
        norm = functools.partial(
            BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
            epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
        )
        last_norm_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        # At inference on the `onednn` lowering each BatchNorm (+ shortcut) + ReLU is folded into
        # the conv before it and applied in that conv's own output pass (layers/epilogue.py).
        fold = not train and fuses_epilogue(self.lowering, self.dtype)

        def conv_norm(conv, inputs, features, relu, name, residual=None, **norm_kwargs):
            bn = norm(relu=relu, name=name, **norm_kwargs)
            return conv_batch_norm(conv, bn, inputs, features, fold, residual)

        # The shortcut first, so that the block's last BatchNorm can add it and apply the ReLU
        # in the same pass (layers/norm.py).
        residual = x
        needs_projection = x.shape[-1] != out_features
        if self.shortcut == "projection":
            if self.strides != 1 or needs_projection:
                residual = conv_norm(conv1x1(out_features, strides=self.strides,
                                             name="downsample_conv"), x, out_features, False,
                                     "downsample_bn")
        else:  # "pool": max-pool 3x3 (padding 1) when striding, then 1x1 + BN when widening
            if self.strides != 1:
                residual = max_pool(residual, 3, self.strides, 1)
            if needs_projection:
                residual = conv_norm(conv1x1(out_features, name="downsample_conv"), residual,
                                     out_features, False, "downsample_bn")

        if self.block == "bottleneck":
            y = conv_norm(conv1x1(self.width, name="conv1"), x, self.width, True, "bn1")
            y = conv_norm(pyconv(self.width, self.kernels, self.groups, self.strides,
                                 name="conv2"), y, self.width, True, "bn2")
            return conv_norm(conv1x1(out_features, name="conv3"), y, out_features, True, "bn3",
                             residual, scale_init=last_norm_init)
        y = conv_norm(pyconv(self.width, self.kernels, self.groups, self.strides, name="conv1"),
                      x, self.width, True, "bn1")
        k = self.basic_second_kernel
        return conv_norm(pyconv(out_features, (k,), (1,), 1, name="conv2"), y, out_features, True,
                         "bn2", residual, scale_init=last_norm_init)


def block_name(stage: int, index: int) -> str:
    """The name of block ``index`` of ``stage`` (0-based), as in the published checkpoints."""
    return f"layer{stage + 1}_{index}"


class ResNet(nn.Module):
    """Residual network over images ``[N, H, W, 3]`` (NHWC), returning logits ``[N, classes]``.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)``.
      block: ``"basic"`` or ``"bottleneck"``.
      stage_widths: inner width of each stage's blocks.
      expansion: block output channels = width * expansion.
      pyconv_kernels / pyconv_groups: the pyramid of each stage's spatial conv (one tuple per
        stage), e.g. ``((3, 5, 7, 9), (3, 5, 7), (3, 5), (3,))``.
      stem_pool: 3x3/2 max-pool after the stem (torchvision ResNet) or not (PyConv families).
      stage_strides: stride of each stage's first block.
      shortcut: ``"projection"`` (strided 1x1 conv + BN) or ``"pool"`` (max-pool, then 1x1 + BN).
      basic_second_kernel: kernel of a basic block's second conv (3 in ResNet, 1 in PyConvResNet).
      num_classes: classifier outputs; 0 returns the pooled features ``[N, C]`` instead.
      dropout_rate: dropout before the classifier (training only).
      zero_init_residual: start each block's last BatchNorm scale at zero.
      features_only: return the stage outputs ``{"C2": ..., "C5": ...}`` (strides 4..32) for use as
        a backbone; no head parameters are created.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); logits are returned in float32.
      param_dtype: parameter storage dtype.
      pyconv_lowering: lowering of every spatial conv (``"auto"``, ``"grouped"``, ``"dense"``,
        ``"split"``, ``"onednn"``; :mod:`pyconv_jax.layers.lowering`).
      remat: recompute each block's activations in the backward pass to save memory.
      bn_momentum / bn_epsilon: BatchNorm settings equal to PyTorch's defaults (its momentum
        0.1 is Flax's 0.9: the weight of the running average, not of the new batch; 1e-5).
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    expansion: int = 4
    pyconv_kernels: Sequence[Sequence[int]] = ((3,), (3,), (3,), (3,))
    pyconv_groups: Sequence[Sequence[int]] = ((1,), (1,), (1,), (1,))
    stem_pool: bool = True
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    shortcut: str = "projection"
    basic_second_kernel: int = 3
    num_classes: int = 1000
    dropout_rate: float = 0.0
    zero_init_residual: bool = False
    features_only: bool = False
    stem_width: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    pyconv_lowering: str = "auto"
    remat: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        num_stages = len(self.stage_sizes)
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; choose one of {list(BLOCKS)}.")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {self.shortcut!r}; choose one of {list(SHORTCUTS)}.")
        check_lowering(self.pyconv_lowering)
        for field in ("stage_widths", "pyconv_kernels", "pyconv_groups", "stage_strides"):
            if len(getattr(self, field)) != num_stages:
                raise ValueError(
                    f"{field} has {len(getattr(self, field))} entries but the model has "
                    f"{num_stages} stages (stage_sizes={list(self.stage_sizes)}); give one per stage."
                )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        # Check every stage's pyramid against the channels it will see, in the user's terms.
        in_features = self.stem_width
        for s, (width, kernels, groups) in enumerate(
            zip(self.stage_widths, self.pyconv_kernels, self.pyconv_groups), start=1
        ):
            conv_inputs = {width} if self.block == "bottleneck" else {in_features, width * self.expansion}
            try:
                levels = pyramid_levels(width, kernels, groups)
                for _, g, _ in levels:
                    for c in sorted(conv_inputs):
                        if c % g:
                            raise ValueError(
                                f"{c} input channels are not divisible by {g} groups"
                            )
            except ValueError as err:
                message = str(err).removeprefix("PyConv").lstrip(": ")
                raise ValueError(
                    f"stage {s} pyramid (kernels {list(kernels)}, groups {list(groups)}, width "
                    f"{width}) does not fit: {message}"
                ) from None
            in_features = width * self.expansion

    def block_fields(self, stage: int, index: int) -> dict[str, Any]:
        """The :class:`ResidualBlock` fields of block ``index`` of ``stage`` (both 0-based).

        Public so that a block can be built alone, as ``scripts/benchmark.py --blocks`` does.
        """
        return dict(
            block=self.block,
            width=self.stage_widths[stage],
            expansion=self.expansion,
            strides=self.stage_strides[stage] if index == 0 else 1,
            kernels=tuple(self.pyconv_kernels[stage]),
            groups=tuple(self.pyconv_groups[stage]),
            shortcut=self.shortcut,
            basic_second_kernel=self.basic_second_kernel,
            zero_init_last=self.zero_init_residual,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            lowering=self.pyconv_lowering,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | dict[str, jax.Array]:
        x = jnp.asarray(x, self.dtype)
        stem = PyConv(
            self.stem_width, (7,), (1,), strides=2, dtype=self.dtype,
            param_dtype=self.param_dtype, lowering=self.pyconv_lowering, name="conv1",
        )
        bn = BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            relu=True, dtype=self.dtype, param_dtype=self.param_dtype, name="bn1",
        )
        x = conv_batch_norm(stem, bn, x, self.stem_width,
                            not train and fuses_epilogue(self.pyconv_lowering, self.dtype))
        if self.stem_pool:
            x = max_pool(x, 3, 2, 1)

        block_cls = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
        features = {}
        for s, num_blocks in enumerate(self.stage_sizes):
            for i in range(num_blocks):
                x = block_cls(**self.block_fields(s, i), name=block_name(s, i))(x, train)
            features[f"C{s + 2}"] = x
        if self.features_only:
            return features

        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes == 0:
            return jnp.asarray(x, jnp.float32)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes, kernel_init=torch_linear_init, dtype=self.dtype,
            param_dtype=self.param_dtype, name="fc",
        )(x)
        return jnp.asarray(x, jnp.float32)
