"""Tests of the input pipeline (pyconv_jax.data): offline, on CPU, small images.

The embedded digits dataset is prepared once per session in a temporary tfds data_dir, with
socket connections refused (and recorded) to show that preparing it needs no network.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import socket
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from pyconv_jax import data
from pyconv_jax.data import digits as digits_lib

MEAN = np.asarray(data.IMAGENET_MEAN, np.float32)
STD = np.asarray(data.IMAGENET_STD, np.float32)


@contextlib.contextmanager
def no_network():
    """Refuses every outgoing connection and records the attempts."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in tests: {address}")

    with (
        mock.patch.object(socket.socket, "connect", refuse),
        mock.patch.object(socket.socket, "connect_ex", refuse),
    ):
        yield attempts


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    with no_network() as attempts:
        data.prepare_digits(root)
    assert attempts == []
    return root


def denormalize(images: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float images -> 0..1 scale."""
    return images * STD + MEAN


def example_keys(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, bytes]]:
    """Hashable identity of examples: (label, image rounded to 1e-3)."""
    rounded = np.round(images, 3).astype(np.float32)
    return [(int(l), rounded[i].tobytes()) for i, l in enumerate(labels)]


def take_examples(iterator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` examples of a batch iterator (images, labels)."""
    images, labels = [], []
    while sum(len(l) for l in labels) < count:
        batch = next(iterator)
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def eval_examples(iterator) -> tuple[np.ndarray, np.ndarray, int]:
    """All real (mask=True) examples of an eval iterator and its number of batches."""
    images, labels, n = [], [], 0
    for batch in iterator:
        n += 1
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(images), np.concatenate(labels), n


# --------------------------------------------------------------------------------------------
# The digits builder.


def test_digits_builder(data_dir):
    builder = tfds.builder("digits", data_dir=data_dir)
    assert builder.is_prepared()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 1437,
        "test": 360,
    }
    assert builder.info.features["label"].num_classes == 10

    sk_images, sk_labels = digits_lib._load_arrays()
    for split in ("train", "test"):
        ds = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels = ds["image"], ds["label"]
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
        assert labels.min() == 0 and labels.max() == 9
        assert images.min() == 0 and images.max() == 255
        # Same pixels as scikit-learn's rows for that split (as multisets; tfds reorders).
        rows = digits_lib.split_indices(sk_labels)[split]
        expected = collections.Counter(example_keys(sk_images[rows], sk_labels[rows]))
        assert collections.Counter(example_keys(images, labels)) == expected
        if split == "test":  # stratified: 35..37 per class, summing to 360
            counts = np.bincount(labels, minlength=10)
            assert counts.sum() == 360 and counts.min() >= 35 and counts.max() <= 37

    split = digits_lib.split_indices(sk_labels)
    assert len(np.intersect1d(split["train"], split["test"])) == 0
    assert len(split["train"]) + len(split["test"]) == 1797


# --------------------------------------------------------------------------------------------
# Training iterator.


def test_train_batches_shapes_and_normalisation(data_dir):
    it = data.create_train_iterator(
        "digits", data_dir=data_dir, image_size=16, local_batch_size=32, seed=0, augment="none"
    )
    batch = next(it)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9
    pixels = denormalize(batch["image"])
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # Grayscale became three equal channels; background (0) maps to -mean/std.
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)
    np.testing.assert_allclose(batch["image"].min(axis=(0, 1, 2)), -MEAN / STD, atol=1e-5)


def test_train_is_deterministic(data_dir):
    kwargs = {
        "data_dir": data_dir,
        "image_size": 12,
        "local_batch_size": 16,
        "augment": "inception_crop",
    }
    a = [
        next(it)
        for it in [data.create_train_iterator("digits", seed=3, **kwargs)]
        for _ in range(4)
    ]
    b = [
        next(it)
        for it in [data.create_train_iterator("digits", seed=3, **kwargs)]
        for _ in range(4)
    ]
    c = next(data.create_train_iterator("digits", seed=4, **kwargs))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c["image"])


