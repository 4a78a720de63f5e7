"""Input pipelines: digits (embedded), Fashion-MNIST, CIFAR-10 and ImageNet.

Four datasets share one pipeline shape, none of which needs TensorFlow:

* ``"digits"``: scikit-learn's ``load_digits`` (1,797 real 8x8 images shipped
  with scikit-learn), split 1,437 / 360 with a fixed stratified split. It never
  needs a download, so it is the default for tests, demos and CI.
* ``"fashion_mnist"``: the four original gzipped IDX files (60,000 / 10,000
  28x28 greyscale images, 10 classes), read from the first of: ``data_dir``
  holding the IDX files; a tfds ``fashion_mnist`` ArrayRecord build in
  ``data_dir`` (or tfds' default); the folder of Debian's
  ``dataset-fashion-mnist`` package, ``FASHION_MNIST_SYSTEM_DIR``
  (``$L1GRAD_FASHION_MNIST_DIR`` replaces it).
* ``"cifar10"`` and ``"imagenet2012"``: tensorflow-datasets ArrayRecord files
  read through ``tfds.data_source`` (random access, decoded to numpy, no
  TensorFlow) and prepared once by the user (see ``DatasetNotFoundError``).

Every dataset also has the split ``"minival"`` when the training functions get
``minival_examples=N > 0``: N examples held out of the official training
split, which ``"train"`` then no longer contains (big_vision's name; the
official test split is never used for model selection). The hold-out is fixed
(its seed is a constant, independent of the run's) and stratified by label
where the labels are in memory (digits, Fashion-MNIST from IDX files); tfds
sources get a seeded uniform subset instead, because reading their labels
would decode every image. ``max_train_examples=M`` then keeps a fixed
(likewise stratified) subset of M of the remaining training examples, for
quick runs. With the defaults (0 and None) the training split and its batches
are exactly the official ones.

Batches are built by grain from a pure index map, so the batch at global step
``s`` is a function of ``(seed, s)`` only: the order within epoch ``e`` is
grain's index shuffle seeded from ``(seed, e)`` and every augmentation draws
from a generator keyed on ``(seed, e, example index)``. A run restarted with
``start_step=k`` therefore sees bit-identical batches, whatever the number of
threads or worker processes. Each process reads only its own slice of every
global batch.

The module is longer than the others because it holds one kind of thing,
every dataset and its pipeline: sources (embedded arrays, IDX files, tfds
ArrayRecord files and the "not prepared" messages, held-out subsets),
per-dataset preprocessing and augmentation, and the grain pipelines that batch
them. It is the only code that reads data; the trainer, PTQ, analysis and
export use its public functions (``get_info``, ``steps_per_epoch``,
``train_batches``, ``eval_batches``, ``input_normalization``).

Example::

  info = data.get_info("digits")
  for batch in data.train_batches("digits", global_batch_size=64, seed=0):
    batch["image"]  # float32 [64, 8, 8, 1], batch["label"] int32 [64]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
import gzip
import logging
import math
import os
from typing import Any
import zlib

from absl import flags
from etils import epath
import grain
import numpy as np
import PIL.Image

from l1grad import errors

__all__ = [
  "DATASETS",
  "FASHION_MNIST_DIR_ENV",
  "FASHION_MNIST_SYSTEM_DIR",
  "MINIVAL",
  "DatasetCorruptError",
  "DatasetInfo",
  "DatasetNotFoundError",
  "InputNormalization",
  "eval_batches",
  "get_info",
  "input_normalization",
  "steps_per_epoch",
  "train_batches",
]

Batch = dict[str, np.ndarray]
# (uint8 or pre-normalised image, rng or None) -> float32 model input.
_Preprocess = Callable[[np.ndarray, "np.random.Generator | None"], np.ndarray]

# Keeps the seed streams of shuffling and augmentation independent, and keeps
# user seeds 0, 1, 2... from aliasing each other's epochs in grain's shuffle
# (which reseeds epoch e with seed + e).
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
# The hold-out and the training subset are drawn from their own fixed streams
# of a constant seed: the same examples whatever the run's seed, so runs with
# different seeds are selected on the same minival.
_SELECTION_SEED = 0
_MINIVAL_STREAM = 2
_SUBSET_STREAM = 3

# The validation split for model selection: held out of the official training
# split (``minival_examples``).
MINIVAL = "minival"


class DatasetNotFoundError(errors.DataNotFoundError):
  """The requested dataset is not where the pipeline looks for it.

  A ``FileNotFoundError`` and a ``UserError``: entry points print the message,
  which gives the commands that prepare the data.
  """


class DatasetCorruptError(errors.UserError, ValueError):
  """A dataset file is there but unreadable: truncated, corrupt or mislabeled.

  The message names the file and what is wrong with it.
  """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset as the model sees it.

  Attributes:
    name: Dataset name, one of ``DATASETS``.
    image_shape: Model input (height, width, channels) after preprocessing.
    num_classes: Number of label classes.
    num_train: Examples in the training split the pipeline iterates over:
      the official one less the ``minival`` hold-out, cut to
      ``max_train_examples`` if given.
    num_test: Examples in the evaluation split (ImageNet: ``validation``,
      because the tfds ``test`` split carries no labels).
    num_minival: Examples held out of the official training split as
      ``"minival"`` (0: none).
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_test: int
  num_minival: int = 0


@dataclasses.dataclass(frozen=True)
class _Spec:
  image_shape: tuple[int, int, int]
  num_classes: int
  splits: tuple[str, ...]
  # Names accepted by `eval_batches` that mean another split.
  aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)


_SPECS: dict[str, _Spec] = {
  "digits": _Spec((8, 8, 1), 10, ("train", "test")),
  "cifar10": _Spec((32, 32, 3), 10, ("train", "test")),
  # tfds' imagenet2012 "test" split has label -1 everywhere; everyone reports
  # the 50k validation set, so "test" means "validation" here.
  "imagenet2012": _Spec(
    (224, 224, 3), 1000, ("train", "validation"), {"test": "validation"}
  ),
  "fashion_mnist": _Spec((28, 28, 1), 10, ("train", "test")),
}
DATASETS: tuple[str, ...] = tuple(_SPECS)

# Per-channel statistics on the [0, 1] scale. CIFAR-10: pixel mean and std of
# the training set (the widely copied std (0.2023, 0.1994, 0.2010) is not it).
_CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
_CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
# Fashion-MNIST: mean and std of pixels/255 over all 60,000 official training
# images, computed once in float64 from train-images-idx3-ubyte.gz:
#   x = _read_idx(path).astype(np.float64) / 255; x.mean(), x.std()
# (tests/test_data_fashion.py recomputes them from the installed files).
_FASHION_MNIST_MEAN = (0.2860405969887955,)
_FASHION_MNIST_STD = (0.35302424451492254,)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR_PAD = 4
_IMAGENET_SIZE = 224
_IMAGENET_RESIZE = 256
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

# Where Debian/Ubuntu's dataset-fashion-mnist package puts the IDX files; the
# environment variable, when set, replaces it (tests set it to an empty folder
# to act as a machine without the package).
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "L1GRAD_FASHION_MNIST_DIR"
# split -> (images, labels) file names, each read gzipped (".gz") or raw.
_FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_SIZE = 28
# IDX element type codes (the third magic byte); multi-byte types are
# big-endian.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}
_IDX_UBYTE = 0x08


# --------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_scaled() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Digits pixels / 16 (their range is 0..16), split: x_train, x_test, y_train, y_test."""
  # Imported lazily: only this dataset needs scikit-learn.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  images = digits.images.astype(np.float32) / 16.0
  labels = digits.target.astype(np.int32)
  return tuple(
    model_selection.train_test_split(
      images, labels, test_size=360, stratify=labels, random_state=0
    )
  )


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads digits once: {"train"|"test": (images [N,8,8,1] f32, labels [N] i32)}.

  Pixels are scaled by 1/16 (their range is 0..16) and standardised with the
  mean and std of the training split, computed here from the fixed split so
  the constants can never drift from the data.
  """
  x_train, x_test, y_train, y_test = _digits_scaled()
  mean, std = x_train.mean(), x_train.std()
  out = {}
  for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    x = ((x - mean) / std).astype(np.float32)[..., None]
    # The cache hands out the same arrays to every caller.
    x.setflags(write=False)
    y.setflags(write=False)
    out[split] = (x, y)
  return out


class _ArraySource:
  """Random-access source over in-memory arrays, shaped like a tfds record."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images = images
    self._labels = labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self._images[index], "label": self._labels[index]}

  @property
  def labels(self) -> np.ndarray:
    """Every label, in order (in memory, so subsets can be stratified)."""
    return self._labels


