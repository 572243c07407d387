"""Max pooling whose backward pass avoids XLA's ``select_and_scatter``.

``flax.linen.max_pool`` differentiates through ``reduce_window``, whose transpose
(``select_and_scatter``) XLA:CPU runs slowly: a 3x3/2 pool of a 16x112x112x64 batch takes 9 ms
forward and 226 ms forward+backward, 47 ms as written here (docs/benchmarks.md). Here the pool is
a maximum over the window's shifted strided views, and the gradient goes to the first maximum of
each window in row-major order, as ``select_and_scatter`` sends it: results equal ``max_pool``'s
exactly and gradients up to the order of float summation where windows overlap, ties included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _views(x: jax.Array, window: int, stride: int, padding: int):
    """The window's ``window**2`` shifted views of ``x`` (padded with -inf), and the output size."""
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                 constant_values=-jnp.inf)
    out_h = (x.shape[1] + 2 * padding - window) // stride + 1
    out_w = (x.shape[2] + 2 * padding - window) // stride + 1
    views = [
        lax.slice(xp, (0, i, j, 0),
                  (xp.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, xp.shape[3]),
                  (1, stride, stride, 1))
        for i in range(window) for j in range(window)
    ]
    return xp.shape, views


def _check(window: int, stride: int, padding: int) -> None:
    """A pool whose windows can lie wholly in the padding has no meaning (they would hold -inf)."""
    if window < 1 or stride < 1 or not 0 <= padding < window:
        raise ValueError(f"max_pool needs window >= 1, stride >= 1 and 0 <= padding < window; got "
                         f"window={window}, stride={stride}, padding={padding}.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
    """Square max pooling of NHWC ``x``, symmetric padding; equal to ``flax.linen.max_pool``."""
    _check(window, stride, padding)
    _, views = _views(x, window, stride, padding)
    return functools.reduce(jnp.maximum, views)


def _max_pool_fwd(x, window, stride, padding):
    y = max_pool(x, window, stride, padding)
    return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, g):
    x, y = residuals
    padded_shape, views = _views(x, window, stride, padding)
    taken = jnp.zeros(y.shape, bool)
    grad = jnp.zeros(padded_shape, g.dtype)
    for index, view in enumerate(views):
        i, j = divmod(index, window)
        first = (view == y) & ~taken  # the first maximum in row-major order gets the gradient
        taken = taken | first
        contribution = jnp.where(first, g, jnp.zeros_like(g))
        # Transpose of the strided view: place each output back at its input pixel.
        grad = grad + lax.pad(contribution, jnp.zeros((), g.dtype), [
            (0, 0, 0),
            (i, padded_shape[1] - i - (stride * (y.shape[1] - 1) + 1), stride - 1),
            (j, padded_shape[2] - j - (stride * (y.shape[2] - 1) + 1), stride - 1),
            (0, 0, 0)])
    return (grad[:, padding:padding + x.shape[1], padding:padding + x.shape[2], :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
