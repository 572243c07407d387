"""What a convolution adds to its output before writing it, at inference.

An inference BatchNorm is an affine map per channel, so ``relu(bn(conv(x)) + shortcut)`` is
``relu(conv(x) * multiplier + shift + shortcut)``. Lowerings that can apply that inside their own
output pass (oneDNN's post-ops, the narrow kernels' row loop: :mod:`pyconv_jax.layers.onednn_conv`)
fold the multiplier into the kernel and write one tensor where conv + BatchNorm wrote two; the
others apply it after the conv (:meth:`Epilogue.apply`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """``act(y * multiplier + shift + residual)`` for a conv output ``y`` ``[..., C]``.

    ``multiplier``, ``shift``: ``[C]`` float32 (a folded BatchNorm, :meth:`BatchNorm.__call__`
    with ``fold=True``); ``residual``: ``y``'s shape or ``None``; ``relu``: whether a ReLU ends it.
    """

    multiplier: jax.Array
    shift: jax.Array
    residual: jax.Array | None = None
    relu: bool = False

    def channels(self, start: int, stop: int) -> Epilogue:
        """The epilogue of output channels ``start:stop`` (one pyramid level's)."""
        return Epilogue(self.multiplier[start:stop], self.shift[start:stop],
                        None if self.residual is None else self.residual[..., start:stop],
                        self.relu)

    def after_bias(self, bias: jax.Array | None) -> Epilogue:
        """This epilogue applied to ``y + bias``, as one epilogue (the bias folded into
        ``shift``)."""
        if bias is None:
            return self
        shift = self.shift + bias.astype(jnp.float32) * self.multiplier
        return dataclasses.replace(self, shift=shift)

    def folded(self, kernel: jax.Array) -> jax.Array:
        """``kernel * multiplier`` (HWIO ``[..., C]``): with it, ``conv(x, kernel) * multiplier``
        is one conv, and the rest of the epilogue adds ``shift``."""
        return (kernel.astype(jnp.float32) * self.multiplier).astype(kernel.dtype)

    def apply(self, y: jax.Array) -> jax.Array:
        """The epilogue after the conv, in ``y``'s dtype."""
        out = (y.astype(jnp.float32) * self.multiplier + self.shift).astype(y.dtype)
        if self.residual is not None:
            out = out + self.residual
        return jnp.maximum(out, 0) if self.relu else out
