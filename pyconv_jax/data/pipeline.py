"""Input pipelines: tensorflow-datasets + tf.data, yielding NumPy batches for one process.

Sources (``name``)
  * any tfds image-classification dataset prepared in ``data_dir`` (``imagenet2012``,
    ``imagenette``, ``cifar10``, ... and ``name/config:version`` forms);
  * ``"digits"``: the embedded scikit-learn digits (:mod:`pyconv_jax.data.digits`), prepared
    offline into ``data_dir`` on first use;
  * ``"imagefolder:/path/to/root"``: images laid out as tfds ``ImageFolder`` expects,
    ``root/<split>/<class name>/<file>.{jpg,jpeg,png}``; class ids follow the sorted class names.

  ``split`` is a split name or a single tfds slice of one (``"train"``, ``"train[:99%]"``,
  ``"train[99%:]"``, ``"validation[:1000]"``). Nothing here downloads: a dataset that is not
  prepared raises :class:`DatasetNotPreparedError` with one line saying how to prepare it.

Process shares
  The split's ``N`` examples (in the source's fixed on-disk order) are cut into ``process_count``
  contiguous ranges; process ``i`` gets ``[i*N//P, (i+1)*N//P)``, the ``tfds.even_splits`` rule
  (sizes differ by at most one, nothing dropped). Shares are disjoint and cover the split.

Training stream: deterministic and resumable
  Each process produces an infinite stream of examples, epoch after epoch; batches are
  consecutive runs of ``local_batch_size`` examples of it (they may straddle epochs). Position
  ``p`` of the stream is a pure function of (seed, process share, shuffle_buffer, p), so the
  stream that starts at ``start_step = k`` is exactly the fresh stream with its first ``k``
  batches dropped. How, and why it stays cheap on ImageNet:

  * The share is cut into ``K = ceil(n / shuffle_buffer)`` contiguous *blocks* of about
    ``shuffle_buffer`` examples. Each block is its own tfds read (``split[a:b]``: tfds turns the
    slice into per-file skip/take, so reading block ``j`` touches only its files).
  * Epoch ``e`` visits the blocks in the order ``argsort(U_K)`` with ``U_K`` stateless-uniform
    keyed by (seed, process, e), and emits each block as a whole, permuted by a stateless
    permutation keyed by (seed, process, e, j). This is a full shuffle within a block plus a
    fresh block order every epoch; tfds already shuffles records globally when it writes a
    dataset (ImageFolder sources are hash-ordered), so a block is a random sample of the split.
  * Resuming at ``p0 = start_step * local_batch_size``: ``e0, r = divmod(p0, n)``; blocks that
    epoch ``e0`` already visited start at epoch ``e0 + 1``, the others at ``e0``, the block
    containing ``r`` is re-read and its first examples skipped. The work to resume is one block
    of I/O (shuffle-buffer sized), not an epoch; nothing is decoded before the resume point.
  * Augmentation is stateless and keyed by (seed, process, p), so skipping examples does not
    shift any later crop or flip, and parallel ``map`` (AUTOTUNE threads, ``deterministic=True``)
    cannot reorder anything.
  * Images travel encoded (``tfds.decode.SkipDecoding``) until the augmentation map, so a block
    in memory costs its JPEG bytes: about ``shuffle_buffer * 110 KB`` for ImageNet, and at most
    about three blocks are held (the one being emitted, the next one prefetched, one being read).

  A resumed run must use the same dataset, split, seed, process_count/index, shuffle_buffer,
  image_size and augment as the run it resumes; ``local_batch_size`` only sets ``p0``.

Bad files in image folders
  An image folder is not checked by anyone before training, so its bad files are handled here, in
  two places, both deterministic so that the training stream stays exactly resumable:

  * When the folder is scanned, every listed file's first 12 bytes are read (32 threads; about
    6 us a file from a warm local disk, so seconds for ImageNet's 1.28M files; once per process).
    Files that are empty, unreadable or do not start with a JPEG, PNG, GIF, BMP or WebP signature
    (a text or HTML file named .jpg, say) are left out of the index, so the split sizes, process
    shares, shuffle blocks and eval counts are those of the files kept. One warning gives their
    number and a few paths. A PNG (or GIF, BMP, WebP) named .jpg is kept: decoding sniffs the
    format. The tail of a file is not checked: valid JPEGs may carry data after their end marker.
  * A file with an image signature can still fail to decode (truncated or corrupt data). Such an
    example is left out where it is decoded, with a warning naming the file (once per file and
    process): decoding runs per batch of positions inside a nested ``tf.data`` dataset with
    ``ignore_errors`` (a plain map cannot catch a failing op). In training, a failed example's
    slot is filled by repeating the batch's examples that did decode, so batch ``k`` stays a
    function of stream positions ``[k*b, (k+1)*b)`` alone and ``start_step`` resumes exactly;
    only a batch where nothing decodes (a mostly broken folder, or tiny batches) is emitted with
    zero (mean-colour) images. Dropping the example instead (``ignore_errors`` on the stream)
    would shift every later batch by one, and finding those files up front would mean decoding
    the whole folder. In evaluation the example is left out and the last batches are padded, so
    every example that decodes is counted exactly once. With ``inception_crop`` a truncated JPEG
    fails only when the crop reaches its missing part (only the window is decoded); crops of its
    intact part are real pixels and are used.

  Grayscale, palette, RGBA and CMYK images (JPEG or PNG) decode to RGB; TensorFlow's CMYK and
  Adobe-inverted CMYK conversion agrees with PIL's ``convert("RGB")``. tfds datasets are
  trusted: ``tfds build`` wrote them, and their pipeline keeps the cheaper plain map.

Evaluation stream
  One pass over the process's share in on-disk order, the last batch padded with zeros and
  ``mask = False``. Every process yields ``ceil(ceil(N / P) / local_batch_size)`` batches, so
  collective evaluation steps line up on every host; over all processes each example of the split
  appears exactly once with ``mask = True``.

TensorFlow here only feeds the host: it is kept off any GPU and its C++ logs are quietened
(``TF_CPP_MIN_LOG_LEVEL=2`` unless already set, before TensorFlow is first imported).
"""

