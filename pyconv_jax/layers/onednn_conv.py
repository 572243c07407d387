"""Convolutions computed by oneDNN through XLA's FFI: the ``onednn`` lowering (CPU, float32).

XLA:CPU's convolution kernels run PyConvResNet's spatial convs far below the machine's speed:
narrow convs on one core, grouped ones as block-diagonal dense convs with G times the MACs, weight
gradients in Eigen at a fifth of a matrix product's speed (docs/benchmarks.md). oneDNN, which
PyTorch uses on CPU, runs each of them with its real groups on every core. :func:`conv` calls it
for the forward pass and both gradients (a ``jax.custom_vjp``: reverse mode only), on the
library that :mod:`pyconv_jax.native.build` compiles. Levels with one or two outputs per group
run forward as depthwise convs (:func:`runs_depthwise`), which oneDNN computes 1.5-4x faster.

Same conv, batch 16, float32, 2 cores, ms (forward / input gradient / weight gradient):
3x3 64->64 at 56x56, XLA 25.8 / 25.9 / 43.0, oneDNN 9.8 / 9.7 / 9.8; 9x9 64->16 with 16 groups
at 56x56, XLA (split) 18.7 / 33.3 / 69.7, oneDNN 22.8 (7.3 as depthwise convs) / 6.9 / 21.3.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from pyconv_jax.native import build

#: The FFI targets, by the conv they compute.
TARGETS = {
    "forward": "PyconvOnednnConvForward",
    "input_grad": "PyconvOnednnConvInputGrad",
    "weight_grad": "PyconvOnednnConvWeightGrad",
}

Padding = tuple[tuple[int, int], tuple[int, int]]


#: OpenMP threads that spin after each oneDNN call take a core from the XLA ops that run next:
#: ResNet-50's BatchNorm and ReLU fusions took 2x as long (2.4 s train step against 2.1 s, in
#: ``jax.profiler`` traces). Sleeping threads cost oneDNN nothing measurable here.
OPENMP_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


@contextlib.contextmanager
def _openmp_environment():
    """Sets :data:`OPENMP_ENVIRONMENT` while the OpenMP runtime loads (it reads its settings
    then), unless the user set any OpenMP wait setting, and restores the environment after, so
    that libraries loaded later (PyTorch) keep their defaults."""
    if any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        yield
        return
    saved = {name: os.environ.get(name) for name in OPENMP_ENVIRONMENT}
    os.environ.update(OPENMP_ENVIRONMENT)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@functools.cache
def _load() -> str | None:
    """Loads the library and registers its handlers with XLA; returns why not, or ``None``."""
    if not build.LIBRARY.exists():
        return (f"{build.LIBRARY.name} is not built; run `python -m pyconv_jax.native.build` "
                "(`make` does).")
    try:
        with _openmp_environment():
            library = ctypes.CDLL(str(build.LIBRARY))
    except OSError as error:
        return f"cannot load {build.LIBRARY}: {error}; rebuild it with `python -m pyconv_jax.native.build`."
    for target in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)),
                                    platform="cpu")
    return None


def unavailable_reason() -> str | None:
    """Why the ``onednn`` lowering cannot run here, or ``None`` when it can."""
    return _load()


def available() -> bool:
    """Whether the ``onednn`` lowering can run here (the library is built and loads)."""
    return _load() is None


def supports(dtype) -> bool:
    """Whether oneDNN computes convs of this dtype here (float32 only)."""
    return jnp.dtype(dtype) == jnp.float32


def _call(kind: str, result_shape, a, b, strides, padding, dilation, groups):
    (top, bottom), (left, right) = padding
    attrs = dict(stride_h=strides[0], stride_w=strides[1], pad_t=top, pad_l=left, pad_b=bottom,
                 pad_r=right, dil_h=dilation[0], dil_w=dilation[1], groups=groups)
    return jax.ffi.ffi_call(TARGETS[kind], jax.ShapeDtypeStruct(result_shape, a.dtype),
                            vmap_method="sequential")(
        a, b, **{name: np.int64(value) for name, value in attrs.items()})


def _out_shape(x_shape, kernel_shape, strides, padding, dilation):
    n, h, w, _ = x_shape
    kh, kw, _, out = kernel_shape
    size = [(length + lo + hi - d * (k - 1) - 1) // s + 1 for length, (lo, hi), d, k, s in
            zip((h, w), padding, dilation, (kh, kw), strides)]
    return (n, *size, out)


def conv(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int], padding: Padding,
         dilation: tuple[int, int] = (1, 1), groups: int = 1) -> jax.Array:
    """``lax.conv_general_dilated`` in NHWC/HWIO with ``feature_group_count=groups``, by oneDNN.

    ``kernel`` is the grouped kernel ``[kh, kw, C/groups, O]``; ``padding`` is
    ``((top, bottom), (left, right))``. Raises ``RuntimeError`` when the library is not built and
    ``ValueError`` for a dtype other than float32.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the 'onednn' conv lowering is unavailable: {reason}")
    if not (supports(x.dtype) and supports(kernel.dtype)):
        raise ValueError(f"the 'onednn' conv lowering computes float32 only, got {x.dtype} and "
                         f"{kernel.dtype}; use lowering='split' for other dtypes.")
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if min(min(pair) for pair in padding) < 0:
        raise ValueError(f"the 'onednn' conv lowering needs padding >= 0, got {padding}.")
    return _conv(x, kernel, tuple(strides), padding, tuple(dilation), groups)


