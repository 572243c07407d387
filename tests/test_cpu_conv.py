"""The CPU convolution against XLA's own conv and gradients, and its slicing policies."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pyconv_jax.layers import cpu_conv, lowering


def xla_conv(x, kernel, strides, padding, dilation):
    return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def assert_close(actual, expected, dtype=np.float32):
    """Elementwise, relative to the largest magnitude (sums of many products cancel)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = np.abs(expected).max()
    assert scale > 0
    tolerance = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(actual / scale, expected / scale, atol=tolerance, rtol=0)


CASES = [
    # (x shape, kernel shape, strides, padding, dilation)
    ((3, 9, 7, 4), (3, 3, 4, 32), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((3, 9, 7, 4), (3, 3, 4, 32), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # space-to-depth input grad
    ((2, 10, 8, 3), (5, 5, 3, 40), (2, 2), ((2, 2), (2, 2)), (1, 1)),  # space-to-depth, even size
    ((2, 11, 9, 6), (7, 7, 6, 32), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    ((2, 9, 9, 5), (4, 4, 5, 32), (2, 2), ((2, 1), (1, 2)), (1, 1)),  # even kernel, XLA's path
    ((2, 12, 10, 4), (3, 3, 4, 36), (1, 1), ((2, 2), (2, 2)), (2, 2)),  # dilated
    ((2, 9, 8, 4), (3, 3, 4, 32), (1, 2), ((-1, 2), (0, 1)), (1, 1)),  # negative, asymmetric
    ((4, 8, 8, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # narrow: whole batch
]


SLICINGS = {  # (images, output rows) per slice, from (batch, output height)
    "bands of 3 rows": lambda n, h: (1, 3),
    "2 images": lambda n, h: (2, h),
    "whole batch": lambda n, h: (n, h),
}


@pytest.mark.parametrize("slicing", SLICINGS)
@pytest.mark.parametrize("x_shape,kernel_shape,strides,padding,dilation", CASES)
def test_gradients_equal_xla(x_shape, kernel_shape, strides, padding, dilation, slicing,
                             monkeypatch):
    """Every slicing, including uneven last slices, gives XLA's gradients."""
    monkeypatch.setattr(cpu_conv, "weight_grad_slices",
                        lambda x_shape, dy_shape, *_: SLICINGS[slicing](dy_shape[0], dy_shape[1]))
    rng = np.random.default_rng(sum(x_shape) + sum(kernel_shape))
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    y = xla_conv(x, kernel, strides, padding, dilation)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)

    ours, vjp = jax.vjp(lambda x, k: cpu_conv.conv(x, k, strides, padding, dilation), x, kernel)
    expected_dx, expected_dk = jax.vjp(
        lambda x, k: xla_conv(x, k, strides, padding, dilation), x, kernel)[1](dy)
    dx, dk = vjp(dy)
    np.testing.assert_array_equal(ours, y)  # XLA's conv itself: outputs too small to slice
    assert_close(dx, expected_dx)
    assert_close(dk, expected_dk)


PATCH_CASES = [
    # (x shape, kernel shape, strides, padding): strided, or small outputs at stride 1
    ((2, 14, 14, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 7, 8), (3, 3, 8, 12), (1, 1), ((1, 1), (1, 1))),
    ((2, 11, 9, 8), (5, 5, 8, 8), (2, 2), ((2, 2), (2, 2))),  # odd sizes
    ((2, 9, 8, 8), (4, 3, 8, 8), (2, 1), ((-1, 2), (0, 1))),  # even kernel, negative padding
]


@pytest.mark.parametrize("x_shape,kernel_shape,strides,padding", PATCH_CASES)
def test_patch_products_equal_xla(x_shape, kernel_shape, strides, padding, monkeypatch):
    """Wide convs with small outputs run as patch products: XLA's conv and gradients."""
    monkeypatch.setattr(cpu_conv, "PATCHES_MIN_FEATURES", 8)  # small features, same path
    rng = np.random.default_rng(sum(x_shape) + sum(kernel_shape))
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    args = (strides, padding, (1, 1))
    y, vjp = jax.vjp(lambda x, k: cpu_conv.conv(x, k, *args), x, kernel)
    expected_y, expected_vjp = jax.vjp(lambda x, k: xla_conv(x, k, *args), x, kernel)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for ours, expected in zip((y, *vjp(dy)), (expected_y, *expected_vjp(dy))):
        assert_close(ours, expected)
    program = jax.jit(lambda x, k: jax.vjp(lambda x, k: cpu_conv.conv(x, k, *args), x, k)[1](y))
    assert "convolution" not in program.lower(x, kernel).as_text()


def test_patch_products_at_the_real_threshold():
    """A 3x3, 128->128, stride-2 conv runs and trains without a single convolution op."""
    x = jnp.ones((1, 8, 8, 128), jnp.float32)
    kernel = jnp.full((3, 3, 128, 128), 0.01, jnp.float32)
    args = ((2, 2), ((1, 1), (1, 1)), (1, 1))
    grads = jax.grad(lambda x, k: jnp.sum(cpu_conv.conv(x, k, *args) ** 2), (0, 1))
    assert "convolution" not in jax.jit(grads).lower(x, kernel).as_text()
    expected = jax.grad(lambda x, k: jnp.sum(xla_conv(x, k, *args) ** 2), (0, 1))(x, kernel)
    for ours, reference in zip(grads(x, kernel), expected):
        assert_close(ours, reference)
    assert "convolution" not in jax.jit(cpu_conv.conv, static_argnums=(2, 3, 4)).lower(
        x, kernel, *args).as_text()


def test_patches_policy():
    uses = cpu_conv.uses_patches
    s1, s2, one = (1, 1), (2, 2), (1, 1)
    # PyConvResNet-50 / ResNet-50 at 224x224: strided wide convs, and the 7x7 stage.
    assert uses((3, 3, 512, 512), s2, one, (16, 7, 7, 512))
    assert uses((3, 3, 256, 256), s2, one, (16, 14, 14, 256))
    assert uses((3, 3, 128, 128), s2, one, (16, 28, 28, 128))
    assert uses((3, 3, 512, 512), s1, one, (16, 7, 7, 512))
    # Stride 1 at 14x14 and 28x28: XLA's conv and the sliced gradients are faster.
    assert not uses((3, 3, 256, 256), s1, one, (16, 14, 14, 256))
    assert not uses((3, 3, 128, 128), s1, one, (16, 28, 28, 128))
    # Narrow convs (the first two stages' pyramid levels), 1x1 and dilated convs.
    assert not uses((3, 3, 128, 32), s2, one, (16, 28, 28, 32))
    assert not uses((5, 5, 64, 32), s2, one, (16, 14, 14, 32))
    assert not uses((1, 1, 512, 512), s2, one, (16, 7, 7, 512))
    assert not uses((3, 3, 512, 512), s1, (2, 2), (16, 7, 7, 512))


def test_bfloat16_gradients_keep_their_dtype():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 32)), jnp.bfloat16)
    args = ((2, 2), ((1, 1), (1, 1)), (1, 1))
    dy = jnp.ones((2, 4, 4, 32), jnp.bfloat16)
    dx, dk = jax.vjp(lambda x, k: cpu_conv.conv(x, k, *args), x, kernel)[1](dy)
    expected_dx, expected_dk = jax.vjp(lambda x, k: xla_conv(x, k, *args), x, kernel)[1](dy)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    assert_close(dx, expected_dx, np.float16)
    assert_close(dk, expected_dk, np.float16)


@pytest.mark.parametrize("batch,out_features,slices", [
    (16, 16, 16), (12, 64, 12), (5, 32, 5), (16, 128, 1)])
def test_forward_equals_xla(batch, out_features, slices, monkeypatch):
    """Narrow convs run as batch slices, wide ones whole; either way they are XLA's conv."""
    calls = []
    real = cpu_conv.forward_slices
    monkeypatch.setattr(cpu_conv, "forward_slices",
                        lambda *a: calls.append(real(*a)) or calls[-1])
    rng = np.random.default_rng(batch + out_features)
    x = jnp.asarray(rng.normal(size=(batch, 56, 30, 2)), jnp.float32)  # 28x30 outputs
    kernel = jnp.asarray(rng.normal(size=(5, 5, 2, out_features)), jnp.float32)
    args = ((2, 1), ((2, 2), (1, 3)), (1, 1))
    ours = jax.jit(lambda x, k: cpu_conv.conv(x, k, *args))(x, kernel)
    assert calls == [slices]
    assert_close(ours, xla_conv(x, kernel, *args))


def test_forward_slicing_policy():
    slices = cpu_conv.forward_slices
    # Fewer than 128 outputs: the fewest equal slices above XLA's split threshold of 8 ready ops.
    assert slices(16, 16) == 16 and slices(16, 64) == 16 and slices(18, 64) == 9
    assert slices(256, 64) == 16 and slices(36, 8) == 9
    # Batches without such a divisor: one image per slice.
    assert slices(8, 16) == 8 and slices(7, 16) == 7 and slices(1, 16) == 1
    # More than 8 sibling convs (the chunks of a split level) already run on every core.
    assert slices(16, 16, siblings=2) == 16 and slices(16, 16, siblings=8) == 16
    assert slices(16, 32, siblings=9) == 1 and slices(16, 32, siblings=32) == 1
    # YNNPACK already runs convs with 128 or more outputs on every core.
    assert slices(16, 128) == 1 and slices(256, 2048) == 1
    # Outputs under 28x28 per image stay whole.
    assert slices(16, 16, out_pixels=27 * 28) == 1 and slices(16, 16, out_pixels=112 * 112) == 16


def test_split_levels_pass_their_chunk_count(monkeypatch):
    """The chunks of a split level are siblings: 9x9 with 16 groups over 64 channels -> 2."""
    seen = []
    real = cpu_conv.forward_slices

    def spy(batch, out_features, siblings, *rest):
        seen.append(siblings)
        return real(batch, out_features, siblings, *rest)

    monkeypatch.setattr(cpu_conv, "forward_slices", spy)
    x = jnp.ones((2, 8, 8, 64), jnp.float32)
    y = lowering.grouped_conv(x, jnp.ones((9, 9, 4, 16)), groups=16, lowering="split")
    assert y.shape == (2, 8, 8, 16) and seen == [2, 2]


def test_slicing_policy():
    slices = cpu_conv.weight_grad_slices
    image_56 = (16, 56, 56, 64)  # 0.8 MB per image in float32: two images per slice
    assert slices(image_56, image_56, 4) == (2, 56)
    # Fewer than SLICE_MIN_FEATURES outputs: XLA's whole-batch gradient.
    assert slices(image_56, (16, 56, 56, 16), 4) == (16, 56)
    # 3.2 MB images: one image at a time, in two bands of rows (16 x 2 = MAX_SLICES).
    assert slices((16, 112, 112, 64), (16, 112, 112, 64), 4) == (1, 56)
    # The output gradient counts too: 64 -> 256 channels at 56x56 is 3.2 MB out per image.
    assert slices(image_56, (16, 56, 56, 256), 4) == (1, 28)
    # Equal slices: 0.4 MB images fit 5 to a slice, but 16 = 4 x 4.
    assert slices((16, 28, 28, 128), (16, 28, 28, 32), 4) == (4, 28)
    # Big batches: never more than MAX_SLICES slices, so larger ones, still equal.
    for n in (33, 37, 64, 256):
        images, rows = slices((n, 56, 56, 64), (n, 56, 56, 64), 4)
        assert rows == 56 and n % images == 0 and n // images <= cpu_conv.MAX_SLICES
    images, rows = slices((4, 224, 224, 64), (4, 224, 224, 64), 4)
    assert images == 1 and 4 * math.ceil(224 / rows) <= cpu_conv.MAX_SLICES


def test_forward_mode_needs_the_grouped_lowering():
    """The CPU backward pass is a custom VJP: reverse mode only. ``grouped`` is XLA's own conv,
    the documented way to get forward-mode derivatives, and they equal the reverse-mode ones."""
    from pyconv_jax.layers import PyConv

    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
    tangent = jax.random.normal(jax.random.key(1), x.shape)
    layers = {lowering: PyConv(32, (3, 5), (1, 4), lowering=lowering)
              for lowering in ("grouped", "split")}
    variables = layers["split"].init(jax.random.key(2), x)
    _, forward = jax.jvp(lambda x: layers["grouped"].apply(variables, x), (x,), (tangent,))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: layers["split"].apply(variables, x), (x,), (tangent,))
    # <cotangent, J tangent> = <J^T cotangent, tangent>, with J^T from the CPU backward pass.
    cotangent = jax.random.normal(jax.random.key(3), forward.shape)
    _, vjp = jax.vjp(lambda x: layers["split"].apply(variables, x), x)
    np.testing.assert_allclose(jnp.vdot(cotangent, forward), jnp.vdot(vjp(cotangent)[0], tangent),
                               rtol=1e-4)