from __future__ import annotations

import abc

import dataclasses
import functools
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from pyconv_jax.data import digits as _digits  # importing registers the `digits` builder
from pyconv_jax.data import preprocess

try:  # TF only feeds the host; it must not grab accelerator memory.
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised by someone else: leave it be
    pass
tf.get_logger().setLevel("ERROR")

log = logging.getLogger("pyconv_jax.data")

Batch = dict[str, np.ndarray]

_INT64_MAX = np.iinfo(np.int64).max
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# How the formats tf.io.decode_image reads begin (WebP: "RIFF", 4 size bytes, "WEBP").
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
# Domain separators of the stateless random keys.
_ORDER, _SHUFFLE, _AUGMENT = 1, 2, 3


class DatasetError(ValueError):
    """A dataset cannot be read; the message is one line saying what to do."""


class UnknownDatasetError(DatasetError):
    """The dataset name is not a tfds dataset, ``digits`` or ``imagefolder:<root>``."""


class DatasetNotPreparedError(DatasetError):
    """The dataset exists but its files are not in the data directory."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset.

    Attributes:
      name: the name it was opened with.
      num_classes: number of labels; labels are ints in ``[0, num_classes)``.
      splits: split name -> number of examples.
      class_names: label id -> name, when the dataset names its classes.
      image_shape: stored image shape ``(H, W, C)``; ``None`` where it varies.
    """

    name: str
    num_classes: int
    splits: Mapping[str, int]
    class_names: tuple[str, ...] | None = None
    image_shape: tuple[int | None, ...] = (None, None, 3)

    @property
    def eval_split(self) -> str | None:
        """The conventional held-out split: ``"validation"`` if there is one, else ``"test"``."""
        for name in ("validation", "test"):
            if name in self.splits:
                return name
        return None

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split``, which may be a tfds slice such as ``"train[:10%]"``."""
        _, lo, hi = _resolve_split(self, split)
        return hi - lo


# ----------------------------------------------------------------------------------------------
# Sources: an info plus "read examples [lo, hi) of a split, in a fixed order".


class _Source(abc.ABC):
    info: DatasetInfo
    # Whether decoding an image may fail (files straight from disk); then read() adds "path".
    may_fail_to_decode: bool = False

    @abc.abstractmethod
    def read(self, split_name: str, lo: int, hi: int) -> tf.data.Dataset:
        """Examples ``[lo, hi)`` of ``split_name`` in on-disk order: {"image": encoded bytes
        (scalar string) or uint8 [H, W, C], "label": int64 []}."""


class _TfdsSource(_Source):
    def __init__(self, name: str, builder: tfds.core.DatasetBuilder):
        self.builder = builder
        features = builder.info.features
        keys = builder.info.supervised_keys
        if (
            isinstance(keys, (tuple, list))
            and len(keys) == 2
            and all(isinstance(k, str) for k in keys)
        ):
            self.image_key, self.label_key = keys
        else:
            self.image_key, self.label_key = "image", "label"
        if self.image_key not in features or self.label_key not in features:
            raise UnknownDatasetError(
                f"dataset {name!r} is not an image-classification dataset (needs 'image' and "
                f"'label' features, has {sorted(features.keys())})"
            )
        image_feature = features[self.image_key]
        label_feature = features[self.label_key]
        if not isinstance(label_feature, tfds.features.ClassLabel):
            raise UnknownDatasetError(
                f"dataset {name!r}: feature {self.label_key!r} is not a ClassLabel"
            )
        self.skip_decoding = (
            isinstance(image_feature, tfds.features.Image) and image_feature.np_dtype == np.uint8
        )
        names = tuple(label_feature.names) if label_feature.names else None
        self.info = DatasetInfo(
            name=name,
            num_classes=int(label_feature.num_classes),
            splits={k: int(v.num_examples) for k, v in builder.info.splits.items()},
            class_names=names,
            image_shape=tuple(image_feature.shape),
        )

    def read(self, split_name: str, lo: int, hi: int) -> tf.data.Dataset:
        options = tf.data.Options()
        options.deterministic = True
        decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.skip_decoding else None
        ds = self.builder.as_dataset(
            split=f"{split_name}[{lo}:{hi}]",
            shuffle_files=False,
            decoders=decoders,
            read_config=tfds.ReadConfig(options=options, skip_prefetch=True, try_autocache=False),
        )
        image_key, label_key = self.image_key, self.label_key
        return ds.map(
            lambda ex: {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int64)}
        )


class _FolderSource(_Source):
    may_fail_to_decode = True

    def __init__(self, name: str, root: str):
        examples, class_names = _scan_image_folder(root)
        self.examples = examples
        self.info = DatasetInfo(
            name=name,
            num_classes=len(class_names),
            splits={k: len(v[0]) for k, v in examples.items()},
            class_names=class_names,
            image_shape=(None, None, 3),
        )

    def read(self, split_name: str, lo: int, hi: int) -> tf.data.Dataset:
        paths, labels = self.examples[split_name]
        ds = tf.data.Dataset.from_tensor_slices(
            (list(paths[lo:hi]), np.asarray(labels[lo:hi], np.int64))
        )
        return ds.map(
            lambda path, label: {"image": tf.io.read_file(path), "label": label, "path": path},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )


@functools.lru_cache(maxsize=8)
def _scan_image_folder(
    root: str,
) -> tuple[dict[str, tuple[tuple[str, ...], tuple[int, ...]]], tuple[str, ...]]:
    """Lists ``root/<split>/<class>/<image>``: ({split: (paths, labels)}, class names).

    Class ids index the sorted union of class folder names over all splits (as tfds
    ``ImageFolder``). Within a split, examples are ordered by the SHA-256 of their path relative
    to ``root``: a fixed, class-mixed order, so contiguous process shares and shuffle blocks are
    random samples of the split. Files without an image signature (empty, unreadable, not an
    image) are left out, with one warning (see the module docstring).
    """
    gfile = tf.io.gfile
    if not gfile.isdir(root):
        raise DatasetNotPreparedError(
            f"image folder {root!r} does not exist: expected {root}/<split>/<class>/<image>.jpg"
        )
    found: dict[str, list[tuple[str, str]]] = {}
    classes: set[str] = set()
    for split in sorted(gfile.listdir(root)):
        split = split.rstrip("/")
        split_dir = os.path.join(root, split)
        if not gfile.isdir(split_dir):
            continue
        for cls in sorted(gfile.listdir(split_dir)):
            cls = cls.rstrip("/")
            cls_dir = os.path.join(split_dir, cls)
            if not gfile.isdir(cls_dir):
                continue
            classes.add(cls)
            for fname in gfile.listdir(cls_dir):
                if fname.lower().endswith(_IMAGE_EXTENSIONS):
                    found.setdefault(split, []).append((os.path.join(split, cls, fname), cls))
    listed = [rel for items in found.values() for rel, _ in items]
    paths = [os.path.join(root, rel) for rel in listed]
    bad = {rel for rel, ok in zip(listed, _have_image_signatures(paths)) if not ok}
    if bad:
        log.warning(
            "image folder %r: skipped %d of %d files that are empty, unreadable or not images "
            "(e.g. %s); they are left out of the split sizes, fix or delete them",
            root,
            len(bad),
            len(listed),
            ", ".join(sorted(bad)[:3]),
        )
        found = {split: [it for it in items if it[0] not in bad] for split, items in found.items()}
    if not any(found.values()):
        skipped = f" ({len(bad)} files skipped as not images)" if bad else ""
        raise DatasetNotPreparedError(
            f"image folder {root!r} holds no images{skipped}: expected "
            f"{root}/<split>/<class>/<image>.jpg"
        )
    class_names = tuple(sorted(classes))
    ids = {c: i for i, c in enumerate(class_names)}
    examples = {}
    for split, items in found.items():
        items.sort(key=lambda it: hashlib.sha256(it[0].encode()).hexdigest())
        examples[split] = (
            tuple(os.path.join(root, rel) for rel, _ in items),
            tuple(ids[c] for _, c in items),
        )
    return examples, class_names


def _has_image_signature(path: str) -> bool:
    """Whether the file starts like a JPEG, PNG, GIF, BMP or WebP; False if empty or unreadable."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(12)
    except (OSError, tf.errors.OpError):
        return False
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:] == b"WEBP")


