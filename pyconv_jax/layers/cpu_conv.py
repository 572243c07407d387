"""A convolution that keeps both cores of XLA:CPU busy, forward and backward.

Convolutions run far below the hardware's speed on XLA:CPU in four cases (float32, batch 16,
2 cores; docs/benchmarks.md):

- **Narrow forward convs.** YNNPACK (this jaxlib's conv library) splits a conv over threads by
  tiles of 64 output channels, so a conv with fewer than :data:`PARALLEL_MIN_FEATURES` outputs
  runs on one core: every pyramid level of PyConvResNet's first two stages, and the stem. XLA's
  runtime runs independent ops side by side only when more than :data:`READY_SPLIT_THRESHOLD` are
  ready at once, so :func:`conv` computes such a conv as :func:`forward_slices` slices of the
  batch: a PyConvResNet-50 stage-1 PyConv then takes 37 ms instead of 63 ms.
- **The weight gradient.** XLA computes it as one convolution that contracts over every batch
  position at once. For a 3x3, 64->64 conv at 56x56 that takes 101 ms, against 27 ms forward, and
  477 ms at 112x112. The gradient is a sum over batch positions, so :func:`sliced_weight_grad`
  adds it up slice by slice: a few whole images, or a band of rows of one image, sized to the
  cache (:data:`SLICE_BYTES`). The same two convs then take 38 ms and 110 ms.
- **The input gradient of a stride-2 conv.** XLA computes it as a convolution over a
  zero-dilated gradient: 94 ms for a 3x3, 64->16 conv at 112x112, against 37 ms forward. The
  same conv written as a stride-1 conv over a space-to-depth input (:func:`space_to_depth_conv`)
  has a stride-1 input gradient: 18 ms.
- **Wide convs with small outputs.** For a strided conv of 128 or more input and output
  features, or one whose output is 7x7, both gradients are far slower than the forward pass: a
  3x3, 512->512, stride-2 conv at 14x14 takes 17 ms forward and 96 ms forward+backward.
  :func:`conv` computes such a conv as one matrix product of image patches
  (:func:`patches_conv`), whose gradients are two matrix products and a sum of shifted slices:
  40 ms (:func:`uses_patches`).

:func:`conv` is ``lax.conv_general_dilated`` (NHWC/HWIO, explicit padding, one feature group)
computed this way. Its results differ from XLA's only in the order of float sums.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

#: YNNPACK gives each thread a tile of 64 output channels: measured over 3x3 to 9x9 convs at
#: 28x28 and 56x56, convs with 16 to 64 outputs run at one core's speed (~150 GFLOP/s) on 1 or 2
#: cores, and 128 outputs at two cores' (~290 GFLOP/s).
PARALLEL_MIN_FEATURES = 128

#: XLA:CPU's runtime hands ready ops to a second thread only when more than this many are ready
#: at once (``ExecuteSession::kSplitThreshold`` in ``xla/backends/cpu/runtime/thunk.h``): 8
#: independent one-core convs took 8x one conv's time, and 16 took 8x as well (two at a time).
READY_SPLIT_THRESHOLD = 8

#: Narrow convs are sliced only when each image's output has at least this many pixels (28x28):
#: at 224x224 that is PyConvResNet's first two stages and the stem, where slicing was measured to
#: pay; the 14x14 stage gained 1 ms of 14, and on small images slices only add compile time.
SLICE_MIN_PIXELS = 28 * 28

#: Bytes of a slice's input, and of its output gradient. Measured on XLA:CPU (2 cores, 2 MiB of
#: L2 each) over 3x3 convs of 16 to 256 channels at 56x56 and 112x112: slices whose input and
#: output gradient are both at most 1.6 MB run 2-4x faster than the whole batch; at 3.2 MB they
#: are as slow as it (docs/benchmarks.md).
SLICE_BYTES = 2 << 20

#: Convs with fewer outputs than this keep XLA's whole-batch weight gradient: it is fast for
#: them (3x3, 64->16 at 16x56x56: 15 ms whole, 48 ms one image at a time), as for the narrow
#: per-chunk convs of the ``split`` pyramid levels.
SLICE_MIN_FEATURES = 32

#: At most this many slices per gradient: the slices are unrolled in the program (XLA:CPU runs a
#: conv inside a loop very slowly), so their count bounds the compile time. Larger batches get
#: larger slices.
MAX_SLICES = 32

#: Convs with at least this many input and output features, strided or with small outputs, run
#: as a product of image patches. Measured at batch 16, forward+backward (ms, ours
#: against patches): 3x3 stride 2, 512->512 at 14x14 96 -> 40, 256->256 at 28x28 79 -> 52,
#: 128->128 at 56x56 82 -> 72, 256->128 at 28x28 35 -> 38 (within noise); 3x3 stride 1,
#: 512->512 at 7x7 51 -> 37, but 256->256 at 14x14 43 -> 49 and 128->128 at 28x28 60 -> 67.
#: 128->32 at 56x56, stride 2: 40 -> 73.
PATCHES_MIN_FEATURES = 128

#: Stride-1 convs use patches only for outputs of at most this many pixels per image (7x7).
PATCHES_MAX_PIXELS = 7 * 7

Padding = tuple[tuple[int, int], tuple[int, int]]


def _conv(x, kernel, strides, padding, dilation=(1, 1)):
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS)


def space_to_depth_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-2 conv of odd square ``kernel`` (padding ``k // 2``) as a stride-1 conv.

    Each 2x2 block of pixels becomes one pixel with 4x the channels, and the kernel is rearranged
    to match (tap ``a = 2 q + r + k // 2`` of the original lands at block offset ``q``, pixel
    ``r``), so the result equals the strided conv's while XLA differentiates a stride-1 conv.
    """
    k, _, c, out = kernel.shape
    p = k // 2
    n, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))  # zeros, as the conv's own padding
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(n, h2, 2, w2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h2, w2, 4 * c)
    first, last = -((p + 1) // 2), p // 2  # block offsets q the kernel reaches
    taps = last - first + 1
    lead = -(2 * first + p)  # 0 or 1 zero taps in front, so that taps pair up as (q, r)
    kernel = jnp.pad(kernel, ((lead, 2 * taps - k - lead),) * 2 + ((0, 0), (0, 0)))
    kernel = kernel.reshape(taps, 2, taps, 2, c, out).transpose(0, 2, 1, 3, 4, 5)
    return _conv(x, kernel.reshape(taps, taps, 4 * c, out), (1, 1),
                 ((-first, last), (-first, last)))


def is_space_to_depth_conv(kernel_shape, strides, padding, dilation) -> bool:
    """Whether :func:`space_to_depth_conv` computes this conv: stride 2, odd square kernel,
    padding ``k // 2`` on every side, no dilation."""
    k = kernel_shape[0]
    return (tuple(strides) == (2, 2) and tuple(dilation) == (1, 1) and k % 2 == 1
            and kernel_shape[1] == k and tuple(map(tuple, padding)) == ((k // 2, k // 2),) * 2)


def forward_slices(batch: int, out_features: int, siblings: int = 1,
                   out_pixels: int = SLICE_MIN_PIXELS) -> int:
    """How many equal batch slices :func:`conv` computes its forward pass in.

    One for convs that already use every core: those YNNPACK spreads over threads
    (:data:`PARALLEL_MIN_FEATURES` outputs or more), and those with more than
    :data:`READY_SPLIT_THRESHOLD` ``siblings`` (independent convs of one input, such as the
    chunks of a ``split`` level, whose inputs are then ready at once); one as well for outputs of
    fewer than :data:`SLICE_MIN_PIXELS` ``out_pixels`` per image. Otherwise the fewest slices
    that exceed the threshold, or one image per slice for a batch too small for that (measured at
    batch 8: PyConvResNet-50 inference 429 -> 393 ms).
    """
    if (out_features >= PARALLEL_MIN_FEATURES or siblings > READY_SPLIT_THRESHOLD
            or out_pixels < SLICE_MIN_PIXELS):
        return 1
    return min((d for d in range(READY_SPLIT_THRESHOLD + 1, batch + 1) if batch % d == 0),
               default=batch)


def _forward_conv(x, kernel, strides, padding, dilation, siblings):
    n = x.shape[0]
    out_shape = jax.eval_shape(lambda x: _conv(x[:1], kernel, strides, padding, dilation), x).shape
    images = n // forward_slices(n, kernel.shape[-1], siblings, out_shape[1] * out_shape[2])
    if images == n:
        return _conv(x, kernel, strides, padding, dilation)
    return jnp.concatenate([_conv(x[i:i + images], kernel, strides, padding, dilation)
                            for i in range(0, n, images)])


def weight_grad_slices(x_shape: tuple[int, ...], dy_shape: tuple[int, ...], itemsize: int,
                       slice_bytes: int | None = None) -> tuple[int, int]:
    """How :func:`sliced_weight_grad` cuts the batch: ``(images per slice, output rows per slice)``.

    The whole batch when the conv has fewer than :data:`SLICE_MIN_FEATURES` outputs. Otherwise
    equal slices of whole images (a divisor of the batch) whose input and output gradient each fit
    ``slice_bytes``, else one image at a time in bands of output rows. Never more than
    :data:`MAX_SLICES` slices.
    """
    slice_bytes = slice_bytes or SLICE_BYTES
    n, h, w, c = x_shape
    _, out_h, out_w, out_c = dy_shape
    if out_c < SLICE_MIN_FEATURES:
        return n, out_h
    image_bytes = max(h * w * c, out_h * out_w * out_c) * itemsize
    if image_bytes <= slice_bytes or n >= MAX_SLICES:
        # Equal slices: a short last slice (5 + 5 + 5 + 1 images) measured 3x slower than 4 x 4.
        fewest = math.ceil(n / MAX_SLICES)
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        fitting = [d for d in divisors if d <= max(slice_bytes // image_bytes, fewest)]
        images = fitting[-1] if fitting[-1] >= fewest else min(d for d in divisors if d >= fewest)
        return images, out_h
    bands = min(math.ceil(image_bytes / slice_bytes), max(1, MAX_SLICES // n), out_h)
    return 1, math.ceil(out_h / bands)


def uses_patches(kernel_shape: tuple[int, ...], strides, dilation,
                 out_shape: tuple[int, ...]) -> bool:
    """Whether :func:`conv` runs as a product of image patches (:func:`patches_conv`).

    For convs of at least :data:`PATCHES_MIN_FEATURES` input and output features and a kernel
    larger than 1x1, without dilation, that are strided or have at most
    :data:`PATCHES_MAX_PIXELS` output pixels per image.
    """
    kh, kw, in_features, out_features = kernel_shape
    return (min(in_features, out_features) >= PATCHES_MIN_FEATURES and kh * kw > 1
            and tuple(dilation) == (1, 1)
            and (max(strides) > 1 or out_shape[1] * out_shape[2] <= PATCHES_MAX_PIXELS))


def image_patches(x: jax.Array, kernel_size: tuple[int, int], strides, padding) -> jax.Array:
    """The input pixels that each output pixel of a conv reads: ``[N, OH, OW, kh * kw * C]``.

    Ordered as an HWIO kernel's rows (kernel row, kernel column, input feature), so that the conv
    is ``image_patches(x, ...) @ kernel.reshape(-1, O)``. Padding may be negative (a crop).
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0),
                                           (0, 0, 0)))
    n, h, w, c = x.shape
    out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
    return jnp.concatenate([
        lax.slice(x, (0, i, j, 0), (n, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, c),
                  (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)], axis=-1)


def patches_conv(x: jax.Array, kernel: jax.Array, strides, padding: Padding) -> jax.Array:
    """The conv as one matrix product of :func:`image_patches`; no dilation.

    Its gradients, by automatic differentiation, are two matrix products and a sum of shifted
    slices of the patches' gradient.
    """
    patches = image_patches(x, kernel.shape[:2], strides, padding)
    y = patches.reshape(-1, patches.shape[-1]) @ kernel.reshape(-1, kernel.shape[-1])
    return y.reshape(*patches.shape[:3], kernel.shape[-1])


def _xla_weight_grad(x, kernel, dy, strides, padding, dilation):
    return jax.vjp(lambda k: _conv(x, k, strides, padding, dilation), kernel)[1](dy)[0]


def sliced_weight_grad(x, kernel_shape, dy, strides, padding, dilation,
                       slice_bytes: int | None = None):
    """The gradient of ``sum(conv(x, kernel) * dy)`` in ``kernel``, as a sum over slices."""
    n, out_height = dy.shape[0], dy.shape[1]
    images, rows = weight_grad_slices(x.shape, dy.shape, x.dtype.itemsize, slice_bytes)
    kernel = jnp.zeros(kernel_shape, x.dtype)  # only its shape and dtype are read
    if rows == out_height:
        return functools.reduce(jnp.add, (
            _xla_weight_grad(x[i:i + images], kernel, dy[i:i + images], strides, padding,
                             dilation) for i in range(0, n, images)))
    # Bands of output rows: pad the height once, then give each band the input rows it reads.
    (top, bottom), width_padding = padding
    x = jnp.pad(x, ((0, 0), (max(top, 0), max(bottom, 0)), (0, 0), (0, 0)))
    x = x[:, max(-top, 0):x.shape[1] - max(-bottom, 0)]  # negative padding crops
    reach = dilation[0] * (kernel_shape[0] - 1) + 1
    grads = []
    for i in range(n):
        for r in range(0, out_height, rows):
            end = min(r + rows, out_height)
            band = x[i:i + 1, r * strides[0]:(end - 1) * strides[0] + reach]
            grads.append(_xla_weight_grad(band, kernel, dy[i:i + 1, r:end], strides,
                                          ((0, 0), width_padding), dilation))
    return functools.reduce(jnp.add, grads)


def input_grad(dy, kernel, x_shape, strides, padding, dilation):
    """The gradient of ``sum(conv(x, kernel) * dy)`` in ``x``; stride 2 through space-to-depth."""
    x = jnp.zeros(x_shape, dy.dtype)  # only its shape and dtype are read
    if is_space_to_depth_conv(kernel.shape, strides, padding, dilation):
        return jax.vjp(lambda x: space_to_depth_conv(x, kernel), x)[1](dy)[0]
    return jax.vjp(lambda x: _conv(x, kernel, strides, padding, dilation), x)[1](dy)[0]


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
         dilation: tuple[int, int] = (1, 1), siblings: int = 1) -> jax.Array:
    """``lax.conv_general_dilated`` in NHWC/HWIO, forward and backward as this module describes.

    ``padding`` is ``((top, bottom), (left, right))``. ``siblings`` counts the independent convs
    of the same input that the caller runs alongside this one, this one included
    (:func:`forward_slices`).
    """
    out_shape = jax.eval_shape(lambda x: _conv(x, kernel, strides, padding, dilation), x).shape
    if uses_patches(kernel.shape, strides, dilation, out_shape):
        return patches_conv(x, kernel, strides, padding)
    return _sliced_conv(x, kernel, strides, padding, dilation, siblings)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _sliced_conv(x, kernel, strides, padding, dilation, siblings):
    return _forward_conv(x, kernel, strides, padding, dilation, siblings)


def _conv_fwd(x, kernel, strides, padding, dilation, siblings):
    return _forward_conv(x, kernel, strides, padding, dilation, siblings), (x, kernel)


def _conv_bwd(strides, padding, dilation, siblings, residuals, dy):
    x, kernel = residuals
    dx = input_grad(dy, kernel, x.shape, strides, padding, dilation)
    dkernel = sliced_weight_grad(x, kernel.shape, dy, strides, padding, dilation)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_sliced_conv.defvjp(_conv_fwd, _conv_bwd)

