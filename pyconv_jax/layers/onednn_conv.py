"""Convolutions computed by oneDNN through XLA's FFI: the ``onednn`` lowering (CPU, float32).

XLA:CPU's convolution kernels run PyConvResNet's spatial convs far below the machine's speed:
narrow convs on one core, grouped ones as block-diagonal dense convs with G times the MACs, weight
gradients in Eigen at a fifth of a matrix product's speed (docs/benchmarks.md). oneDNN, which
PyTorch uses on CPU, runs each of them with its real groups on every core. :func:`conv` calls it
for the forward pass and both gradients (a ``jax.custom_vjp``: reverse mode only), on the
library that :mod:`pyconv_jax.native.build` compiles. Levels with at most four outputs per group
run forward and kernel gradient in the same library's own channel-vectorised kernels instead
(:func:`runs_narrow`), 1.3-6x faster than oneDNN's there, and so does the input gradient of those
with at most four inputs per group (:func:`runs_narrow_input_grad`); levels with eight outputs
per group run forward and kernel gradient in the same library's paired kernels
(:func:`runs_paired`). At inference :func:`conv_bias_act` applies a folded BatchNorm, the
shortcut and the ReLU inside the conv's own output pass.

Same conv, batch 16, float32, 2 cores, ms (forward / input gradient / weight gradient):
3x3 64->64 at 56x56, XLA 25.8 / 25.9 / 43.0, oneDNN 9.8 / 9.7 / 9.8; 9x9 64->16 with 16 groups
at 56x56, XLA (split) 18.7 / 33.3 / 69.7, oneDNN 22.8 / 6.1 / 21.3, narrow kernels 4.7 / 2.3 / 4.0.
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
    "narrow_forward": "PyconvNarrowConvForward",
    "narrow_input_grad": "PyconvNarrowConvInputGrad",
    "narrow_weight_grad": "PyconvNarrowConvWeightGrad",
    "fused_forward": "PyconvOnednnConvForwardFused",
    "materialize": "PyconvMaterialize",
    "batch_norm_input_grad_pieces": "PyconvBatchNormInputGradPieces",
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


def _call(kind: str, result_shape, a, b, strides, padding, dilation, groups, *extra, **more):
    (top, bottom), (left, right) = padding
    attrs = dict(stride_h=strides[0], stride_w=strides[1], pad_t=top, pad_l=left, pad_b=bottom,
                 pad_r=right, dil_h=dilation[0], dil_w=dilation[1], groups=groups, **more)
    return jax.ffi.ffi_call(TARGETS[kind], jax.ShapeDtypeStruct(result_shape, a.dtype),
                            vmap_method="sequential")(
        a, b, *extra, **{name: np.int64(value) for name, value in attrs.items()})


def _out_shape(x_shape, kernel_shape, strides, padding, dilation):
    n, h, w, _ = x_shape
    kh, kw, _, out = kernel_shape
    size = [(length + lo + hi - d * (k - 1) - 1) // s + 1 for length, (lo, hi), d, k, s in
            zip((h, w), padding, dilation, (kh, kw), strides)]
    return (n, *size, out)


def _check(*arrays, padding: Padding) -> Padding:
    """Raises when oneDNN cannot compute this conv here; returns ``padding`` as ints."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the 'onednn' conv lowering is unavailable: {reason}")
    if not all(supports(a.dtype) for a in arrays):
        raise ValueError(f"the 'onednn' conv lowering computes float32 only, got "
                         f"{', '.join(str(a.dtype) for a in arrays)}; use lowering='split' for "
                         "other dtypes.")
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if min(min(pair) for pair in padding) < 0:
        raise ValueError(f"the 'onednn' conv lowering needs padding >= 0, got {padding}.")
    return padding


def conv(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int], padding: Padding,
         dilation: tuple[int, int] = (1, 1), groups: int = 1) -> jax.Array:
    """``lax.conv_general_dilated`` in NHWC/HWIO with ``feature_group_count=groups``, by oneDNN.

    ``kernel`` is the grouped kernel ``[kh, kw, C/groups, O]``; ``padding`` is
    ``((top, bottom), (left, right))``. Raises ``RuntimeError`` when the library is not built and
    ``ValueError`` for a dtype other than float32.
    """
    padding = _check(x, kernel, padding=padding)
    return _conv(x, kernel, tuple(strides), padding, tuple(dilation), groups)