class _SubsetSource:
  """The examples ``indices`` of another source, renumbered 0..len-1."""

  def __init__(self, source: Any, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    self._indices.setflags(write=False)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self._indices[index])]

  @property
  def indices(self) -> np.ndarray:
    """Positions in the underlying source."""
    return self._indices

  @property
  def base(self) -> Any:
    return self._source

  @property
  def labels(self) -> np.ndarray | None:
    labels = _cheap_labels(self._source)
    return None if labels is None else labels[self._indices]


def _cheap_labels(source: Any) -> np.ndarray | None:
  """The labels of an in-memory source; None where reading them would decode
  every example (tfds)."""
  if isinstance(source, (_ArraySource, _SubsetSource)):
    return source.labels
  return None


def _subset(source: Any, indices: np.ndarray) -> _SubsetSource:
  """``source[indices]``, composed into one index map over the base source."""
  if isinstance(source, _SubsetSource):
    return _SubsetSource(source.base, source.indices[indices])
  return _SubsetSource(source, indices)


# IDX files (Fashion-MNIST's format: http://yann.lecun.com/exdb/mnist/).


def _read_idx(
  path: str,
  *,
  dtype_code: int | None = None,
  ndim: int | None = None,
  hint: str = "",
) -> np.ndarray:
  """Reads one IDX file, gzipped or raw (told apart by content, not name).

  Strict: the magic number (two zero bytes, a known element type, the number
  of dimensions) must be as expected and the data exactly as long as the
  header says.

  Args:
    path: The file.
    dtype_code: Required element type code (0x08: unsigned byte); None: any.
    ndim: Required number of dimensions; None: any.
    hint: Appended to error messages (how to get a good copy).

  Returns:
    A read-only array of the header's shape (native byte order).

  Raises:
    DatasetCorruptError: Unreadable, truncated, corrupt or unexpected file.
  """

  def fail(problem: str) -> DatasetCorruptError:
    return DatasetCorruptError(
      f"{path}: {problem}; it is not a valid IDX file.{hint}"
    )

  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DatasetCorruptError(f"Cannot read {path}: {e}.{hint}") from e
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise fail(f"truncated or corrupt gzip data ({e})") from e
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
    raise fail(f"bad magic number {raw[:4].hex() or '(empty)'}")
  code, dims = raw[2], raw[3]
  if dtype_code is not None and code != dtype_code:
    raise fail(
      f"element type 0x{code:02x}, expected 0x{dtype_code:02x} (magic number)"
    )
  if ndim is not None and dims != ndim:
    raise fail(f"{dims} dimensions, expected {ndim} (magic number)")
  header = 4 + 4 * dims
  if len(raw) < header:
    raise fail(f"truncated header ({len(raw)} bytes, needs {header})")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", dims, 4))
  dtype = _IDX_DTYPES[code]
  expected = header + math.prod(shape) * dtype.itemsize
  if len(raw) != expected:
    what = "truncated" if len(raw) < expected else "trailing bytes"
    raise fail(
      f"{what}: {len(raw)} bytes, the header {shape} {dtype.name} needs"
      f" {expected}"
    )
  array = np.frombuffer(raw, dtype, offset=header).reshape(shape)
  if dtype.byteorder == ">":
    array = array.astype(dtype.newbyteorder("="))
  array.setflags(write=False)
  return array