def _have_image_signatures(paths: list[str]) -> list[bool]:
    """:func:`_has_image_signature` of each path, in order; 32 threads hide the I/O latency."""
    chunks = [paths[i : i + 1024] for i in range(0, len(paths), 1024)]
    with ThreadPoolExecutor(32) as pool:
        results = pool.map(lambda chunk: [_has_image_signature(p) for p in chunk], chunks)
        return [ok for chunk in results for ok in chunk]


def _unknown(name: str) -> UnknownDatasetError:
    return UnknownDatasetError(
        f"unknown dataset {name!r}: use 'digits' (embedded), 'imagefolder:/path/root' "
        "(root/<split>/<class>/<image>.jpg) or a tfds image-classification name such as "
        "imagenet2012, imagenette or cifar10 (see tfds.list_builders())"
    )


def _open_source(name: str, data_dir: str | None) -> _Source:
    """Opens ``name`` for reading, preparing ``digits`` if needed; never touches the network."""
    if name.startswith("imagefolder:"):
        root = os.path.expanduser(name[len("imagefolder:") :])
        if not root:
            raise _unknown(name)
        return _FolderSource(name, root)
    # "name[/config][:version]" is local; "namespace:name" (huggingface:..., community datasets)
    # would be resolved online, so it is refused.
    if ":" in re.sub(r":[0-9][0-9.*]*$", "", name):
        raise _unknown(name)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.DatasetNotFoundError:
        raise _unknown(name) from None
    if builder.name == "digits":
        builder = _digits.prepare_digits(data_dir)
    elif not builder.is_prepared():
        raise _not_prepared(name, builder)
    return _TfdsSource(name, builder)


