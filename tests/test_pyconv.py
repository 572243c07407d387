"""PyConv layer: counts from the seed articles, equality with a naive reference, gradients, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyconv_jax.layers import LOWERINGS, PyConv, block_diagonal_kernel, split_features


def n_params(module, in_channels=64, size=8):
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, in_channels)))
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))


# ---------------------------------------------------------------- numbers from the seed articles
def test_seed_article_parameter_counts():
    plain3 = nn.Conv(128, (3, 3), use_bias=False)
    plain5 = nn.Conv(128, (5, 5), use_bias=False)
    assert n_params(plain3) == 73_728
    assert n_params(PyConv(128, (3,))) == 73_728
    assert n_params(plain5) == 204_800
    assert n_params(PyConv(128, (5,))) == 204_800
    # Both kernels at full width (no grouping): 278,528.
    assert n_params(PyConv((128, 128), (3, 5), (1, 1))) == 278_528
    assert n_params(PyConv(128, (5,), (2,))) == 102_400
    # The PyConv of the article: 3x3 (g1, 64 out) + 5x5 (g4, 64 out).
    assert n_params(PyConv(128, (3, 5), (1, 4))) == 36_864 + 25_600 == 62_464


def test_paper_channel_split():
    assert split_features(256, 4) == (64, 64, 64, 64)
    assert split_features(256, 3) == (64, 64, 128)
    assert split_features(256, 2) == (128, 128)
    assert split_features(256, 1) == (256,)
    assert PyConv(256, (3, 5, 7), (1, 4, 8)).out_features == 256


# ---------------------------------------------------------------- naive reference
def naive_grouped_conv(x, w, groups, stride, dilation):
    """Direct loops over groups and kernel taps in float64 numpy. x: NHWC, w: HWIO (grouped)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    k = w.shape[0]
    pad = dilation * (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, wd, c = x.shape
    out_h = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    out_w = (wd + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    cin_g, cout = w.shape[2], w.shape[3]
    cout_g = cout // groups
    y = np.zeros((n, out_h, out_w, cout))
    for g in range(groups):
        xin = xp[..., g * cin_g:(g + 1) * cin_g]
        wg = w[..., g * cout_g:(g + 1) * cout_g]
        for i in range(k):
            for j in range(k):
                patch = xin[:, i * dilation: i * dilation + stride * (out_h - 1) + 1: stride,
                            j * dilation: j * dilation + stride * (out_w - 1) + 1: stride, :]
                y[..., g * cout_g:(g + 1) * cout_g] += patch @ wg[i, j]
    return y


def naive_pyconv(x, params, specs, stride, dilation):
    if len(specs) == 1:
        return naive_grouped_conv(x, params["kernel"], specs[0][1], stride, dilation)
    outs = [
        naive_grouped_conv(x, params[f"conv2_{i}"]["kernel"], g, stride, dilation)
        for i, (_, g, _) in enumerate(specs, start=1)
    ]
    return np.concatenate(outs, axis=-1)


SPECS = [
    # (in_channels, features, kernels, groups)
    (16, 64, (3, 5, 7, 9), (1, 4, 8, 16)),
    (16, 32, (3, 5, 7), (1, 4, 8)),
    (8, 16, (3, 5), (1, 4)),
    (8, 12, (3,), (1,)),
    (8, (4, 8), (3, 5), (2, 4)),
    (32, 128, (3, 5, 7, 9), (4, 8, 16, 32)),
    (128, 64, (3, 5, 7), (4, 8, 16)),  # wide enough for "split" to cut 4 chunks
]


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("in_ch,features,kernels,groups", SPECS)
def test_pyconv_matches_naive_reference(in_ch, features, kernels, groups, stride, lowering):
    x = jax.random.normal(jax.random.key(1), (2, 11, 9, in_ch))  # odd, non-square
    layer = PyConv(features, kernels, groups, strides=stride, lowering=lowering)
    variables = layer.init(jax.random.key(2), x)
    y = layer.apply(variables, x)
    expected = naive_pyconv(x, variables["params"], layer.level_specs(), stride, 1)
    assert y.shape == expected.shape == (2, -(-11 // stride), -(-9 // stride), layer.out_features)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lowering", ["grouped", "dense", "split", "onednn"])
def test_dilation_and_bias(lowering):
    x = jax.random.normal(jax.random.key(3), (1, 13, 13, 8))
    layer = PyConv(16, (3, 5), (1, 4), dilation=2, use_bias=True, lowering=lowering,
                   bias_init=nn.initializers.normal(1.0))
    variables = layer.init(jax.random.key(4), x)
    y = layer.apply(variables, x)
    p = variables["params"]
    expected = naive_pyconv(x, p, layer.level_specs(), 1, 2) + np.concatenate(
        [p["conv2_1"]["bias"], p["conv2_2"]["bias"]])
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)


def test_block_diagonal_kernel_structure():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 8))  # 4 groups: 8 in, 8 out
    dense = np.asarray(block_diagonal_kernel(kernel, 4))
    assert dense.shape == (3, 3, 8, 8)
    for gi in range(4):
        for go in range(4):
            block = dense[:, :, gi * 2:(gi + 1) * 2, go * 2:(go + 1) * 2]
            if gi == go:
                np.testing.assert_array_equal(block, np.asarray(kernel)[..., go * 2:(go + 1) * 2])
            else:
                assert not block.any()


def test_gradients_reach_every_level_and_agree_across_lowerings():
    x = jax.random.normal(jax.random.key(5), (2, 9, 9, 64))  # "split": 2 chunks of 32 channels
    grads = {}
    for lowering in ("grouped", "dense", "split", "onednn"):
        layer = PyConv(64, (3, 5, 7, 9), (1, 4, 8, 16), strides=2, lowering=lowering)
        variables = layer.init(jax.random.key(6), x)
        target = jax.random.normal(jax.random.key(7), layer.apply(variables, x).shape)

        def loss(params, x):
            return jnp.sum(layer.apply({"params": params}, x) * target)

        grads[lowering] = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    for level in ("conv2_1", "conv2_2", "conv2_3", "conv2_4"):
        g = np.asarray(grads["grouped"][0][level]["kernel"])
        assert np.abs(g).min() > 0 or np.count_nonzero(g) > 0.9 * g.size, level
        for lowering in ("dense", "split", "onednn"):
            np.testing.assert_allclose(np.asarray(grads[lowering][0][level]["kernel"]), g,
                                       rtol=1e-4, atol=1e-4, err_msg=lowering)
    for lowering in ("dense", "split", "onednn"):
        np.testing.assert_allclose(np.asarray(grads[lowering][1]), np.asarray(grads["grouped"][1]),
                                   rtol=1e-4, atol=1e-4, err_msg=lowering)


def test_bfloat16_compute_keeps_float32_params():
    x = jax.random.normal(jax.random.key(8), (1, 8, 8, 16))
    layer = PyConv(32, (3, 5), (1, 4), dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(9), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    y = layer.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    y32 = PyConv(32, (3, 5), (1, 4)).apply(variables, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- errors in the user's terms
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(features=64, kernel_sizes=(3, 5), groups=(1,)), "2 kernel sizes [3, 5] but 1 group counts [1]"),
        (dict(features=64, kernel_sizes=()), "kernel_sizes is empty"),
        (dict(features=64, kernel_sizes=(3, 4), groups=(1, 4)), "level 2: kernel size 4 must be a positive odd"),
        (dict(features=(16, 10), kernel_sizes=(3, 5), groups=(1, 4)),
         "level 2 (kernel 5x5): 10 output channels are not divisible by 4 groups"),
        (dict(features=(16,), kernel_sizes=(3, 5), groups=(1, 4)), "but 1 per-level features [16]"),
        (dict(features=66, kernel_sizes=(3, 5, 7), groups=(1, 1, 1)), "cannot be split evenly over 3 levels"),
        (dict(features=64, kernel_sizes=(3,) * 5), "defined for 1 to 4 levels"),
        (dict(features=64, kernel_sizes=(3,), lowering="fast"), "unknown conv lowering 'fast'"),
        (dict(features=64, kernel_sizes=(3,), strides=0), "strides must be a positive int or pair"),
        (dict(features=64, kernel_sizes=(3,), strides=(1, 2, 1)), "strides must be a positive int"),
    ],
)
def test_invalid_specs_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError) as err:
        PyConv(**kwargs)
    assert message in str(err.value)


