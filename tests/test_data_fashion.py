"""Fashion-MNIST (IDX files), the minival hold-out and training subsets.

Most tests run on tiny IDX files written here, so they need no download; the
ones marked ``real`` check the files of Debian's ``dataset-fashion-mnist``
package and skip, with the reason shown, where it is not installed.
"""

from __future__ import annotations

import gzip
import importlib
import itertools
import os
import subprocess
import sys

from conftest import ROOT
from conftest import history
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tiny_configs import tiny_digits

from l1grad import config_lib
from l1grad import data
from l1grad import train
from l1grad.errors import ConfigError
from l1grad.errors import UserError

SYSTEM_DIR = data.FASHION_MNIST_SYSTEM_DIR
HAVE_REAL = os.path.isfile(
  os.path.join(SYSTEM_DIR, "train-images-idx3-ubyte.gz")
)
real = pytest.mark.skipif(
  not HAVE_REAL,
  reason=f"{SYSTEM_DIR} is absent (apt-get install dataset-fashion-mnist)",
)
FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TINY_TRAIN = 20  # per class
TINY_TEST = 5  # per class


def write_idx(path, array: np.ndarray, *, gz: bool, code: int = 0x08) -> str:
  """Writes ``array`` as an IDX file (big-endian header, as the format is)."""
  header = (
    bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  )
  dtype = {0x08: np.uint8, 0x0C: ">i4"}[code]
  raw = header + np.asarray(array, dtype).tobytes()
  path = os.fspath(path) + (".gz" if gz else "")
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if gz else raw)
  return path


