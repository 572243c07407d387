"""materialize(): the identity, and it stops XLA:CPU recomputing a residual chain per reader."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyconv_jax.layers import materialize as materialize_module
from pyconv_jax.layers import onednn_conv
from pyconv_jax.layers.materialize import materialize
from pyconv_jax.layers.norm import batch_norm_train

pytestmark = pytest.mark.skipif(not onednn_conv.available(),
                                reason="the native library is not built here")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_it_returns_its_argument_under_jit_and_vmap(dtype):
    x = (jnp.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    np.testing.assert_array_equal(jax.jit(materialize)(x), x)
    np.testing.assert_array_equal(jax.jit(jax.vmap(materialize))(x), x)
    # Its operand stays intact for the operand's other readers.
    both = jax.jit(lambda x: (materialize(x * 2) + 1, x * 2))(x)
    np.testing.assert_array_equal(both[0], x * 2 + 1)
    np.testing.assert_array_equal(both[1], x * 2)


def _chain_loss(xs, scale, bias, cotangent):
    """A stage of residual blocks: y = relu(bn(x_k) + y), as in a ResNet."""
    y = xs[0]
    for x in xs[1:]:
        y = batch_norm_train(x, scale, bias, y, 1e-5, True, jnp.float32)[0]
    return jnp.sum(y * cotangent)


def _most_tensors_one_fusion_reads(blocks: int) -> int:
    shape = (4, 16, 16, 64)
    xs = [jnp.zeros(shape)] * (blocks + 1)
    scale = bias = jnp.ones(shape[-1])
    hlo = jax.jit(jax.grad(_chain_loss)).lower(xs, scale, bias, jnp.zeros(shape)).compile()
    text = hlo.as_text()
    full = f"f32[{','.join(map(str, shape))}]"
    shapes = dict(re.findall(r"%([\w.\-]+) = (\S+?)\{", text))
    most = 0
    for operands in re.findall(r"= \S+ fusion\((.*?)\), kind=", text):
        names = [re.sub(r"/\*index=\d+\*/", "", o).strip().lstrip("%") for o in operands.split(",")]
        most = max(most, sum(shapes.get(name) == full for name in names))
    return most


def test_no_fusion_recomputes_the_residual_chain():
    """Without materialize() a fusion of a stage's last block read every block's conv output
    (checked: 4 tensors at 2 blocks, 8 at 6); with it each fusion reads a block's own few (2),
    however deep the stage."""
    assert _most_tensors_one_fusion_reads(6) <= 3
    assert _most_tensors_one_fusion_reads(6) == _most_tensors_one_fusion_reads(2)


def test_it_is_the_identity_off_a_single_cpu_device(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    assert not materialize_module.applies()
    x = jnp.ones(3)
    assert materialize(x) is x
