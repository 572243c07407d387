"""Throughput, compile time and memory of train and inference steps, optionally beside PyTorch.

Every figure is measured in the same process, side by side, so ratios are meaningful even on a
noisy machine: each measurement is the median of ``repeats`` timed calls after ``warmup`` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pyconv_jax.counting import count_macs
from pyconv_jax.models import ResidualBlock, create_model
from pyconv_jax.models.resnet import block_name
from pyconv_jax.train import steps

#: Dense (no sparsity) peak rates in TFLOP/s by accelerator and compute dtype, from the vendors'
#: datasheets (SXM parts unless named): the denominator of model FLOP utilisation (MFU). The first
#: entry whose name occurs in the device's name applies. A device or dtype not listed gets no MFU
#: unless the benchmark is given ``peak_tflops``.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0}),
    ("H100", {"bfloat16": 989.4}),
    ("H200", {"bfloat16": 989.4}),
    ("A100", {"bfloat16": 312.0}),
)

#: The compute dtypes the JAX and PyTorch benchmarks run in (PyTorch's bfloat16 is autocast: AMP).
DTYPES = ("float32", "bfloat16")


def mebibytes(nbytes: int | None) -> str:
    """``nbytes`` in MiB for a table, or empty where there is no figure."""
    return f"{nbytes / 2**20:.0f}" if nbytes else ""


@dataclasses.dataclass
class Result:
    model: str
    framework: str
    mode: str  # "train" | "inference"
    lowering: str
    batch_size: int
    image_size: int
    dtype: str
    seconds_per_step: float
    images_per_second: float
    compile_seconds: float | None = None
    peak_bytes: int | None = None  # XLA's compiled temp + argument + output sizes
    device: str = ""  # the device's name, as its framework gives it
    model_tflops: float | None = None  # model FLOPs per step (step_flops) over the step's time
    mfu: float | None = None  # model_tflops over the device's peak (PEAK_TFLOPS)

    def row(self) -> str:
        compile_s = f"{self.compile_seconds:.1f}" if self.compile_seconds is not None else ""
        mem = mebibytes(self.peak_bytes)
        tflops = f"{self.model_tflops:.2f}" if self.model_tflops is not None else ""
        mfu = f"{self.mfu:.1%}" if self.mfu is not None else ""
        return (f"| {self.model} | {self.framework} | {self.mode} | {self.lowering} | "
                f"{self.batch_size} | {self.image_size} | {self.dtype} | "
                f"{self.seconds_per_step * 1000:.0f} | {self.images_per_second:.1f} | "
                f"{compile_s} | {mem} | {tflops} | {mfu} |")


HEADER = ("| model | framework | mode | lowering | batch | size | dtype | ms/step | img/s | "
          "compile s | memory MiB | model TFLOP/s | MFU |\n"
          "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")


def peak_tflops(device: str, dtype: str) -> float | None:
    """The dense peak TFLOP/s of ``device`` (its name) in ``dtype`` from :data:`PEAK_TFLOPS`, or
    ``None`` where it is not listed."""
    for name, rates in PEAK_TFLOPS:
        if name in device:
            return rates.get(dtype)
    return None


@functools.lru_cache(maxsize=None)
def step_flops(name: str, *, batch_size: int, image_size: int, mode: str) -> int:
    """Model FLOPs of one step of ``name``: two per multiply-add of the forward pass's convolutions
    and matrix products (:func:`pyconv_jax.counting.count_macs`, the architecture's count), three
    times that for a train step (the backward pass does two products per forward one, for the
    input and the kernel gradients). This is the usual convention for MFU: the work the model
    needs, not what a lowering or rematerialisation adds."""
    if mode not in ("train", "inference"):
        raise ValueError(f"mode must be 'train' or 'inference', got {mode!r}")
    forward = 2 * count_macs(create_model(name), image_size, batch_size)
    return 3 * forward if mode == "train" else forward


def _result(name: str, framework: str, mode: str, lowering: str, batch_size: int,
            image_size: int, dtype: str, seconds: float, device: str,
            peak: float | None = None, **extra) -> Result:
    """A :class:`Result` with its throughput, model TFLOP/s and MFU (against ``peak`` TFLOP/s,
    else the device's entry in :data:`PEAK_TFLOPS`) filled in."""
    flops = step_flops(name, batch_size=batch_size, image_size=image_size, mode=mode)
    tflops = flops / seconds / 1e12
    peak = peak or peak_tflops(device, dtype)
    return Result(name, framework, mode, lowering, batch_size, image_size, dtype, seconds,
                  batch_size / seconds, device=device, model_tflops=tflops,
                  mfu=tflops / peak if peak else None, **extra)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _time(fn: Callable[[], Any], warmup: int, repeats: int,
          sync: Callable[[], Any] | None = None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls, each waited for (JAX
    arrays it returns, and ``sync``: e.g. ``torch.cuda.synchronize``). The median, because the
    shared VM stalls a whole process now and then (+2.5 s in one train step of ten)."""

    def call():
        jax.block_until_ready(fn())
        if sync is not None:
            sync()

    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def _memory(compiled) -> int | None:
    """XLA's planned bytes for one call of ``compiled``, or None (with a warning) where the
    backend does not report them."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError) as e:  # jaxlib's XlaRuntimeError is a RuntimeError
        m, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "memory_analysis() returned None"
    if m is None:
        logging.warning("no memory figure: this backend does not report one (%s)", why)
        return None
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def _inputs(batch_size: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random NHWC images and labels (never zeros: they can run faster than real data)."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
            rng.integers(0, 1000, size=(batch_size,)))


@dataclasses.dataclass
class TrainStep:
    """A model's compiled train step on fixed random inputs; :meth:`run` takes one step (the
    state is donated and replaced) and returns its loss."""

    model: nn.Module
    compiled: Any
    state: Any
    batch: dict
    compile_seconds: float

    def run(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        return metrics["loss"]


def _initial_state(model: nn.Module, image_size: int) -> steps.TrainState:
    """``model``'s initial train state under SGD momentum (the benchmarks' optimizer)."""
    variables = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    return steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                   batch_stats=variables["batch_stats"],
                                   tx=optax.sgd(0.1, momentum=0.9))


def _lowered_train_step(state, batch) -> jax.stages.Lowered:
    """The project's train step (BatchNorm in training mode, 1000 classes), lowered for
    ``state`` and ``batch`` (arrays or their shapes), the state donated."""
    train_step = steps.make_train_step(num_classes=1000, schedule=optax.constant_schedule(0.1), seed=0)
    return jax.jit(train_step, donate_argnums=0).lower(state, batch)


def compile_train_step(name: str, *, batch_size: int, image_size: int, dtype: str = "float32",
                       lowering: str = "auto", remat: bool = False) -> TrainStep:
    """The project's train step (SGD momentum, BatchNorm in training mode) of model ``name``,
    compiled for random inputs of the given shape."""
    _check_dtype(dtype)
    model = create_model(name, dtype=dtype, pyconv_lowering=lowering, remat=remat)
    images, labels = _inputs(batch_size, image_size)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)}
    state = jax.jit(functools.partial(_initial_state, model, image_size))()
    t0 = time.perf_counter()
    compiled = _lowered_train_step(state, batch).compile()
    return TrainStep(model, compiled, state, batch, time.perf_counter() - t0)


def benchmark_jax(name: str, *, batch_size: int, image_size: int, dtype: str = "float32",
                  lowering: str = "auto", remat: bool = False, warmup: int = 2,
                  repeats: int = 5, peak: float | None = None) -> list[Result]:
    """Train-step (SGD momentum) and inference timings of a registered model in JAX, on the
    default device. ``peak`` (TFLOP/s) overrides :data:`PEAK_TFLOPS` for the MFU."""
    step = compile_train_step(name, batch_size=batch_size, image_size=image_size, dtype=dtype,
                              lowering=lowering, remat=remat)
    device = jax.devices()[0].device_kind
    row = functools.partial(_result, name, "jax", lowering=lowering + ("+remat" if remat else ""),
                            batch_size=batch_size, image_size=image_size, dtype=dtype,
                            device=device, peak=peak)
    results = [row(mode="train", seconds=_time(step.run, warmup, repeats),
                   compile_seconds=step.compile_seconds, peak_bytes=_memory(step.compiled))]

    variables = {"params": step.state.params, "batch_stats": step.state.batch_stats}
    x = step.batch["image"]
    infer = jax.jit(lambda v, x: step.model.apply(v, x, train=False))
    t0 = time.perf_counter()
    compiled_inf = infer.lower(variables, x).compile()
    compile_s = time.perf_counter() - t0
    results.append(row(mode="inference",
                       seconds=_time(lambda: compiled_inf(variables, x), warmup, repeats),
                       compile_seconds=compile_s, peak_bytes=_memory(compiled_inf)))
    return results


def alternated_train_seconds(names, *, batch_size: int, image_size: int,
                             dtype: str = "float32", lowering: str = "auto", rounds: int = 14,
                             warmup: int = 2) -> dict[str, float]:
    """Median train-step seconds of each model in ``names``, timed in alternation: every round
    takes one step of each model in turn. A shared machine's speed drifts over minutes; this way
    the drift reaches every model alike, so the ratios between them are steadier than those of
    :func:`benchmark_jax` calls made minutes apart."""
    compiled = {name: compile_train_step(name, batch_size=batch_size, image_size=image_size,
                                         dtype=dtype, lowering=lowering) for name in names}
    for step in compiled.values():
        for _ in range(warmup):
            jax.block_until_ready(step.run())
    seconds = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(step.run())
            seconds[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in seconds.items()}


def _torch_device(device: str | None = None) -> tuple[str, Callable[[], Any] | None]:
    """``device`` (by default CUDA where PyTorch sees a GPU, else the CPU) and the call that waits
    for its queued work (``None`` on the CPU, which runs eagerly). On CUDA, cuDNN picks its fastest
    algorithms (its ``benchmark`` mode) during the warm-up calls."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        return device, None
    torch.backends.cudnn.benchmark = True
    return device, torch.cuda.synchronize


def benchmark_torch(name: str, *, batch_size: int, image_size: int, dtype: str = "float32",
                    device: str | None = None, warmup: int = 2, repeats: int = 5,
                    peak: float | None = None) -> list[Result]:
    """The same architecture in PyTorch (the tests' reference model), channels_last, eager, on
    ``device`` (CUDA when there is one, else the CPU). ``bfloat16`` runs it under autocast (AMP):
    float32 weights and optimizer, bfloat16 convolutions and matrix products, which is how
    PyTorch users train in bfloat16."""
    import torch

    from tests.torch_reference import build_torch_model

    _check_dtype(dtype)
    device, sync = _torch_device(device)
    cuda = device.startswith("cuda")
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    row = functools.partial(_result, name, "torch", lowering="-", batch_size=batch_size,
                            image_size=image_size, dtype=dtype, device=device_name, peak=peak)
    timed = functools.partial(_time, warmup=warmup, repeats=repeats, sync=sync)

    def amp():
        return torch.autocast("cuda" if cuda else "cpu", torch.bfloat16, dtype == "bfloat16")

    images, labels = _inputs(batch_size, image_size)
    model = build_torch_model(name).to(device=device, memory_format=torch.channels_last)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device).contiguous(
        memory_format=torch.channels_last)
    y = torch.from_numpy(labels).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def infer():
        with torch.no_grad(), amp():
            model(x)

    model.train()
    results = [row(mode="train", seconds=timed(train))]
    model.eval()
    results.append(row(mode="inference", seconds=timed(infer)))
    return results


def level_lowerings() -> tuple[str, ...]:
    """The lowerings :func:`benchmark_level` compares: every one that can run here."""
    from pyconv_jax.layers import onednn_conv

    return ("grouped", "dense", "split") + (("onednn",) if onednn_conv.available() else ())


def benchmark_level(kernel: int, groups: int, *, batch_size: int = 8, size: int = 56,
                    in_features: int = 64, out_features: int = 16, repeats: int = 5) -> dict:
    """Forward and forward+backward time of one grouped pyramid level in each lowering."""
    from pyconv_jax.layers import grouped_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch_size, size, size, in_features)), jnp.float32)
    out_features = max(out_features, groups)  # each group needs at least one output
    w = jnp.asarray(rng.normal(size=(kernel, kernel, in_features // groups, out_features)), jnp.float32)
    out = {}
    for lowering in level_lowerings():
        fwd = jax.jit(lambda x, w: grouped_conv(x, w, groups=groups, lowering=lowering))
        bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(grouped_conv(x, w, groups=groups,
                                                                 lowering=lowering) ** 2), (0, 1)))
        out[lowering] = (_time(lambda: fwd(x, w), 1, repeats), _time(lambda: bwd(x, w), 1, repeats))
    return out


@dataclasses.dataclass
class BlockResult:
    """One residual block's time; ``count`` is how many blocks of the network it stands for."""

    model: str
    block: str
    input_shape: tuple[int, ...]  # NHWC
    count: int
    framework: str
    mode: str  # "train" (forward and backward, BatchNorm in training mode) | "inference"
    seconds: float


def block_inputs(name: str, *, batch_size: int, image_size: int) -> dict[str, tuple[int, ...]]:
    """The NHWC input shape of every residual block of model ``name``, by block name."""
    model = create_model(name)
    shapes = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, ResidualBlock) and context.method_name == "__call__":
            shapes[context.module.name] = tuple(args[0].shape)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0),
                       jnp.zeros((batch_size, image_size, image_size, 3)))
    return shapes