def test_input_channels_not_divisible_by_groups_fails_at_init():
    layer = PyConv(32, (3, 5), (1, 4))
    with pytest.raises(ValueError, match=r"level 2 \(kernel 5x5\): 6 input channels are not divisible by 4 groups"):
        layer.init(jax.random.key(0), jnp.zeros((1, 8, 8, 6)))


def test_lowering_policy():
    from pyconv_jax.layers import onednn_conv
    from pyconv_jax.layers.lowering import choose_lowering, split_chunks

    # On CPU: oneDNN where it is built (tests/test_onednn_conv.py checks that it is on Linux
    # x86-64), for float32; the split lowering otherwise and for other dtypes.
    cpu = "onednn" if onednn_conv.available() else "split"
    assert choose_lowering(1, "cpu") == choose_lowering(16, "cpu") == cpu
    assert choose_lowering(16, "cpu", jnp.bfloat16) == "split"
    assert choose_lowering(1, "gpu") == choose_lowering(16, "gpu") == "grouped"
    # Chunks of >= 32 input channels that divide the groups, as measured best on XLA:CPU.
    assert [split_chunks(c, g) for c, g in [(64, 16), (128, 4), (128, 8), (32, 32), (96, 16),
                                            (512, 64), (16, 4), (64, 1)]] == [2, 4, 4, 1, 2, 16, 1, 1]