def test_train_resume_equals_fresh_stream(data_dir):
    """start_step=k yields exactly the fresh stream after k batches: mid-block, across a block
    boundary and in the second epoch (1437 examples, blocks of ~288, batches of 32)."""
    kwargs = {
        "data_dir": data_dir,
        "image_size": 12,
        "local_batch_size": 32,
        "seed": 7,
        "augment": "inception_crop",
        "shuffle_buffer": 300,
    }
    fresh = data.create_train_iterator("digits", **kwargs)
    stream = [next(fresh) for _ in range(60)]  # 1920 examples: 1.3 epochs
    for k in (13, 46):  # 416: inside the 2nd block; 1472: epoch 1, offset 35
        resumed = data.create_train_iterator("digits", start_step=k, **kwargs)
        for i in range(k, 60):
            batch = next(resumed)
            np.testing.assert_array_equal(
                batch["label"], stream[i]["label"], err_msg=f"k={k} i={i}"
            )
            np.testing.assert_array_equal(
                batch["image"], stream[i]["image"], err_msg=f"k={k} i={i}"
            )


def test_train_epochs_and_process_shares(data_dir):
    """Each process's epoch is a permutation of its share; the shares of 2 processes are
    disjoint and together are the whole train split; epochs are reshuffled."""
    whole_images, whole_labels, _ = eval_examples(
        data.create_eval_iterator(
            "digits",
            split="train",
            data_dir=data_dir,
            image_size=8,
            resize_size=8,
            local_batch_size=256,
        )
    )
    whole = collections.Counter(example_keys(whole_images, whole_labels))
    assert sum(whole.values()) == 1437

    union = collections.Counter()
    for index, n_local in ((0, 718), (1, 719)):
        it = data.create_train_iterator(
            "digits",
            data_dir=data_dir,
            image_size=8,
            local_batch_size=50,
            seed=1,
            augment="none",
            process_index=index,
            process_count=2,
            shuffle_buffer=250,
        )
        images, labels = take_examples(it, 2 * n_local)
        epoch0 = example_keys(images[:n_local], labels[:n_local])
        epoch1 = example_keys(images[n_local:], labels[n_local:])
        assert collections.Counter(epoch0) == collections.Counter(epoch1)
        assert epoch0 != epoch1  # a new order every epoch
        assert set(labels) == set(range(10))
        union += collections.Counter(epoch0)
    assert union == whole


