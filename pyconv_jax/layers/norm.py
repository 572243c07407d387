"""BatchNorm with the ReLU and residual add that follow it, differentiated by hand.

Every BatchNorm of a residual network is followed by a ReLU, an add of the shortcut and a ReLU,
or nothing. Written as ``nn.BatchNorm`` then ``nn.relu``, JAX's autodiff keeps ``x - mean`` as a
residual for the backward pass and XLA:CPU writes it out, so each BatchNorm writes two tensors
forward and four backward. :func:`batch_norm_train` computes ``act(bn(x) + residual)`` with a
``jax.custom_vjp`` that keeps only ``x`` and the output: forward, reductions that only read ``x``
and one pass that writes the output; backward, reductions that only read and one pass that writes
the input gradient (and, with a shortcut, its gradient). A PyConvResNet-50 train step's
temporary memory fell from 2,651 to 1,936 MiB, and the step by 6-10% (docs/benchmarks.md).

:class:`BatchNorm` has the variables of ``flax.linen.BatchNorm`` (``params``: ``scale``,
``bias``; ``batch_stats``: ``mean``, ``var``), the same statistics (the fast variance
``E[x^2] - E[x]^2``, clipped at zero, in float32), the same running-average update and the same
rounding of the output to ``dtype``, so checkpoints and converted weights load unchanged.

In training the output is written out once (:func:`~pyconv_jax.layers.materialize.materialize`):
XLA:CPU would otherwise recompute a stage's whole residual chain in every fusion that reads a
block's output, forward and backward.

The input may also be given as the channel pieces it is concatenated from (a PyConv's levels):
the backward pass then returns each piece's gradient. On CPU with the native library that is one
pass writing every piece (``native/norm_grad.cc``), where XLA:CPU would run one slower fusion per
piece (four 16-channel pieces at 56x56: 0.95 against 2.6 ms).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pyconv_jax.layers import materialize as materialize_lib
from pyconv_jax.layers import onednn_conv
from pyconv_jax.layers.epilogue import Epilogue
from pyconv_jax.layers.materialize import materialize

Dtype = Any


def _reduction_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _finish(normalized: jax.Array, residual: jax.Array | None, relu: bool, dtype) -> jax.Array:
    """``normalized`` rounded to ``dtype``, plus ``residual``, then ReLU: in the order (and with
    the roundings) of ``nn.relu(nn.BatchNorm(dtype=dtype)(x) + residual)``."""
    y = normalized.astype(dtype)
    if residual is not None:
        y = y + residual
    return jnp.maximum(y, 0) if relu else y


def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Batch mean and (fast, biased) variance over every axis but the last, in float32."""
    xf = x.astype(jnp.float32)
    axes = _reduction_axes(x)
    mean, mean_sq = jnp.mean(xf, axes), jnp.mean(jnp.square(xf), axes)
    return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))


def _joined(x) -> jax.Array:
    """``x``, or the concatenation of its channel pieces when it is a tuple of them."""
    return jnp.concatenate(x, axis=-1) if isinstance(x, tuple) else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def batch_norm_train(x, scale, bias, residual, epsilon: float, relu: bool, dtype):
    """Training-mode ``act(batch_norm(x) + residual)`` and the batch statistics.

    ``x`` ``[..., C]`` (or a tuple of its channel pieces ``[..., C_i]``, whose gradients are then
    returned piece by piece) is normalised over every axis but the last with its own mean and
    variance; ``scale``, ``bias`` ``[C]``; ``residual`` (``x``'s shape, or ``None``) is added
    after the output is rounded to ``dtype``; ``relu`` applies a ReLU last. Returns ``(y, mean,
    var)``, the statistics in float32 for the running averages. Gradients flow to ``x``,
    ``scale``, ``bias``, ``residual`` and through ``mean`` and ``var`` (reverse mode only).
    """
    return _forward(x, scale, bias, residual, epsilon, relu, dtype)[0]


def _forward(x, scale, bias, residual, epsilon, relu, dtype):
    x = _joined(x)
    mean, var = _statistics(x)
    inv_std = lax.rsqrt(var + epsilon)
    multiplier = inv_std * scale.astype(jnp.float32)
    # Written out once: a residual chain of these would otherwise be recomputed by every reader.
    y = materialize(_finish((x.astype(jnp.float32) - mean) * multiplier
                            + bias.astype(jnp.float32), residual, relu, dtype))
    return (y, mean, var), (x, y if relu else None, scale, bias, mean, inv_std, residual)


def _forward_with_residuals(x, scale, bias, residual, epsilon, relu, dtype):
    # The pieces' widths, carried (as static values) by the shape of an empty array.
    widths = jnp.zeros((0, *(piece.shape[-1] for piece in x))) if isinstance(x, tuple) else None
    outputs, saved = _forward(x, scale, bias, residual, epsilon, relu, dtype)
    x, y, scale, bias, mean, inv_std, residual = saved
    # The residual's value is not needed backward, only its dtype: an empty array carries it.
    residual = None if residual is None else jnp.zeros((0,), residual.dtype)
    return outputs, (x, widths, y, scale, bias, mean, inv_std, residual)


