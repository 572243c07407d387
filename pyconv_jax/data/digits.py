"""The embedded ``digits`` dataset: scikit-learn's 1,797 8x8 handwritten digits as a tfds dataset.

Why a tfds dataset: the demo and the tests then run through exactly the same input pipeline as
ImageNet (``tfds.builder(...).as_dataset``, encoded images, split slicing, per-process shares),
with no network and no manual download. The pixels come from the copy of the UCI "Optical
Recognition of Handwritten Digits" test set that scikit-learn ships inside its wheel
(``sklearn.datasets.load_digits``), so preparing it only reads a local file.

Features
  ``image``: uint8 [8, 8, 1]; the original 0..16 intensities rescaled to 0..255 with
    ``round(v * 255 / 16)`` (0 stays 0, 16 becomes 255). Stored PNG-encoded like every tfds image.
  ``label``: ``ClassLabel(num_classes=10)``, the digit.

Splits (fixed, stratified, independent of library versions)
  ``test``: 360 examples, ``train``: 1,437 examples. For each class ``c`` with ``n_c`` examples
  the test share is ``n_c * 360 / 1797`` rounded by the largest-remainder rule (ties broken by the
  smaller class id) so the shares sum to exactly 360 (35 to 37 per class). Inside a class, the
  examples are ordered by ``sha256(f"{SPLIT_SEED}:{index}")`` (``index`` = row in the
  scikit-learn array) and the first ones go to ``test``. A hash rather than a NumPy RNG keeps the
  split identical across NumPy/scikit-learn versions.

Preparing: ``tfds.builder("digits", data_dir=...).download_and_prepare()`` writes the usual tfds
files under ``data_dir/digits/1.0.0`` in about a second; :func:`prepare_digits` does that with
every remote option off, and the input pipeline calls it on first use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

SPLIT_SEED = 0
NUM_TEST = 360
NUM_TRAIN = 1437
NUM_EXAMPLES = NUM_TRAIN + NUM_TEST

_HOMEPAGE = "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"
_CITATION = r"""@misc{alpaydin1998digits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}"""


def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [1797, 8, 8, 1] on 0..255, labels int64 [1797]) from scikit-learn."""
    from sklearn.datasets import load_digits  # local file inside the sklearn wheel

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], values 0..16
    images = np.rint(raw * 255.0 / 16.0).clip(0, 255).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return images, labels


def split_indices(
    labels: np.ndarray, num_test: int = NUM_TEST, seed: int = SPLIT_SEED
) -> dict[str, np.ndarray]:
    """Stratified, hash-ordered train/test split of ``labels`` (see the module docstring).

    Returns ``{"train": int64 [N - num_test], "test": int64 [num_test]}`` of row indices, each
    sorted ascending.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    exact = counts * num_test / len(labels)
    take = np.floor(exact).astype(int)
    remainder = exact - take
    # Largest remainder first; stable sort keeps the smaller class id first on ties.
    for i in np.argsort(-remainder, kind="stable")[: num_test - int(take.sum())]:
        take[i] += 1
    test, train = [], []
    for c, k in zip(classes, take):
        rows = np.flatnonzero(labels == c)
        order = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{int(r)}".encode()).hexdigest())
        test.extend(order[:k])
        train.extend(order[k:])
    return {"train": np.sort(np.array(train, np.int64)), "test": np.sort(np.array(test, np.int64))}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (1,437 train / 360 test), prepared offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: stratified 1,437/360 split, images rescaled to 0..255."
    }
    # tfds derives `code_path` through `importlib_resources`, which tfds only declares as a
    # dependency on Python < 3.9; on newer Pythons without it `download_and_prepare` crashes.
    # The class lives in this file, so say so directly.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "1,797 8x8 grayscale handwritten digits (UCI optdigits test set as shipped by "
                "scikit-learn), rescaled from 0..16 to 0..255, with a fixed stratified split."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # nothing to download: the data is inside scikit-learn
        images, labels = _load_arrays()
        splits = split_indices(labels)
        return {
            name: self._generate_examples(images, labels, rows) for name, rows in splits.items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for r in rows:
            yield int(r), {"image": images[r], "label": int(labels[r])}


def prepare_digits(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the ``digits`` builder for ``data_dir``, preparing it first if needed (offline)."""
    builder = tfds.builder("digits", data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return builder