def test_train_labels_stay_with_their_images(data_dir):
    """A 1-nearest-neighbour classifier over one shuffled training epoch (blocks, 2 processes
    merged) scores > 95% on the test split (~98% expected on digits): images and labels were
    permuted together. A label/image mix-up would give ~10%."""
    images, labels = [], []
    for index, n_local in ((0, 718), (1, 719)):
        it = data.create_train_iterator(
            "digits",
            data_dir=data_dir,
            image_size=8,
            local_batch_size=64,
            seed=2,
            augment="none",
            process_index=index,
            process_count=2,
            shuffle_buffer=200,
        )
        x, y = take_examples(it, n_local)
        images.append(x[..., 0].reshape(n_local, -1))
        labels.append(y)
    test_x, test_y, _ = eval_examples(
        data.create_eval_iterator(
            "digits:1.0.0",
            split="test",
            data_dir=data_dir,
            image_size=8,
            resize_size=8,
            local_batch_size=128,
        )
    )
    train_x, train_y = np.concatenate(images), np.concatenate(labels)
    test_x = test_x[..., 0].reshape(len(test_y), -1)
    distances = ((test_x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)  # [360, 1437]
    accuracy = (train_y[distances.argmin(1)] == test_y).mean()
    assert accuracy > 0.95, accuracy


# --------------------------------------------------------------------------------------------
# Evaluation iterator.


def test_eval_covers_split_exactly_once(data_dir):
    builder = tfds.builder("digits", data_dir=data_dir)
    test_labels = tfds.as_numpy(builder.as_dataset(split="test", batch_size=-1))["label"]

    it = data.create_eval_iterator(
        "digits",
        split="test",
        data_dir=data_dir,
        image_size=16,
        resize_size=16,
        local_batch_size=64,
    )
    assert len(it) == math.ceil(360 / 64)
    batches = list(it)
    assert len(batches) == len(it)
    for b in batches:
        assert b["image"].shape == (64, 16, 16, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert mask.sum() == 360 and mask[:360].all() and not mask[360:].any()
    np.testing.assert_array_equal(
        np.bincount(labels[mask], minlength=10), np.bincount(test_labels, minlength=10)
    )
    assert (images[~mask] == 0).all() and (labels[~mask] == 0).all()

    one = collections.Counter(example_keys(images[mask], labels[mask]))
    for split, shares in (("test", (180, 180)), ("test[:359]", (179, 180))):
        union, lengths = collections.Counter(), []
        for index in range(2):
            it = data.create_eval_iterator(
                "digits",
                split=split,
                data_dir=data_dir,
                image_size=16,
                resize_size=16,
                local_batch_size=50,
                process_index=index,
                process_count=2,
            )
            imgs, lbls, n = eval_examples(it)
            assert n == len(it) and len(lbls) == shares[index]
            lengths.append(n)
            union += collections.Counter(example_keys(imgs, lbls))
        assert lengths == [4, 4]  # from the largest share, 180
        if split == "test":
            assert union == one
        else:
            assert sum(union.values()) == 359 and not union - one


# --------------------------------------------------------------------------------------------
# ImageNet-style path: tfds mock data with encoded JPEGs of varied sizes.

NUM_FAKE = {"train": 40, "validation": 12}


def fake_label(index: int) -> int:
    return (index * 37 + 11) % 1000


def fake_jpeg(index: int) -> bytes:
    h, w = 40 + 7 * (index % 5), 48 + 9 * (index % 3)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy + 17 * index) % 256], -1).astype(
        np.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Replaces the tfds file reader: honours split slices, images are real JPEG bytes."""
    del read_config, shuffle_files
    spec = split if isinstance(split, str) else str(split)
    (part,) = tfds.core.ReadInstruction.from_spec(spec).to_absolute(self.info.splits)
    lo = part.from_ or 0
    hi = NUM_FAKE[part.splitname] if part.to is None else part.to
    offset = 0 if part.splitname == "train" else 1000
    idx = range(offset + lo, offset + hi)
    ds = tf.data.Dataset.from_tensor_slices(
        {
            "image": [fake_jpeg(i) for i in idx],
            "label": np.asarray([fake_label(i) for i in idx], np.int64),
            "file_name": [f"{i}.JPEG" for i in idx],
        }
    )
    if not (decoders and "image" in decoders):
        ds = ds.map(lambda ex: {**ex, "image": tf.io.decode_jpeg(ex["image"], channels=3)})
    return ds


@pytest.fixture
def mock_imagenet(tmp_path):
    root = str(tmp_path)
    builder = tfds.builder("imagenet2012", data_dir=root)
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name=k, shard_lengths=[n], num_bytes=0)
                for k, n in NUM_FAKE.items()
            ]
        )
    )
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(data_dir=root, as_dataset_fn=fake_as_dataset):
        yield root


def test_imagenet_style_pipeline_with_mock_data(mock_imagenet):
    info = data.get_dataset_info("imagenet2012", mock_imagenet)
    assert info.num_classes == 1000 and dict(info.splits) == NUM_FAKE
    assert info.eval_split == "validation"
    assert info.num_examples("train[:25%]") == 10

    kwargs = {
        "data_dir": mock_imagenet,
        "image_size": 32,
        "local_batch_size": 8,
        "seed": 0,
        "augment": "inception_crop",
        "shuffle_buffer": 16,
    }
    fresh = data.create_train_iterator("imagenet2012", **kwargs)
    stream = [next(fresh) for _ in range(7)]  # 56 examples: past the first epoch of 40
    assert stream[0]["image"].shape == (8, 32, 32, 3) and stream[0]["label"].dtype == np.int32
    first_epoch = np.concatenate([b["label"] for b in stream])[:40]
    assert sorted(first_epoch) == sorted(fake_label(i) for i in range(40))
    pixels = denormalize(np.stack([b["image"] for b in stream]))
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    resumed = data.create_train_iterator("imagenet2012", start_step=3, **kwargs)
    for i in range(3, 7):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], stream[i]["image"])
        np.testing.assert_array_equal(batch["label"], stream[i]["label"])

    for augment in ("resize_flip", "none"):
        batch = next(data.create_train_iterator("imagenet2012", **{**kwargs, "augment": augment}))
        assert batch["image"].shape == (8, 32, 32, 3)

    it = data.create_eval_iterator(
        "imagenet2012",
        split="validation",
        data_dir=mock_imagenet,
        image_size=32,
        local_batch_size=5,
    )
    assert len(it) == 3
    batches = list(it)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.sum() == 12 and batches[0]["image"].shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(labels[mask], [fake_label(1000 + i) for i in range(12)])


# --------------------------------------------------------------------------------------------
# Eval preprocessing against an independent reference.


def textured_image(h: int, w: int) -> np.ndarray:
    """A smooth colour gradient with some mid-frequency texture, uint8 [h, w, 3]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * xx / (w - 1)
    g = 255 * yy / (h - 1)
    b = 128 + 60 * np.sin(xx / 3.1) * np.cos(yy / 4.7) + 40 * np.sin((xx + yy) / 11.0)
    return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)


