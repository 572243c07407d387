"""An identity that XLA:CPU cannot fuse into the users of its result.

XLA's fusion duplicates cheap elementwise producers into each of their consumers rather than
write them out. Through a residual network that is costly: a block's output
``relu(bn(x) + shortcut)`` has the previous block's output as its shortcut, so every fusion that
reads a block's output (the next block's BatchNorm, the ReLU mask of the backward pass)
recomputed the whole stage's chain from the raw conv outputs. In a PyConvResNet-50 train step the
BatchNorm fusions read 3.6 GiB where 2.4 GiB would do (the fusion of stage 3's last block read
ten tensors instead of three). :func:`materialize` passes its argument through a custom call
whose result aliases its operand: the operand is computed once, into its own buffer, and the
users read that buffer; the call itself does nothing. Optimisation barriers would not do: XLA:CPU
removes them before fusion.
"""

from __future__ import annotations

import jax

from pyconv_jax.layers import onednn_conv


def applies() -> bool:
    """Whether :func:`materialize` calls the native no-op here: on CPU with the library built
    and one device (XLA's SPMD partitioner would gather a sharded operand of a custom call)."""
    return jax.default_backend() == "cpu" and onednn_conv.available() and jax.device_count() == 1


def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged, written out in a buffer of its own where :func:`applies`, else ``x``."""
    if not applies():
        return x
    return jax.ffi.ffi_call(onednn_conv.TARGETS["materialize"],
                            jax.ShapeDtypeStruct(x.shape, x.dtype),
                            input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)