#: Grouped convs with at most this many outputs per group run forward as depthwise convs.
#: oneDNN's grouped forward kernel vectorises over a group's outputs, so with one or two it idles
#: most of each vector; its depthwise kernel vectorises over channels. Forward, batch 16, ms:
#: 9x9/16 64->16 at 56x56 23.1 -> 7.3; 7x7/8 64->16 at 56x56 14.0 -> 8.1; the same two at
#: 112x112 stride 2 34.2 -> 9.0 and 18.9 -> 12.7; but 5x5/4 64->16 (4 per group) 7.8 -> 25.0.
DEPTHWISE_MAX_OUTPUTS_PER_GROUP = 2


def runs_depthwise(out_features: int, groups: int) -> bool:
    """Whether :func:`conv`'s forward pass runs as depthwise convs (see
    :data:`DEPTHWISE_MAX_OUTPUTS_PER_GROUP`); the gradients always run as the grouped conv."""
    return groups > 1 and out_features // groups <= DEPTHWISE_MAX_OUTPUTS_PER_GROUP


def _depthwise_forward(x, kernel, out_shape, strides, padding, dilation, groups):
    """The grouped conv as ``O/groups`` depthwise convs, one per output of a group, each summed
    over the group's inputs: the same MACs, in oneDNN's depthwise kernel."""
    kh, kw, in_per_group, out = kernel.shape
    channels = x.shape[-1]
    per_output = kernel.reshape(kh, kw, in_per_group, groups, out // groups)
    n, oh, ow, _ = out_shape
    outputs = []
    for m in range(out // groups):
        depthwise = per_output[..., m].transpose(0, 1, 3, 2).reshape(kh, kw, 1, channels)
        z = _call("forward", (n, oh, ow, channels), x, depthwise, strides, padding, dilation,
                  channels)
        outputs.append(z.reshape(n, oh, ow, groups, in_per_group).sum(axis=-1))
    return jnp.stack(outputs, axis=-1).reshape(out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, padding, dilation, groups):
    out_shape = _out_shape(x.shape, kernel.shape, strides, padding, dilation)
    if runs_depthwise(kernel.shape[-1], groups):
        return _depthwise_forward(x, kernel, out_shape, strides, padding, dilation, groups)
    return _call("forward", out_shape, x, kernel, strides, padding, dilation, groups)


def _conv_fwd(x, kernel, strides, padding, dilation, groups):
    return _conv(x, kernel, strides, padding, dilation, groups), (x, kernel)


def _conv_bwd(strides, padding, dilation, groups, residuals, dy):
    x, kernel = residuals
    dx = _call("input_grad", x.shape, dy, kernel, strides, padding, dilation, groups)
    dkernel = _call("weight_grad", kernel.shape, x, dy, strides, padding, dilation, groups)
    return dx, dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)
