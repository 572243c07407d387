"""PointwiseConv: oneDNN's 1x1 conv and XLA's matrix product compute the same function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyconv_jax.layers import PointwiseConv, onednn_conv
from tests.jaxpr_helpers import ffi_targets

pytestmark = pytest.mark.skipif(not onednn_conv.available(),
                                reason="the native library is not built here")


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("shape,features", [((3, 9, 7, 32), 48), ((2, 4, 5, 3), 5)])
def test_onednn_matches_the_matrix_product_forward_and_backward(strides, shape, features):
    """Outputs, input and kernel gradients agree to float rounding, odd and strided images
    included; under ``auto`` on one CPU device it is oneDNN's conv that runs, forward and both
    gradients."""
    x = jax.random.normal(jax.random.key(0), shape)
    conv = PointwiseConv(features, strides=strides, lowering="onednn")
    product = PointwiseConv(features, strides=strides, lowering="grouped")
    params = conv.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, product.init(jax.random.key(1), x))

    def run(module):
        y, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
        return y, *vjp(jax.random.normal(jax.random.key(2), y.shape))

    ours, reference = run(conv), run(product)
    assert ours[0].shape == reference[0].shape
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)

    grads = lambda module: jax.grad(  # noqa: E731
        lambda p, x: jnp.sum(module.apply(p, x)), (0, 1))
    auto = PointwiseConv(features, strides=strides)
    assert ffi_targets(grads(auto), params, x) == sorted(
        onednn_conv.TARGETS[kind] for kind in ("forward", "input_grad", "weight_grad"))
    assert ffi_targets(grads(product), params, x) == []
