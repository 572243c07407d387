"""Convert published PyTorch checkpoints (``.pth``) into Flax variables and checkpoint directories.

The Flax modules are named after the published PyTorch modules, so conversion is one fixed
renaming plus a layout change. All renaming rules live in :func:`torch_key` (Flax path ->
PyTorch key); :func:`name_map` applies them to every variable of a model:

  Flax path                          PyTorch key                          layout change
  layer{s}_{i}/...                   layer{s}.{i}....
  .../conv2/conv2_{l}/kernel         ...conv2.conv2_{l}.weight (level l)  OIHW -> HWIO
  .../<conv>/kernel                  ...<conv>.weight                     OIHW -> HWIO
  .../downsample_conv/kernel         ...downsample.1.weight after a max-pool (PyConv families,
                                     strided block), else ...downsample.0.weight
  .../downsample_bn/{scale,bias}     ...downsample.2.{weight,bias} after a max-pool, else .1.
  .../<bn>/scale, .../<bn>/bias      ...<bn>.weight, ...<bn>.bias
  batch_stats/.../<bn>/{mean,var}    ...<bn>.running_mean, ...<bn>.running_var
  fc/kernel, fc/bias                 fc.weight, fc.bias                   (out, in) -> (in, out)

Conversion is strict: every tensor of the file is used and every Flax variable is filled; only
BatchNorm's ``num_batches_tracked`` counters are dropped. Anything else raises ``ValueError``
listing the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

#: The only PyTorch entries conversion drops (BatchNorm's step counter, unused in eval and by Flax).
DROPPED_SUFFIX = "num_batches_tracked"
_SHOW = 5  # keys listed per category in error messages

_TORCH_MISSING = (
    "reading PyTorch checkpoints needs PyTorch, which is an optional dependency: "
    "pip install 'pyconv-jax[torch]'"
)


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(_TORCH_MISSING) from None
    return torch


# ----------------------------------------------------------------------------- reading .pth files
def load_torch_checkpoint(path: str) -> dict[str, Any]:
    """Reads a ``.pth`` file into a flat ``{key: tensor}`` state_dict.

    Accepts a plain state_dict or a training checkpoint ``{"state_dict": ..., "epoch": ...}``,
    and strips the ``module.`` prefix that ``DataParallel`` adds to every key. Loads with
    ``weights_only=True`` (no arbitrary pickles) onto the CPU.
    """
    torch = _import_torch()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"could not read {path!r} as a PyTorch checkpoint ({type(err).__name__}: {reason}); "
            "the file is probably truncated or corrupt: download it again."
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{path!r} holds a {type(obj).__name__}, not a state_dict (a dict of tensors, or "
            "{'state_dict': {...}, ...}); save the model with torch.save(model.state_dict(), ...)."
        )
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(  # noqa: TRY004 - a bad file is a value error, as elsewhere
                f"{path!r} is not a state_dict: entry {key!r} holds {type(value).__name__}, "
                "not a tensor."
            )
        state_dict[key.removeprefix("module.")] = value
    return state_dict


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the name map
def _downsample_indices(model, stage: int, index: int) -> tuple[int, int]:
    """Positions of the shortcut conv and BN inside the PyTorch ``downsample`` Sequential.

    The PyConv families put a max-pool (no weights) first when the block strides, so the conv is
    ``downsample.1`` and the BN ``downsample.2``; otherwise (torchvision) ``downsample.0/.1``.
    """
    strides = model.stage_strides[stage - 1] if index == 0 else 1
    return (1, 2) if model.shortcut == "pool" and strides != 1 else (0, 1)


def torch_key(model, path: tuple[str, ...]) -> str:
    """The PyTorch state_dict key of the Flax variable at ``path`` (``("params", ..., leaf)``).

    This function holds every renaming rule of the converter (see the module docstring).
    """
    collection, *modules, leaf = path
    names = []
    block = None
    for name in modules:
        m = re.fullmatch(r"layer(\d+)_(\d+)", name)
        if m:  # Flax block ``layer2_0`` is ``layer2.0``
            block = (int(m.group(1)), int(m.group(2)))
            names += [f"layer{block[0]}", str(block[1])]
        elif name in ("downsample_conv", "downsample_bn"):
            if block is None:
                raise ValueError(f"shortcut outside a block at {'/'.join(path)}")
            conv_index, bn_index = _downsample_indices(model, *block)
            names += ["downsample", str(conv_index if name == "downsample_conv" else bn_index)]
        else:  # conv1, bn1, conv2, conv2_1 .. conv2_4, conv3, bn3, fc: same name
            names.append(name)
    torch_leaf = {
        ("params", "kernel"): "weight",
        ("params", "scale"): "weight",
        ("params", "bias"): "bias",
        ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var",
    }.get((collection, leaf))
    if torch_leaf is None:
        raise ValueError(f"no PyTorch name for Flax variable {'/'.join(path)}")
    return ".".join(names + [torch_leaf])


def to_flax_layout(array: np.ndarray, flax_ndim: int) -> np.ndarray:
    """PyTorch layout -> Flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if flax_ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if flax_ndim == 2:
        return np.transpose(array, (1, 0))
    return array


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax variable of ``flax_shape`` (inverse of ``to_flax_layout``)."""
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _flat_abstract_variables(model) -> dict[tuple[str, ...], Any]:
    from flax.traverse_util import flatten_dict

    from pyconv_jax.models import abstract_variables

    return flatten_dict(abstract_variables(model))


def name_map(
    arch: str, num_classes: int = 1000
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{pytorch_key: (flax_path, pytorch_shape)}`` for every variable of ``arch``."""
    from pyconv_jax.models import create_model

    model = create_model(arch, num_classes=num_classes)
    mapping = {}
    for path, leaf in _flat_abstract_variables(model).items():
        mapping[torch_key(model, path)] = (path, torch_shape(tuple(leaf.shape)))
    return mapping


