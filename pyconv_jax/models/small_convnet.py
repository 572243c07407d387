"""The seed article's small convnet, with the spatial convolution design taken from a field.

Two conv blocks (design conv -> BatchNorm -> ReLU -> 2x2 max-pool) and two dense layers
(hidden -> ReLU -> dropout -> classes), as the Keras CIFAR-10 convnets the article compares.
``conv`` is a key of :data:`pyconv_jax.layers.designs.CONV_DESIGNS`; ``conv_kwargs`` are passed
to the design (e.g. ``{"groups": 4}``). Group counts are fitted to the channels a block sees
(``fit_groups``), so grouped and pyramidal designs also work on the 3-channel input of block 1.

    model = SmallConvNet(num_classes=10, conv="pyconv", kernel_size=5)
    variables = model.init(rng, jnp.zeros((1, 16, 16, 3)), train=False)
    logits = model.apply(variables, images, train=False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyconv_jax.layers.designs import ConvDesign, get_conv_design
from pyconv_jax.layers.lowering import check_lowering

Dtype = Any

#: Designs with a ``fit_groups`` field.
_FITS_GROUPS = ("grouped", "pyconv")


class SmallConvNet(nn.Module):
    """``[N, H, W, C]`` images -> ``[N, num_classes]`` float32 logits.

    Attributes:
      num_classes: classifier outputs.
      conv: spatial conv design, a key of ``CONV_DESIGNS``.
      conv_kwargs: design-specific fields (e.g. ``{"groups": 4}``, ``{"reduction": 4}``).
      kernel_size: ``K`` of every conv block (the window each conv output sees).
      widths: output channels of the conv blocks.
      hidden: width of the first dense layer.
      dropout_rate: dropout after the hidden dense layer (training only).
      bn_momentum / bn_epsilon: BatchNorm settings.
      dtype / param_dtype: compute and storage dtypes.
      pyconv_lowering: lowering of grouped convolutions (named as in the ResNet models, so
        :func:`pyconv_jax.counting.count_macs` counts the grouped form).
    """

    num_classes: int = 10
    conv: str = "plain"
    conv_kwargs: Mapping[str, Any] | None = None
    kernel_size: int = 3
    widths: Sequence[int] = (32, 64)
    hidden: int = 128
    dropout_rate: float = 0.5
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    pyconv_lowering: str = "auto"

    def __post_init__(self) -> None:
        check_lowering(self.pyconv_lowering)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        if not self.widths:
            raise ValueError("SmallConvNet: widths is empty; give one width per conv block.")
        for width in self.widths:
            self.conv_layer(width)  # validates the design and its kwargs in the user's terms
        super().__post_init__()

    def conv_layer(self, features: int, **module_kwargs: Any) -> ConvDesign:
        """The design layer of one block; unbound unless ``module_kwargs`` give a parent."""
        kwargs = dict(self.conv_kwargs or {})
        if self.conv in _FITS_GROUPS:
            kwargs.setdefault("fit_groups", True)
        cls = get_conv_design(self.conv)
        module_kwargs.setdefault("parent", None)
        try:
            return cls(
                features=features, kernel_size=self.kernel_size, dtype=self.dtype,
                param_dtype=self.param_dtype, lowering=self.pyconv_lowering,
                **kwargs, **module_kwargs,
            )
        except TypeError as err:
            raise ValueError(
                f"SmallConvNet: bad conv_kwargs for design {self.conv!r}: {err}"
            ) from None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.widths, start=1):
            x = self.conv_layer(width, parent=self, name=f"conv{i}")(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"bn{i}",
            )(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2"
        )(x)
        return jnp.asarray(x, jnp.float32)

    def counts(self, image_size: int, in_channels: int = 3) -> dict[str, int]:
        """Parameters and MACs of one image by formula.

        ``conv_params`` / ``conv_macs``: the design convolutions only; ``params`` / ``macs``: the
        whole model (BatchNorm scale and bias, both dense layers with biases).
        """
        conv_params = conv_macs = bn_params = 0
        size, cin = image_size, in_channels
        for width in self.widths:
            p, m = self.conv_layer(width).conv_counts(cin, size, size)
            conv_params, conv_macs = conv_params + p, conv_macs + m
            bn_params += 2 * width
            size, cin = size // 2, width  # 2x2 max-pool, VALID
        flat = size * size * cin
        dense_macs = flat * self.hidden + self.hidden * self.num_classes
        dense_params = dense_macs + self.hidden + self.num_classes
        return {
            "conv_params": conv_params,
            "conv_macs": conv_macs,
            "params": conv_params + bn_params + dense_params,
            "macs": conv_macs + dense_macs,
        }


__all__ = ["SmallConvNet"]
