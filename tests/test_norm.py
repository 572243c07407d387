"""The fused BatchNorm (+ residual + ReLU) against Flax's BatchNorm and JAX's autodiff of it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


from pyconv_jax.layers.norm import BatchNorm, batch_norm_train

SHAPE = (4, 7, 5, 24)  # NHWC, odd spatial sizes


class FlaxReference(nn.Module):
    """``relu(flax BatchNorm(x) + residual)``: what :class:`BatchNorm` replaces."""

    relu: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, residual, train):
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name="bn")(x)
        if residual is not None:
            y = y + residual
        return nn.relu(y) if self.relu else y


class Fused(nn.Module):
    relu: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, residual, train):
        return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         relu=self.relu, dtype=self.dtype, name="bn")(x, residual)


def _inputs(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    # Channel means of a few standard deviations, as conv outputs have: the backward pass sums
    # over x (not x - mean), so this is where its rounding would show.
    x = rng.normal(size=SHAPE) * rng.uniform(0.5, 3, SHAPE[-1]) + rng.normal(0, 4, SHAPE[-1])
    residual = rng.normal(size=SHAPE)
    cotangent = rng.normal(size=SHAPE)
    return (jnp.asarray(x, dtype), jnp.asarray(residual, dtype), jnp.asarray(cotangent, dtype))


def _variables(module, x, residual, seed=1):
    variables = module.init(jax.random.key(0), x, residual, False)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype),
                        variables)


def _train(module, variables, x, residual, cotangent):
    """Output, new batch_stats and the gradients of ``sum(output * cotangent)``."""

    def loss(params, x, residual):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, residual, True, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * cotangent), (y, updates["batch_stats"])

    argnums = (0, 1) if residual is None else (0, 1, 2)
    (_, (y, stats)), grads = jax.value_and_grad(loss, argnums, has_aux=True)(
        variables["params"], x, residual)
    return y, stats, grads


def _errors(actual, expected):
    """Each leaf's largest difference, relative to the largest magnitude of ``expected``'s."""
    out = []
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        out.append(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30))
    return np.array(out)


def _assert_close(actual, expected, rtol):
    errors = _errors(actual, expected)
    assert np.all(errors <= rtol), errors


def _assert_as_accurate(actual, reference, truth):
    """``actual`` is as close to the float64 ``truth`` as the float32 ``reference`` is. Both carry
    the rounding of the fast variance E[x^2] - E[x]^2 (here ~1e-5, with channel means up to 20
    standard deviations), which dominates any difference between them."""
    reference_errors, errors = _errors(reference, truth), _errors(actual, truth)
    assert np.all(errors <= np.maximum(1.5 * reference_errors, 1e-6)), (errors, reference_errors)


def _float64_gradients(relu, variables, x, residual, cotangent):
    """The gradients of Flax's BatchNorm computed in float64: the truth both are measured by."""
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), tree)  # noqa: E731
        return _train(FlaxReference(relu, jnp.float64), as64(variables), as64(x), as64(residual),
                      as64(cotangent))[2]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_training_matches_flax_forward_statistics_and_gradients(relu, with_residual):
    x, residual, cotangent = _inputs()
    residual = residual if with_residual else None
    reference, fused = FlaxReference(relu), Fused(relu)
    variables = _variables(reference, x, residual)
    # Same variable tree, names and shapes: checkpoints and converted weights load unchanged.
    assert (jax.tree.map(jnp.shape, fused.init(jax.random.key(0), x, residual, False))
            == jax.tree.map(jnp.shape, variables))
    expected = _train(reference, variables, x, residual, cotangent)
    actual = _train(fused, variables, x, residual, cotangent)
    _assert_close(actual[:2], expected[:2], 1e-6)  # output and running statistics
    # Gradients of scale, bias, x (and residual).
    truth = _float64_gradients(relu, variables, x, residual, cotangent)
    _assert_as_accurate(actual[2], expected[2], truth)


@pytest.mark.parametrize("relu", [False, True])
def test_inference_matches_flax(relu):
    x, residual, _ = _inputs()
    reference, fused = FlaxReference(relu), Fused(relu)
    variables = _variables(reference, x, residual)
    expected = reference.apply(variables, x, residual, False)
    np.testing.assert_array_equal(fused.apply(variables, x, residual, False), expected)