def _backward(epsilon, relu, dtype, saved, cotangents):
    del epsilon, dtype
    x, widths, y, scale, bias, mean, inv_std, residual = saved
    widths = None if widths is None else widths.shape[1:]
    dy, dmean, dvar = cotangents
    axes = _reduction_axes(x)
    count = x.size // x.shape[-1]
    dz = jnp.where(y > 0, dy, jnp.zeros_like(dy)) if relu else dy
    g = dz.astype(jnp.float32)  # the gradient of the normalised output, before its rounding
    xf = x.astype(jnp.float32)
    sum_g = jnp.sum(g, axes)
    # sum(g * (x - mean)), from sums over tensors only: XLA:CPU's reductions would otherwise
    # write out the broadcast mean (or x - mean) as a whole tensor first. The cancellation is that
    # of the fast variance E[x^2] - E[x]^2 of the forward pass.
    sum_g_centered = jnp.sum(g * xf, axes) - mean * sum_g
    multiplier = inv_std * scale.astype(jnp.float32)
    # d/dx of (x - mean) * inv_std * scale with mean and inv_std depending on x, plus the
    # contributions of the returned statistics (mean: 1/count each; var: 2 (x - mean) / count).
    shift = (dmean - multiplier * sum_g) / count
    coef = (2.0 * dvar - multiplier * inv_std**2 * sum_g_centered) / count
    dscale = (sum_g_centered * inv_std).astype(scale.dtype)
    dbias = sum_g.astype(bias.dtype)
    dresidual = None if residual is None else dz.astype(residual.dtype)
    if widths is not None and _native_pieces(x.dtype):
        dx = _input_grad_pieces(g, xf, multiplier, shift, mean, coef, widths)
    else:
        dx = (multiplier * g + shift + (xf - mean) * coef).astype(x.dtype)
        if widths is not None:
            dx = tuple(jnp.split(dx, np.cumsum(widths)[:-1].tolist(), axis=-1))
    return dx, dscale, dbias, dresidual


def _native_pieces(dtype) -> bool:
    """Whether the native pass writes the input gradient's pieces here (float32, on CPU with the
    library built and one device: see :func:`~pyconv_jax.layers.materialize.applies`)."""
    return jnp.dtype(dtype) == jnp.float32 and materialize_lib.applies()


def _input_grad_pieces(g, x, multiplier, shift, mean, coef, widths) -> tuple[jax.Array, ...]:
    """``multiplier * g + shift + (x - mean) * coef`` cut into channel pieces of ``widths``, in
    one native pass over ``g`` and ``x``."""
    pieces = [jax.ShapeDtypeStruct((*g.shape[:-1], width), jnp.float32) for width in widths]
    return tuple(jax.ffi.ffi_call(onednn_conv.TARGETS["batch_norm_input_grad_pieces"], pieces,
                                  vmap_method="sequential")(g, x, multiplier, shift, mean, coef))


batch_norm_train.defvjp(_forward_with_residuals, _backward)


def batch_norm_inference(x, scale, bias, mean, var, residual, *, epsilon: float, relu: bool,
                         dtype) -> jax.Array:
    """``act(batch_norm(x) + residual)`` with the running statistics ``mean``, ``var``."""
    multiplier = lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
    return _finish((x.astype(jnp.float32) - mean) * multiplier + bias.astype(jnp.float32),
                   residual, relu, dtype)


class BatchNorm(nn.Module):
    """``[..., C] -> [..., C]``: BatchNorm over every axis but the last, then ``+ residual`` and a
    ReLU when asked: ``relu(bn(x) + residual)``.

    Same variables, statistics, running-average update (``momentum`` weighs the old value) and
    output rounding as ``flax.linen.BatchNorm(axis=-1)``; see the module docstring for why it
    exists. Statistics are over the global batch under ``jax.jit`` with a sharded batch (XLA
    inserts the collectives), as with Flax's.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    relu: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array], residual: jax.Array | None = None, *,
                 fold: bool = False):
        """``relu(bn(x) + residual)``. ``x`` may be given as the channel pieces it is the
        concatenation of (e.g. a PyConv's levels, ``PyConv(...)(x, pieces=True)``): the result
        is the same, and in training the backward pass writes each piece's gradient directly.
        With ``fold=True`` (inference only) nothing is applied: returns the
        :class:`~pyconv_jax.layers.epilogue.Epilogue` that computes it from ``x``, for the conv
        that produces ``x`` to apply in its own output pass; ``x`` then only gives the channel
        count (anything with a ``shape``)."""
        if isinstance(x, (list, tuple)):
            x = tuple(x) if len(x) > 1 else x[0]
        if isinstance(x, tuple):
            shape = (*x[0].shape[:-1], sum(piece.shape[-1] for piece in x))
        else:
            shape = x.shape
        features = (shape[-1],)
        if residual is not None and not fold and residual.shape != shape:
            raise ValueError(f"BatchNorm residual of shape {residual.shape} does not match the "
                             f"input's {shape}; the shortcut must have the block's output shape.")
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        if fold:
            if not self.use_running_average:
                raise ValueError("BatchNorm(fold=True) folds the running statistics: it needs "
                                 "use_running_average=True (inference).")
            multiplier = lax.rsqrt(ra_var.value + self.epsilon) * scale.astype(jnp.float32)
            shift = bias.astype(jnp.float32) - ra_mean.value * multiplier
            return Epilogue(multiplier, shift, residual, self.relu)
        dtype = self.dtype or jnp.result_type(*(x if isinstance(x, tuple) else (x,)), scale, bias)
        if self.use_running_average:
            return batch_norm_inference(_joined(x), scale, bias, ra_mean.value, ra_var.value,
                                        residual, epsilon=self.epsilon, relu=self.relu,
                                        dtype=dtype)
        y, mean, var = batch_norm_train(x, scale, bias, residual, self.epsilon, self.relu, dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
