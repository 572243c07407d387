"""Model zoo: published parameter counts and MACs, forward passes, options, registry errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pyconv_jax
from pyconv_jax.counting import count_macs, count_params
from pyconv_jax.models import MODEL_SPECS
from tests.conftest import fast_variables

ALL_MODELS = pyconv_jax.list_models()
# One model per (family, block) shape of code; the deeper ones differ only in block counts and
# run for real in tests/test_convert.py against PyTorch.
REPRESENTATIVE = ["resnet18", "resnet50", "pyconvresnet18", "pyconvresnet50", "pyconvhgresnet50"]


def test_registry_lists_all_thirteen_models():
    assert len(ALL_MODELS) == 13
    assert pyconv_jax.list_models("pyconvhg*") == [
        "pyconvhgresnet101", "pyconvhgresnet152", "pyconvhgresnet50"]
    assert "resnet50" in ALL_MODELS


@pytest.mark.parametrize("name", ALL_MODELS)
def test_published_counts_and_full_size_shapes(name):
    """Parameters equal the published count exactly, MACs within 1%, 224x224 shapes in both modes."""
    model = pyconv_jax.create_model(name)
    published = MODEL_SPECS[name].published
    assert count_params(model) == published.params
    assert abs(count_macs(model, image_size=224) / 1e9 / published.gmacs - 1) < 0.01
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))
    logits, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
        variables["batch_stats"])


@pytest.fixture(scope="module", params=REPRESENTATIVE)
def small_model(request):
    model = pyconv_jax.create_model(request.param, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    return request.param, model, fast_variables(model, x), x


def test_forward_eval_and_train(small_model):
    name, model, variables, x = small_model
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
    logits_t, updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert logits_t.shape == (2, 10) and np.isfinite(np.asarray(logits_t)).all()
    # Training mode normalises with batch statistics and updates the running ones.
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(old, new))


def test_bfloat16_compute_close_to_float32(small_model):
    name, model, variables, x = small_model
    bf16 = model.clone(dtype=jnp.bfloat16)
    y32 = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    y16 = jax.jit(lambda v, x: bf16.apply(v, x))(variables, x)
    assert y16.dtype == jnp.float32  # logits come back in float32
    scale = float(jnp.max(jnp.abs(y32)))
    assert float(jnp.max(jnp.abs(y16 - y32))) < 0.1 * scale + 1e-3


def test_pyconv_parameter_layout_follows_published_keys():
    model = pyconv_jax.create_model("pyconvresnet50")
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    block = params["layer1_0"]
    assert block["conv2"]["conv2_4"]["kernel"].shape == (9, 9, 64 // 16, 16)
    assert block["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
    assert params["layer4_0"]["conv2"]["kernel"].shape == (3, 3, 512, 512)  # one-level stage
    assert params["fc"]["kernel"].shape == (2048, 1000)
    # Stage 1 of the 18/34 models widens nothing, so its shortcut is the max-pool alone.
    p18 = jax.eval_shape(pyconv_jax.create_model("pyconvresnet18").init, jax.random.key(0),
                         jnp.zeros((1, 32, 32, 3)))["params"]
    assert "downsample_conv" not in p18["layer1_0"] and "downsample_conv" in p18["layer2_0"]


def test_features_only_and_pooled_outputs():
    model = pyconv_jax.create_model("pyconvresnet50", features_only=True)
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert "fc" not in variables["params"]
    feats = jax.eval_shape(model.apply, variables, x)
    assert {k: v.shape for k, v in feats.items()} == {
        "C2": (1, 16, 16, 256), "C3": (1, 8, 8, 512), "C4": (1, 4, 4, 1024), "C5": (1, 2, 2, 2048)}
    pooled = pyconv_jax.create_model("resnet18", num_classes=0)
    v = jax.eval_shape(pooled.init, jax.random.key(0), x)
    assert jax.eval_shape(pooled.apply, v, x).shape == (1, 512)


def test_pyramid_override_and_zero_init_residual():
    model = pyconv_jax.create_model(
        "pyconvresnet18", num_classes=10, zero_init_residual=True,
        pyconv_kernels=[[3, 5], [3, 5], [3], [3]], pyconv_groups=[[1, 4], [1, 4], [1], [1]])
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert set(params["layer1_0"]["conv1"]) == {"conv2_1", "conv2_2"}
    assert params["layer2_0"]["conv1"]["conv2_2"]["kernel"].shape == (5, 5, 16, 64)
    assert params["layer3_0"]["conv1"]["kernel"].shape == (3, 3, 128, 256)
    assert not np.asarray(params["layer1_0"]["bn2"]["scale"]).any()  # last BN of the block
    assert np.asarray(params["layer1_0"]["bn1"]["scale"]).all()


def test_remat_gives_identical_gradients():
    model = pyconv_jax.create_model("pyconvresnet18", num_classes=4)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = fast_variables(model, x)

    def grads(m):
        def loss(params):
            out, _ = m.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(out ** 2)
        return jax.jit(jax.grad(loss))(variables["params"])

    g0, g1 = grads(model), grads(model.clone(remat=True))
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, pyramids", [("pyconvresnet50", 3 + 4 + 6), ("resnet50", 0)])
def test_each_pyramid_hands_its_levels_to_the_batch_norm(name, pyramids, monkeypatch):
    """Every multi-level PyConv's BatchNorm takes the levels' outputs as pieces, so that its
    backward pass writes their gradients without slicing (one native call each where the library
    is built; docs/benchmarks.md). Traced, not compiled: the full-size train step's gradient."""
    from pyconv_jax.layers import norm
    calls = []

    def record(g, *rest):
        widths = rest[-1]
        calls.append(widths)
        return tuple(jnp.zeros((*g.shape[:-1], width), g.dtype) for width in widths)

    monkeypatch.setattr(norm, "_native_pieces", lambda dtype: True)
    monkeypatch.setattr(norm, "_input_grad_pieces", record)
    model = pyconv_jax.create_model(name)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def loss(params, batch_stats, x):
        out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(out)

    jax.eval_shape(jax.grad(loss), variables["params"], variables["batch_stats"], x)
    assert len(calls) == pyramids
    assert all(len(widths) > 1 for widths in calls)


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("pyconvresnet51", {}, "unknown model 'pyconvresnet51'; choose one of:"),
        ("resnet50", {"num_clases": 10}, "unknown argument(s) ['num_clases']"),
        ("pyconvresnet50", {"pyconv_groups": [[1, 4, 8, 48], [1, 4, 8], [1, 4], [1]]},
         "stage 1 pyramid (kernels [3, 5, 7, 9], groups [1, 4, 8, 48], width 64) does not fit: "
         "level 4 (kernel 9x9): 16 output channels are not divisible by 48 groups"),
        ("pyconvresnet50", {"pyconv_kernels": [[3, 5], [3], [3]]},
         "pyconv_kernels has 3 entries but the model has 4 stages"),
        ("pyconvhgresnet50", {"stage_widths": [96, 256, 512, 1024]},
         "stage 1 pyramid (kernels [3, 5, 7, 9], groups [32, 32, 32, 32], width 96) does not fit"),
        ("resnet50", {"dropout_rate": 1.5}, "dropout_rate must be in [0, 1)"),
    ],
)
def test_bad_model_arguments_give_clear_errors(name, kwargs, message):
    with pytest.raises(ValueError) as err:
        pyconv_jax.create_model(name, **kwargs)
    assert message in str(err.value)