def conv_bias_act(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                  residual: jax.Array | None = None, *, relu: bool, strides: tuple[int, int],
                  padding: Padding, dilation: tuple[int, int] = (1, 1),
                  groups: int = 1) -> jax.Array:
    """``act(conv(x, kernel) + bias + residual)`` in one pass: :func:`conv` whose kernel writes
    its output with the bias ``[O]`` (a folded BatchNorm's shift), the ``residual`` (the output's
    shape, or ``None``) and a ReLU (``relu``) already applied. An inference conv + BatchNorm (+
    shortcut) + ReLU writes one tensor instead of two. Differentiable (reverse mode)."""
    padding = _check(x, kernel, bias, *([] if residual is None else [residual]), padding=padding)
    out_shape = _out_shape(x.shape, kernel.shape, strides, padding, dilation)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"the residual's shape {tuple(residual.shape)} is not the conv output's "
                         f"{out_shape}; add a shortcut of the block's output shape.")
    if bias.shape != (kernel.shape[-1],):
        raise ValueError(f"the bias has shape {bias.shape}; give one value per output channel, "
                         f"({kernel.shape[-1]},).")
    return _conv_bias_act(x, kernel, bias, residual, bool(relu), tuple(strides), padding,
                          tuple(dilation), groups)


def conv_with_epilogue(x: jax.Array, kernel: jax.Array, epilogue, *, strides: tuple[int, int],
                       padding: Padding, dilation: tuple[int, int] = (1, 1),
                       groups: int = 1) -> jax.Array:
    """:func:`conv`, or with an ``epilogue`` (:class:`pyconv_jax.layers.epilogue.Epilogue`, a
    folded inference BatchNorm with the shortcut and ReLU after it) :func:`conv_bias_act`."""
    if epilogue is None:
        return conv(x, kernel, strides=strides, padding=padding, dilation=dilation, groups=groups)
    return conv_bias_act(x, epilogue.folded(kernel), epilogue.shift, epilogue.residual,
                         relu=epilogue.relu, strides=strides, padding=padding, dilation=dilation,
                         groups=groups)


#: Grouped convs with at most this many outputs per group run forward and weight gradient in the
#: channel-vectorised kernels of ``native/narrow_conv.cc`` (AVX-512; oneDNN elsewhere). oneDNN's
#: grouped kernels vectorise over a group's outputs and idle most of each vector when there are
#: few; those kernels vectorise over input channels. Batch 16, 56x56, ms, forward / weight
#: gradient, oneDNN -> narrow: 9x9/16 64->16 6.4 (as depthwise convs; 20.1 grouped) / 19.6 ->
#: 2.6 / 2.3; 7x7/8 11.8 / 11.9 -> 3.4 / 2.9; 5x5/4 6.3 / 6.6 -> 3.8 / 3.4; PyConvHGResNet's
#: 9x9/32 128->32 53.9 / 41.6 -> 5.5 / 4.5. With eight outputs per group (stage 2's 5x5/4 128->32
#: and 7x7/8 128->64 at 28x28) they are 1.1-1.5x slower, hence the threshold: those run in the
#: paired kernels (:data:`PAIRED_OUTPUTS_PER_GROUP`).
NARROW_MAX_OUTPUTS_PER_GROUP = 4


#: Of those, the ones with at most this many inputs per group also run their input gradient in
#: the narrow kernels. Batch 16, ms, oneDNN -> narrow: 9x9/16 64->16 at 56x56 6.1 -> 2.3, the same
#: from 112x112 with stride 2 7.6 -> 3.0, PyConvHGResNet's 9x9/32 128->32 18.3 -> 5.5; with eight
#: inputs per group it is a draw (7x7/8 64->16 3.4 -> 3.0, strided 4.3 -> 5.2) and with sixteen
#: oneDNN wins (5x5/4 2.1 -> 3.8).
NARROW_INPUT_GRAD_MAX_INPUTS_PER_GROUP = 4


#: Grouped convs with this many outputs per group and an even number of groups run forward pass
#: and kernel gradient in the paired kernels of ``native/paired_conv.cc``: two groups' outputs
#: fill one 16-lane vector, where oneDNN fills half of it with one group's (AVX-512 and kernels 5
#: to 11 wide, undilated along width, stride 1 or 2; the library hands the rest to oneDNN).
#: Batch 16, ms, oneDNN -> paired, forward / kernel gradient: PyConvResNet-50 stage 2's 7x7/8
#: 128->64 at 28x28 6.68 / 5.62 -> 4.33 / 4.33, 5x5/4 128->32 3.45 / 3.23 -> 2.49 / 2.65; in
#: stage 2's first block (from 56x56, stride 2) 7.23 / 6.78 -> 5.69 / 6.30 and 3.73 / 4.03 ->
#: 3.53 / 3.65. Their input gradients (eight outputs, so at least sixteen lanes' worth of
#: inputs per group) stay in oneDNN, which fills its vectors there.
PAIRED_OUTPUTS_PER_GROUP = 8


