"""Input pipeline: tfds + tf.data, per-process shards, deterministic and resumable training streams.

Importing this package imports TensorFlow (kept off any GPU) and registers the embedded tfds
dataset ``digits``, so ``tfds.builder("digits", data_dir=...)`` works.

    from pyconv_jax import data
    info = data.get_dataset_info("digits", data_dir)
    train = data.create_train_iterator("digits", split="train", data_dir=data_dir, image_size=32,
                                       local_batch_size=64, seed=0, augment="none")
    batch = next(train)  # {"image": float32 [64, 32, 32, 3], "label": int32 [64]}
"""

import os

# Quieten TensorFlow's C++ logs unless the user chose a level; must precede its first import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pyconv_jax.data.digits import Digits, prepare_digits
from pyconv_jax.data.pipeline import (
    undecodable_files,
    DatasetError,
    DatasetInfo,
    DatasetNotPreparedError,
    EvalIterator,
    UnknownDatasetError,
    create_eval_iterator,
    create_train_iterator,
    get_dataset_info,
    make_eval_dataset,
    make_train_dataset,
    num_eval_batches,
)
from pyconv_jax.data.preprocess import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    default_resize_size,
    normalize,
    preprocess_eval,
    preprocess_train,
)

__all__ = [
    "undecodable_files",
    "AUGMENTATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "Digits",
    "EvalIterator",
    "UnknownDatasetError",
    "create_eval_iterator",
    "create_train_iterator",
    "default_resize_size",
    "get_dataset_info",
    "make_eval_dataset",
    "make_train_dataset",
    "normalize",
    "num_eval_batches",
    "prepare_digits",
    "preprocess_eval",
    "preprocess_train",
]
