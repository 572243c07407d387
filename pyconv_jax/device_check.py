"""Numerical checks of the conv lowerings and of whole models on the default JAX device.

The test suite checks every lowering on the CPU. An accelerator runs other kernels (cuDNN's
grouped convolutions, matrix units in TF32 or bfloat16), so these checks run the same kind of
comparison wherever JAX runs (``scripts/device_check.py``, on a lent GPU): every stage's pyramid
of a model (all its levels, stride 1 and 2), forward and both gradients, and whole models in
train mode, logits and every parameter's gradient, each against PyTorch in float64 on the CPU
with the same weights and inputs. Random inputs and weights, never zeros.

The error is ``|ours - ref| / |ref|`` (L2 norms over the whole tensor). Tolerances per compute
mode (:data:`MODES`), from its rounding unit ``u``:

- ``float32`` at ``highest`` precision: plain float32 arithmetic (``u`` = 6e-8); only the order
  of the sums differs, so a conv lands at 1e-7 to 1e-6.
- ``float32`` at ``default`` precision: XLA may round the operands of convs and matrix products
  to TF32 on GPUs (``u`` = 4.9e-4); a conv lands near ``u``.
- ``bfloat16`` (``u`` = 3.9e-3): operands and outputs are rounded; a conv lands near ``u``
  (2-4e-3 measured).

A whole network's error also depends on the network (ReLU inputs that round across zero,
BatchNorm's cancellations), so there the yardstick is PyTorch's own error in the same mode
(:func:`check_model`). A wrong tap, group or padding misses by far more than any tolerance
(tests/test_device_check.py breaks convs to show it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pyconv_jax.layers import grouped_conv, onednn_conv, pyramid_levels
from pyconv_jax.models import MODEL_SPECS, create_model

#: ``(dtype, precision) -> (tolerance of one pyramid, least tolerance of a whole network)``.
MODES = {
    ("float32", "highest"): (1e-5, 1e-4),
    ("float32", "default"): (3e-3, 3e-2),
    ("bfloat16", "default"): (1e-2, 1e-1),
}


@dataclasses.dataclass
class Check:
    """One compared quantity: its relative L2 error against the float64 reference."""

    subject: str  # e.g. "pyconvresnet50 stage 2, stride 2" or "pyconvresnet50"
    lowering: str
    dtype: str
    precision: str
    quantity: str  # "forward", "input grad", "kernel grad", "logits", "param grads"
    error: float
    tolerance: float
    yardstick: float | None = None  # PyTorch's error in the same mode (whole models)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance


def relative_error(ours, ref) -> float:
    """``|ours - ref| / |ref|`` in float64 (L2 norms); NaN or a shape mismatch fails loudly."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} against the reference's {ref.shape}")
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _precision(dtype: str, precision: str):
    return jax.default_matmul_precision(precision if dtype == "float32" else "default")


# ------------------------------------------------------------------------------ pyramid levels
def pyramid_cases(name: str) -> list[dict]:
    """Every stage's pyramid of model ``name`` (its real channel counts), stride 1 and 2."""
    spec = MODEL_SPECS[name]
    cases = []
    for stage, (width, kernels, groups) in enumerate(
            zip(spec.stage_widths, spec.pyconv_kernels, spec.pyconv_groups), start=1):
        for stride in (1, 2):
            cases.append({"subject": f"{name} stage {stage}, stride {stride}", "stride": stride,
                          "in_features": width, "levels": pyramid_levels(width, kernels, groups)})
    return cases