def _not_prepared(name: str, builder: tfds.core.DatasetBuilder) -> DatasetNotPreparedError:
    """One line: which dataset, where its files must go, and the command that prepares it."""
    variant_dir = os.fspath(builder.data_dir)
    # data_dir/<name>[/<config>]/<version> -> data_dir
    depth = 3 if builder.builder_config is not None else 2
    root = variant_dir
    for _ in range(depth):
        root = os.path.dirname(root)
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    build = f"tfds build {name} --data_dir={root}"
    if instructions:
        what = " ".join(str(instructions).split())
        if len(what) > 240:
            what = what[:237] + "..."
        manual_dir = os.path.join(root, "downloads", "manual")
        return DatasetNotPreparedError(
            f"dataset {name!r} is not prepared in {variant_dir}; it needs a manual download: "
            f"put its files in {manual_dir} ({what}) and run once `{build}`"
        )
    return DatasetNotPreparedError(
        f"dataset {name!r} is not prepared in {variant_dir}; prepare it once (this downloads it) "
        f"with `{build}`, or point data_dir at a directory that holds it"
    )


def _resolve_split(info: DatasetInfo, split: str) -> tuple[str, int, int]:
    """``"train[10:20]"`` -> ("train", 10, 20) for a single contiguous tfds slice of one split."""
    split_infos = {
        k: tfds.core.SplitInfo(name=k, shard_lengths=[n], num_bytes=0)
        for k, n in info.splits.items()
    }
    try:
        parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(split_infos)
    except (ValueError, AssertionError, KeyError) as e:
        detail = " ".join(str(e).split())
        raise DatasetError(
            f"dataset {info.name!r} has no split {split!r} (splits: {sorted(info.splits)}"
            + ("" if detail.startswith("Unknown split") else f"; {detail}")
            + ")"
        ) from None
    if len(parts) != 1:
        raise DatasetError(
            f"split {split!r} of {info.name!r} must be one contiguous slice of one split"
        )
    part = parts[0]  # tfds writes None for "from the start" / "to the end"
    lo = 0 if part.from_ is None else int(part.from_)
    hi = info.splits[part.splitname] if part.to is None else int(part.to)
    return part.splitname, lo, hi