# ----------------------------------------------------------------------------- conversion
def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; bfloat16/float16 go through float32
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _natural(key: str) -> list:
    """Sort key putting ``layer3.9`` before ``layer3.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _matching_archs(keys_and_shapes: dict[str, tuple[int, ...]], num_classes: int) -> list[str]:
    """Registered architectures whose keys and shapes equal the given ones (for error hints)."""
    from pyconv_jax.models import MODEL_SPECS

    # Cheap filter first: the published entry count includes one num_batches_tracked per BN.
    num_bn = sum(k.endswith(".running_mean") for k in keys_and_shapes)
    matches = []
    for name, spec in MODEL_SPECS.items():
        if spec.published.state_dict_entries != len(keys_and_shapes) + num_bn:
            continue
        expected = name_map(name, num_classes)
        if {k: s for k, (_, s) in expected.items()} == keys_and_shapes:
            matches.append(name)
    return matches


def torch_state_dict_to_flax(
    arch: str, state_dict: Mapping[str, Any], num_classes: int | None = None
) -> dict[str, Any]:
    """Converts a PyTorch state_dict of ``arch`` to Flax ``{"params", "batch_stats"}`` (numpy).

    ``num_classes`` defaults to the rows of ``fc.weight`` (1000 for ImageNet weights). Strict:
    raises ``ValueError`` listing missing, unexpected and mis-shaped keys unless every tensor
    (except ``num_batches_tracked``) maps onto exactly one Flax variable of the right shape.
    """
    from flax.traverse_util import unflatten_dict

    from pyconv_jax.models import get_spec

    get_spec(arch)  # unknown names fail here, listing the registered ones
    given = {k: v for k, v in state_dict.items() if not k.endswith(DROPPED_SUFFIX)}
    if num_classes is None:
        fc = given.get("fc.weight")
        num_classes = _shape(fc)[0] if fc is not None and len(_shape(fc)) == 2 else 1000
    expected = name_map(arch, num_classes)

    missing = sorted((k for k in expected if k not in given), key=_natural)
    unexpected = sorted((k for k in given if k not in expected), key=_natural)
    misshaped = [
        f"{k} {list(_shape(given[k]))} (expected {list(expected[k][1])})"
        for k in sorted(expected, key=_natural) if k in given and _shape(given[k]) != expected[k][1]
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing [{_listing(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected [{_listing(unexpected)}]")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped [{_listing(misshaped)}]")
        others = [a for a in _matching_archs({k: _shape(v) for k, v in given.items()}, num_classes)
                  if a != arch]
        if others:
            hint = f"the file matches {' / '.join(others)}: use --arch {others[0]}."
        elif misshaped and not missing and not unexpected:
            hint = ("the names match but shapes differ: check --arch, and --num_classes for the "
                    "classifier.")
        else:
            hint = ("check that --arch names the architecture the file was trained as "
                    "(python -c 'import pyconv_jax; print(pyconv_jax.list_models())').")
        raise ValueError(
            f"the checkpoint does not match {arch} ({num_classes} classes, {len(expected)} "
            f"tensors expected, {len(given)} given): " + "; ".join(parts) + ". Fix: " + hint)

    flat = {}
    for key, (path, _) in expected.items():
        array = _to_numpy(given[key])
        flat[path] = np.ascontiguousarray(to_flax_layout(array, array.ndim), dtype=np.float32)
    variables = unflatten_dict(flat)
    variables.setdefault("batch_stats", {})
    return variables


def convert_torch_checkpoint(
    arch: str, torch_checkpoint: str, output: str, num_classes: int | None = None
) -> dict[str, Any]:
    """Reads ``torch_checkpoint``, converts it strictly and writes a checkpoint directory.

    Everything is validated (file readable, names and shapes, output directory free) before
    anything is written. Returns a summary ``{"arch", "num_classes", "params", "output", ...}``;
    the directory loads with :func:`pyconv_jax.load_pretrained` (``arch``, ``output``).
    """
    from pyconv_jax import checkpoint as ckpt

    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise FileExistsError(
            f"output {output!r} already exists and is not an empty directory; choose a new one.")
    state_dict = load_torch_checkpoint(torch_checkpoint)
    variables = torch_state_dict_to_flax(arch, state_dict, num_classes)
    fc = variables["params"].get("fc")
    num_classes = int(fc["bias"].shape[0]) if fc else 0
    num_params = sum(int(np.prod(v.shape)) for v in _leaves(variables["params"]))
    sha256 = file_sha256(torch_checkpoint)
    ckpt.save_model_variables(
        output, arch, {"num_classes": num_classes}, variables,
        source=os.path.basename(torch_checkpoint), source_sha256=sha256,
    )
    return {"arch": arch, "num_classes": num_classes, "params": num_params, "output": output,
            "source": torch_checkpoint, "sha256": sha256}


def _leaves(tree: Mapping[str, Any]):
    for value in tree.values():
        if isinstance(value, Mapping):
            yield from _leaves(value)
        else:
            yield value


__all__ = [
    "convert_torch_checkpoint", "file_sha256", "load_torch_checkpoint", "name_map", "torch_key",
    "torch_state_dict_to_flax",
]