def test_bfloat16_rounds_like_flax():
    """The output is rounded to ``dtype`` before the residual is added, as in Flax."""
    x, residual, cotangent = _inputs(jnp.bfloat16)
    reference, fused = FlaxReference(True, jnp.bfloat16), Fused(True, jnp.bfloat16)
    variables = _variables(reference, x, residual)
    expected = _train(reference, variables, x, residual, cotangent)
    actual = _train(fused, variables, x, residual, cotangent)
    assert actual[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(actual[0], expected[0])
    _assert_close(actual[1], expected[1], 1e-6)
    # bfloat16 keeps 8 bits: gradients agree to its rounding.
    _assert_close(actual[2], expected[2], 2e-2)


def _reference_train(x, scale, bias, residual):
    """Training-mode BatchNorm + residual + ReLU and its statistics, written plainly."""
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(x * x, (0, 1, 2)) - mean**2)
    y = (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
    return jnp.maximum(y + residual, 0), mean, var


def test_gradients_flow_through_the_returned_statistics():
    """A loss that uses the batch mean and variance too: their cotangents reach x."""
    x, residual, cotangent = _inputs()
    rng = np.random.default_rng(2)
    scale, bias = (jnp.asarray(rng.normal(1, 0.2, SHAPE[-1]), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.normal(size=(2, SHAPE[-1])), jnp.float32)

    def loss(fn):
        def value(x, scale, bias, residual):
            y, mean, var = fn(x, scale, bias, residual)
            return jnp.sum(y * cotangent) + jnp.sum(weights[0] * mean) + jnp.sum(weights[1] * var)
        return jax.grad(value, (0, 1, 2, 3))(x, scale, bias, residual)

    fused = loss(lambda *a: batch_norm_train(*a, 1e-5, True, jnp.float32))
    with jax.enable_x64(True):
        truth = jax.tree.map(lambda g: np.asarray(g, np.float64), loss(
            lambda *a: _reference_train(*(jnp.asarray(v, jnp.float64) for v in a))))
    _assert_as_accurate(fused, loss(_reference_train), truth)


def test_the_backward_pass_writes_only_the_gradients():
    """XLA:CPU writes out ``x - mean`` (or the broadcast mean) as a whole tensor when the backward
    pass reduces over it. Compiled (not run) at a ResNet stage-1 size, where XLA:CPU hands the
    reductions to its YNNPACK fusions: the only full-size tensors written are the forward's
    output (once, for the ReLU mask) and, backward, dx and dz."""
    shape = (16, 56, 56, 64)
    x = residual = cotangent = jnp.zeros(shape)
    scale = bias = jnp.ones(shape[-1])

    def grads(x, residual, cotangent):
        def value(x, residual):
            return jnp.sum(batch_norm_train(x, scale, bias, residual, 1e-5, True,
                                            jnp.float32)[0] * cotangent)
        return jax.grad(value, (0, 1))(x, residual)

    hlo = jax.jit(grads).lower(x, residual, cotangent).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    written = [line for line in entry.splitlines() if " = " in line
               and f"f32[{','.join(map(str, shape))}]" in line.split(" = ")[1].split("(")[0]
               and not any(op in line for op in ("parameter(", " bitcast(", " tuple("))
               and "output_to_operand_aliasing" not in line]  # materialize() writes nothing
    backward = [line for line in written if "transpose(" in line]
    assert len(backward) <= 2 and len(written) - len(backward) <= 1, "\n".join(written)


def test_residual_of_another_shape_is_refused():
    x, residual, _ = _inputs()
    with pytest.raises(ValueError, match="residual of shape"):
        Fused(True).init(jax.random.key(0), x, residual[..., :8], True)


class FusedPieces(nn.Module):
    """:class:`Fused` with its input handed over as channel pieces (as a PyConv's levels)."""

    relu: bool
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x, residual, train):
        pieces = jnp.split(x, np.cumsum(self.widths)[:-1].tolist(), axis=-1)
        return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         relu=self.relu, name="bn")(pieces, residual)


def _runs_native_pieces(module, variables, x, residual) -> bool:
    def loss(x):
        y, _ = module.apply(variables, x, residual, True, mutable=["batch_stats"])
        return jnp.sum(y)
    hlo = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
    return 'custom_call_target="PyconvBatchNormInputGradPieces"' in hlo


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("widths", [(16, 8), (5, 3, 16)])  # vector and scalar channel runs
@pytest.mark.parametrize("with_residual", [False, True])
def test_channel_pieces_match_the_concatenated_input(native, widths, with_residual, monkeypatch):
    """Training on pieces gives the output, statistics and gradients of training on their
    concatenation; the pieces' gradients are the slices of the concatenation's. Natively (one
    pass writing every piece, where the library is built) and by XLA (one slice per piece)."""
    from pyconv_jax.layers import norm
    if native and not norm._native_pieces(jnp.float32):
        pytest.skip(f"the native library is unavailable here: {_unavailable_reason()}")
    monkeypatch.setattr(norm, "_native_pieces", lambda dtype: native)
    x, residual, cotangent = _inputs()
    residual = residual if with_residual else None
    whole, pieces = Fused(True), FusedPieces(True, widths)
    variables = _variables(whole, x, residual)
    assert _runs_native_pieces(pieces, variables, x, residual) == native
    y, stats, grads = _train(pieces, variables, x, residual, cotangent)
    y_whole, stats_whole, grads_whole = _train(whole, variables, x, residual, cotangent)
    _assert_close((y, stats, grads), (y_whole, stats_whole, grads_whole), 1e-6)


def test_channel_pieces_at_inference_match_the_concatenated_input():
    x, residual, _ = _inputs()
    variables = _variables(Fused(True), x, residual)
    expected = Fused(True).apply(variables, x, residual, False)
    np.testing.assert_array_equal(FusedPieces(True, (16, 8)).apply(variables, x, residual, False),
                                  expected)


def test_native_pieces_that_do_not_cover_the_channels_are_refused():
    from pyconv_jax.layers import norm, onednn_conv
    if not norm._native_pieces(jnp.float32):
        pytest.skip(f"the native library is unavailable here: {_unavailable_reason()}")
    x = jnp.ones((2, 3, 3, 24))
    vectors = [jnp.ones(24)] * 4
    call = jax.ffi.ffi_call(onednn_conv.TARGETS["batch_norm_input_grad_pieces"],
                            [jax.ShapeDtypeStruct((2, 3, 3, 16), jnp.float32)] * 2)
    with pytest.raises(Exception, match="pieces must cover g's channels"):
        jax.block_until_ready(call(x, x, *vectors))


def _unavailable_reason() -> str:
    from pyconv_jax.layers import onednn_conv
    return onednn_conv.unavailable_reason() or "more than one device"