def distinct_blocks(name: str) -> list[tuple[int, int, int]]:
    """``(stage, index, count)`` for each stage's first block and, standing for the others
    (all alike), its second: every distinct block shape of the network, 0-based."""
    model = create_model(name)
    out = []
    for s, n in enumerate(model.stage_sizes):
        out.append((s, 0, 1))
        if n > 1:
            out.append((s, 1, n - 1))
    return out


def jax_block(name: str, stage: int, index: int, lowering: str = "auto") -> ResidualBlock:
    """Block ``index`` of ``stage`` (0-based) of model ``name``, as a module of its own."""
    model = create_model(name, pyconv_lowering=lowering)
    return ResidualBlock(**model.block_fields(stage, index))


def torch_block(name: str, stage: int, index: int):
    """The same block of the PyTorch reference model (``layer{stage + 1}[index]``)."""
    from tests.torch_reference import build_torch_model

    return getattr(build_torch_model(name), f"layer{stage + 1}")[index]


def benchmark_jax_block(name: str, stage: int, index: int, input_shape, *,
                        lowering: str = "auto", warmup: int = 2, repeats: int = 5) -> dict:
    """Seconds of one block alone in JAX: ``train`` (forward and the gradients of its parameters
    and input, BatchNorm statistics updated) and ``inference``."""
    block = jax_block(name, stage, index, lowering)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=input_shape), jnp.float32)
    variables = jax.jit(block.init)(jax.random.key(0), x)
    dy = jnp.asarray(rng.normal(size=jax.eval_shape(block.apply, variables, x).shape), jnp.float32)

    @jax.jit
    def train(variables, x, dy):
        def forward(params, x):
            return block.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"])
        _, vjp, updates = jax.vjp(forward, variables["params"], x, has_aux=True)
        return vjp(dy), updates

    infer = jax.jit(lambda variables, x: block.apply(variables, x, train=False))
    return {"train": _time(lambda: train(variables, x, dy), warmup, repeats),
            "inference": _time(lambda: infer(variables, x), warmup, repeats)}


