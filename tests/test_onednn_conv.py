"""The ``onednn`` lowering: oneDNN's convolutions through XLA's FFI, against XLA's own conv."""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pyconv_jax.layers import lowering, onednn_conv
from pyconv_jax.native import build
from tests.jaxpr_helpers import equations, ffi_calls


def xla_conv(x, kernel, strides, padding, dilation, groups):
    return lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=lax.Precision.HIGHEST)


def test_the_library_is_built_and_loads_here():
    """``make`` builds it on every Linux x86-64 machine, so the tests below never skip there."""
    if not build.supported_platform():
        pytest.skip("oneDNN's pip packages are for Linux x86-64 only")
    assert onednn_conv.unavailable_reason() is None
    assert onednn_conv.available()


CASES = [  # (kernel, groups, stride, dilation, padding, (in, out) channels)
    *itertools.product((1, 3, 5), (1, 4), (1, 2), (1,), ("same",), ((32, 16),)),
    (9, 16, 1, 1, "same", (32, 16)), (9, 16, 2, 1, "same", (32, 16)),
    (7, 8, 2, 1, "same", (32, 16)), (3, 1, 1, 2, "same", (32, 16)), (5, 4, 2, 2, "same", (32, 16)),
    (3, 1, 1, 1, ((2, 0), (0, 1)), (32, 16)), (5, 2, 2, 1, ((1, 3), (2, 0)), (32, 16)),
    (3, 4, 1, 1, ((0, 0), (0, 0)), (32, 16)),
    # The narrow kernels (one to four outputs per group): one or several input channels per
    # group, up to two groups per vector, groups wider than a vector, dilation, asymmetric
    # padding, a 1x1 kernel, a dilated kernel wider than the image (every tap checked).
    (7, 8, 1, 2, "same", (32, 16)), (5, 16, 1, 1, ((1, 3), (2, 0)), (32, 16)),
    (9, 16, 1, 1, "same", (64, 16)), (7, 8, 2, 1, "same", (64, 16)), (3, 2, 1, 1, "same", (32, 2)),
    (3, 2, 2, 1, ((0, 2), (1, 1)), (64, 4)), (1, 16, 2, 1, "same", (32, 16)),
    (9, 16, 1, 2, "same", (32, 16)),
    # Their input gradient (at most four inputs per group): strides and dilations with common
    # factors and without, asymmetric padding, a tap set that skips whole dy pixels.
    (7, 16, 2, 2, "same", (64, 16)), (5, 16, 3, 2, ((2, 1), (3, 0)), (32, 16)),
    (3, 32, 2, 3, ((0, 3), (3, 1)), (64, 32)), (9, 16, 3, 1, "same", (64, 16)),
    # The paired kernels (eight outputs per group, two groups to a vector): PyConvResNet's
    # stage-2 levels, strided, one or many inputs per group, asymmetric padding, kernel widths
    # 5 to 11 (one output row at a time from 9 up, two below), four groups to a vector; dilated
    # widths, odd group counts and kernels narrower than 5 are left to oneDNN.
    (5, 4, 1, 1, "same", (128, 32)), (7, 8, 2, 1, "same", (128, 64)),
    (9, 2, 1, 1, ((1, 3), (2, 0)), (16, 16)), (11, 4, 2, 1, "same", (64, 32)),
    (5, 2, 2, 1, "same", (8, 16)), (7, 8, 1, 1, ((0, 4), (3, 1)), (64, 32)),
    (3, 2, 1, 2, "same", (32, 16)), (3, 3, 1, 1, "same", (48, 24)), (3, 2, 1, 1, "same", (32, 16)),
    # ... and shapes they leave to oneDNN: channels not a multiple of 16, or 3 per group.
    (3, 8, 2, 1, "same", (8, 16)), (3, 8, 1, 1, "same", (8, 8)), (3, 16, 1, 1, "same", (48, 16)),
]


@pytest.mark.parametrize("kernel,groups,stride,dilation,padding,channels", CASES)
def test_forward_and_gradients_match_xla(kernel, groups, stride, dilation, padding, channels):
    """Forward, input gradient and kernel gradient equal XLA's grouped conv to float rounding,
    on an odd, non-square image and a cotangent that is not all ones."""
    _check_against_xla((3, 13, 11), kernel, groups, stride, dilation, padding, channels)


