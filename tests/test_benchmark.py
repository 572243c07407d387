"""The per-block benchmark times the blocks the network really runs, in JAX and in PyTorch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pyconv_jax import benchmark
from pyconv_jax.layers import pyramid_levels
from pyconv_jax.models import ResidualBlock, create_model
from pyconv_jax.models.resnet import block_name
from tests.conftest import fast_variables


def _run_capturing_blocks(model, variables, x):
    """Each block's input and output in a whole-network forward pass, by block name."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if isinstance(context.module, ResidualBlock) and context.method_name == "__call__":
            seen[context.module.name] = (args[0], y)
        return y

    with nn.intercept_methods(record):
        model.apply(variables, x)
    return seen


@pytest.mark.parametrize("name", ["pyconvresnet18", "pyconvresnet50", "resnet50"])
def test_a_block_built_alone_computes_what_it_computes_in_the_network(name):
    model = create_model(name)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = fast_variables(model, x, train_stats=True)
    seen = _run_capturing_blocks(model, variables, x)
    assert len(seen) == sum(model.stage_sizes)
    shapes = benchmark.block_inputs(name, batch_size=2, image_size=32)
    for stage, num_blocks in enumerate(model.stage_sizes):
        for index in range(num_blocks):
            label = block_name(stage, index)
            block_x, block_y = seen[label]
            assert shapes[label] == block_x.shape
            block = ResidualBlock(**model.block_fields(stage, index))
            alone = block.apply({c: variables[c][label] for c in ("params", "batch_stats")},
                                block_x)
            np.testing.assert_allclose(alone, block_y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "pyconvresnet18", "pyconvresnet50",
                                  "pyconvhgresnet50"])
def test_the_pytorch_block_has_the_jax_blocks_shapes(name):
    """The PyTorch block timed beside a JAX block takes and returns the same shapes."""
    shapes = benchmark.block_inputs(name, batch_size=1, image_size=64)
    for stage, index, _ in benchmark.distinct_blocks(name):
        block = benchmark.jax_block(name, stage, index)
        x = jnp.zeros(shapes[block_name(stage, index)])
        y = jax.eval_shape(lambda x: block.init_with_output(jax.random.key(0), x)[0], x)
        torch_block = benchmark.torch_block(name, stage, index)
        with torch.no_grad():
            torch_y = torch_block(torch.zeros(x.shape).permute(0, 3, 1, 2))
        assert tuple(torch_y.permute(0, 2, 3, 1).shape) == y.shape, (stage, index)
        assert sum(p.numel() for p in torch_block.parameters()) == sum(
            p.size for p in jax.tree_util.tree_leaves(jax.eval_shape(
                block.init, jax.random.key(0), x)["params"])), (stage, index)


def test_benchmark_blocks_covers_every_block_once_and_tabulates_the_ratio():
    name = "pyconvresnet18"
    results = benchmark.benchmark_blocks(name, batch_size=2, image_size=32, compare_torch=True,
                                         repeats=1)
    model = create_model(name)
    counts = {r.block: r.count for r in results}
    assert sum(counts.values()) == sum(model.stage_sizes)
    assert {(r.framework, r.mode) for r in results} == {
        (f, m) for f in ("jax", "torch") for m in ("train", "inference")}
    assert all(r.seconds > 0 for r in results)
    table = benchmark.blocks_table(results).splitlines()
    assert len(table) == 2 + len(counts) + 1
    total = table[-1].split("|")
    jax_train = sum(r.seconds * r.count for r in results
                    if r.framework == "jax" and r.mode == "train")
    torch_train = sum(r.seconds * r.count for r in results
                      if r.framework == "torch" and r.mode == "train")
    assert total[3].strip() == str(sum(model.stage_sizes))
    assert float(total[-3]) == pytest.approx(jax_train / torch_train, abs=0.006)