def benchmark_torch_block(name: str, stage: int, index: int, input_shape, *, warmup: int = 2,
                          repeats: int = 5) -> dict:
    """The same block of the PyTorch reference model (channels_last, float32), timed the same way,
    on :func:`benchmark_torch`'s device."""
    import torch

    device, sync = _torch_device()
    block = torch_block(name, stage, index).to(device=device, memory_format=torch.channels_last)
    n, h, w, c = input_shape
    x = torch.randn(n, c, h, w, device=device).to(memory_format=torch.channels_last).requires_grad_()
    with torch.no_grad():
        dy = torch.randn_like(block(x))

    def train():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).backward(dy)

    block.train()
    out = {"train": _time(train, warmup, repeats, sync)}
    block.eval()
    with torch.no_grad():
        out["inference"] = _time(lambda: block(x), warmup, repeats, sync)
    return out


def benchmark_blocks(name: str, *, batch_size: int, image_size: int, lowering: str = "auto",
                     compare_torch: bool = False, repeats: int = 5) -> list[BlockResult]:
    """Every distinct residual block of model ``name`` timed alone, in JAX and optionally in
    PyTorch, to show where the time of a whole step goes."""
    shapes = block_inputs(name, batch_size=batch_size, image_size=image_size)
    results = []
    for stage, index, count in distinct_blocks(name):
        label = block_name(stage, index)
        timers = [("jax", functools.partial(benchmark_jax_block, lowering=lowering))]
        if compare_torch:
            timers.append(("torch", benchmark_torch_block))
        for framework, timer in timers:
            seconds = timer(name, stage, index, shapes[label], repeats=repeats)
            results += [BlockResult(name, label, shapes[label], count, framework, mode, s)
                        for mode, s in seconds.items()]
    return results