def _fashion_mnist_paths(directory: str) -> dict[str, tuple[str, str]] | None:
  """The four IDX files in ``directory`` (each gzipped or raw), or None."""
  found = {}
  for split, names in _FASHION_MNIST_FILES.items():
    paths = []
    for name in names:
      candidates = [os.path.join(directory, name + ext) for ext in (".gz", "")]
      path = next((c for c in candidates if os.path.isfile(c)), None)
      if path is None:
        return None
      paths.append(path)
    found[split] = (paths[0], paths[1])
  return found


_IDX_HINT = (
  " Replace it with a good copy (Debian/Ubuntu, as root: apt-get install"
  " --reinstall dataset-fashion-mnist)."
)


@functools.lru_cache(maxsize=2)
def _fashion_mnist_idx(
  directory: str,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads the IDX files of ``directory`` once (cached: every caller gets the
  same read-only arrays): {split: (uint8 [N,28,28,1], int32 [N])}.

  Raises:
    DatasetCorruptError: A file is unreadable or does not hold Fashion-MNIST.
  """
  paths = _fashion_mnist_paths(directory)
  if paths is None:
    raise DatasetNotFoundError(f"No Fashion-MNIST IDX files in {directory}.")
  size = _FASHION_MNIST_SIZE
  out = {}
  for split, (image_path, label_path) in paths.items():
    images = _read_idx(
      image_path, dtype_code=_IDX_UBYTE, ndim=3, hint=_IDX_HINT
    )
    labels = _read_idx(
      label_path, dtype_code=_IDX_UBYTE, ndim=1, hint=_IDX_HINT
    )
    if images.shape[1:] != (size, size):
      raise DatasetCorruptError(
        f"{image_path}: images of {images.shape[1:]} pixels, expected"
        f" ({size}, {size}).{_IDX_HINT}"
      )
    if len(images) != len(labels):
      raise DatasetCorruptError(
        f"{image_path} holds {len(images)} images but {label_path}"
        f" {len(labels)} labels.{_IDX_HINT}"
      )
    if len(labels) and int(labels.max()) >= _SPECS["fashion_mnist"].num_classes:
      raise DatasetCorruptError(
        f"{label_path}: label {int(labels.max())} is not a Fashion-MNIST"
        f" class (0..9).{_IDX_HINT}"
      )
    labels = labels.astype(np.int32)
    labels.setflags(write=False)
    # A view of the read-only array: read-only too.
    out[split] = (images[..., None], labels)
  return out


def _fashion_mnist_system_dir() -> str:
  return os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_SYSTEM_DIR


def _fashion_mnist_idx_source(directory: str, split: str) -> _ArraySource:
  return _ArraySource(*_fashion_mnist_idx(os.path.realpath(directory))[split])


def _fashion_mnist_source(split: str, data_dir: str | None) -> Any:
  """Fashion-MNIST's ``split`` from the first place that has it.

  Order: ``data_dir`` holding the IDX files; a tfds ``fashion_mnist``
  ArrayRecord build in ``data_dir`` (or tfds' default); the Debian package's
  folder (``$L1GRAD_FASHION_MNIST_DIR`` or ``FASHION_MNIST_SYSTEM_DIR``).

  Raises:
    DatasetNotFoundError: None of them has it; the message says how to get it.
    DatasetCorruptError: The IDX files found are unreadable.
  """
  if data_dir is not None and _fashion_mnist_paths(data_dir) is not None:
    return _fashion_mnist_idx_source(data_dir, split)
  try:
    return _tfds_source("fashion_mnist", split, data_dir)
  except DatasetNotFoundError as e:
    tfds_error = e
  system_dir = _fashion_mnist_system_dir()
  if _fashion_mnist_paths(system_dir) is not None:
    return _fashion_mnist_idx_source(system_dir, split)
  raise DatasetNotFoundError(
    _fashion_mnist_missing(data_dir, system_dir, tfds_error)
  ) from None


def _fashion_mnist_missing(
  data_dir: str | None, system_dir: str, tfds_error: Exception
) -> str:
  """What the pipeline looked for, and the commands that provide it."""
  tfds_dir = _resolve_data_dir(data_dir)
  files = ", ".join(
    f"{name}[.gz]" for names in _FASHION_MNIST_FILES.values() for name in names
  )
  looked = []
  if data_dir is not None:
    looked.append(f"  - the IDX files in data_dir={data_dir}")
  looked.append(f"  - a tfds 'fashion_mnist' ArrayRecord build in {tfds_dir}")
  source = (
    f"${FASHION_MNIST_DIR_ENV}"
    if os.environ.get(FASHION_MNIST_DIR_ENV)
    else "Debian's dataset-fashion-mnist"
  )
  looked.append(f"  - the IDX files in {system_dir} ({source})")
  detail = ""
  if epath.Path(tfds_dir, "fashion_mnist").exists():
    cause = tfds_error.__cause__ or tfds_error
    detail = f"\ntfds: {type(cause).__name__}: {cause}"
  return (
    f"Fashion-MNIST not found ({files}). Looked for:\n"
    + "\n".join(looked)
    + "\nInstall it (Debian/Ubuntu, as root):\n"
    "  apt-get install dataset-fashion-mnist\n"
    "or prepare it with tfds (downloads ~30 MB; TensorFlow is needed for"
    " this step only):\n"
    "  pip install tensorflow importlib_resources\n"
    f"  tfds build fashion_mnist --file_format=array_record"
    f" --data_dir={tfds_dir}\n"
    "or put the four IDX files in a folder and pass it as"
    f" --config.data_dir (or set ${FASHION_MNIST_DIR_ENV})." + detail
  )


def _resolve_data_dir(data_dir: str | None) -> str:
  if data_dir is not None:
    return os.fspath(data_dir)
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

  return os.fspath(constants.get_default_data_dir())


def _prepare_instructions(name: str, data_dir: str) -> str:
  """The exact shell commands that prepare `name` as ArrayRecord."""
  # Verified with tfds 4.9.10: the `tfds` CLI imports TensorFlow at start-up,
  # and the builders need it too (CIFAR reads with tf.io.gfile, Image features
  # encode with TF); the builder also imports importlib_resources. Only
  # preparing needs them; reading the ArrayRecord files does not.
  build = (
    "  pip install tensorflow importlib_resources\n"
    f"  tfds build {name} --file_format=array_record --data_dir={data_dir}\n"
  )
  if name == "imagenet2012":
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    return (
      "ImageNet cannot be downloaded automatically. Register at "
      "https://image-net.org/download-images, put ILSVRC2012_img_train.tar "
      f"and ILSVRC2012_img_val.tar into {manual_dir}/ and then run:\n" + build
    )
  return "Prepare it once (downloads ~170 MB) with:\n" + build


def _tfds_source(name: str, split: str, data_dir: str | None) -> Any:
  """Opens a tfds ArrayRecord split as a random-access source of numpy dicts.

  Raises:
    DatasetNotFoundError: The split is not prepared as ArrayRecord.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # tfds warns about a missing variant folder before failing; the error below
  # says the same with the command that fixes it.
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_drop_missing_variant_warning)
  try:
    # download=False: tfds would otherwise try to build the dataset here,
    # which needs TensorFlow and, for ImageNet, a manual download.
    return tfds.data_source(
      name, split=split, data_dir=data_dir, download=False
    )
  except (
    NotImplementedError,  # No ArrayRecord files (tfds' message for "absent").
    KeyError,  # tfds 4.9.10 with the default data_dir: "splits is empty".
    AssertionError,
    ValueError,
    FileNotFoundError,
    tfds.core.DatasetNotFoundError,
  ) as e:
    resolved = _resolve_data_dir(data_dir)
    detail = ""
    if epath.Path(resolved, name).exists():
      # Something is there (TFRecord files, another version, a missing split):
      # tfds' own words tell which.
      detail = f"\ntfds: {type(e).__name__}: {e}"
    raise DatasetNotFoundError(
      f"tfds dataset {name!r} (split {split!r}) is not prepared as "
      f"ArrayRecord under data_dir={resolved!r}.\n"
      + _prepare_instructions(name, resolved)
      + detail
    ) from e
  finally:
    absl_logger.removeFilter(_drop_missing_variant_warning)


def _drop_missing_variant_warning(record: logging.LogRecord) -> bool:
  return not str(record.msg).startswith("Variant folder ")


def _spec(name: str) -> _Spec:
  try:
    return _SPECS[name]
  except KeyError:
    raise errors.ConfigError(
      f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}."
    ) from None