def test_stage_levels_are_each_stages_pyramid_at_its_resolution():
    name = "pyconvresnet50"
    results = benchmark.benchmark_stage_levels(name, batch_size=2, image_size=32,
                                               compare_torch=True, repeats=1)
    model = create_model(name)
    expected = [(s + 1, k, g, (2, 8 // 2**s, 8 // 2**s, width), f)
                for s, width in enumerate(model.stage_widths)
                for k, g, f in pyramid_levels(width, model.pyconv_kernels[s],
                                              model.pyconv_groups[s])]
    for framework in ("jax", "torch"):
        assert [(r.stage, r.kernel, r.groups, r.input_shape, r.out_features)
                for r in results if r.framework == framework] == expected
    assert all(0 < r.forward and 0 < r.forward_backward for r in results)
    assert all(0 < r.input_grad and 0 < r.weight_grad for r in results if r.framework == "jax")
    table = benchmark.levels_table(results).splitlines()
    assert len(table) == 2 + len(expected)
    assert table[2].startswith("| 1 | 3x3, 1 group | 2x8x8x64 -> 16 |")


def test_step_flops_are_twice_the_published_macs_and_three_passes_for_training():
    """The MFU numerator: 2 FLOPs per multiply-add of the architecture (the paper's count,
    independent of the lowering), three forward passes' worth per train step."""
    inference = benchmark.step_flops("pyconvresnet50", batch_size=1, image_size=224,
                                     mode="inference")
    assert inference == pytest.approx(2 * 3.820e9, rel=1e-3)  # official-models.md: 3.820 G MACs
    assert benchmark.step_flops("pyconvresnet50", batch_size=4, image_size=224,
                                mode="train") == 3 * 4 * inference
    with pytest.raises(ValueError, match="mode must be"):
        benchmark.step_flops("pyconvresnet50", batch_size=1, image_size=224, mode="eval")


def test_peak_rates_match_device_names_most_specific_first():
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert benchmark.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert benchmark.peak_tflops("NVIDIA H200", "float32") is None
    assert benchmark.peak_tflops("cpu", "bfloat16") is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_benchmarks_report_throughput_model_flops_and_mfu(dtype):
    """Both frameworks' train and inference timings, in either dtype (PyTorch's bfloat16 as
    autocast), with model TFLOP/s and an MFU against the given peak."""
    rows = (benchmark.benchmark_jax("pyconvresnet18", batch_size=2, image_size=32, dtype=dtype,
                                    repeats=1, warmup=1, peak=2.0)
            + benchmark.benchmark_torch("pyconvresnet18", batch_size=2, image_size=32,
                                        dtype=dtype, repeats=1, warmup=1, peak=2.0))
    assert [(r.framework, r.mode) for r in rows] == [
        ("jax", "train"), ("jax", "inference"), ("torch", "train"), ("torch", "inference")]
    for r in rows:
        flops = benchmark.step_flops("pyconvresnet18", batch_size=2, image_size=32, mode=r.mode)
        assert r.dtype == dtype and r.device and r.seconds_per_step > 0
        assert r.images_per_second == pytest.approx(2 / r.seconds_per_step)
        assert r.model_tflops == pytest.approx(flops / r.seconds_per_step / 1e12)
        assert r.mfu == pytest.approx(r.model_tflops / 2.0)
        assert r.row().count("|") == benchmark.HEADER.splitlines()[0].count("|")
    with pytest.raises(ValueError, match="dtype must be one of"):
        benchmark.benchmark_torch("pyconvresnet18", batch_size=2, image_size=32, dtype="float16")


def test_benchmarks_and_device_checks_import_without_the_input_pipelines_libraries():
    """The GPU machines have JAX, Flax, optax and PyTorch but not TensorFlow, tensorflow-datasets
    or ml_collections, and need not have orbax: the benchmark and the device checks (which map
    PyTorch's weights to Flax's names) must not need them."""
    import subprocess
    import sys

    code = ("import sys, pyconv_jax.benchmark, pyconv_jax.device_check, pyconv_jax.train.steps; "
            "from pyconv_jax import convert; convert.name_map('resnet18'); "
            "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'ml_collections', "
            "'orbax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_alternated_train_steps_time_every_model_each_round(monkeypatch):
    calls = []
    original = benchmark.TrainStep.run

    def run(self):
        calls.append(self.model.pyconv_kernels[0])  # (3, 5, 7, 9) or (3,): which model
        return original(self)

    monkeypatch.setattr(benchmark.TrainStep, "run", run)
    seconds = benchmark.alternated_train_seconds(["pyconvresnet18", "resnet18"], batch_size=2,
                                                 image_size=32, rounds=3, warmup=1)
    assert list(seconds) == ["pyconvresnet18", "resnet18"] and all(s > 0 for s in seconds.values())
    # one warm-up step each, then the models in turn, round after round
    assert calls == [(3, 5, 7, 9), (3,)] * 4


def test_memory_figure_is_none_with_a_warning_only_where_the_backend_has_none(caplog):
    compiled = jax.jit(lambda x: x * 2).lower(jnp.ones((4, 4))).compile()
    assert benchmark._memory(compiled) >= 2 * 4 * 4 * 4  # the argument and the output

    class NoAnalysis:
        def __init__(self, result):
            self.result = result

        def memory_analysis(self):
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    for result in (NotImplementedError("not here"), None):
        caplog.clear()
        assert benchmark._memory(NoAnalysis(result)) is None
        assert "no memory figure" in caplog.text
    with pytest.raises(ValueError):  # a real failure is not hidden
        benchmark._memory(NoAnalysis(ValueError("bug")))