@pytest.mark.parametrize("kernel,groups,stride,channels", [
    (9, 16, 1, (64, 16)), (9, 16, 2, (64, 16)), (7, 8, 1, (64, 16)), (7, 8, 2, (64, 16)),
    (5, 4, 1, (64, 16)), (5, 4, 2, (64, 16)), (11, 16, 1, (32, 16)), (3, 16, 2, (64, 32)),
    (1, 16, 1, (32, 16)),
    # The paired kernels' blocks of seven (forward, kernels up to 7 wide) and fourteen pixels.
    (7, 8, 1, (128, 64)), (5, 4, 2, (128, 32)), (9, 2, 1, (32, 16)), (11, 4, 2, (64, 32)),
])
def test_narrow_kernels_match_xla_on_rows_wide_enough_for_their_pixel_blocks(
        kernel, groups, stride, channels):
    """The narrow kernels take eight output pixels at a time where all their taps fall inside the
    image (undilated, stride 1 or 2): rows wide enough for one or more such blocks and a tail."""
    _check_against_xla((2, 6, 45), kernel, groups, stride, 1, "same", channels)


def _check_against_xla(image, kernel, groups, stride, dilation, padding, channels):
    c, out = channels
    x = jax.random.normal(jax.random.key(0), (*image, c))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, c // groups, out))
    if padding == "same":
        p = dilation * (kernel - 1) // 2
        padding = ((p, p), (p, p))
    args = dict(strides=(stride, stride), padding=padding, dilation=(dilation, dilation))

    def ours(x, w):
        return onednn_conv.conv(x, w, groups=groups, **args)

    def reference(x, w):
        return xla_conv(x, w, args["strides"], padding, args["dilation"], groups)

    y, vjp = jax.vjp(jax.jit(ours), x, w)
    y_ref, vjp_ref = jax.vjp(reference, x, w)
    assert y.shape == y_ref.shape
    dy = jax.random.normal(jax.random.key(2), y.shape)
    for got, want in zip((y, *vjp(dy)), (y_ref, *vjp_ref(dy))):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * scale)


FUSED_CASES = [  # a dense conv, a strided 1x1, narrow levels (one with stride 2), oneDNN fallbacks
    (3, 1, 1, 1, "same", (32, 16)), (1, 1, 2, 1, "same", (32, 64)),
    (9, 16, 1, 1, "same", (64, 16)), (7, 8, 2, 1, "same", (64, 16)),
    (5, 4, 1, 2, "same", (32, 16)), (5, 2, 2, 1, ((1, 3), (2, 0)), (32, 16)),
    (3, 16, 1, 1, "same", (48, 16)), (5, 4, 1, 1, "same", (64, 32)),
    (9, 2, 1, 1, "same", (16, 16)),  # the paired kernel's one-row path
]


@pytest.mark.parametrize("relu,with_residual", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("kernel,groups,stride,dilation,padding,channels", FUSED_CASES)
def test_conv_bias_act_matches_xla(kernel, groups, stride, dilation, padding, channels, relu,
                                   with_residual):
    """The inference conv with its epilogue (bias, residual, ReLU) applied in its output pass,
    and its gradients, against XLA's conv followed by the same epilogue."""
    c, out = channels
    x = jax.random.normal(jax.random.key(0), (3, 13, 11, c))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, c // groups, out))
    bias = jax.random.normal(jax.random.key(2), (out,))
    if padding == "same":
        p = dilation * (kernel - 1) // 2
        padding = ((p, p), (p, p))
    args = dict(strides=(stride, stride), padding=padding, dilation=(dilation, dilation))
    y_shape = xla_conv(x, w, args["strides"], padding, args["dilation"], groups).shape
    residual = jax.random.normal(jax.random.key(3), y_shape) if with_residual else None

    def ours(x, w, bias, residual):
        return onednn_conv.conv_bias_act(x, w, bias, residual, relu=relu, groups=groups, **args)

    def reference(x, w, bias, residual):
        y = xla_conv(x, w, args["strides"], padding, args["dilation"], groups) + bias
        y = y if residual is None else y + residual
        return jnp.maximum(y, 0) if relu else y

    y, vjp = jax.vjp(jax.jit(ours), x, w, bias, residual)
    y_ref, vjp_ref = jax.vjp(reference, x, w, bias, residual)
    dy = jax.random.normal(jax.random.key(4), y.shape)
    for got, want in zip((y, *vjp(dy)), (y_ref, *vjp_ref(dy))):
        if want is None:
            assert got is None
            continue
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * scale)


def test_conv_bias_act_refuses_a_residual_or_bias_of_the_wrong_shape():
    x, w = jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 8))
    args = dict(relu=True, strides=(1, 1), padding=((1, 1), (1, 1)))
    with pytest.raises(ValueError, match=r"residual's shape \(1, 8, 8, 4\) is not the conv"):
        onednn_conv.conv_bias_act(x, w, jnp.ones(8), jnp.ones((1, 8, 8, 4)), **args)
    with pytest.raises(ValueError, match="one value per output channel"):
        onednn_conv.conv_bias_act(x, w, jnp.ones(4), **args)


