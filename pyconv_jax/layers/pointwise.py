"""The 1x1 convolutions of a bottleneck: oneDNN's 1x1 conv on CPU, else matrix products.

Under the ``onednn`` lowering (``auto`` on one CPU device, float32) a 1x1 conv is oneDNN's,
forward and both gradients: a PyConvResNet-50 train step is 5% faster than with XLA:CPU's matrix
products, whose backward pass runs at 120-350 GF/s against oneDNN's 290-390 (batch 16,
docs/benchmarks.md). Elsewhere it is a matrix product over the channel axis, which runs 2-2.4x
faster forward and backward on XLA:CPU than the same ``conv_general_dilated``. Written as one
2-D product of the ``[N*H*W, C]`` pixels, its backward pass is up to 3x faster again than the
same product contracting over N, H and W (docs/benchmarks.md). GPU/TPU backends lower all of
these to the same GEMM. The parameters are those of ``flax.linen.Conv(kernel_size=(1, 1),
use_bias=False)`` (``kernel`` ``[1, 1, in, out]``), so the published checkpoints and converted
weights load unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyconv_jax.layers import lowering as lowering_lib
from pyconv_jax.layers import onednn_conv
from pyconv_jax.layers.epilogue import Epilogue
from pyconv_jax.layers.pyconv import kaiming_normal_fan_out


class PointwiseConv(nn.Module):
    """``[N, H, W, C] -> [N, ceil(H / s), ceil(W / s), features]``: a (strided) bias-free 1x1 conv.

    A stride ``s`` keeps every ``s``-th pixel starting at the first, as a VALID 1x1 conv does.
    ``lowering`` is as :class:`~pyconv_jax.layers.PyConv`'s: ``onednn`` (``auto`` on one CPU
    device, float32) runs oneDNN's 1x1 conv, with an inference epilogue inside its output pass;
    any other lowering XLA's matrix product, followed by the epilogue.
    """

    features: int
    strides: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = kaiming_normal_fan_out
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, epilogue: Epilogue | None = None) -> jax.Array:
        """``x`` ``[N, H, W, C]``; ``epilogue`` (e.g. a folded inference BatchNorm, the block's
        shortcut and ReLU) is applied to the output."""
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, kernel)
        x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
        strides, padding = (self.strides, self.strides), ((0, 0), (0, 0))
        if lowering_lib.resolve(self.lowering, dtype=dtype) == "onednn":
            lowering_lib.check_onednn_backend()
            return onednn_conv.conv_with_epilogue(x, kernel, epilogue, strides=strides,
                                                  padding=padding)
        if self.strides != 1:
            x = x[:, :: self.strides, :: self.strides, :]
        # One matrix [N*H*W, C]: its weight gradient is then a single 2-D product, which XLA:CPU
        # runs up to 3x faster than the same product contracting over N, H and W separately.
        y = (x.reshape(-1, x.shape[-1]) @ kernel[0, 0]).reshape(*x.shape[:-1], self.features)
        return y if epilogue is None else epilogue.apply(y)