def write_fashion(
  directory, per_class_train: int, per_class_test: int, *, seed
):
  """Random tiny Fashion-MNIST: train files gzipped, test files raw.

  Returns {split: (images uint8 [N,28,28], labels [N])} as written. Labels
  are shuffled; every image is distinct (random bytes), so its bytes name it.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  out = {}
  for split, per_class in (
    ("train", per_class_train),
    ("test", per_class_test),
  ):
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    gz = split == "train"
    write_idx(os.path.join(directory, FILES[split][0]), images, gz=gz)
    write_idx(os.path.join(directory, FILES[split][1]), labels, gz=gz)
    out[split] = (images, labels)
  return out


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
  """A machine without the Debian package and without a tfds build."""
  empty = tmp_path / "no_system"
  empty.mkdir()
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(empty))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
  return empty


@pytest.fixture
def tiny(tmp_path, no_system_data):
  del no_system_data
  directory = tmp_path / "tiny"
  arrays = write_fashion(directory, TINY_TRAIN, TINY_TEST, seed=0)
  return str(directory), arrays


def normalized(images: np.ndarray) -> np.ndarray:
  """What eval_batches makes of raw uint8 images (input_normalization)."""
  norm = data.input_normalization("fashion_mnist")
  shift = np.float32(norm.mean[0]) * np.float32(norm.pixel_max)
  scale = np.float32(norm.std[0]) * np.float32(norm.pixel_max)
  return ((images.astype(np.float32) - shift) / scale)[..., None]


def eval_images(directory, split, **kw) -> tuple[np.ndarray, np.ndarray]:
  merged = list(
    data.eval_batches(
      "fashion_mnist", split, global_batch_size=64, data_dir=directory, **kw
    )
  )
  mask = np.concatenate([b["mask"] for b in merged])
  images = np.concatenate([b["image"] for b in merged])[mask]
  labels = np.concatenate([b["label"] for b in merged])[mask]
  return images, labels


# ------------------------------------------------------------------ IDX reader


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_reads_gz_and_raw(tmp_path, gz):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = write_idx(tmp_path / "x", images, gz=gz)
  got = data._read_idx(path, dtype_code=0x08, ndim=3)  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, images)
  assert got.dtype == np.uint8 and not got.flags.writeable
  ints = np.array([-1, 2, 70000], np.int32)
  got = data._read_idx(write_idx(tmp_path / "i", ints, gz=gz, code=0x0C))  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, ints)
  assert got.dtype == np.dtype("int32")  # native order


def _corrupt_cases(tmp_path):
  labels = np.arange(10, dtype=np.uint8)
  good = write_idx(tmp_path / "good", labels, gz=False)
  raw = open(good, "rb").read()
  gz = gzip.compress(raw)
  return {
    "bad magic": (b"\x01\x02" + raw[2:], {}),
    "element type": (raw, {"dtype_code": 0x0C}),
    "dimensions": (raw, {"ndim": 3}),
    "truncated": (raw[:-3], {}),
    "trailing bytes": (raw + b"\0", {}),
    "truncated header": (raw[:6], {}),
    "gzip": (gz[: len(gz) // 2], {}),
    "(empty)": (b"", {}),
  }


@pytest.mark.parametrize(
  "problem",
  [
    "bad magic",
    "element type",
    "dimensions",
    "truncated",
    "trailing bytes",
    "truncated header",
    "gzip",
    "(empty)",
  ],
)
def test_idx_reader_refuses_corrupt_files(tmp_path, problem):
  content, kwargs = _corrupt_cases(tmp_path)[problem]
  path = tmp_path / "bad"
  path.write_bytes(content)
  with pytest.raises(data.DatasetCorruptError) as err:
    data._read_idx(str(path), **kwargs)  # pylint: disable=protected-access
  assert isinstance(err.value, UserError)
  assert str(path) in str(err.value) and problem in str(err.value)


def test_corrupt_fashion_files_are_a_user_error(tiny):
  directory, _ = tiny
  path = os.path.join(directory, FILES["test"][0])
  with open(path, "r+b") as f:
    f.truncate(1000)
  with pytest.raises(data.DatasetCorruptError, match="truncated"):
    data.get_info("fashion_mnist", data_dir=directory)


# ------------------------------------------------------------------ sources


def test_tiny_files_pipeline(tiny):
  directory, arrays = tiny
  info = data.get_info("fashion_mnist", data_dir=directory)
  assert info == data.DatasetInfo(
    "fashion_mnist", (28, 28, 1), 10, 10 * TINY_TRAIN, 10 * TINY_TEST
  )
  images, labels = eval_images(directory, "test")
  # Bit for bit what input_normalization says (export relies on it).
  np.testing.assert_array_equal(images, normalized(arrays["test"][0]))
  np.testing.assert_array_equal(labels, arrays["test"][1])
  assert images.dtype == np.float32 and labels.dtype == np.int32

  batches = list(
    itertools.islice(
      data.train_batches(
        "fashion_mnist", global_batch_size=50, seed=0, data_dir=directory
      ),
      4,  # one epoch
    )
  )
  originals = {img.tobytes(): img for img in normalized(arrays["train"][0])}
  flipped = 0
  seen = set()
  for b in batches:
    assert b["image"].shape == (50, 28, 28, 1)
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
    for img in b["image"]:
      if img.tobytes() in originals:
        seen.add(img.tobytes())
      else:  # Augmentation is a horizontal flip, nothing else.
        assert img[:, ::-1].tobytes() in originals
        seen.add(img[:, ::-1].tobytes())
        flipped += 1
  assert len(seen) == 200  # An epoch is a permutation.
  assert 60 < flipped < 140


def test_exported_normalisation_is_the_pipelines():
  # pylint: disable=protected-access
  from l1grad import export  # pylint: disable=g-import-not-at-top

  spec = export._preprocessing_json(data.input_normalization("fashion_mnist"))
  model = export.ExportedModel(
    None,
    {"activation_ranges": {}, "w_bits": 8, "a_bits": 8, "preprocessing": spec},
    {},
    {},
    {},
  )
  raw = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
  want = np.stack([data._PREPROCESS["fashion_mnist"](x, None) for x in raw])
  assert want.shape == (2, 28, 28, 1)
  np.testing.assert_array_equal(model.normalize(raw), want)
  np.testing.assert_array_equal(model.normalize(raw[..., None]), want)


def test_data_dir_with_idx_files_wins(tmp_path, monkeypatch):
  system = tmp_path / "system"
  write_fashion(system, 3, 1, seed=1)
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(system))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
  own = tmp_path / "own"
  write_fashion(own, 2, 2, seed=2)
  assert data.get_info("fashion_mnist", data_dir=str(own)).num_train == 20
  # No IDX files in data_dir and no tfds build there: the system folder.
  empty = tmp_path / "empty"
  empty.mkdir()
  assert data.get_info("fashion_mnist", data_dir=str(empty)).num_train == 30
  assert data.get_info("fashion_mnist").num_train == 30


def test_a_tfds_build_comes_before_the_system_folder(tmp_path, monkeypatch):
  system = tmp_path / "system"
  write_fashion(system, 3, 1, seed=1)
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(system))
  with tfds.testing.mock_data(
    num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    info = data.get_info("fashion_mnist", data_dir=str(tmp_path))
    assert (info.num_train, info.num_test) == (12, 12)
    # A tfds source has no labels in memory: a seeded uniform hold-out.
    held = data.get_info(
      "fashion_mnist", data_dir=str(tmp_path), minival_examples=4
    )
    assert (held.num_train, held.num_minival) == (8, 4)
    batch = next(
      data.train_batches(
        "fashion_mnist",
        global_batch_size=4,
        seed=0,
        data_dir=str(tmp_path),
        minival_examples=4,
      )
    )
    assert batch["image"].shape == (4, 28, 28, 1)
    assert batch["image"].dtype == np.float32


def test_missing_everywhere_says_how_to_get_it(tmp_path, no_system_data):
  empty = tmp_path / "data"
  empty.mkdir()
  with pytest.raises(data.DatasetNotFoundError) as err:
    data.get_info("fashion_mnist", data_dir=str(empty))
  assert isinstance(err.value, FileNotFoundError)
  msg = str(err.value)
  for text in (
    "apt-get install dataset-fashion-mnist",
    "pip install tensorflow importlib_resources",
    f"tfds build fashion_mnist --file_format=array_record --data_dir={empty}",
    f"the IDX files in data_dir={empty}",
    f"the IDX files in {no_system_data}",
    data.FASHION_MNIST_DIR_ENV,
    "train-images-idx3-ubyte[.gz]",
  ):
    assert text in msg, msg
  with pytest.raises(data.DatasetNotFoundError):
    data.train_batches(
      "fashion_mnist", global_batch_size=8, seed=0, data_dir=str(empty)
    )


# ------------------------------------------------------------------ minival


def test_minival_is_stratified_disjoint_and_fixed(tiny):
  directory, arrays = tiny
  info = data.get_info("fashion_mnist", data_dir=directory, minival_examples=50)
  assert (info.num_train, info.num_minival) == (150, 50)
  official = {
    img.tobytes(): i for i, img in enumerate(normalized(arrays["train"][0]))
  }

  def split_ids(split):
    images, labels = eval_images(directory, split, minival_examples=50)
    ids = [official[img.tobytes()] for img in images]
    np.testing.assert_array_equal(labels, arrays["train"][1][ids])
    return ids

  minival, rest = split_ids("minival"), split_ids("train")
  assert len(set(minival)) == 50 and len(set(rest)) == 150
  assert not set(minival) & set(rest)
  assert set(minival) | set(rest) == set(range(200))
  assert sorted(minival) == minival  # In the official order.
  counts = np.bincount(arrays["train"][1][minival], minlength=10)
  np.testing.assert_array_equal(counts, [5] * 10)
  # Fixed: the same examples again, also after the files are reread.
  data._fashion_mnist_idx.cache_clear()  # pylint: disable=protected-access
  assert split_ids("minival") == minival
  # Training never sees the hold-out.
  train_labels = []
  for b in itertools.islice(
    data.train_batches(
      "fashion_mnist",
      global_batch_size=50,
      seed=3,
      data_dir=directory,
      minival_examples=50,
    ),
    3,
  ):
    train_labels.append(b["label"])
  np.testing.assert_array_equal(
    np.bincount(np.concatenate(train_labels), minlength=10), [15] * 10
  )


def test_max_train_examples_is_a_fixed_stratified_subset(tiny):
  directory, _ = tiny
  kw = dict(data_dir=directory, minival_examples=50, max_train_examples=100)
  assert data.get_info("fashion_mnist", **kw).num_train == 100
  assert data.steps_per_epoch("fashion_mnist", 25, **kw) == 4
  epochs = []
  for seed in (0, 1):
    batches = list(
      itertools.islice(
        data.train_batches(
          "fashion_mnist", global_batch_size=25, seed=seed, **kw
        ),
        4,
      )
    )
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [10] * 10)
    # The same subset whatever the seed (flips aside: each image's rows
    # sorted, which a horizontal flip does not change).
    epochs.append(
      sorted(
        np.sort(img, axis=1).tobytes() for b in batches for img in b["image"]
      )
    )
  assert epochs[0] == epochs[1]
  # More than there are: all of them.
  assert (
    data.get_info(
      "fashion_mnist", data_dir=directory, max_train_examples=10**6
    ).num_train
    == 200
  )


def test_subset_argument_errors(tiny):
  directory, _ = tiny
  with pytest.raises(ConfigError, match="minival_examples"):
    data.eval_batches(
      "fashion_mnist", "minival", global_batch_size=8, data_dir=directory
    )
  with pytest.raises(ConfigError, match="smaller than the 200"):
    data.get_info("fashion_mnist", data_dir=directory, minival_examples=200)
  with pytest.raises(ConfigError, match=">= 0"):
    data.get_info("fashion_mnist", data_dir=directory, minival_examples=-1)
  with pytest.raises(ConfigError, match="max_train_examples"):
    data.get_info("fashion_mnist", data_dir=directory, max_train_examples=0)
  with pytest.raises(ConfigError, match="minival"):
    data.eval_batches("fashion_mnist", "val", global_batch_size=8)


# ------------------------------------------------------------------ config


def test_config_validation_of_the_new_fields():
  config = importlib.import_module("configs.fashion_mnist").get_config()
  config_lib.validate(config)
  for field, value, text in (
    ("minival_examples", -1, "config.minival_examples"),
    ("max_train_examples", 0, "config.max_train_examples"),
    ("eval_split", "validation", "config.eval_split"),
  ):
    bad = ml_collections.ConfigDict(config.to_dict())
    bad[field] = value
    with pytest.raises(ConfigError, match=text):
      config_lib.validate(bad)
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.minival_examples = 0
  with pytest.raises(ConfigError, match="--config.minival_examples=N"):
    config_lib.validate(bad)


def test_stored_configs_without_the_fields_still_resume(tmp_path):
  now = importlib.import_module("configs.default").get_config()
  stored = ml_collections.ConfigDict(now.to_dict())
  for field in ("minival_examples", "max_train_examples", "eval_split"):
    del stored[field]
  config_lib.check_same_run(now, stored, str(tmp_path))
  assert config_lib.data_kwargs(stored) == {
    "data_dir": None,
    "minival_examples": 0,
    "max_train_examples": None,
  }
  held = ml_collections.ConfigDict(now.to_dict())
  held.minival_examples = 5000
  with pytest.raises(ConfigError, match="minival_examples"):
    config_lib.check_same_run(held, stored, str(tmp_path))


def test_a_hold_out_larger_than_the_data_fails_before_the_workdir(tmp_path):
  config = tiny_digits(minival_examples=1437)
  with pytest.raises(ConfigError, match="smaller than the 1437 examples"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ training


def test_train_and_evaluate_on_minival(tmp_path, no_system_data):
  del no_system_data
  directory = tmp_path / "data"
  write_fashion(directory, 60, 2, seed=4)  # 600 train images
  config = importlib.import_module("configs.fashion_mnist").get_config()
  config.data_dir = str(directory)
  config.minival_examples = 40
  config.max_train_examples = 512
  config.model_kwargs.width_multiplier = 1 / 32
  config.batch_size = 64
  config.num_epochs = 1
  config.log_every_steps = 4
  config.max_eval_examples = 32
  config.track_act_grad = False  # Compiles faster; run-neutral.
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 8  # 512 // 64
  rows = history(workdir)
  assert rows[-1]["eval_on_minival"] == 1.0
  assert 0.0 <= rows[-1]["test_accuracy"] <= 1.0
  assert np.isfinite(rows[-1]["test_loss"])
  # The stored config compares equal to itself: the rerun resumes (and has
  # nothing left to do).
  assert int(train.train_and_evaluate(config, workdir).step) == 8


def test_no_data_is_a_user_error_before_the_workdir(tmp_path, no_system_data):
  del no_system_data
  config = importlib.import_module("configs.fashion_mnist").get_config()
  empty = tmp_path / "data"
  empty.mkdir()
  config.data_dir = str(empty)
  with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_train_py_without_data_exits_2_without_traceback(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TFDS_DATA_DIR=str(empty),
    **{data.FASHION_MNIST_DIR_ENV: str(empty)},
  )
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      f"--config={ROOT}/configs/fashion_mnist.py",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  message = result.stderr[result.stderr.index("error: ") :]
  assert "apt-get install dataset-fashion-mnist" in message
  assert (
    "tfds build fashion_mnist --file_format=array_record"
    f" --data_dir={empty}" in message
  )
  assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ real files


@real
def test_real_files_sizes_labels_and_minival(monkeypatch):
  monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
  splits = data._fashion_mnist_idx(os.path.realpath(SYSTEM_DIR))  # pylint: disable=protected-access
  (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
  assert x_train.shape == (60000, 28, 28, 1) and x_test.shape[0] == 10000
  assert x_train.dtype == np.uint8 and not x_train.flags.writeable
  np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
  minival = data._source(  # pylint: disable=protected-access
    "fashion_mnist", "minival", str(SYSTEM_DIR), minival_examples=5000
  )
  np.testing.assert_array_equal(np.bincount(minival.labels), [500] * 10)
  info = data.get_info(
    "fashion_mnist", data_dir=str(SYSTEM_DIR), minival_examples=5000
  )
  assert (info.num_train, info.num_test, info.num_minival) == (
    55000,
    10000,
    5000,
  )


@real
def test_real_normalisation_constants():
  x = data._fashion_mnist_idx(os.path.realpath(SYSTEM_DIR))["train"][0]  # pylint: disable=protected-access
  # Exact integer sums (fast), then the float64 mean and std of x / 255.
  n = x.size
  total = int(x.sum(dtype=np.uint64))
  squares = int(np.square(x, dtype=np.uint32).sum(dtype=np.uint64))
  mean = total / n / 255.0
  std = np.sqrt(squares / n - (total / n) ** 2) / 255.0
  norm = data.input_normalization("fashion_mnist")
  np.testing.assert_allclose(norm.mean, [mean], rtol=1e-12)
  np.testing.assert_allclose(norm.std, [std], rtol=1e-10)
  assert norm.pixel_max == 255.0 and norm.image_shape == (28, 28, 1)