def blocks_table(results: list[BlockResult]) -> str:
    """A markdown table of :func:`benchmark_blocks` results: one row per block, JAX beside
    PyTorch when measured, and a last row weighting each block by its ``count``."""
    times = {(r.block, r.framework, r.mode): r.seconds for r in results}
    blocks = list(dict.fromkeys((r.block, r.input_shape, r.count) for r in results))
    columns = [(f, m) for m in ("train", "inference") for f in ("jax", "torch")
               if any(r.framework == f and r.mode == m for r in results)]
    ratios = [m for m in ("train", "inference") if ("torch", m) in columns]
    header = (["block", "input (NHWC)", "count"] + [f"{f} {m} ms" for f, m in columns]
              + [f"{m} JAX / PyTorch" for m in ratios])
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]

    def cells(get):
        values = [get(f, m) for f, m in columns]
        ratio = [get("jax", m) / get("torch", m) for m in ratios]
        return [f"{v * 1e3:.0f}" for v in values] + [f"{r:.2f}" for r in ratio]

    for block, shape, count in blocks:
        row = cells(lambda f, m: times[block, f, m])
        lines.append("| " + " | ".join([block, "x".join(map(str, shape)), str(count)] + row) + " |")
    total = cells(lambda f, m: sum(times[b, f, m] * c for b, _, c in blocks))
    lines.append("| " + " | ".join(["all blocks, weighted by count", "",
                                    str(sum(c for *_, c in blocks))] + total) + " |")
    return "\n".join(lines)


