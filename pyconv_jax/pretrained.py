"""Load pretrained (converted or trained) weights: ``model, variables = load_pretrained(name)``.

The authors publish PyTorch ``.pth`` files (links in the README of github.com/iduta/pyconv).
They are converted once into a checkpoint directory, by default in the cache
``$PYCONV_JAX_CACHE/<name>`` (or ``~/.cache/pyconv_jax/<name>``)::

    python scripts/convert_checkpoint.py --arch pyconvresnet50 \\
        --torch_checkpoint pyconvresnet50.pth --output ~/.cache/pyconv_jax/pyconvresnet50

Nothing is downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pyconv_jax import checkpoint as ckpt
from pyconv_jax.models.registry import get_spec
from pyconv_jax.models.specs import MODEL_SPECS

AUTHORS_REPO = "https://github.com/iduta/pyconv"
CACHE_ENV = "PYCONV_JAX_CACHE"


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """One released ImageNet checkpoint of the authors."""

    name: str  # registry name
    weights_file: str  # the .pth file linked from the authors' README
    top1: float | None  # published ImageNet top-1 (%), single 224 crop after resize 256


PRETRAINED: dict[str, PretrainedWeights] = {
    name: PretrainedWeights(name, spec.published.weights_file, spec.published.top1)
    for name, spec in MODEL_SPECS.items()
    if spec.published.weights_file
}


def cache_dir(name: str) -> str:
    """Default directory of ``name``'s converted checkpoint."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "pyconv_jax")
    root = os.environ.get(CACHE_ENV) or default
    return os.path.join(root, name)


def conversion_instructions(name: str, output: str | None = None) -> str:
    """How to obtain the converted checkpoint of ``name`` (the file and the one command)."""
    output = output or cache_dir(name)
    weights = PRETRAINED.get(name)
    if weights is None:
        return (
            f"the authors publish no ImageNet weights for {name}; train it with scripts/train.py "
            "and pass the workdir as the path, or pick one of: "
            + ", ".join(sorted(PRETRAINED)) + "."
        )
    top1 = f", published top-1 {weights.top1:.2f}%" if weights.top1 is not None else ""
    return (
        f"download {weights.weights_file} ({name}{top1}) from the links in the README of "
        f"{AUTHORS_REPO}, then convert it once: python scripts/convert_checkpoint.py --arch {name} "
        f"--torch_checkpoint {weights.weights_file} --output {output}"
    )


def load_pretrained(
    name: str, path: str | None = None, mesh: Mesh | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(model, {"params", "batch_stats"})`` of registered model ``name`` from a checkpoint.

    Args:
      name: registry name; must equal the model recorded in the checkpoint.
      path: a directory written by ``scripts/convert_checkpoint.py`` or a training workdir;
        default: the cache directory (``$PYCONV_JAX_CACHE/<name>`` or
        ``~/.cache/pyconv_jax/<name>``).
      mesh: place the variables replicated on this mesh; default the first local device.

    The model is rebuilt with the checkpoint's recorded arguments (e.g. ``num_classes``).
    Raises ``FileNotFoundError`` (saying which ``.pth`` to download and how to convert it) when
    there is no checkpoint, ``ValueError`` when it holds a different model.
    """
    get_spec(name)  # unknown names list the registered ones
    directory = os.path.expanduser(path if path is not None else cache_dir(name))
    directory = ckpt.resolve_checkpoint_dir(directory)
    if not ckpt.has_checkpoint(directory):
        where = "the cache" if path is None else "the given path"
        raise FileNotFoundError(
            f"no converted checkpoint for {name} at {directory!r} ({where}); "
            + conversion_instructions(name, None if path is None else path)
        )
    recorded = ckpt.read_meta(directory)["model"]  # checked before reading any weights
    if recorded != name:
        raise ValueError(
            f"the checkpoint at {directory!r} holds {recorded!r}, not {name!r}; call "
            f"load_pretrained({recorded!r}, ...) or convert the right file with --arch {name}."
        )
    sharding = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    meta, variables = ckpt.restore_model_variables(directory, sharding=sharding)
    return ckpt.build_model(meta), variables


__all__ = ["PRETRAINED", "PretrainedWeights", "cache_dir", "conversion_instructions",
           "load_pretrained"]