def _split_name(name: str, split: str) -> str:
  spec = _spec(name)
  split = spec.aliases.get(split, split)
  if split not in spec.splits:
    valid = sorted(set(spec.splits) | set(spec.aliases) | {MINIVAL})
    raise errors.ConfigError(
      f"{name!r} has no split {split!r}; valid: {valid}."
    )
  return split


def _official_source(name: str, split: str, data_dir: str | None) -> Any:
  """An official split (aliases resolved), before any hold-out."""
  split = _split_name(name, split)
  if name == "digits":
    return _ArraySource(*_digits_splits()[split])
  if name == "fashion_mnist":
    return _fashion_mnist_source(split, data_dir)
  return _tfds_source(name, split, data_dir)


def _select(
  labels: np.ndarray | None, n: int, k: int, stream: int
) -> np.ndarray:
  """``k`` sorted positions out of ``range(n)``, fixed by ``stream``.

  With labels, stratified: each class gets its proportional share
  ``k * count / n`` rounded down, and the examples still missing go to the
  classes with the largest remainders (ties: the lower class), so the shares
  are as exact as integers allow (5,000 of Fashion-MNIST's 60,000: 500 per
  class). Without labels, a uniform random subset.
  """
  rng = np.random.default_rng([_SELECTION_SEED, stream])
  if labels is None:
    return np.sort(rng.choice(n, size=k, replace=False))
  classes, inverse, counts = np.unique(
    labels, return_inverse=True, return_counts=True
  )
  exact = k * counts / n
  quota = np.floor(exact).astype(np.int64)
  largest = np.argsort(-(exact - quota), kind="stable")
  quota[largest[: k - int(quota.sum())]] += 1
  chosen = [
    rng.permutation(np.flatnonzero(inverse == c))[:q]
    for c, q in enumerate(quota)
  ]
  return np.sort(np.concatenate(chosen))


