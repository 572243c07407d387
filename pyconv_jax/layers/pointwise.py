"""The 1x1 convolutions of a bottleneck, computed as matrix products.

A 1x1 convolution is a matrix product over the channel axis. As a matrix product it runs 2-2.4x
faster forward and backward on XLA:CPU than the same ``conv_general_dilated``. Written as one 2-D
product of the ``[N*H*W, C]`` pixels, its backward pass is up to 3x faster again than the same
product contracting over N, H and W (docs/benchmarks.md). GPU/TPU backends lower all of these to
the same GEMM. The parameters are those of ``flax.linen.Conv(kernel_size=(1, 1),
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


#: On the ``onednn`` lowering, a 1x1 conv's weight gradient ``X^T dY`` (X ``[M, K]``, dY
#: ``[M, N]``) runs in oneDNN's sgemm when ``M >= SGEMM_MIN_ROWS * max(K, N)``: there XLA:CPU is
#: 1.5-2.7x slower (``[200704, 64]^T [200704, 64]``: 23.5 ms against 8.6 ms; ``[12544, 128]^T
#: [12544, 512]``: 7.2 against 4.6 ms), while with fewer rows per channel sgemm is the slower one
#: (``[3136, 256]^T [3136, 1024]``: 6.1 against 8.7 ms). docs/benchmarks.md.
SGEMM_MIN_ROWS = 8


class PointwiseConv(nn.Module):
    """``[N, H, W, C] -> [N, ceil(H / s), ceil(W / s), features]``: a (strided) bias-free 1x1 conv.

    A stride ``s`` keeps every ``s``-th pixel starting at the first, as a VALID 1x1 conv does.
    ``lowering`` (as :class:`~pyconv_jax.layers.PyConv`'s): with ``onednn`` (``auto`` on one CPU
    device) large weight gradients run in oneDNN's sgemm and an inference epilogue inside
    oneDNN's conv; otherwise XLA computes it all.
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
        onednn = lowering_lib.resolve(self.lowering, dtype=dtype) == "onednn"
        if epilogue is not None and onednn:
            return onednn_conv.conv_bias_act(
                x, epilogue.folded(kernel), epilogue.shift, epilogue.residual,
                relu=epilogue.relu, strides=(self.strides, self.strides),
                padding=((0, 0), (0, 0)))
        if self.strides != 1:
            x = x[:, :: self.strides, :: self.strides, :]
        # One matrix [N*H*W, C]: its weight gradient is then a single 2-D product, which XLA:CPU
        # runs up to 3x faster than the same product contracting over N, H and W separately.
        rows, w = x.reshape(-1, x.shape[-1]), kernel[0, 0]
        if onednn and rows.shape[0] >= SGEMM_MIN_ROWS * max(w.shape):
            y = _product_sgemm_weight_grad(rows, w)
        else:
            y = rows @ w
        y = y.reshape(*x.shape[:-1], self.features)
        return y if epilogue is None else epilogue.apply(y)


@jax.custom_vjp
def _product_sgemm_weight_grad(rows: jax.Array, w: jax.Array) -> jax.Array:
    """``rows @ w`` whose gradient for ``w`` is oneDNN's sgemm (see :data:`SGEMM_MIN_ROWS`)."""
    return rows @ w


def _product_fwd(rows, w):
    return rows @ w, (rows, w)


def _product_bwd(residuals, dy):
    rows, w = residuals
    dw = onednn_conv.matmul_tn(rows, dy)
    # The input gradient waits for the weight gradient: run side by side, XLA's product and
    # oneDNN's OpenMP threads would share two cores four ways (the step: 1,796 -> 1,765 ms).
    dy, w = jax.lax.optimization_barrier((dw, dy, w))[1:]
    return dy @ w.T, dw


_product_sgemm_weight_grad.defvjp(_product_fwd, _product_bwd)
