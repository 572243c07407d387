"""Model registry: build any registered architecture by name, list them, read their metadata."""

from __future__ import annotations

import fnmatch
from typing import Any

import jax
import jax.numpy as jnp

from pyconv_jax.models.resnet import ResNet
from pyconv_jax.models.specs import MODEL_SPECS, ModelSpec


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob such as ``"pyconv*"``."""
    names = sorted(MODEL_SPECS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; an unknown name lists the known ones."""
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}."
        ) from None


def _normalise_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Accepts config-friendly values: dtype names as strings, lists for tuples."""
    out = dict(overrides)
    for key in ("dtype", "param_dtype"):
        if isinstance(out.get(key), str):
            out[key] = jnp.dtype(out[key])
    for key in ("pyconv_kernels", "pyconv_groups"):
        if key in out and out[key] is not None:
            out[key] = tuple(tuple(int(v) for v in stage) for stage in out[key])
    return {k: v for k, v in out.items() if v is not None}


def create_model(name: str, **overrides: Any) -> ResNet:
    """Builds the registered model ``name``; keyword overrides replace its :class:`ResNet` fields.

    Example: ``create_model("pyconvresnet50", num_classes=10, dtype=jnp.bfloat16)``.
    """
    spec = get_spec(name)
    kwargs = spec.model_kwargs()
    overrides = _normalise_overrides(overrides)
    unknown = sorted(set(overrides) - set(ResNet.__dataclass_fields__) - {"parent", "name"})
    if unknown:
        raise ValueError(
            f"create_model({name!r}): unknown argument(s) {unknown}; valid ones are "
            f"{sorted(f for f in ResNet.__dataclass_fields__ if f not in ('parent', 'name'))}."
        )
    kwargs.update(overrides)
    return ResNet(**kwargs)


def abstract_variables(model, image_size: int = 32) -> dict[str, Any]:
    """Shapes and dtypes of ``model``'s ``params`` and ``batch_stats``, traced without compute
    (the targets of a checkpoint restore and of a weight conversion)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