@pytest.mark.parametrize("kernel", [3, 5, 7, 9, 11])
@pytest.mark.parametrize("size", [(12, 10), (11, 9), (1, 2)])
def test_space_to_depth_conv_equals_the_strided_conv(kernel, size):
    """Even, odd and tiny inputs, both parities of k // 2; values and gradients."""
    from pyconv_jax.layers.cpu_conv import space_to_depth_conv

    rng = np.random.default_rng(kernel)
    x = jnp.asarray(rng.normal(size=(2, *size, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)

    def strided(x, w):
        p = kernel // 2
        return jax.lax.conv_general_dilated(x, w, (2, 2), [(p, p), (p, p)],
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    np.testing.assert_allclose(space_to_depth_conv(x, w), strided(x, w), rtol=1e-5, atol=1e-4)
    target = jnp.asarray(rng.normal(size=strided(x, w).shape), jnp.float32)
    for a, b in zip(jax.grad(lambda x, w: jnp.sum(space_to_depth_conv(x, w) * target), (0, 1))(x, w),
                    jax.grad(lambda x, w: jnp.sum(strided(x, w) * target), (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernels, groups", [((3, 5, 7), (1, 4, 8)), ((3,), (1,))])
def test_pieces_are_the_levels_outputs(kernels, groups):
    """``pieces=True`` returns the levels' outputs unconcatenated (one level: a tuple of one),
    with the same parameters."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 16))
    layer = PyConv(16, kernels, groups)
    variables = layer.init(jax.random.key(1), x)
    pieces = layer.apply(variables, x, pieces=True)
    widths = [f for _, _, f in layer.level_specs()]
    assert isinstance(pieces, tuple) and [p.shape[-1] for p in pieces] == widths
    np.testing.assert_array_equal(jnp.concatenate(pieces, -1), layer.apply(variables, x))