def pil_reference(image: np.ndarray, resize_size: int, crop: int) -> np.ndarray:
    """PIL: shorter side to resize_size (bilinear; PIL widens the filter when downscaling, i.e.
    antialiases), longer side int(size * long / short), then the central crop at (size-crop)//2."""
    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = resize_size, int(resize_size * w / h)
    else:
        new_h, new_w = int(resize_size * h / w), resize_size
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return resized[top : top + crop, left : left + crop]


@pytest.mark.parametrize("shape", [(300, 451), (97, 70)])  # downscale (antialiased) and upscale
def test_eval_resize_and_crop_matches_pil(shape):
    """Tolerance, in grey levels of 0..255: PIL rounds its output to uint8 (error <= 0.5) and
    applies its filter weights in 8-bit fixed point per pass (two passes, each <= ~0.5 more); TF
    keeps float32. Both are separable triangle filters with the same support (widened by the
    scale factor when downscaling) and the same pixel-centre alignment, so the mean difference
    stays well under one level (measured ~0.3) and the largest about one level (measured ~1.0):
    we require mean < 0.6 and max < 2. A wrong crop offset, a missing antialias or a
    corner-aligned resize each break these by several levels."""
    image = textured_image(*shape)
    encoded = tf.io.encode_png(image)
    out = data.preprocess_eval(encoded, image_size=112, resize_size=128).numpy()
    assert out.shape == (112, 112, 3)
    ours = denormalize(out) * 255.0
    ref = pil_reference(image, 128, 112)
    diff = np.abs(ours - ref)
    assert diff.mean() < 0.6, diff.mean()
    assert diff.max() < 2.0, diff.max()


def test_train_crop_is_inside_and_stateless():
    """The random-resized crop depends only on the seed; flips happen for about half the seeds."""
    image = tf.constant(textured_image(60, 80))
    seed = tf.constant([5, 9], tf.int64)
    a = data.preprocess_train(image, seed, image_size=24, augment="inception_crop").numpy()
    b = data.preprocess_train(image, seed, image_size=24, augment="inception_crop").numpy()
    np.testing.assert_array_equal(a, b)
    flipped = 0
    base = data.preprocess_train(image, seed, image_size=24, augment="none").numpy()
    for s in range(20):
        out = data.preprocess_train(
            image, tf.constant([s, 1], tf.int64), image_size=24, augment="resize_flip"
        )
        flipped += int(np.allclose(out.numpy(), base[:, ::-1]))
    assert 3 <= flipped <= 17


# --------------------------------------------------------------------------------------------
# Image folders.