def _torch_pyramid(x, kernels, levels, stride):
    """The float64 reference: PyTorch's grouped conv of each level (NCHW, OIHW, k // 2 padding),
    and the gradients of ``sum(y * dy)``."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.transpose(x, (0, 3, 1, 2))).double().requires_grad_()
    ws = [torch.from_numpy(np.transpose(w, (3, 2, 0, 1))).double().requires_grad_()
          for w in kernels]
    ys = [F.conv2d(x, w, stride=stride, padding=k // 2, groups=g)
          for w, (k, g, _) in zip(ws, levels)]
    y = torch.cat(ys, dim=1)
    dy = torch.from_numpy(np.random.default_rng(1).normal(size=y.shape))
    (y * dy).sum().backward()
    nhwc = lambda t: np.transpose(t.detach().numpy(), (0, 2, 3, 1))  # noqa: E731
    return (nhwc(y), nhwc(x.grad), [np.transpose(w.grad.numpy(), (2, 3, 1, 0)) for w in ws],
            np.transpose(dy.numpy(), (0, 2, 3, 1)))


def check_pyramids(cases: list[dict], lowerings, modes=MODES, *, batch_size: int = 2,
                   size: int = 8, conv: Callable = grouped_conv, seed: int = 0) -> list[Check]:
    """Each pyramid of ``cases`` (every level, concatenated) in each lowering and mode against the
    reference: the forward pass and the input and kernel gradients. All cases run in one
    compiled program per lowering and mode (``onednn`` in float32 only). ``conv`` is the grouped
    conv under test (:func:`pyconv_jax.layers.grouped_conv`; the tests pass broken ones)."""
    rng = np.random.default_rng(seed)
    inputs, refs = [], []
    for case in cases:
        x = rng.normal(size=(batch_size, size, size, case["in_features"])).astype(np.float32)
        kernels = [(rng.normal(size=(k, k, x.shape[-1] // g, f)) / np.sqrt(k * k * x.shape[-1] / g))
                   .astype(np.float32) for k, g, f in case["levels"]]
        ref_y, ref_dx, ref_dw, dy = _torch_pyramid(x, kernels, case["levels"], case["stride"])
        inputs.append((x, kernels, dy))
        refs.append((ref_y, ref_dx, ref_dw))

    checks = []
    for lowering in lowerings:
        for (dtype, precision), (tolerance, _) in modes.items():
            if lowering == "onednn" and not onednn_conv.supports(dtype):
                continue  # it computes float32 only, and says so

            def forward_and_grads(inputs):
                out = []
                for case, (x, kernels, dy) in zip(cases, inputs):
                    stride = (case["stride"],) * 2

                    def pyramid(x, kernels):
                        return jnp.concatenate([
                            conv(x.astype(dtype), w.astype(dtype), groups=g, strides=stride,
                                 lowering=lowering)
                            for w, (_, g, _) in zip(kernels, case["levels"])], axis=-1)

                    y, vjp = jax.vjp(pyramid, x, kernels)
                    out.append((y, *vjp(dy.astype(y.dtype))))
                return out

            with _precision(dtype, precision):
                outputs = jax.jit(forward_and_grads)(inputs)
            for case, (y, dx, dws), (ref_y, ref_dx, ref_dw) in zip(cases, outputs, refs):
                row = functools.partial(Check, case["subject"], lowering, dtype, precision,
                                        tolerance=tolerance)
                checks += [row("forward", relative_error(y, ref_y)),
                           row("input grad", relative_error(dx, ref_dx)),
                           row("kernel grad", max(relative_error(a, b)
                                                  for a, b in zip(dws, ref_dw)))]
    return checks


# ------------------------------------------------------------------------------ whole models
def _torch_model(name: str, seed: int):
    """The reference model with random weights (:func:`tests.torch_reference.random_torch_model`)
    and each residual block's last BatchNorm scale drawn from [0.1, 0.3], in train mode.

    With scales near 1 a random 50-layer network is chaotic: rounding errors grow through the
    depth until PyTorch's own bfloat16 (AMP) logits miss the float64 ones by 30% and its
    gradients are uncorrelated with them. Small last scales (trained ResNets have them too) keep
    each block near the identity, so the comparison measures the kernels, not the network."""
    import torch

    from tests.torch_reference import random_torch_model

    model = random_torch_model(name, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.modules():
            if hasattr(block, "bn2"):  # a residual block: bn3 (bottleneck) or bn2 is its last
                getattr(block, "bn3", block.bn2).weight.uniform_(0.1, 0.3, generator=generator)
    return model.train()


def _allow_tf32(torch, allow: bool) -> None:
    """Lets (or stops) cuDNN's convs and cuBLAS's products round float32 to TF32: through the
    ``fp32_precision`` settings of PyTorch 2.9 and later, else the older ``allow_tf32`` flags."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = (
            "tf32" if allow else "ieee")
    else:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow


