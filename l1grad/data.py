"""Input pipelines: digits (embedded), CIFAR-10 and ImageNet, without TensorFlow.

Three datasets share one pipeline shape:

* ``"digits"``: scikit-learn's ``load_digits`` (1,797 real 8x8 images shipped
  with scikit-learn), split 1,437 / 360 with a fixed stratified split. It never
  needs a download, so it is the default for tests, demos and CI.
* ``"cifar10"`` and ``"imagenet2012"``: tensorflow-datasets ArrayRecord files
  read through ``tfds.data_source`` (random access, decoded to numpy, no
  TensorFlow) and prepared once by the user (see ``DatasetNotFoundError``).

Batches are built by grain from a pure index map, so the batch at global step
``s`` is a function of ``(seed, s)`` only: the order within epoch ``e`` is
grain's index shuffle seeded from ``(seed, e)`` and every augmentation draws
from a generator keyed on ``(seed, e, example index)``. A run restarted with
``start_step=k`` therefore sees bit-identical batches, whatever the number of
threads or worker processes. Each process reads only its own slice of every
global batch.

The module is longer than the others because it holds one kind of thing,
every dataset and its pipeline: sources (embedded arrays, tfds ArrayRecord
files and the "not prepared" message), per-dataset preprocessing and
augmentation, and the grain pipelines that batch them. It is the only code
that reads data; the trainer, PTQ, analysis and export use its public
functions (``get_info``, ``steps_per_epoch``, ``train_batches``,
``eval_batches``, ``input_normalization``).

Example::

  info = data.get_info("digits")
  for batch in data.train_batches("digits", global_batch_size=64, seed=0):
    batch["image"]  # float32 [64, 8, 8, 1], batch["label"] int32 [64]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
import logging
import math
import os
from typing import Any

from absl import flags
from etils import epath
import grain
import numpy as np
import PIL.Image

from l1grad import errors

__all__ = [
  "DATASETS",
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


class DatasetNotFoundError(errors.DataNotFoundError):
  """The requested tfds dataset is not prepared as ArrayRecord in data_dir.

  A ``FileNotFoundError`` and a ``UserError``: entry points print the message,
  which gives the commands that prepare the data.
  """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset as the model sees it.

  Attributes:
    name: Dataset name, one of ``DATASETS``.
    image_shape: Model input (height, width, channels) after preprocessing.
    num_classes: Number of label classes.
    num_train: Examples in the training split.
    num_test: Examples in the evaluation split (ImageNet: ``validation``,
      because the tfds ``test`` split carries no labels).
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_test: int


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
}
DATASETS: tuple[str, ...] = tuple(_SPECS)

# Per-channel statistics on the [0, 1] scale. CIFAR-10: pixel mean and std of
# the training set (the widely copied std (0.2023, 0.1994, 0.2010) is not it).
_CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
_CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR_PAD = 4
_IMAGENET_SIZE = 224
_IMAGENET_RESIZE = 256
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


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
    valid = sorted(set(spec.splits) | set(spec.aliases))
    raise errors.ConfigError(
      f"{name!r} has no split {split!r}; valid: {valid}."
    )
  return split


def _source(name: str, split: str, data_dir: str | None) -> Any:
  split = _split_name(name, split)
  if name == "digits":
    return _ArraySource(*_digits_splits()[split])
  return _tfds_source(name, split, data_dir)


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


def get_info(name: str, *, data_dir: str | None = None) -> DatasetInfo:
  """Returns shapes, class count and split sizes of a dataset.

  Args:
    name: One of ``DATASETS``.
    data_dir: tfds data directory; ``None`` means tfds' default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Unused for digits.

  Raises:
    errors.ConfigError: (a ValueError) Unknown dataset name.
    DatasetNotFoundError: A tfds dataset is not prepared in ``data_dir``.
  """
  spec = _spec(name)
  # Sizes come from the sources, not from stored metadata, so they are the
  # numbers the pipeline will actually iterate over.
  return DatasetInfo(
    name=name,
    image_shape=spec.image_shape,
    num_classes=spec.num_classes,
    num_train=len(_source(name, "train", data_dir)),
    num_test=len(_source(name, "test", data_dir)),
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
  name: str, global_batch_size: int, *, data_dir: str | None = None
) -> int:
  """Optimizer steps per training epoch (the last partial batch is dropped)."""
  return get_info(name, data_dir=data_dir).num_train // global_batch_size


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

  Returns:
    An iterator of ``{"image": float32 [B/P, H, W, C], "label": int32 [B/P]}``
    with ``B/P = global_batch_size // process_count``, holding the slice
    ``[process_index * B/P, (process_index + 1) * B/P)`` of each global batch.

  Raises:
    errors.ConfigError: (a ValueError) Unknown dataset, bad batch/process
      arguments, a negative seed or start_step, or a global batch larger
      than the training split.
    DatasetNotFoundError: A tfds dataset is not prepared in ``data_dir``.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  if seed < 0 or start_step < 0:
    raise errors.ConfigError(
      f"seed and start_step must be >= 0, got {seed=}, {start_step=}."
    )
  source = _source(name, "train", data_dir)
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
) -> Iterator[Batch]:
  """One pass over a split in order, every example exactly once.

  The last global batch is padded to full size; ``"mask"`` is False on the
  padding, so metrics summed with the mask are exact. Every process yields the
  same number of batches (``ceil(n / global_batch_size)``), which keeps
  collective ops in step.

  Args:
    name: One of ``DATASETS``.
    split: ``"test"`` (ImageNet: the validation set) or ``"train"``; ImageNet
      also accepts ``"validation"``.
    global_batch_size: Examples per batch over all processes.
    process_index: This process.
    process_count: Number of processes.
    data_dir: tfds data directory (``None``: tfds' default).
    worker_count: Grain worker processes; 0 uses threads only.
    max_examples: Evaluate only the first ``max_examples`` examples.

  Returns:
    An iterator of ``{"image": float32 [B/P, H, W, C], "label": int32 [B/P],
    "mask": bool [B/P]}``.

  Raises:
    errors.ConfigError: (a ValueError) Unknown dataset or split, bad
      batch/process arguments or ``max_examples < 1``.
    DatasetNotFoundError: A tfds dataset is not prepared in ``data_dir``.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  if max_examples is not None and max_examples < 1:
    raise errors.ConfigError(f"max_examples must be >= 1, got {max_examples}.")
  source = _source(name, split, data_dir)
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
