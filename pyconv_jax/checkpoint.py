"""Checkpoint directories: one orbax layout for training runs and converted weights.

A checkpoint directory is an orbax ``CheckpointManager`` directory (``<dir>/<step>/...``); every
step holds up to three items:

- ``model``: ``{"params": ..., "batch_stats": ...}``, the variables a model needs to run;
- ``train``: the rest of a training state (optimizer state and step, which also fixes where the
  input resumes); training only;
- ``meta``: JSON ``{"model": registry name, "model_kwargs": {...}, "format": 1, ...}``, enough to
  rebuild the model with :func:`pyconv_jax.create_model`.

orbax writes each step under a temporary name and renames it when complete, so a crash during a
save never leaves a step that ``latest_step`` would pick. What a rename cannot catch (a file
damaged later on disk) the ``meta`` item's ``checksums`` do: a digest of every saved array,
checked on every restore, because orbax restores a flipped byte in array data silently.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pyconv_jax import models

MODEL, TRAIN, META = "model", "train", "meta"
ITEM_NAMES = (MODEL, TRAIN, META)
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint is intact but was written for another model or configuration."""


class DamagedCheckpointError(ValueError):
    """The checkpoint's arrays do not match the checksums recorded when it was written."""


def tree_checksum(tree: Any) -> str:
    """A digest of every leaf's path, dtype, shape and bytes, for trees replicated on each host.

    Only the first addressable shard of each ``jax.Array`` is read, which is the whole array for
    the replicated training state and converted weights this project saves.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def verify_checksum(meta: dict[str, Any], item: str, tree: Any, where: str) -> None:
    """Raises :class:`DamagedCheckpointError` if ``tree`` differs from what was saved as ``item``.

    Checkpoints written before checksums existed (no ``checksums`` in ``meta``) pass unchecked.
    """
    expected = meta.get("checksums", {}).get(item)
    if expected is not None and tree_checksum(tree) != expected:
        raise DamagedCheckpointError(
            f"{where}: the {item!r} arrays do not match the checksum recorded when they were "
            "saved (the files were damaged after writing)."
        )


def quarantine_step(directory: str, step: int) -> str:
    """Moves step ``step`` of ``directory`` to ``<directory>.damaged/<step>-<time>``; returns it.

    The damaged files are kept for inspection instead of deleted, and moved out of the manager's
    directory so that no later start picks them and the step number can be written again.
    """
    target = os.path.join(f"{os.path.abspath(directory)}.damaged", f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(directory, str(step)), target)
    return target


def jsonable_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model constructor arguments as JSON values (dtypes by name, tuples as lists)."""

    def convert(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (np.dtype, type)):
            return jnp.dtype(value).name
        if isinstance(value, np.generic):
            return value.item()
        return value

    return {k: convert(v) for k, v in kwargs.items()}


def make_meta(model_name: str, model_kwargs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``meta`` item: what :func:`build_model` needs to rebuild the model."""
    return {"format": FORMAT_VERSION, "model": model_name, "model_kwargs": jsonable_kwargs(model_kwargs), **extra}


def open_manager(
    directory: str,
    *,
    max_to_keep: int | None = None,
    async_save: bool = False,
    create: bool = True,
    cleanup_tmp: bool = False,
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` over ``directory`` with this project's items.

    ``cleanup_tmp`` deletes unfinished saves (left by a crash); only the process that owns the
    directory (the training run) may ask for it, or it would delete a save in progress.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=cleanup_tmp,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEM_NAMES)


def has_checkpoint(directory: str) -> bool:
    return os.path.isdir(directory) and open_manager(directory, create=False).latest_step() is not None


def _require_checkpoint(directory: str) -> ocp.CheckpointManager:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist.")
    manager = open_manager(directory, create=False)
    if manager.latest_step() is None:
        raise FileNotFoundError(
            f"{directory!r} holds no complete checkpoint; point at a training workdir or a "
            "directory written by scripts/convert_checkpoint.py."
        )
    return manager


def read_meta(directory: str, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` item of ``directory``'s latest (or given) step."""
    manager = _require_checkpoint(directory)
    step = manager.latest_step() if step is None else step
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"checkpoint {directory!r} step {step} has no model metadata.")
    return meta


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory, or a training workdir that keeps them in ``checkpoints/``."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def build_model(meta: dict[str, Any]):
    """Rebuilds the model recorded in ``meta``."""
    return models.create_model(meta["model"], **meta.get("model_kwargs", {}))


def restore_model_variables(
    directory: str, step: int | None = None, sharding: jax.sharding.Sharding | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores ``(meta, {"params", "batch_stats"})`` from a training or converted checkpoint.

    Variables are placed with ``sharding`` (default: replicated on the first local device), so a
    checkpoint written on any device count loads on any other.
    """
    manager = _require_checkpoint(directory)
    step = manager.latest_step() if step is None else step
    meta = read_meta(directory, step)
    model = build_model(meta)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        models.abstract_variables(model),
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(**{MODEL: ocp.args.StandardRestore(target)})
    )
    verify_checksum(meta, MODEL, restored[MODEL], f"checkpoint {directory!r} step {step}")
    return meta, restored[MODEL]


def save_model_variables(
    directory: str, model_name: str, model_kwargs: dict[str, Any], variables: dict[str, Any],
    step: int = 0, **extra_meta: Any,
) -> None:
    """Writes a loadable checkpoint (``model`` + ``meta`` items) of ``variables`` to ``directory``.

    Refuses to write into a directory that already holds checkpoints, so nothing is overwritten.
    """
    if has_checkpoint(directory):
        raise FileExistsError(
            f"{directory!r} already holds a checkpoint; choose a new output directory."
        )
    model_vars = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    manager = open_manager(directory)
    meta = make_meta(model_name, model_kwargs, **extra_meta)
    meta["checksums"] = {MODEL: tree_checksum(model_vars)}
    manager.save(
        step,
        args=ocp.args.Composite(**{
            MODEL: ocp.args.StandardSave(model_vars),
            META: ocp.args.JsonSave(meta),
        }),
    )
    manager.wait_until_finished()
    manager.close()