@dataclasses.dataclass
class LevelResult:
    """One pyramid level of a network's stage, timed alone (milliseconds are in :func:`levels_table`)."""

    model: str
    stage: int  # 1-based, as in the block names
    kernel: int
    groups: int
    input_shape: tuple[int, ...]  # NHWC
    out_features: int
    framework: str
    forward: float  # seconds
    forward_backward: float  # seconds: the forward and both gradients (input and kernel)
    input_grad: float | None = None  # seconds, the input gradient alone (JAX only)
    weight_grad: float | None = None  # seconds, the kernel gradient alone (JAX only)


def benchmark_stage_levels(name: str, *, batch_size: int, image_size: int,
                           lowering: str = "auto", compare_torch: bool = False,
                           repeats: int = 5) -> list[LevelResult]:
    """Each pyramid level of each stage's stride-1 spatial conv, alone: JAX's lowering and,
    optionally, PyTorch's grouped ``Conv2d`` (channels_last) on the same shapes."""
    from pyconv_jax.layers import grouped_conv, pyramid_levels

    model = create_model(name)
    shapes = block_inputs(name, batch_size=batch_size, image_size=image_size)
    rng = np.random.default_rng(0)
    results = []
    for s, num_blocks in enumerate(model.stage_sizes):
        index = min(1, num_blocks - 1)  # the second block, whose spatial conv has stride 1
        fields = model.block_fields(s, index)
        n, h, w, _ = shapes[block_name(s, index)]
        c = fields["width"]
        x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
        for k, g, f in pyramid_levels(c, fields["kernels"], fields["groups"]):
            kernel = jnp.asarray(rng.normal(size=(k, k, c // g, f)), jnp.float32)

            def conv(x, kernel, g=g):
                return grouped_conv(x, kernel, groups=g, lowering=lowering)

            dy = jnp.ones(jax.eval_shape(conv, x, kernel).shape, jnp.float32)
            fwd = jax.jit(conv)
            fwd_bwd = jax.jit(lambda x, kernel, dy: jax.vjp(conv, x, kernel)[1](dy))
            # Each gradient alone: a conv is linear, so XLA drops the unused forward pass.
            dx = jax.jit(lambda x, kernel, dy: jax.vjp(lambda x: conv(x, kernel), x)[1](dy))
            dw = jax.jit(lambda x, kernel, dy: jax.vjp(lambda k: conv(x, k), kernel)[1](dy))
            results.append(LevelResult(
                name, s + 1, k, g, (n, h, w, c), f, "jax",
                forward=_time(lambda: fwd(x, kernel), 2, repeats),
                forward_backward=_time(lambda: fwd_bwd(x, kernel, dy), 2, repeats),
                input_grad=_time(lambda: dx(x, kernel, dy), 2, repeats),
                weight_grad=_time(lambda: dw(x, kernel, dy), 2, repeats)))
            if compare_torch:
                results.append(_torch_level(name, s + 1, k, g, (n, h, w, c), f, repeats))
    return results


def _torch_level(name, stage, k, g, input_shape, f, repeats) -> LevelResult:
    import torch

    device, sync = _torch_device()
    n, h, w, c = input_shape
    conv = torch.nn.Conv2d(c, f, k, padding=k // 2, groups=g, bias=False)
    conv = conv.to(device=device, memory_format=torch.channels_last)
    x = torch.randn(n, c, h, w, device=device).to(memory_format=torch.channels_last).requires_grad_()
    with torch.no_grad():
        dy = torch.randn_like(conv(x))
        forward = _time(lambda: conv(x), 2, repeats, sync)

    def forward_backward():
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).backward(dy)

    return LevelResult(name, stage, k, g, input_shape, f, "torch", forward,
                       _time(forward_backward, 2, repeats, sync))


def levels_table(results: list[LevelResult]) -> str:
    """A markdown table of :func:`benchmark_stage_levels`: JAX beside PyTorch when measured."""
    rows = {}
    for r in results:
        key = (r.stage, r.kernel, r.groups, r.input_shape, r.out_features)
        rows.setdefault(key, {})[r.framework] = r
    torch_too = any("torch" in v for v in rows.values())
    header = ("| stage | level | input (NHWC) -> out | JAX fwd ms | JAX input grad ms | "
              "JAX weight grad ms | JAX fwd+bwd ms |")
    header += " PyTorch fwd ms | PyTorch fwd+bwd ms | fwd+bwd JAX / PyTorch |" if torch_too else ""
    lines = [header, "|---|---|---|" + "---:|" * (header.count("|") - 4)]
    for (stage, k, g, shape, f), by in rows.items():
        cells = [str(stage), f"{k}x{k}, {g} group{'s' * (g > 1)}", f"{'x'.join(map(str, shape))} -> {f}"]
        ours = by["jax"]
        cells += [f"{t * 1e3:.1f}" for t in (ours.forward, ours.input_grad, ours.weight_grad,
                                             ours.forward_backward)]
        if torch_too:
            theirs = by["torch"]
            cells += [f"{theirs.forward * 1e3:.1f}", f"{theirs.forward_backward * 1e3:.1f}",
                      f"{ours.forward_backward / theirs.forward_backward:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_step_memory(name: str, *, batch_size: int, image_size: int, dtype: str = "float32",
                      remat: bool = False) -> int | None:
    """XLA's planned memory (temp + arguments + outputs) of the train step, compiled, not run.

    Compile-only, so it measures batch sizes this machine could not run in reasonable time.
    """
    _check_dtype(dtype)
    model = create_model(name, dtype=dtype, remat=remat)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    state = jax.eval_shape(functools.partial(_initial_state, model, image_size))
    return _memory(_lowered_train_step(state, batch).compile())


def write_jpeg_folder(root: str, num_images: int, *, size: tuple[int, int] = (500, 375),
                      num_classes: int = 10, seed: int = 0) -> str:
    """Writes ``root/train/<class>/<i>.jpg``: ImageNet-sized JPEGs (quality 90) with smooth
    random content, which compresses and decodes like photographs rather than like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = os.path.join(root, "train", f"class{i % num_classes}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.integers(0, 256, size=(size[1] // 25 + 1, size[0] // 25 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        image.save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def benchmark_input_pipeline(root: str, *, image_size: int = 224, batch_size: int = 64,
                             augment: str = "inception_crop", batches: int = 20) -> dict:
    """Images/s of the training input pipeline (read, decode, augment, batch) on ``root``.

    Uses every core tf.data may use; ``per_core`` divides by the cores this process may run on.
    """
    from pyconv_jax import data

    iterator = data.create_train_iterator(
        f"imagefolder:{root}", image_size=image_size, local_batch_size=batch_size,
        augment=augment, shuffle_buffer=1024)
    next(iterator)  # build the pipeline and fill its buffers
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    cores = len(os.sched_getaffinity(0))
    rate = batches * batch_size / seconds
    return {"images_per_second": rate, "cores": cores, "per_core": rate / cores,
            "augment": augment, "image_size": image_size}
