"""Inference with each BatchNorm (+ shortcut) + ReLU folded into the conv before it: the same
numbers as the unfused model, gradients through it, and the fused path taken."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyconv_jax.layers import onednn_conv
from pyconv_jax.layers.epilogue import Epilogue
from pyconv_jax.layers.lowering import fuses_epilogue
from pyconv_jax.layers.norm import BatchNorm
from pyconv_jax.models import create_model
from tests.jaxpr_helpers import ffi_calls
from tests.conftest import fast_variables

needs_onednn = pytest.mark.skipif(not onednn_conv.available(),
                                  reason="the oneDNN library is not built here")


def _close(got, want, rtol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=rtol * scale)


def test_epilogue_is_the_batchnorm_it_folds():
    """``Epilogue.apply`` of a folded BatchNorm equals the BatchNorm (inference), with the
    residual and ReLU; per-level slices and a conv bias fold in as they should."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 8)) * 2 + 1, jnp.float32)
    residual = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    bn = BatchNorm(use_running_average=True, relu=True)
    variables = bn.init(jax.random.key(0), x, residual)
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.uniform(0.1, 1, v.shape), v.dtype),
                             variables)
    epilogue = bn.apply(variables, jax.ShapeDtypeStruct((8,), jnp.float32), residual, fold=True)
    assert isinstance(epilogue, Epilogue) and epilogue.relu
    want = bn.apply(variables, x, residual)
    _close(epilogue.apply(x), want, 1e-6)
    _close(epilogue.channels(2, 6).apply(x[..., 2:6]), want[..., 2:6], 1e-6)
    bias = jnp.asarray(rng.normal(size=8), jnp.float32)
    _close(epilogue.after_bias(bias).apply(x), epilogue.apply(x + bias), 1e-6)
    kernel = jnp.asarray(rng.normal(size=(1, 1, 8, 8)), jnp.float32)
    folded = epilogue.folded(kernel)
    np.testing.assert_allclose(folded, kernel * epilogue.multiplier, rtol=1e-6)
    with pytest.raises(ValueError, match="use_running_average=True"):
        BatchNorm(use_running_average=False).apply(variables, x, fold=True)


@needs_onednn
@pytest.mark.parametrize("name", ["pyconvresnet50", "pyconvhgresnet50", "resnet18",
                                  "pyconvresnet18"])
def test_fused_inference_matches_the_unfused_model(name):
    """Every conv of the network applies its BatchNorm (+ shortcut) + ReLU in its own pass:
    logits equal the XLA model's (``grouped``, unfused) to float rounding."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    fused, plain = create_model(name, num_classes=10), create_model(
        name, num_classes=10, pyconv_lowering="grouped")
    assert fuses_epilogue(fused.pyconv_lowering) and not fuses_epilogue(plain.pyconv_lowering)
    variables = fast_variables(fused, x, train_stats=True)
    apply = functools.partial(fused.apply, train=False)
    _close(jax.jit(apply)(variables, x), plain.apply(variables, x, train=False), 1e-5)
    # One fused FFI conv per conv of the network (pyramid levels counted one by one).
    convs = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
                if path[-1].key == "kernel" and "fc" not in jax.tree_util.keystr(path))
    targets = ffi_calls(apply, variables, x)
    assert len(targets) == convs
    assert set(targets) == {onednn_conv.TARGETS["fused_forward"]}


@needs_onednn
def test_gradients_through_the_fused_inference_model():
    """Gradients of an inference-mode loss (saliency, fine-tuning with frozen statistics) flow
    through the folding into every parameter, statistic and the input: as close to float64 as
    the unfused model's (within 4x: the folded kernel adds one rounding; both ~5e-5 here)."""
    name = "pyconvresnet18"
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    fused, plain = (create_model(name, num_classes=10, pyconv_lowering=lowering)
                    for lowering in ("auto", "grouped"))
    variables = fast_variables(fused, x, train_stats=True)

    def grads(model, variables, x):
        def loss(params, batch_stats, x):
            logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
            return jnp.sum(jnp.sin(logits))
        return jax.grad(loss, (0, 1, 2))(variables["params"], variables["batch_stats"], x)

    with jax.enable_x64(True):
        model64 = create_model(name, num_classes=10, pyconv_lowering="grouped",
                               dtype=jnp.float64, param_dtype=jnp.float64)
        truth = jax.tree.map(np.asarray, grads(
            model64, jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables),
            jnp.asarray(x, jnp.float64)))

    def errors(got):
        return np.array([np.max(np.abs(np.asarray(g, np.float64) - t)) / np.max(np.abs(t))
                         for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(truth),
                                         strict=True)])

    fused_errors, plain_errors = errors(grads(fused, variables, x)), errors(
        grads(plain, variables, x))
    assert fused_errors.max() <= 4 * plain_errors.max(), (fused_errors.max(), plain_errors.max())
    assert fused_errors.max() < 1e-3