def _check_subset_args(
  minival_examples: int, max_train_examples: int | None
) -> None:
  if isinstance(minival_examples, bool) or not isinstance(
    minival_examples, (int, np.integer)
  ):
    raise errors.ConfigError(
      f"minival_examples must be an int, got {minival_examples!r}."
    )
  if minival_examples < 0:
    raise errors.ConfigError(
      f"minival_examples must be >= 0 (0: no hold-out), got {minival_examples}."
    )
  if max_train_examples is not None and (
    isinstance(max_train_examples, bool)
    or not isinstance(max_train_examples, (int, np.integer))
    or max_train_examples < 1
  ):
    raise errors.ConfigError(
      f"max_train_examples must be a positive int or None (all), got"
      f" {max_train_examples!r}."
    )


def _holdout(
  name: str, source: Any, minival_examples: int
) -> tuple[np.ndarray, np.ndarray]:
  """(train, minival) positions of the official training ``source``."""
  n = len(source)
  if minival_examples >= n:
    raise errors.ConfigError(
      f"minival_examples={minival_examples} must be smaller than the {n}"
      f" examples of {name!r}'s training split, which it is held out of"
      " (config.minival_examples; 0: no hold-out)."
    )
  minival = _select(_cheap_labels(source), n, minival_examples, _MINIVAL_STREAM)
  keep = np.ones(n, bool)
  keep[minival] = False
  return np.flatnonzero(keep), minival


def _source(
  name: str,
  split: str,
  data_dir: str | None,
  *,
  minival_examples: int = 0,
  max_train_examples: int | None = None,
) -> Any:
  """The random-access source of ``split`` as the pipeline reads it.

  ``"minival"`` is held out of the official training split, ``"train"`` is
  the rest, cut to ``max_train_examples`` (a fixed subset; all if it is not
  smaller). With ``minival_examples=0`` and no cut, the official source
  itself.
  """
  _check_subset_args(minival_examples, max_train_examples)
  if split == MINIVAL:
    _spec(name)
    if not minival_examples:
      raise errors.ConfigError(
        f"Split {MINIVAL!r} of {name!r} is held out of the training split,"
        " and minival_examples is 0 so there is none: set minival_examples"
        " (config.minival_examples) to the number of examples to hold out,"
        " e.g. 5000, or evaluate on 'test'."
      )
    base = _official_source(name, "train", data_dir)
    return _subset(base, _holdout(name, base, minival_examples)[1])
  source = _official_source(name, split, data_dir)
  if _split_name(name, split) != "train":
    return source
  if minival_examples:
    source = _subset(source, _holdout(name, source, minival_examples)[0])
  if max_train_examples is not None and max_train_examples < len(source):
    keep = _select(
      _cheap_labels(source), len(source), max_train_examples, _SUBSET_STREAM
    )
    source = _subset(source, keep)
  return source


# --------------------------------------------------------------------------
# Image ops (numpy + PIL, uint8 until the final normalisation).
# --------------------------------------------------------------------------


