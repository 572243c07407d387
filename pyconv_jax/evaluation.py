"""Evaluate and predict with a checkpoint directory (from training or the converter).

The checkpoint records the model name and constructor arguments, so nothing else is needed. The
evaluation preprocessing is the authors': resize the shorter side (bilinear, antialiased as PIL
does), center crop, ImageNet mean/std.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pyconv_jax import checkpoint as ckpt
from pyconv_jax import data
from pyconv_jax.train import steps
from pyconv_jax.train.loop import evaluate, make_mesh


def load_for_inference(path: str, sharding: jax.sharding.Sharding | None = None):
    """``(model, variables, meta)`` of the latest checkpoint under ``path``."""
    meta, variables = ckpt.restore_model_variables(ckpt.resolve_checkpoint_dir(path), sharding=sharding)
    return ckpt.build_model(meta), variables, meta


def evaluate_checkpoint(
    path: str, *, dataset: str = "imagenet2012", split: str = "validation",
    data_dir: str | None = None, resize: int = 256, crop: int = 224, batch_size: int = 250,
) -> dict[str, float]:
    """Loss, top-1 and top-5 of the checkpoint at ``path`` on every example of ``split``."""
    if resize < crop:
        raise ValueError(f"--resize={resize} is smaller than --crop={crop}; use resize >= crop.")
    mesh = make_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    model, variables, _ = load_for_inference(path, replicated)
    info = data.get_dataset_info(dataset, data_dir)
    num_outputs = variables["params"]["fc"]["bias"].shape[0]
    if num_outputs != info.num_classes:
        raise ValueError(
            f"the checkpoint predicts {num_outputs} classes but {dataset} has {info.num_classes}; "
            "evaluate on the dataset it was trained for."
        )
    state = steps.TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
        tx=optax.identity())
    eval_step = jax.jit(steps.eval_step, in_shardings=(replicated, batch_sharding),
                        out_shardings=replicated)
    return evaluate(state, eval_step, batch_sharding, dataset=dataset, split=split,
                    data_dir=data_dir, image_size=crop, resize_size=resize, batch_size=batch_size)


def class_names(meta: dict[str, Any], num_classes: int) -> list[str]:
    """Label names of the dataset the checkpoint was trained on (ImageNet for converted weights)."""
    import tensorflow_datasets as tfds

    name = meta.get("dataset") or ("imagenet2012" if num_classes == 1000 else None)
    try:
        names = list(tfds.builder(name).info.features["label"].names) if name else []
    except Exception:  # an unprepared or unknown dataset: fall back to indices
        names = []
    return names if len(names) == num_classes else [f"class {i}" for i in range(num_classes)]


def predict_files(path: str, files: Sequence[str], *, resize: int = 256, crop: int = 224,
                  top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k ``(class name, probability)`` for each image file."""
    import tensorflow as tf

    model, variables, meta = load_for_inference(path)
    images = []
    for f in files:
        try:
            raw = tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
            raise ValueError(f"cannot read {f!r} as an image ({err.message.splitlines()[0]}).") from None
        images.append(data.preprocess_eval(raw, image_size=crop, resize_size=resize).numpy())
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, np.stack(images))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    names = class_names(meta, probs.shape[-1])
    return [[(names[i], float(p[i])) for i in np.argsort(-p)[:top_k]] for p in probs]
