"""Conv designs of the seed articles: arithmetic, receptive fields, the small convnet, the study.

Parameter counts come from ``jax.eval_shape`` of ``init`` (nothing is allocated, so the 512-channel
layers of the articles cost nothing); MACs from the traced forward pass (``counting``).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyconv_jax.counting import _jaxpr_macs, count_macs
from pyconv_jax.layers.designs import (
    CONV_DESIGNS,
    Bottleneck1x1,
    DepthwiseSeparableConv,
    GroupedConv,
    PlainConv,
    PyConvDesign,
    SpatiallySeparableConv,
    StackedConv,
    count_conv_design,
    get_conv_design,
)
from pyconv_jax.models.small_convnet import SmallConvNet
from tests.conftest import fast_variables


def param_shapes(module, in_channels, size=8):
    x = jnp.zeros((1, size, size, in_channels))
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def n_params(module, in_channels, size=8):
    shapes = param_shapes(module, in_channels, size)
    return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes))


def traced_macs(module, in_channels, size):
    """MACs of one image from the jaxpr, grouped convs in their grouped (architectural) form."""
    module = module.clone(lowering="grouped")
    x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    return _jaxpr_macs(jax.make_jaxpr(module.apply)(variables, x).jaxpr)


# ---------------------------------------------------------------- the articles' arithmetic
@pytest.mark.parametrize("c", [64, 256])
def test_stacked_3x3_against_one_big_kernel(c):
    # Two stacked 3x3 convs see a 5x5 window: 18 c^2 weights instead of 25 c^2.
    assert n_params(PlainConv(c, 5), c) == 25 * c * c
    assert n_params(StackedConv(c, 5), c) == 18 * c * c
    assert StackedConv(c, 5).num_convs == 2
    # Three 3x3 convs see a 7x7 window: 27 c^2 instead of 49 c^2.
    assert n_params(PlainConv(c, 7), c) == 49 * c * c
    assert n_params(StackedConv(c, 7), c) == 27 * c * c
    assert round(25 / 18, 2) == 1.39 and round(49 / 27, 2) == 1.81


def test_bottleneck_256_32_256():
    bottleneck = Bottleneck1x1(256, 3, bottleneck_features=32)
    shapes = param_shapes(bottleneck, 256)
    per_layer = {k: math.prod(v["kernel"].shape) for k, v in shapes.items()}
    assert per_layer == {"reduce": 8_192, "conv": 9_216, "expand": 8_192}
    assert sum(per_layer.values()) == 25_600
    assert n_params(Bottleneck1x1(256, 3), 256) == 25_600  # default reduction 8: 256 / 8 = 32
    assert n_params(PlainConv(256, 3), 256) == 589_824  # 3^2 * 256^2 (not 65,536)


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_separable(k):
    c = 64
    shapes = param_shapes(DepthwiseSeparableConv(c, k), c)
    assert shapes["depthwise"]["kernel"].shape == (k, k, 1, c)
    assert shapes["pointwise"]["kernel"].shape == (1, 1, c, c)
    assert n_params(DepthwiseSeparableConv(c, k), c) == c * k * k + c * c
    assert n_params(PlainConv(c, k), c) == c * c * k * k


@pytest.mark.parametrize("k", [3, 5])
def test_grouped_512_in_two_groups(k):
    assert n_params(GroupedConv(512, k, groups=2), 512) == 2 * k * k * 256**2
    assert n_params(PlainConv(512, k), 512) == k * k * 512**2


def test_spatially_separable():
    c = 64
    shapes = param_shapes(SpatiallySeparableConv(c, 3), c)
    assert shapes["conv_kx1"]["kernel"].shape == (3, 1, c, c)
    assert shapes["conv_1xk"]["kernel"].shape == (1, 3, c, c)
    assert n_params(SpatiallySeparableConv(c, 3), c) == 6 * c * c  # vs 9 c^2
    assert n_params(SpatiallySeparableConv(c, 7), c) == 14 * c * c  # vs 49 c^2


def test_pyconv_64_to_128():
    assert n_params(PlainConv(128, 3), 64) == 73_728
    assert n_params(PlainConv(128, 5), 64) == 204_800
    assert n_params(GroupedConv(128, 5, groups=2), 64) == 102_400
    # The article's PyConv: 3x3 (g1, 64 out) + 5x5 (g4, 64 out), the default pyramid for K=5.
    pyconv = PyConvDesign(128, 5)
    assert pyconv.levels(64) == ((3, 1, 64), (5, 4, 64))
    shapes = param_shapes(pyconv, 64)["pyconv"]
    assert math.prod(shapes["conv2_1"]["kernel"].shape) == 36_864
    assert math.prod(shapes["conv2_2"]["kernel"].shape) == 25_600
    assert n_params(pyconv, 64) == 62_464
    assert PyConvDesign.count(64, 128, 5) == (62_464, 62_464)


# ---------------------------------------------------------------- formula == actual, every design
CASES = [
    # (in_channels, features, kernel_size, strides, size, fields)
    (16, 32, 3, 1, 9, {}),
    (16, 32, 5, 2, 10, {}),
    (8, 16, 7, 2, 9, {}),
    (16, 16, 5, 1, 8, {"use_bias": True}),
]
EXTRA = {
    "stacked": [{"hidden_features": 8}],
    "bottleneck": [{"bottleneck_features": 4}, {"reduction": 2}],
    "grouped": [{"groups": 4}],
    "depthwise_separable": [{"depth_multiplier": 2}],
    "spatially_separable": [{"hidden_features": 12}],
    "pyconv": [{"kernel_sizes": (3, 5), "groups": (2, 8), "kernel_size": 5}],
}


def _count_cases():
    for name in CONV_DESIGNS:
        for case in CASES:
            if name == "stacked" and case[2] < 3:
                continue
            yield name, case
        for fields in EXTRA.get(name, []):
            k = fields.get("kernel_size", 5)
            rest = {key: v for key, v in fields.items() if key != "kernel_size"}
            yield name, (16, 32, k, 2, 9, rest)
    # A first layer: 3 RGB channels, group counts fitted.
    yield "grouped", (3, 32, 5, 1, 8, {"fit_groups": True})
    yield "pyconv", (3, 32, 7, 1, 8, {"fit_groups": True})


@pytest.mark.parametrize("name,case", list(_count_cases()), ids=lambda v: str(v))
def test_formula_counts_equal_variables_and_traced_macs(name, case):
    cin, features, k, s, size, fields = case
    cls = get_conv_design(name)
    layer = cls(features=features, kernel_size=k, strides=s, **fields)
    params, macs = cls.count(cin, features, k, strides=s, height=size, width=size, **fields)
    assert (params, macs) == count_conv_design(
        name, cin, features, k, strides=s, height=size, width=size, **fields)
    assert params == n_params(layer, cin, size)
    assert macs == traced_macs(layer, cin, size)
    x = jnp.zeros((2, size, size, cin))
    out = jax.eval_shape(layer.init_with_output, jax.random.key(0), x)[0]
    assert out.shape == (2, -(-size // s), -(-size // s), features)


# ---------------------------------------------------------------- receptive field: impulse test
def _footprint(mask_1d_size, centre, radius, stride):
    """Output positions whose input window (centre s*o, radius r) contains the impulse."""
    return np.array([abs(stride * o - centre) <= radius for o in range(mask_1d_size)])


def _channel_kernels(layer, cin):
    """Kernel size seen by each output channel (PyConv: its level's kernel)."""
    if isinstance(layer, PyConvDesign):
        return np.concatenate([[k] * f for k, _, f in layer.levels(cin)])
    return np.full(layer.features, layer.kernel_size)


IMPULSE_CASES = [(name, k) for name in CONV_DESIGNS for k in (3, 5)] + [
    ("stacked", 7), ("pyconv", 7),  # three 3x3 convs; three pyramid levels
]


@pytest.mark.parametrize("name,k", IMPULSE_CASES)
def test_impulse_footprint_is_the_kxk_window(name, k):
    size, cin, features = 11, 8, 16
    c = size // 2
    x = np.zeros((1, size, size, cin), np.float32)
    x[0, c, c, :] = 1.0  # a single 1 in the centre (every channel, so every group sees it)
    for stride in (1, 2):
        layer = get_conv_design(name)(features=features, kernel_size=k, strides=stride)
        shapes = jax.eval_shape(layer.init, jax.random.key(0), jnp.asarray(x))
        ones = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, p.dtype), shapes)
        y = np.asarray(layer.apply(ones, jnp.asarray(x)))
        out = -(-size // stride)
        assert y.shape == (1, out, out, features)
        assert np.all(y >= 0)
        for kc in np.unique(_channel_kernels(layer, cin)):
            channels = _channel_kernels(layer, cin) == kc
            r = (kc - 1) // 2
            line = _footprint(out, c, r, stride)
            expected = line[:, None] & line[None, :]
            nonzero = y[0][..., channels] > 0
            # Every channel of this kernel size is non-zero exactly on the window, nowhere else.
            assert np.array_equal(nonzero, np.repeat(expected[..., None], channels.sum(), -1)), (
                name, k, stride, kc)
            if stride == 1:
                rows, cols = np.nonzero(expected)
                assert np.ptp(rows) + 1 == kc and np.ptp(cols) + 1 == kc
                assert expected.sum() == kc * kc
        # The whole layer sees exactly KxK.
        assert _channel_kernels(layer, cin).max() == k


@pytest.mark.parametrize("name", list(CONV_DESIGNS))
def test_strided_equals_subsampled_stride_1(name):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 10, 8)), jnp.float32)
    one = get_conv_design(name)(features=16, kernel_size=5, strides=1)
    two = one.clone(strides=2)
    variables = fast_variables(one, x)
    y1, y2 = one.apply(variables, x), two.apply(variables, x)
    np.testing.assert_allclose(y2, y1[:, ::2, ::2], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- registry, signature, errors
def test_registry_and_common_signature():
    assert list(CONV_DESIGNS) == [
        "plain", "stacked", "bottleneck", "grouped", "depthwise_separable",
        "spatially_separable", "pyconv",
    ]
    for name, cls in CONV_DESIGNS.items():
        assert cls.design == name
        layer = cls(features=16, kernel_size=3, strides=1)
        leaves = jax.tree_util.tree_leaves_with_path(param_shapes(layer, 8))
        assert leaves and all(path[-1].key == "kernel" for path, _ in leaves)  # no bias by default
        with_bias = cls(features=16, kernel_size=3, use_bias=True)
        assert any(path[-1].key == "bias"
                   for path, _ in jax.tree_util.tree_leaves_with_path(param_shapes(with_bias, 8)))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown conv design 'octave'"):
        get_conv_design("octave")
    for cls in CONV_DESIGNS.values():
        with pytest.raises(ValueError, match="odd"):
            cls(features=8, kernel_size=4)
    with pytest.raises(ValueError, match=r"odd int >= 3"):
        StackedConv(8, 1)
    with pytest.raises(ValueError, match="divisible by 3 groups"):
        param_shapes(GroupedConv(12, 3, groups=3), 8)
    assert n_params(GroupedConv(12, 3, groups=3, fit_groups=True), 8) == 9 * 8 * 12  # gcd -> 1
    with pytest.raises(ValueError, match="up to 9x9"):
        PyConvDesign(16, 11)
    with pytest.raises(ValueError, match="largest level"):
        PyConvDesign(16, 7, kernel_sizes=(3, 5))
    with pytest.raises(ValueError, match="strides"):
        PlainConv(8, 3, strides=0)
    with pytest.raises(ValueError, match="bad conv_kwargs for design 'plain'"):
        SmallConvNet(conv="plain", conv_kwargs={"groups": 2})


# ---------------------------------------------------------------- the small convnet
@pytest.mark.parametrize("name", list(CONV_DESIGNS))
def test_small_convnet_forward(name):
    model = SmallConvNet(num_classes=10, conv=name, kernel_size=5, widths=(8, 16), hidden=16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    variables = fast_variables(model, x)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    counts = model.counts(8)
    leaves = jax.tree_util.tree_leaves(variables["params"])
    assert counts["params"] == sum(math.prod(p.shape) for p in leaves)
    assert counts["macs"] == count_macs(model, image_size=8)
    conv_params = sum(math.prod(p.shape) for k in ("conv1", "conv2")
                      for p in jax.tree_util.tree_leaves(variables["params"][k]))
    assert counts["conv_params"] == conv_params


# ---------------------------------------------------------------- the study, end to end (tiny)
@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from pyconv_jax import data

    root = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_digits(root)
    return root


def test_study_smoke(digits_dir, tmp_path):
    from pyconv_jax import study

    variants = [study.Variant.parse("plain"), study.Variant.parse("grouped:groups=4")]
    assert variants[1].conv_kwargs == {"groups": 4}
    config = study.StudyConfig(
        data_dir=digits_dir, image_size=8, batch_size=16, eval_batch_size=120, steps=3,
        eval_every=2, seeds=(0,), kernel_size=3, widths=(4, 8), hidden=16,
    )
    lines = []
    result = study.run_study(variants, config, log=lines.append)
    assert result["eval_steps"] == [0, 2, 3]
    assert [r["label"] for r in result["variants"]] == ["plain", "grouped:groups=4"]
    for row in result["variants"]:
        assert np.asarray(row["accuracy"]).shape == (1, 3)
        assert 0.0 <= row["final_accuracy_mean"] <= 1.0 and row["ms_per_step"] > 0
    assert any("grouped:groups=4" in line for line in lines)

    paths = study.write_outputs(
        result, str(tmp_path / "out"), command="python scripts/kernel_study.py"
    )
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths["png"]) > 10_000
    md = open(paths["md"]).read()
    assert "| plain | " in md and "| grouped:groups=4 | " in md and "kernel_study.png" in md
    saved = json.load(open(paths["json"]))
    assert saved["variants"][0]["conv_params"] == result["variants"][0]["conv_params"]
    assert saved["command"] == "python scripts/kernel_study.py"