@pytest.mark.parametrize("groups", [16, 8, 4, 1])
def test_narrow_levels_run_forward_and_kernel_gradient_in_the_narrow_kernels(groups):
    """PyConvResNet-50's levels with one to four outputs per group (9x9/16, 7x7/8 and 5x5/4,
    64 -> 16) call the narrow kernels for the forward pass and the kernel gradient, the dense
    3x3 oneDNN's primitives; the input gradient is the narrow kernels' with four inputs per group
    (9x9/16), oneDNN's with more."""
    x, w = jnp.ones((2, 8, 8, 64)), jnp.ones((3, 3, 64 // groups, 16))
    conv = functools.partial(onednn_conv.conv, strides=(1, 1), padding=((1, 1), (1, 1)),
                             groups=groups)
    jaxpr = jax.make_jaxpr(lambda x, w: jax.vjp(conv, x, w)[1](jnp.ones((2, 8, 8, 16))))(x, w)
    targets = sorted(eqn.params["target_name"] for eqn in equations(jaxpr.jaxpr)
                     if eqn.primitive.name == "ffi_call")
    narrow = groups in (16, 8, 4)
    assert onednn_conv.runs_narrow(16, groups) == narrow
    prefix = "narrow_" if narrow else ""
    input_prefix = "narrow_" if groups == 16 else ""
    assert onednn_conv.runs_narrow_input_grad(64, 16, groups) == (groups == 16)
    assert targets == sorted(onednn_conv.TARGETS[kind] for kind in
                             (prefix + "forward", input_prefix + "input_grad",
                              prefix + "weight_grad"))
    # The fused inference conv asks for the narrow kernels on the same levels.
    fused = jax.make_jaxpr(functools.partial(
        onednn_conv.conv_bias_act, relu=True, strides=(1, 1), padding=((1, 1), (1, 1)),
        groups=groups))(x, w, jnp.ones(16))
    (call,) = [eqn for eqn in equations(fused.jaxpr) if eqn.primitive.name == "ffi_call"]
    assert call.params["target_name"] == onednn_conv.TARGETS["fused_forward"]
    assert int(dict(call.params["attributes"])["narrow"]) == int(narrow)


def test_levels_with_eight_outputs_per_group_run_in_the_paired_kernels():
    """PyConvResNet-50 stage 2's 7x7/8 128 -> 64 (and any level with eight outputs per group and
    an even group count) calls the native targets for its forward pass (training and inference)
    and kernel gradient, oneDNN for its input gradient; on AVX-512 the library runs them in the
    paired kernels."""
    x, w = jnp.ones((2, 8, 8, 128)), jnp.ones((7, 7, 16, 64))
    args = dict(strides=(1, 1), padding=((3, 3), (3, 3)), groups=8)
    assert onednn_conv.runs_paired(64, 8) and not onednn_conv.runs_narrow(64, 8)
    assert not onednn_conv.runs_paired(24, 3) and not onednn_conv.runs_paired(32, 2)
    conv = functools.partial(onednn_conv.conv, **args)
    calls = ffi_calls(lambda x, w: jax.vjp(conv, x, w)[1](jnp.ones((2, 8, 8, 64))), x, w)
    assert sorted(calls) == sorted(onednn_conv.TARGETS[kind] for kind in
                                   ("narrow_forward", "input_grad", "narrow_weight_grad"))
    fused = jax.make_jaxpr(functools.partial(onednn_conv.conv_bias_act, relu=True, **args))(
        x, w, jnp.ones(64))
    (call,) = [eqn for eqn in equations(fused.jaxpr) if eqn.primitive.name == "ffi_call"]
    assert int(dict(call.params["attributes"])["narrow"]) == 1
    if not onednn_conv.available():
        pytest.skip(f"the library is unavailable: {onednn_conv.unavailable_reason()}")
    with open("/proc/cpuinfo") as cpuinfo:
        avx512 = " avx512f " in f" {cpuinfo.read().replace(chr(10), ' ')} "
    assert onednn_conv.narrow_kernels_run((16, 28, 28, 128), w.shape, paired=True, **args) == avx512
    assert onednn_conv.narrow_kernels_run((16, 56, 56, 128), (5, 5, 32, 32), groups=4,
                                          strides=(2, 2), padding=((2, 2), (2, 2)),
                                          paired=True) == avx512
    # Four outputs per group (stage 1's 5x5/4): the forward pass too, four groups to a vector.
    assert onednn_conv.narrow_kernels_run((16, 56, 56, 64), (5, 5, 16, 16), groups=4,
                                          strides=(1, 1), padding=((2, 2), (2, 2)),
                                          paired=True) == avx512
    # Dilated along width, or two outputs per group: the narrow kernels' own forward pass.
    assert not onednn_conv.narrow_kernels_run((16, 56, 56, 64), (7, 7, 8, 16), groups=8,
                                              strides=(1, 1), padding=((3, 3), (3, 3)),
                                              paired=True)
    assert not onednn_conv.narrow_kernels_run((2, 13, 11, 32), (3, 3, 16, 16), groups=2,
                                              strides=(1, 1), padding=((2, 2), (2, 2)),
                                              dilation=(2, 2), paired=True)


def test_the_narrow_kernels_themselves_run_on_avx512_cpus():
    """On a CPU with AVX-512 (this project's machines and CI) the narrow cases of the grid above
    run in the narrow kernels, not in the oneDNN fallback, so the grid tests the kernels."""
    if not onednn_conv.available():
        pytest.skip(f"the library is unavailable: {onednn_conv.unavailable_reason()}")
    with open("/proc/cpuinfo") as cpuinfo:
        avx512 = " avx512f " in f" {cpuinfo.read().replace(chr(10), ' ')} "
    same = dict(strides=(1, 1), padding=((4, 4), (4, 4)))
    assert onednn_conv.narrow_kernels_run((16, 56, 56, 64), (9, 9, 4, 16), groups=16,
                                          **same) == avx512
    assert onednn_conv.narrow_kernels_run((3, 13, 11, 32), (7, 7, 4, 16), groups=8,
                                          strides=(2, 2), padding=((3, 3), (3, 3))) == avx512
    # Three channels per group do not tile a 16-lane vector; a 13-wide kernel is beyond them.
    assert not onednn_conv.narrow_kernels_run((3, 13, 11, 48), (3, 3, 3, 16), groups=16, **same)
    assert not onednn_conv.narrow_kernels_run((3, 13, 11, 64), (13, 13, 4, 16), groups=16,
                                              strides=(1, 1), padding=((6, 6), (6, 6)))


def test_pyconv_levels_match_the_grouped_lowering_under_vmap_and_jit():
    """A whole pyramid through :func:`lowering.grouped_conv`, mapped over an extra axis."""
    x = jax.random.normal(jax.random.key(3), (2, 2, 10, 10, 64))
    kernels = [jax.random.normal(jax.random.key(k), (k, k, 64 // g, 16))
               for k, g in ((3, 1), (5, 4), (7, 8), (9, 16))]

    def pyramid(x, name):
        return jnp.concatenate([
            lowering.grouped_conv(x, w, groups=64 // w.shape[2], lowering=name) for w in kernels],
            axis=-1)

    got = jax.jit(jax.vmap(lambda x: pyramid(x, "onednn")))(x)
    want = jax.vmap(lambda x: pyramid(x, "grouped"))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_unsupported_input_fails_in_the_users_terms(monkeypatch):
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    args = dict(strides=(1, 1), padding=((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="float32 only, got bfloat16.*lowering='split'"):
        onednn_conv.conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), **args)
    with pytest.raises(ValueError, match="padding >= 0"):
        onednn_conv.conv(x, w, strides=(1, 1), padding=((-1, 1), (1, 1)))
    monkeypatch.setattr(onednn_conv, "unavailable_reason", lambda: "it is not built")
    with pytest.raises(RuntimeError, match="'onednn' conv lowering is unavailable: it is not built"):
        onednn_conv.conv(x, w, **args)
    # Without the library, `auto` falls back to the split lowering on CPU.
    monkeypatch.setattr(onednn_conv, "available", lambda: False)
    assert lowering.choose_lowering(4, "cpu") == "split"


def test_auto_keeps_sharded_cpu_programs_off_the_ffi_call(monkeypatch):
    """XLA's partitioner gathers a batch-sharded input before an FFI call (each device would
    compute the whole batch), so ``auto`` picks ``split`` when there are several devices."""
    if not onednn_conv.available():
        pytest.skip(f"the library is unavailable: {onednn_conv.unavailable_reason()}")
    assert lowering.choose_lowering(4, "cpu") == "onednn"
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    assert lowering.choose_lowering(4, "cpu") == "split"


def test_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    """The OpenMP wait policy is set only while the runtime loads, and never over the user's."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with onednn_conv._openmp_environment():
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    with onednn_conv._openmp_environment():
        assert "OMP_WAIT_POLICY" not in os.environ


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    if not build.supported_platform():
        pytest.skip("oneDNN's pip packages are for Linux x86-64 only")
    output = tmp_path / "lib.so"
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(build.BuildError, match="failed"):
        build.build(output)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(build.BuildError, match="'no-such-compiler' not found"):
        build.build(output)
    assert list(tmp_path.iterdir()) == []