def _normalize(
  image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
  scale = np.asarray(std, np.float32) * np.float32(255.0)
  shift = np.asarray(mean, np.float32) * np.float32(255.0)
  return (image.astype(np.float32) - shift) / scale


def _random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


def _pad_crop_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """CIFAR augmentation: zero-pad by 4, random crop back, random h-flip."""
  h, w = image.shape[:2]
  p = _CIFAR_PAD
  # Padding is black in pixel space (value 0 before normalisation), as in the
  # reference torchvision pipeline.
  padded = np.pad(image, ((p, p), (p, p), (0, 0)))
  top, left = rng.integers(0, 2 * p + 1, size=2)
  return _random_flip(padded[top : top + h, left : left + w], rng)


def _inception_crop_box(
  height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """Random-resized-crop box (top, left, h, w), as torchvision samples it.

  Area fraction ~ U(0.08, 1) and log aspect ratio ~ U(log 3/4, log 4/3); ten
  tries, then the largest centred crop whose aspect ratio is in range.
  """
  area = height * width
  log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*_CROP_SCALE)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * ratio)))
    h = int(round(math.sqrt(target_area / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < _CROP_RATIO[0]:
    w, h = width, int(round(width / _CROP_RATIO[0]))
  elif in_ratio > _CROP_RATIO[1]:
    h, w = height, int(round(height * _CROP_RATIO[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _to_rgb_pil(image: np.ndarray) -> PIL.Image.Image:
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return PIL.Image.fromarray(np.ascontiguousarray(image)).convert("RGB")


def _imagenet_train_image(
  image: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
  top, left, h, w = _inception_crop_box(image.shape[0], image.shape[1], rng)
  size = (_IMAGENET_SIZE, _IMAGENET_SIZE)
  # One PIL call crops and resizes; PIL's bilinear filter widens its support
  # when downscaling, i.e. it antialiases like torchvision's default.
  crop = _to_rgb_pil(image).resize(
    size, PIL.Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
  )
  return _random_flip(np.asarray(crop), rng)


def _imagenet_eval_image(image: np.ndarray) -> np.ndarray:
  """Resizes the shorter side to 256, then takes the central 224x224."""
  height, width = image.shape[:2]
  scale = _IMAGENET_RESIZE / min(height, width)
  new_h = max(_IMAGENET_SIZE, int(round(height * scale)))
  new_w = max(_IMAGENET_SIZE, int(round(width * scale)))
  resized = _to_rgb_pil(image).resize(
    (new_w, new_h), PIL.Image.Resampling.BILINEAR
  )
  top = int(round((new_h - _IMAGENET_SIZE) / 2.0))
  left = int(round((new_w - _IMAGENET_SIZE) / 2.0))
  return np.asarray(resized)[
    top : top + _IMAGENET_SIZE, left : left + _IMAGENET_SIZE
  ]


def _digits_preprocess(
  image: np.ndarray, rng: np.random.Generator | None
) -> np.ndarray:
  del rng  # No augmentation: 8x8 digits lose too much to shifts and flips.
  return image  # Normalised once when loaded.


def _fashion_mnist_preprocess(
  image: np.ndarray, rng: np.random.Generator | None
) -> np.ndarray:
  if image.ndim == 2:
    image = image[..., None]
  if rng is not None:
    # A horizontal flip only: the garments are centred, upright and of one
    # size, so shifts and crops would mostly cut them.
    image = _random_flip(image, rng)
  return _normalize(image, _FASHION_MNIST_MEAN, _FASHION_MNIST_STD)


def _cifar10_preprocess(
  image: np.ndarray, rng: np.random.Generator | None
) -> np.ndarray:
  if rng is not None:
    image = _pad_crop_flip(image, rng)
  return _normalize(image, _CIFAR10_MEAN, _CIFAR10_STD)


def _imagenet_preprocess(
  image: np.ndarray, rng: np.random.Generator | None
) -> np.ndarray:
  if rng is None:
    image = _imagenet_eval_image(image)
  else:
    image = _imagenet_train_image(image, rng)
  return _normalize(image, _IMAGENET_MEAN, _IMAGENET_STD)


_PREPROCESS: dict[str, _Preprocess] = {
  "digits": _digits_preprocess,
  "fashion_mnist": _fashion_mnist_preprocess,
  "cifar10": _cifar10_preprocess,
  "imagenet2012": _imagenet_preprocess,
}


# --------------------------------------------------------------------------
# Index maps. Module-level classes so grain can pickle them into workers.
# --------------------------------------------------------------------------


def _derive_seed(seed: int, stream: int) -> int:
  """A 32-bit seed for `stream`, decorrelated from neighbouring user seeds."""
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _TrainElement:
  """Maps a position in this process's training stream to a processed example.

  Position t of process p is element j = t % local of global step
  s = t // local; within epoch e = s // steps_per_epoch that step reads
  positions [b*B, (b+1)*B) of the epoch's permutation (b = s % steps_per_epoch)
  and process p takes the slice [p*local, (p+1)*local). The last
  num_train % B examples of each permutation are dropped.
  """

  source: Any
  order: grain.MapDataset  # order[e * n + i]: example at position i of epoch e.
  preprocess: _Preprocess
  num_examples: int
  global_batch_size: int
  local_batch_size: int
  process_index: int
  steps_per_epoch: int
  augment_seed: int

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    step, j = divmod(position, self.local_batch_size)
    epoch, b = divmod(step, self.steps_per_epoch)
    i = (
      b * self.global_batch_size
      + self.process_index * self.local_batch_size
      + j
    )
    index = int(self.order[epoch * self.num_examples + i])
    # Keyed on the example, not on the stream position, so augmentation is
    # independent of batch size, process count and where a run resumed.
    rng = np.random.default_rng([self.augment_seed, epoch, index])
    record = self.source[index]
    return {
      "image": self.preprocess(record["image"], rng),
      "label": np.int32(record["label"]),
    }


@dataclasses.dataclass(frozen=True)
class _EvalElement:
  """Maps a position in this process's eval stream to an example or padding."""

  source: Any
  preprocess: _Preprocess
  num_examples: int
  global_batch_size: int
  local_batch_size: int
  process_index: int
  image_shape: tuple[int, int, int]

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    b, j = divmod(position, self.local_batch_size)
    index = (
      b * self.global_batch_size
      + self.process_index * self.local_batch_size
      + j
    )
    if index >= self.num_examples:
      # Padding: never decoded, masked out; label 0 keeps any loss finite.
      return {
        "image": np.zeros(self.image_shape, np.float32),
        "label": np.int32(0),
        "mask": np.bool_(False),
      }
    record = self.source[index]
    return {
      "image": self.preprocess(record["image"], None),
      "label": np.int32(record["label"]),
      "mask": np.bool_(True),
    }


def _local_batch_size(
  global_batch_size: int, process_index: int, process_count: int
) -> int:
  if global_batch_size <= 0:
    raise errors.ConfigError(
      f"global_batch_size must be positive, got {global_batch_size}."
    )
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise errors.ConfigError(
      "Need 0 <= process_index < process_count, got "
      f"{process_index=}, {process_count=}."
    )
  if global_batch_size % process_count:
    raise errors.ConfigError(
      f"global_batch_size={global_batch_size} is not divisible by "
      f"process_count={process_count}."
    )
  return global_batch_size // process_count


def _read_options() -> grain.ReadOptions:
  # Grain's default buffer is 500 elements; ours are whole batches (an ImageNet
  # batch of 256 is 150 MB), so buffer only as many as threads build at once.
  threads = max(1, min(8, os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)


def _iterate(ds: grain.MapDataset, worker_count: int) -> Iterator[Batch]:
  # Batching happens before `to_iter_dataset`, so grain's per-worker slicing
  # hands out whole batches and the output does not depend on worker_count.
  it_ds = ds.to_iter_dataset(_read_options())
  if worker_count > 0:
    # grain 0.2.18 reads an absl flag when it starts workers and fails with
    # UnparsedFlagAccessError outside absl.app (pytest, notebooks); fixed
    # upstream by google/grain#1362. Defaults are what such callers get anyway,
    # and absl.app still parses argv normally if it runs later.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count)
    )
  it = iter(it_ds)
  try:
    yield from it
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()  # Stops worker processes promptly instead of at GC.


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def get_info(
  name: str,
  *,
  data_dir: str | None = None,
  minival_examples: int = 0,
  max_train_examples: int | None = None,
) -> DatasetInfo:
  """Returns shapes, class count and split sizes of a dataset.

  Args:
    name: One of ``DATASETS``.
    data_dir: tfds data directory; ``None`` means tfds' default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Unused for digits;
      for Fashion-MNIST also a folder holding its IDX files.
    minival_examples: Examples held out of the official training split as
      ``"minival"`` (0: none; ``num_train`` is then the official size).
    max_train_examples: Train on a fixed subset of this many of the
      remaining examples (None: all).

  Raises:
    errors.ConfigError: (a ValueError) Unknown dataset name, or a hold-out
      not smaller than the training split.
    DatasetNotFoundError: The dataset is not where the pipeline looks.
    DatasetCorruptError: Its files are unreadable.
  """
  spec = _spec(name)
  # Sizes come from the sources, not from stored metadata, so they are the
  # numbers the pipeline will actually iterate over.
  return DatasetInfo(
    name=name,
    image_shape=spec.image_shape,
    num_classes=spec.num_classes,
    num_train=len(
      _source(
        name,
        "train",
        data_dir,
        minival_examples=minival_examples,
        max_train_examples=max_train_examples,
      )
    ),
    num_test=len(_source(name, "test", data_dir)),
    num_minival=minival_examples,
  )


@dataclasses.dataclass(frozen=True)
class InputNormalization:
  """How the pipeline turns a raw image into model input (evaluation path).

  ``input = (float32(raw) - mean * pixel_max) / (std * pixel_max)`` per
  channel, each product rounded to float32: bit for bit what
  ``eval_batches`` feeds the model, for a raw image already at the model's
  size (ImageNet: shorter side resized to 256, central 224x224 crop).

  Attributes:
    dataset: Dataset name.
    raw: What a raw image is: source, dtype, range and shape.
    pixel_max: Raw pixels lie in ``[0, pixel_max]``.
    mean: Per-channel mean on the ``[0, 1]`` scale (one value: every channel).
    std: Per-channel standard deviation on the ``[0, 1]`` scale.
    image_shape: Model input (height, width, channels).
  """

  dataset: str
  raw: str
  pixel_max: float
  mean: tuple[float, ...]
  std: tuple[float, ...]
  image_shape: tuple[int, int, int]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def input_normalization(name: str) -> InputNormalization:
  """The input normalisation of dataset ``name`` (see :class:`InputNormalization`).

  Raises:
    errors.ConfigError: (a ValueError) Unknown dataset name.
  """
  shape = _spec(name).image_shape
  if name == "digits":
    x_train = _digits_scaled()[0]
    # The same float32 statistics _digits_splits standardises with.
    return InputNormalization(
      name,
      "sklearn.datasets.load_digits().images: pixel values 0..16 (any"
      " numeric dtype), shape [N, 8, 8] or [N, 8, 8, 1]",
      16.0,
      (float(x_train.mean()),),
      (float(x_train.std()),),
      shape,
    )
  if name == "fashion_mnist":
    size = _FASHION_MNIST_SIZE
    return InputNormalization(
      name,
      f"uint8 greyscale 0..255, shape [N, {size}, {size}] or"
      f" [N, {size}, {size}, 1] (the IDX files' images)",
      255.0,
      _FASHION_MNIST_MEAN,
      _FASHION_MNIST_STD,
      shape,
    )
  if name == "cifar10":
    return InputNormalization(
      name,
      "uint8 RGB 0..255, shape [N, 32, 32, 3]",
      255.0,
      _CIFAR10_MEAN,
      _CIFAR10_STD,
      shape,
    )
  if name == "imagenet2012":
    return InputNormalization(
      name,
      f"uint8 RGB 0..255, shape [N, {_IMAGENET_SIZE}, {_IMAGENET_SIZE}, 3]:"
      f" shorter side resized to {_IMAGENET_RESIZE} (bilinear), central crop",
      255.0,
      _IMAGENET_MEAN,
      _IMAGENET_STD,
      shape,
    )
  raise errors.ConfigError(
    f"No input normalisation recorded for {name!r} (add it here)."
  )


def steps_per_epoch(
  name: str,
  global_batch_size: int,
  *,
  data_dir: str | None = None,
  minival_examples: int = 0,
  max_train_examples: int | None = None,
) -> int:
  """Optimizer steps per training epoch (the last partial batch is dropped).

  The keyword arguments are those of :func:`get_info`.
  """
  info = get_info(
    name,
    data_dir=data_dir,
    minival_examples=minival_examples,
    max_train_examples=max_train_examples,
  )
  return info.num_train // global_batch_size


def train_batches(
  name: str,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  data_dir: str | None = None,
  worker_count: int = 0,
  minival_examples: int = 0,
  max_train_examples: int | None = None,
) -> Iterator[Batch]:
  """Infinite, shuffled, augmented training batches for this process.

  The batch of global step ``s`` depends only on ``(seed, s)``: epoch
  ``e = s // steps_per_epoch`` is a fresh permutation seeded from
  ``(seed, e)``, and each example's augmentation draws from ``(seed, e,
  example index)``. ``start_step=k`` yields exactly what steps ``k, k+1, ...``
  of a run started at 0 yielded, which makes resumption bit-identical.

  Args:
    name: One of ``DATASETS``.
    global_batch_size: Examples per step over all processes.
    seed: Non-negative data seed.
    start_step: First global step to produce.
    process_index: This process (``jax.process_index()``).
    process_count: Number of processes (``jax.process_count()``).
    data_dir: tfds data directory (``None``: tfds' default).
    worker_count: Grain worker processes; 0 uses threads only. The output is
      the same for any value.
    minival_examples: Examples held out as ``"minival"``, never trained on
      (0: none, the batches of the whole official split).
    max_train_examples: Train on a fixed subset of this many of the
      remaining examples (None: all).

  Returns:
    An iterator of ``{"image": float32 [B/P, H, W, C], "label": int32 [B/P]}``
    with ``B/P = global_batch_size // process_count``, holding the slice
    ``[process_index * B/P, (process_index + 1) * B/P)`` of each global batch.

  Raises:
    errors.ConfigError: (a ValueError) Unknown dataset, bad batch/process
      arguments, a negative seed or start_step, a global batch larger
      than the training split, or a hold-out not smaller than it.
    DatasetNotFoundError: The dataset is not where the pipeline looks.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  if seed < 0 or start_step < 0:
    raise errors.ConfigError(
      f"seed and start_step must be >= 0, got {seed=}, {start_step=}."
    )
  source = _source(
    name,
    "train",
    data_dir,
    minival_examples=minival_examples,
    max_train_examples=max_train_examples,
  )
  n = len(source)
  spe = n // global_batch_size
  if spe == 0:
    raise errors.ConfigError(
      f"global_batch_size={global_batch_size} exceeds the {n} training "
      f"examples of {name!r}."
    )
  element = _TrainElement(
    source=source,
    order=grain.MapDataset.range(n).shuffle(
      seed=_derive_seed(seed, _SHUFFLE_STREAM)
    ),
    preprocess=_PREPROCESS[name],
    num_examples=n,
    global_batch_size=global_batch_size,
    local_batch_size=local,
    process_index=process_index,
    steps_per_epoch=spe,
    augment_seed=_derive_seed(seed, _AUGMENT_STREAM),
  )
  # Positions of this process's stream; 2**62 is "forever" at any batch rate.
  ds = grain.MapDataset.range(start_step * local, 2**62).map(element)
  return _iterate(ds.batch(local, drop_remainder=True), worker_count)


def eval_batches(
  name: str,
  split: str = "test",
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  data_dir: str | None = None,
  worker_count: int = 0,
  max_examples: int | None = None,
  minival_examples: int = 0,
) -> Iterator[Batch]:
  """One pass over a split in order, every example exactly once.

  The last global batch is padded to full size; ``"mask"`` is False on the
  padding, so metrics summed with the mask are exact. Every process yields the
  same number of batches (``ceil(n / global_batch_size)``), which keeps
  collective ops in step.

  Args:
    name: One of ``DATASETS``.
    split: ``"test"`` (ImageNet: the validation set), ``"train"`` (without
      the hold-out) or ``"minival"`` (the hold-out; needs
      ``minival_examples``); ImageNet also accepts ``"validation"``.
    global_batch_size: Examples per batch over all processes.
    process_index: This process.
    process_count: Number of processes.
    data_dir: tfds data directory (``None``: tfds' default).
    worker_count: Grain worker processes; 0 uses threads only.
    max_examples: Evaluate only the first ``max_examples`` examples.
    minival_examples: Examples held out of the official training split as
      ``"minival"`` (as the training run used; 0: none).

  Returns:
    An iterator of ``{"image": float32 [B/P, H, W, C], "label": int32 [B/P],
    "mask": bool [B/P]}``.

  Raises:
    errors.ConfigError: (a ValueError) Unknown dataset or split, bad
      batch/process arguments, ``max_examples < 1``, or ``"minival"`` with
      ``minival_examples=0``.
    DatasetNotFoundError: The dataset is not where the pipeline looks.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  if max_examples is not None and max_examples < 1:
    raise errors.ConfigError(f"max_examples must be >= 1, got {max_examples}.")
  source = _source(name, split, data_dir, minival_examples=minival_examples)
  n = len(source) if max_examples is None else min(len(source), max_examples)
  num_batches = -(-n // global_batch_size)
  element = _EvalElement(
    source=source,
    preprocess=_PREPROCESS[name],
    num_examples=n,
    global_batch_size=global_batch_size,
    local_batch_size=local,
    process_index=process_index,
    image_shape=_spec(name).image_shape,
  )
  ds = grain.MapDataset.range(num_batches * local).map(element)
  return _iterate(ds.batch(local, drop_remainder=True), worker_count)