def _torch_logits_and_grads(name, model, images, weights, dtype, precision, device):
    """The logits of the PyTorch ``model`` in train mode and the gradients of
    ``sum(logits * weights)`` as Flax ``params`` leaves: in float64 (``dtype`` None) or in a
    compute mode of :data:`MODES` on ``device`` (bfloat16 as autocast; float32 ``default`` lets
    cuDNN and cuBLAS use TF32)."""
    import torch

    from pyconv_jax import convert

    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cuda":
        _allow_tf32(torch, precision == "default")
    model = model.to(device=device, dtype=torch.float64 if dtype is None else torch.float32)
    model.zero_grad(set_to_none=True)
    x = torch.from_numpy(np.transpose(images, (0, 3, 1, 2))).to(device, model.fc.weight.dtype)
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits = model(x)
    loss = (logits.double() * torch.from_numpy(weights).to(device).double()).sum()
    loss.backward()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.update({k: p.grad.detach().cpu() for k, p in model.named_parameters()})
    return logits.detach().double().cpu().numpy(), jax.tree_util.tree_leaves(
        convert.torch_state_dict_to_flax(name, state)["params"])


def check_model(name: str, lowerings, modes=MODES, *, batch_size: int = 8, image_size: int = 64,
                seed: int = 0, torch_device: str | None = None) -> list[Check]:
    """Model ``name`` in train mode (BatchNorm on batch statistics), in each lowering and mode,
    with the weights of a random PyTorch reference model (:func:`_torch_model`): the logits and
    the gradients of every parameter (of ``sum(logits * w)``, random ``w``), against that model
    in float64.

    A whole network's error depends on the network as much as on the kernels (ReLUs whose input
    rounds across zero, BatchNorm's cancellations), so the yardstick is PyTorch's own error in
    the same mode on ``torch_device`` (CUDA when there is one, else the CPU): ours passes within
    twice that, or within the mode's network tolerance, whichever is larger."""
    import torch

    from pyconv_jax import convert

    torch_device = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
    weights = rng.normal(size=(batch_size, 1000)).astype(np.float32)
    torch_model = _torch_model(name, seed)
    variables = convert.torch_state_dict_to_flax(name, torch_model.state_dict())
    ref_logits, ref_grads = _torch_logits_and_grads(name, torch_model, images, weights, None,
                                                    None, "cpu")
    flat = lambda leaves: np.concatenate([np.ravel(a) for a in leaves])  # noqa: E731
    errors = lambda logits, grads: (relative_error(logits, ref_logits),  # noqa: E731
                                    relative_error(flat(grads), flat(ref_grads)))

    checks = []
    for (dtype, precision), (_, floor) in modes.items():
        yardsticks = errors(*_torch_logits_and_grads(name, torch_model, images, weights, dtype,
                                                     precision, torch_device))
        for lowering in lowerings:
            model = create_model(name, dtype=dtype, pyconv_lowering=lowering)

            def loss(params, images):
                logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                        images, train=True, mutable=["batch_stats"])
                logits = logits.astype(jnp.float32)
                return jnp.sum(logits * weights), logits

            with _precision(dtype, precision):
                (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
                    variables["params"], images)
            ours = errors(logits, jax.tree_util.tree_leaves(grads))
            for quantity, error, yardstick in zip(("logits", "param grads"), ours, yardsticks):
                checks.append(Check(name, lowering, dtype, precision, quantity, error,
                                    max(floor, 2 * yardstick), yardstick))
    return checks


def summary(checks: list[Check]) -> str:
    """A markdown table with one row per subject kind (``pyramids`` of a model, or the model),
    lowering, mode and quantity: the worst error over its checks, and how many passed."""
    groups: dict[tuple, list[Check]] = {}
    for c in checks:
        subject = c.subject.split(" stage ")[0] + (" pyramids" if " stage " in c.subject else "")
        groups.setdefault((subject, c.lowering, c.dtype, c.precision, c.quantity), []).append(c)
    lines = ["| subject | lowering | dtype | precision | quantity | worst error | its tolerance | "
             "PyTorch's error | passed |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    for key, group in groups.items():
        worst = max(group, key=lambda c: c.error / c.tolerance)
        yardstick = "" if worst.yardstick is None else f"{worst.yardstick:.2e}"
        lines.append("| " + " | ".join(key) + f" | {worst.error:.2e} | {worst.tolerance:.1e} | "
                     f"{yardstick} | {sum(c.ok for c in group)}/{len(group)} |")
    return "\n".join(lines)