def runs_paired(out_features: int, groups: int) -> bool:
    """Whether :func:`conv` runs its forward pass and kernel gradient (and :func:`conv_bias_act`
    its forward pass) in the paired kernels (see :data:`PAIRED_OUTPUTS_PER_GROUP`)."""
    return groups % 2 == 0 and out_features == groups * PAIRED_OUTPUTS_PER_GROUP


def _runs_native(out_features: int, groups: int) -> bool:
    """Whether the forward pass and kernel gradient run in the library's own kernels."""
    return runs_narrow(out_features, groups) or runs_paired(out_features, groups)


def runs_narrow(out_features: int, groups: int) -> bool:
    """Whether :func:`conv` runs its forward pass and kernel gradient in the narrow kernels (see
    :data:`NARROW_MAX_OUTPUTS_PER_GROUP`)."""
    return groups > 1 and out_features // groups <= NARROW_MAX_OUTPUTS_PER_GROUP


def runs_narrow_input_grad(in_features: int, out_features: int, groups: int) -> bool:
    """Whether :func:`conv` runs its input gradient in the narrow kernels too (see
    :data:`NARROW_INPUT_GRAD_MAX_INPUTS_PER_GROUP`)."""
    return (runs_narrow(out_features, groups)
            and in_features // groups <= NARROW_INPUT_GRAD_MAX_INPUTS_PER_GROUP)


def _target_kind(kind: str, kernel, groups: int) -> str:
    """``kind``'s native version (the narrow or paired kernels, one FFI target) where
    :func:`runs_narrow` or :func:`runs_paired` (for the input gradient
    :func:`runs_narrow_input_grad`) says so, else ``kind`` (oneDNN)."""
    in_features, out_features = kernel.shape[2] * groups, kernel.shape[3]
    narrow = (runs_narrow_input_grad(in_features, out_features, groups) if kind == "input_grad"
              else _runs_native(out_features, groups))
    return f"narrow_{kind}" if narrow else kind


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, padding, dilation, groups):
    out_shape = _out_shape(x.shape, kernel.shape, strides, padding, dilation)
    return _call(_target_kind("forward", kernel, groups), out_shape, x, kernel, strides, padding,
                 dilation, groups)


def narrow_kernels_run(x_shape, kernel_shape, *, strides, padding, dilation=(1, 1),
                       groups=1, paired: bool = False) -> bool:
    """Whether the narrow kernels themselves (not the oneDNN fallback the library takes on CPUs
    without AVX-512 or for channel counts they do not tile) compute this conv here; with
    ``paired``, whether the paired kernel runs its forward pass."""
    if _load() is not None:
        return False
    (top, _), (left, _) = padding
    _, oh, ow, out = _out_shape(x_shape, kernel_shape, strides, padding, dilation)
    geometry = (*x_shape, oh, ow, out, *kernel_shape[:2], *strides, top, left, *dilation, groups)
    library = ctypes.CDLL(str(build.LIBRARY))
    supported = library.PyconvPairedForwardSupported if paired else library.PyconvNarrowSupported
    return bool(supported((ctypes.c_int64 * 16)(*geometry)))


def _conv_fwd(x, kernel, strides, padding, dilation, groups):
    return _conv(x, kernel, strides, padding, dilation, groups), (x, kernel)


def _conv_bwd(strides, padding, dilation, groups, residuals, dy):
    x, kernel = residuals
    dx = _call(_target_kind("input_grad", kernel, groups), x.shape, dy, kernel, strides, padding,
               dilation, groups)
    dkernel = _call(_target_kind("weight_grad", kernel, groups), kernel.shape, x, dy, strides,
                    padding, dilation, groups)
    return dx, dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _conv_bias_act(x, kernel, bias, residual, relu, strides, padding, dilation, groups):
    out_shape = _out_shape(x.shape, kernel.shape, strides, padding, dilation)
    extra = (bias,) if residual is None else (bias, residual)
    native = _runs_native(kernel.shape[-1], groups)
    return _call("fused_forward", out_shape, x, kernel, strides, padding, dilation, groups,
                 *extra, relu=int(relu), narrow=int(native))


def _conv_bias_act_fwd(x, kernel, bias, residual, relu, strides, padding, dilation, groups):
    y = _conv_bias_act(x, kernel, bias, residual, relu, strides, padding, dilation, groups)
    return y, (x, kernel, y if relu else None, residual is not None)


def _conv_bias_act_bwd(relu, strides, padding, dilation, groups, saved, dy):
    x, kernel, y, has_residual = saved
    dz = jnp.where(y > 0, dy, jnp.zeros_like(dy)) if relu else dy
    dx, dkernel = _conv_bwd(strides, padding, dilation, groups, (x, kernel), dz)
    return dx, dkernel, jnp.sum(dz, axis=(0, 1, 2)), dz if has_residual else None


_conv_bias_act.defvjp(_conv_bias_act_fwd, _conv_bias_act_bwd)