def test_image_folder(tmp_path):
    root = tmp_path / "folder"
    counts = {"train": {"cat": 5, "dog": 4}, "val": {"cat": 2, "dog": 3}}
    for split, classes in counts.items():
        for cls, n in classes.items():
            os.makedirs(root / split / cls)
            for i in range(n):
                img = textured_image(20 + i, 30)
                Image.fromarray(img).save(root / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    name = f"imagefolder:{root}"
    info = data.get_dataset_info(name)
    reference = tfds.ImageFolder(str(root)).info
    assert info.class_names == tuple(reference.features["label"].names) == ("cat", "dog")
    assert dict(info.splits) == {k: v.num_examples for k, v in reference.splits.items()}

    _imgs, labels, _ = eval_examples(
        data.create_eval_iterator(
            name, split="val", image_size=16, resize_size=16, local_batch_size=4
        )
    )
    assert sorted(labels) == [0, 0, 1, 1, 1]
    batch = next(data.create_train_iterator(name, image_size=16, local_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 16, 16, 3)


# --------------------------------------------------------------------------------------------
# Image folders with bad files and unusual colour modes.

# Files that are not images: left out when the folder is scanned.
NOT_IMAGES = ("a/text.jpg", "b/empty.jpg", "c/empty.png")
TRUNCATED = "c/truncated.jpg"  # a JPEG signature, but fails to decode: left out where decoded
# JPEG decoding tolerance, in grey levels of 0..255. Every test image is made of flat 8x8 blocks
# saved without chroma subsampling, so each JPEG block holds only its DC coefficient and the IDCT
# is nearly exact; what remains is TensorFlow's default INTEGER_FAST IDCT against PIL's ISLOW
# (measured: up to 3 levels for RGB, 0 for grayscale) and, for CMYK, the two conversions' rounding
# of C*K (1 level; with dct_method="INTEGER_ACCURATE" RGB and grayscale equal PIL bitwise). An
# unconverted CMYK image, a K channel ignored (109 levels here) or one channel taken as gray is off
# by tens of levels, and the files' own colours differ by 127 or more. PNG is lossless: only
# float rounding.
JPEG_TOLERANCE, PNG_TOLERANCE = 4.0, 0.01


def write_messy_image_folder(root) -> dict[str, tuple[np.ndarray, int, float]]:
    """``root/train/<a|b|c>/...``: 16x16 images in every colour mode plus bad files.

    Returns {relative path: (PIL's RGB conversion as float [16, 16, 3], label, tolerance)} for
    the files that decode. Each image has its own four block colours, so outputs can be matched
    back to the file they came from.
    """
    rng = np.random.default_rng(0)

    def blocks(channels: int) -> np.ndarray:
        return np.kron(rng.integers(0, 256, (2, 2, channels)), np.ones((8, 8, 1))).astype(np.uint8)

    def rgb() -> Image.Image:
        return Image.fromarray(blocks(3))

    images = {
        "a/rgb.jpg": rgb(),
        "a/gray.jpg": Image.fromarray(blocks(1)[..., 0]),
        "a/cmyk.jpg": Image.fromarray(blocks(4), mode="CMYK"),  # K channel not zero
        "b/gray.png": Image.fromarray(blocks(1)[..., 0]),
        "b/rgba.png": Image.fromarray(blocks(4), mode="RGBA"),  # alpha dropped, not blended
        "b/palette.png": rgb().convert("P", palette=Image.ADAPTIVE, colors=4),
        "c/png_named.jpg": rgb(),  # PNG bytes in a .jpg
        "c/rgb.jpg": rgb(),
    }
    expected = {}
    for rel, image in images.items():
        path = root / "train" / rel
        os.makedirs(path.parent, exist_ok=True)
        if rel.endswith(".png") or rel == "c/png_named.jpg":
            image.save(path, format="PNG")
            tolerance = PNG_TOLERANCE
        else:
            image.save(path, format="JPEG", quality=90, subsampling=0)
            tolerance = JPEG_TOLERANCE
        pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)
        expected[rel] = (pixels, "abc".index(rel[0]), tolerance)
    for rel in NOT_IMAGES:
        (root / "train" / rel).write_bytes(b"" if "empty" in rel else b"not an image\n")
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=90)
    (root / "train" / TRUNCATED).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return expected


def match_files(images: np.ndarray, labels: np.ndarray, expected) -> list[str]:
    """The file each normalised output image came from (the nearest expected image), checking
    its label and that it is within that file's tolerance of PIL's RGB conversion."""
    names = []
    for image, label in zip(denormalize(images) * 255.0, labels):
        diffs = {rel: np.abs(image - pixels).max() for rel, (pixels, _, _) in expected.items()}
        rel = min(diffs, key=diffs.get)
        assert diffs[rel] <= expected[rel][2], (rel, diffs[rel])
        assert label == expected[rel][1], rel
        names.append(rel)
    return names


def test_image_folder_skips_bad_files_in_eval_and_matches_pil(tmp_path, caplog):
    """Non-images are dropped at scan time (sizes exclude them, one warning); the truncated JPEG
    is dropped at decode time (a warning naming it); every other file is evaluated exactly once,
    on one process or two, with pixels equal to PIL's RGB conversion (tolerances above)."""
    expected = write_messy_image_folder(tmp_path)
    name = f"imagefolder:{tmp_path}"
    with caplog.at_level(logging.WARNING, logger="pyconv_jax.data"):
        info = data.get_dataset_info(name)
    assert dict(info.splits) == {"train": 9} and info.class_names == ("a", "b", "c")
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "skipped 3 of 12 files" in warning and "\n" not in warning
    assert all(f"train/{rel}" in warning for rel in NOT_IMAGES)
    caplog.clear()

    kwargs = {"split": "train", "image_size": 16, "resize_size": 16, "local_batch_size": 4}
    with caplog.at_level(logging.WARNING, logger="pyconv_jax.data"):
        it = data.create_eval_iterator(name, **kwargs)
        assert len(it) == 3  # from the 9 files kept at scan time
        images, labels, n = eval_examples(it)
    assert n == 3
    assert sorted(match_files(images, labels, expected)) == sorted(expected)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "1 image file(s) that fail to decode" in warning and TRUNCATED in warning

    names, lengths = [], []
    for index in range(2):
        it = data.create_eval_iterator(name, process_index=index, process_count=2, **kwargs)
        images, labels, n = eval_examples(it)
        lengths.append(n)
        names += match_files(images, labels, expected)
    assert lengths == [2, 2] and sorted(names) == sorted(expected)


