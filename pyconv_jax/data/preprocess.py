"""Per-example image preprocessing (TensorFlow ops, for use inside ``tf.data`` maps).

Every function takes ONE example's image, either encoded bytes (a scalar ``tf.string``: JPEG,
PNG, GIF or BMP, as tfds stores images and as ``tfds.decode.SkipDecoding()`` hands them over) or
a decoded uint8 ``[H, W, C]`` tensor, and returns float32 ``[image_size, image_size, 3]``.

Conventions (the ones the published PyConv weights were trained and evaluated with, i.e.
torchvision's ImageNet recipe):

* train, ``"inception_crop"``: random-resized crop, area fraction ``U(0.08, 1)`` of the image and
  aspect ratio ``exp(U(log 3/4, log 4/3))`` (``tf.image.stateless_sample_distorted_bounding_box``
  with up to 10 attempts; if none fits, the whole image), resized to ``image_size`` (bilinear,
  antialiased), then a horizontal flip with probability 1/2. JPEG bytes are decoded only inside
  the crop window (``tf.io.decode_and_crop_jpeg``), which is most of the decoding work saved.
* eval: resize so the shorter side is ``resize_size`` (the longer side is
  ``int(resize_size * long / short)``, truncated, as torchvision's ``Resize``), bilinear with
  antialiasing, then the central ``image_size`` square (offset ``(size - crop) // 2``).
* ``"resize_flip"``: the eval transform with ``resize_size = image_size`` plus the random flip;
  ``"none"``: the eval transform with ``resize_size = image_size``. These suit small or
  non-photographic images (e.g. the 8x8 digits, which are upscaled; digits must not be flipped,
  so they use ``"none"``).
* Grayscale images are repeated to 3 channels; an alpha channel is dropped.
* Normalisation: ``(x / 255 - IMAGENET_MEAN) / IMAGENET_STD`` per channel.

Randomness is *stateless*: every random op takes an explicit ``seed`` (int32/int64 ``[2]``), so
the same (seed, example) always gives the same crop and flip, whatever order or thread the
example is processed in. The pipeline derives that seed from the run's seed and the example's
position in the stream (see :mod:`pyconv_jax.data.pipeline`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet on the 0..1 scale."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet on the 0..1 scale."""

AUGMENTATIONS: tuple[str, ...] = ("inception_crop", "resize_flip", "none")
"""Valid values of ``augment`` for training."""

CROP_SCALE: tuple[float, float] = (0.08, 1.0)
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """Maps an RGB image on the 0..255 scale, [..., 3], to float32 ``(x/255 - mean) / std``."""
    image = tf.cast(image, tf.float32)
    mean = tf.constant(IMAGENET_MEAN, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STD, tf.float32) * 255.0
    return (image - mean) / std


def decode_image(image: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (scalar string) or uint8 [H, W, C] (C in 1..4) -> uint8 [H, W, 3]."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    else:
        image = tf.convert_to_tensor(image)
        if image.shape.rank == 2:
            image = image[..., None]
        image = tf.cond(
            tf.shape(image)[-1] < 3,
            lambda: tf.tile(image[..., :1], [1, 1, 3]),  # grayscale (+ alpha) -> RGB
            lambda: image[..., :3],  # RGB (+ alpha) -> RGB
        )
        image = tf.cast(image, tf.uint8)
    image.set_shape([None, None, 3])
    return image


def _resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """Bilinear resize with antialiasing (a triangle filter widened when downscaling, like PIL)."""
    return tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=True)


def resize_shorter_and_center_crop(image: tf.Tensor, resize_size: int, crop_size: int) -> tf.Tensor:
    """uint8/float [H, W, 3] -> float32 [crop_size, crop_size, 3] on the input's 0..255 scale.

    Resizes so that the shorter side is ``resize_size`` (longer side truncated like torchvision's
    ``Resize``), then takes the central ``crop_size`` square (top/left offset ``(size - crop)//2``).
    """
    if resize_size < crop_size:
        raise ValueError(f"resize_size ({resize_size}) must be >= the crop size ({crop_size})")
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float64)
    w = tf.cast(shape[1], tf.float64)
    size = tf.constant(float(resize_size), tf.float64)
    new_h = tf.where(h <= w, size, tf.floor(size * h / w))
    new_w = tf.where(h <= w, tf.floor(size * w / h), size)
    new_h, new_w = tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)
    image = _resize(image, new_h, new_w)
    top = (new_h - crop_size) // 2
    left = (new_w - crop_size) // 2
    image = image[top : top + crop_size, left : left + crop_size]
    image.set_shape([crop_size, crop_size, 3])
    return tf.cast(image, tf.float32)


def _crop_window(shape: tf.Tensor, seed: tf.Tensor, scale: Sequence[float], ratio: Sequence[float]):
    """Samples a random-resized-crop window for an image of ``shape`` [3]: (begin [3], size [3])."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio),
        area_range=tuple(scale),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    image_size: int,
    scale: Sequence[float] = CROP_SCALE,
    ratio: Sequence[float] = CROP_RATIO,
) -> tf.Tensor:
    """Inception/torchvision random-resized crop -> float32 [image_size, image_size, 3] (0..255).

    ``image``: encoded bytes or uint8 [H, W, C]; JPEG bytes are decoded only inside the window.
    ``seed``: int [2], the stateless seed that fixes the window.
    """

    def crop_decoded(decoded: tf.Tensor) -> tf.Tensor:
        begin, size = _crop_window(tf.shape(decoded), seed, scale, ratio)
        return tf.slice(decoded, begin, size)

    if image.dtype == tf.string:

        def crop_jpeg() -> tf.Tensor:
            begin, size = _crop_window(tf.image.extract_jpeg_shape(image), seed, scale, ratio)
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
            return tf.io.decode_and_crop_jpeg(image, window, channels=3)

        crop = tf.cond(tf.io.is_jpeg(image), crop_jpeg, lambda: crop_decoded(decode_image(image)))
    else:
        crop = crop_decoded(decode_image(image))
    crop.set_shape([None, None, 3])
    resized = _resize(crop, tf.constant(image_size), tf.constant(image_size))
    resized.set_shape([image_size, image_size, 3])
    return resized


def preprocess_train(
    image: tf.Tensor, seed: tf.Tensor, *, image_size: int, augment: str
) -> tf.Tensor:
    """One training example -> normalised float32 [image_size, image_size, 3].

    ``augment``: ``"inception_crop"`` (random-resized crop + flip), ``"resize_flip"`` (shorter side
    to ``image_size``, central square, flip) or ``"none"`` (the same without the flip).
    ``seed``: int [2] stateless seed for this example.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if augment == "inception_crop":
        out = random_resized_crop(image, crop_seed, image_size)
    else:
        out = resize_shorter_and_center_crop(decode_image(image), image_size, image_size)
    if augment != "none":
        out = tf.image.stateless_random_flip_left_right(out, flip_seed)
    return normalize(out)


def preprocess_eval(image: tf.Tensor, *, image_size: int, resize_size: int) -> tf.Tensor:
    """One evaluation example -> normalised float32 [image_size, image_size, 3].

    Shorter side to ``resize_size`` (bilinear, antialiased), then the central ``image_size`` square.
    """
    return normalize(resize_shorter_and_center_crop(decode_image(image), resize_size, image_size))


def default_resize_size(image_size: int) -> int:
    """The usual eval resize for a crop: 256 for 224 (crop fraction 0.875)."""
    return math.floor(image_size / 0.875 + 0.5)