def _process_range(lo: int, hi: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Contiguous share ``[a, b)`` of ``[lo, hi)`` for one process (the tfds.even_splits rule)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
    n = hi - lo
    return lo + process_index * n // process_count, lo + (process_index + 1) * n // process_count


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Number of classes, split sizes, class names and stored image shape of ``name``.

    Raises :class:`UnknownDatasetError` / :class:`DatasetNotPreparedError` (both ``ValueError``)
    with a one-line explanation. Prepares ``digits`` on first use.
    """
    return _open_source(name, data_dir).info


# ----------------------------------------------------------------------------------------------
# Stateless keys.


def _key(seed: int, domain: int, *data: Any) -> tf.Tensor:
    """int64 [2] stateless seed for (seed, domain, *data); ``data`` may be tensors."""
    key = tf.constant([seed % (1 << 63), domain], tf.int64)
    for d in data:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
    return key


def _block_order(seed: int, process_index: int, epoch: Any, num_blocks: int) -> tf.Tensor:
    """int64 [num_blocks]: the order in which epoch ``epoch`` visits the blocks."""
    if num_blocks == 1:
        return tf.zeros([1], tf.int64)
    u = tf.random.stateless_uniform([num_blocks], seed=_key(seed, _ORDER, process_index, epoch))
    return tf.cast(tf.argsort(u, stable=True), tf.int64)


def _data_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # One thread per op invocation; parallelism comes from the parallel maps (AUTOTUNE).
    options.threading.max_intra_op_parallelism = 1
    options.experimental_optimization.map_parallelization = True
    return options


# ----------------------------------------------------------------------------------------------
# Images that fail to decode.

_undecodable: set[str] = set()  # files seen failing to decode in this process
_undecodable_lock = threading.Lock()


def _note_undecodable(paths: tf.Tensor) -> bool:
    """Logs the files among ``paths`` (string [n]) not yet reported as failing to decode."""
    with _undecodable_lock:
        new = sorted({p.decode() for p in paths.numpy()} - _undecodable)
        _undecodable.update(new)
        total = len(_undecodable)
    if new:
        log.warning(
            "skipped %d image file(s) that fail to decode (truncated or corrupt), e.g. %s; %d such "
            "files so far in this process, fix or delete them",
            len(new),
            ", ".join(new[:3]),
            total,
        )
    return True


def undecodable_files() -> list[str]:
    """The image files that failed to decode so far in this process (skipped), sorted."""
    with _undecodable_lock:
        return sorted(_undecodable)


def _map_skipping_failures(fn: Callable[..., Any], args: tuple, paths: tf.Tensor) -> Any:
    """``fn(*example)`` for each example of the batch ``args`` (structures of [n, ...] tensors), in
    order, leaving out the examples where ``fn`` fails; returns a structure of [m, ...], m <= n.

    A ``tf.data`` map cannot catch a failing op, but a nested dataset with ``ignore_errors`` can;
    one per batch keeps the cost small. ``paths`` (string [n]) names the files, for the warning.
    """
    n = tf.shape(paths)[0]
    done = (
        tf.data.Dataset.from_tensor_slices((tf.range(n), args))
        .map(lambda i, example: (i, fn(*example)))
        .ignore_errors()
    )
    empty = tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape], s.dtype), done.element_spec)
    index, out = (
        done.batch(tf.cast(n, tf.int64))
        .concatenate(tf.data.Dataset.from_tensors(empty))
        .take(1)
        .get_single_element()
    )
    failed = tf.scatter_nd(index[:, None], tf.ones_like(index), [n]) == 0
    noted = tf.cond(
        tf.reduce_any(failed),
        lambda: tf.py_function(_note_undecodable, [tf.boolean_mask(paths, failed)], tf.bool),
        lambda: tf.constant(True),
    )
    with tf.control_dependencies([noted]):
        return tf.nest.map_structure(tf.identity, out)


# ----------------------------------------------------------------------------------------------
# Training.


def make_train_dataset(
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int = 224,
    local_batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    augment: str = "inception_crop",
    start_step: int = 0,
    shuffle_buffer: int = 10_000,
) -> tf.data.Dataset:
    """The ``tf.data.Dataset`` behind :func:`create_train_iterator` (same arguments)."""
    if augment not in preprocess.AUGMENTATIONS:
        raise ValueError(f"augment must be one of {preprocess.AUGMENTATIONS}, got {augment!r}")
    if local_batch_size < 1 or shuffle_buffer < 1 or start_step < 0:
        raise ValueError("local_batch_size and shuffle_buffer must be >= 1 and start_step >= 0")
    source = _open_source(name, data_dir)
    split_name, lo, hi = _resolve_split(source.info, split)
    a, b = _process_range(lo, hi, process_index, process_count)
    n = b - a
    if n == 0:
        raise DatasetError(
            f"process {process_index} of {process_count} gets no examples of {name!r} {split!r}"
        )

    num_blocks = -(-n // shuffle_buffer)
    bounds = [a + j * n // num_blocks for j in range(num_blocks + 1)]
    sizes = [bounds[j + 1] - bounds[j] for j in range(num_blocks)]

    # Where the stream starts: epoch e0, offset r into it.
    start = start_step * local_batch_size
    e0, r = divmod(start, n)
    order0 = _block_order(seed, process_index, e0, num_blocks).numpy().tolist()
    pos, before = 0, 0
    while before + sizes[order0[pos]] <= r:
        before += sizes[order0[pos]]
        pos += 1
    already_visited = set(order0[:pos])

    def block_dataset(j: int) -> tf.data.Dataset:
        # One element per epoch: (epoch, j, the whole block with images still encoded).
        ds = source.read(split_name, bounds[j], bounds[j + 1]).take(sizes[j]).batch(sizes[j])
        ds = ds.repeat().enumerate(start=e0 + 1 if j in already_visited else e0)
        return ds.map(lambda epoch, block: (epoch, tf.constant(j, tf.int64), block))

    choice = tf.data.Dataset.range(e0, _INT64_MAX).flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(
            _block_order(seed, process_index, epoch, num_blocks)
        )
    )
    blocks = tf.data.Dataset.choose_from_datasets(
        [block_dataset(j) for j in range(num_blocks)], choice.skip(pos)
    )
    blocks = blocks.prefetch(1)  # read the next block while this one is consumed

    def shuffle_block(epoch, j, block):
        count = tf.shape(block["label"])[0]
        u = tf.random.stateless_uniform([count], seed=_key(seed, _SHUFFLE, process_index, epoch, j))
        perm = tf.argsort(u, stable=True)
        return tf.nest.map_structure(lambda t: tf.gather(t, perm), block)

    examples = blocks.map(shuffle_block).unbatch().skip(r - before).enumerate(start=start)

    def augment_example(position, example):
        key = _key(seed, _AUGMENT, process_index, position)
        image = preprocess.preprocess_train(
            example["image"], key, image_size=image_size, augment=augment
        )
        return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    def augment_batch(positions, batch):
        # Examples that fail to decode are replaced by repeating those that did (module docstring).
        out = _map_skipping_failures(augment_example, (positions, batch), batch["path"])
        count = tf.shape(out["label"])[0]
        blank = {
            "image": tf.zeros([local_batch_size, image_size, image_size, 3], tf.float32),
            "label": tf.cast(batch["label"], tf.int32),
        }

        def refill():
            repeat = tf.range(local_batch_size) % count
            return tf.nest.map_structure(lambda t: tf.gather(t, repeat), out)

        return tf.cond(count > 0, refill, lambda: blank)

    if source.may_fail_to_decode:
        ds = examples.batch(local_batch_size, drop_remainder=True)
        ds = ds.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = examples.map(augment_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(local_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_data_options())


def create_train_iterator(
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int = 224,
    local_batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    augment: str = "inception_crop",
    start_step: int = 0,
    shuffle_buffer: int = 10_000,
) -> Iterator[Batch]:
    """Infinite iterator of this process's training batches.

    Yields ``{"image": float32 [local_batch_size, image_size, image_size, 3] (ImageNet-normalised),
    "label": int32 [local_batch_size]}``. The stream is a pure function of the arguments; the one
    started at ``start_step=k`` equals a fresh one (``start_step=0``) after ``k`` batches, so a
    trainer resumes exactly by passing its restored step (see the module docstring).

    Args:
      name: ``"digits"``, ``"imagefolder:/root"`` or a tfds dataset name.
      split: split name or one tfds slice (``"train[:99%]"``).
      data_dir: tfds data directory (``None``: tfds's default).
      image_size: output height and width.
      local_batch_size: examples per batch for THIS process (global batch / process_count).
      seed: seeds the block order, the in-block shuffle and the augmentation.
      process_index, process_count: this process and the number of processes
        (``jax.process_index()``, ``jax.process_count()``); each gets a disjoint share.
      augment: ``"inception_crop"`` (ImageNet), ``"resize_flip"`` (light) or ``"none"``
        (use ``"none"`` for digits: flips and 8%-area crops destroy 8x8 digits).
      start_step: number of batches already consumed (resume point).
      shuffle_buffer: examples per shuffle block; memory is about three blocks of encoded images.
    """
    ds = make_train_dataset(
        name,
        split=split,
        data_dir=data_dir,
        image_size=image_size,
        local_batch_size=local_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        augment=augment,
        start_step=start_step,
        shuffle_buffer=shuffle_buffer,
    )
    return ds.as_numpy_iterator()


# ----------------------------------------------------------------------------------------------
# Evaluation.


def num_eval_batches(num_examples: int, local_batch_size: int, process_count: int = 1) -> int:
    """Batches every process yields for a split of ``num_examples``: from the largest share."""
    largest_share = -(-num_examples // process_count)
    return -(-largest_share // local_batch_size)


def make_eval_dataset(
    name: str,
    *,
    split: str,
    data_dir: str | None = None,
    image_size: int = 224,
    local_batch_size: int,
    resize_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[tf.data.Dataset, int]:
    """The dataset behind :func:`create_eval_iterator` and its number of batches."""
    if local_batch_size < 1:
        raise ValueError("local_batch_size must be >= 1")
    resize_size = preprocess.default_resize_size(image_size) if resize_size is None else resize_size
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
    source = _open_source(name, data_dir)
    split_name, lo, hi = _resolve_split(source.info, split)
    a, b = _process_range(lo, hi, process_index, process_count)
    num_batches = num_eval_batches(hi - lo, local_batch_size, process_count)

    def prepare(example):
        image = preprocess.preprocess_eval(
            example["image"], image_size=image_size, resize_size=resize_size
        )
        return {
            "image": image,
            "label": tf.cast(example["label"], tf.int32),
            "mask": tf.constant(True),
        }

    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, 3], tf.float32),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(False),
        }
    ).repeat(num_batches * local_batch_size)
    if b > a:
        examples = source.read(split_name, a, b).take(b - a)
        if source.may_fail_to_decode:  # leave out examples that fail to decode (module docstring)
            examples = examples.batch(local_batch_size).map(
                lambda batch: _map_skipping_failures(prepare, (batch,), batch["path"]),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            examples = examples.unbatch()
        else:
            examples = examples.map(
                prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
        ds = examples.concatenate(padding)
    else:
        ds = padding
    # Padding is generous, so every process yields exactly num_batches full batches.
    ds = ds.batch(local_batch_size, drop_remainder=True).take(num_batches)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_data_options()), num_batches


class EvalIterator:
    """One pass of evaluation batches; ``len()`` is the batch count (equal on every process)."""

    def __init__(self, ds: tf.data.Dataset, num_batches: int):
        self.num_batches = num_batches
        self._it = ds.as_numpy_iterator()

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> EvalIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._it)


def create_eval_iterator(
    name: str,
    *,
    split: str,
    data_dir: str | None = None,
    image_size: int = 224,
    local_batch_size: int,
    resize_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> EvalIterator:
    """One pass over this process's share of ``split``, every example exactly once.

    Yields ``{"image": float32 [local_batch_size, image_size, image_size, 3], "label": int32 [b],
    "mask": bool [b]}``; padding (zeros, label 0) has ``mask=False``. Every process yields
    ``len(iterator)`` batches (computed from the largest share). Images: shorter side resized to
    ``resize_size`` (default ``image_size / 0.875``, i.e. 256 for 224), central ``image_size``
    crop, ImageNet-normalised. For digits pass ``resize_size=image_size`` (no crop).
    """
    ds, num_batches = make_eval_dataset(
        name,
        split=split,
        data_dir=data_dir,
        image_size=image_size,
        local_batch_size=local_batch_size,
        resize_size=resize_size,
        process_index=process_index,
        process_count=process_count,
    )
    return EvalIterator(ds, num_batches)