def test_image_folder_bad_files_keep_training_resumable(tmp_path, caplog):
    """Training over a folder with bad files: full batches of kept files with their labels; the
    slot of the truncated JPEG (once per epoch of 9 positions) is filled by a file of the same
    batch, so 36 slots hold every good file 4 times plus 4 repeats; resuming at start_step equals
    the uninterrupted stream bitwise (a stream that dropped the slot would shift by one per
    epoch); with a batch of 1 the truncated slot becomes a blank (mean-colour) image."""
    expected = write_messy_image_folder(tmp_path)
    name = f"imagefolder:{tmp_path}"
    kwargs = {"image_size": 16, "local_batch_size": 4, "seed": 5, "shuffle_buffer": 4}
    with caplog.at_level(logging.WARNING, logger="pyconv_jax.data"):
        fresh = data.create_train_iterator(name, augment="none", **kwargs)
        stream = [next(fresh) for _ in range(9)]  # 36 positions: 4 epochs
    assert any(TRUNCATED in r.getMessage() for r in caplog.records)
    for batch in stream:
        assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
    counts = collections.Counter(
        match_files(
            np.concatenate([b["image"] for b in stream]),
            np.concatenate([b["label"] for b in stream]),
            expected,
        )
    )
    assert set(counts) == set(expected) and min(counts.values()) >= 4
    assert sum(counts.values()) - 4 * len(expected) == 4

    for augment in ("none", "inception_crop"):  # crops may decode part of a truncated JPEG
        if augment != "none":
            fresh = data.create_train_iterator(name, augment=augment, **kwargs)
            stream = [next(fresh) for _ in range(9)]
        resumed = data.create_train_iterator(name, augment=augment, start_step=5, **kwargs)
        for i in range(5, 9):  # from position 20, past two truncated slots
            batch = next(resumed)
            np.testing.assert_array_equal(batch["image"], stream[i]["image"], f"{augment} {i}")
            np.testing.assert_array_equal(batch["label"], stream[i]["label"], f"{augment} {i}")

    ones = data.create_train_iterator(name, augment="none", **{**kwargs, "local_batch_size": 1})
    blank = [b for b in (next(ones) for _ in range(9)) if not b["image"].any()]
    assert len(blank) == 1 and blank[0]["label"][0] == "abc".index(TRUNCATED[0])


# --------------------------------------------------------------------------------------------
# Errors.


def test_unprepared_dataset_error(tmp_path):
    empty = str(tmp_path / "empty")
    with no_network() as attempts:
        with pytest.raises(ValueError) as err:
            data.get_dataset_info("imagenet2012", data_dir=empty)
        with pytest.raises(data.DatasetNotPreparedError):
            data.create_train_iterator("imagenet2012", data_dir=empty, local_batch_size=2)
        with pytest.raises(data.DatasetNotPreparedError) as err2:
            data.create_eval_iterator("cifar10", split="test", data_dir=empty, local_batch_size=2)
    assert attempts == []
    message = str(err.value)
    assert isinstance(err.value, data.DatasetNotPreparedError)
    assert "\n" not in message
    assert "imagenet2012" in message and os.path.join(empty, "downloads", "manual") in message
    assert (
        "ILSVRC2012_img_train.tar" in message
        and f"tfds build imagenet2012 --data_dir={empty}" in message
    )
    assert "\n" not in str(err2.value) and f"tfds build cifar10 --data_dir={empty}" in str(
        err2.value
    )


def test_unknown_dataset_and_split_errors(data_dir, tmp_path):
    for name in ("no_such_dataset_xyz", "huggingface:foo/bar"):
        with pytest.raises(ValueError) as err:
            data.get_dataset_info(name, data_dir=data_dir)
        assert isinstance(err.value, data.UnknownDatasetError)
        assert (
            "\n" not in str(err.value)
            and name in str(err.value)
            and "imagefolder:" in str(err.value)
        )
    with pytest.raises(data.DatasetNotPreparedError):
        data.get_dataset_info(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(data.DatasetError, match="no split"):
        data.create_eval_iterator(
            "digits", split="validation", data_dir=data_dir, local_batch_size=2
        )
    with pytest.raises(ValueError, match="augment"):
        data.create_train_iterator("digits", data_dir=data_dir, local_batch_size=2, augment="bogus")
