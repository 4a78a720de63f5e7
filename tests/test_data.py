"""Tests for l1grad.data: splits, padding/masking, determinism, resume, sharding.

Digits runs on the real embedded data. CIFAR-10 and ImageNet run on
`tfds.testing.mock_data`, which patches `tfds.data_source` to serve random
examples (ImageNet's with random sizes), so the whole tfds + grain path runs
without any download or TensorFlow.
"""

from __future__ import annotations

import itertools

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds

from l1grad import data

MOCK_EXAMPLES = 20


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b) -> None:
  chex.assert_trees_all_equal(a, b)  # same count, keys, shapes and values


def concat_shards(shards) -> dict[str, np.ndarray]:
  return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


@pytest.fixture(scope="module")
def digits_arrays():
  return data._digits_splits()  # pylint: disable=protected-access


def row_index(images: np.ndarray) -> dict[bytes, int]:
  # Every digits image is unique, so its bytes identify the example.
  return {img.tobytes(): i for i, img in enumerate(images)}


# ------------------------------------------------------------------ digits


def test_digits_info_and_stratified_split(digits_arrays):
  info = data.get_info("digits")
  assert info == data.DatasetInfo("digits", (8, 8, 1), 10, 1437, 360)
  _, y_test = digits_arrays["test"]
  counts = np.bincount(y_test, minlength=10)
  # 360 / 10 classes; load_digits has 174..183 per class, so stratification
  # gives 35..37 each.
  assert counts.min() >= 35 and counts.max() <= 37
  x_train, _ = digits_arrays["train"]
  # Standardised with train-split statistics.
  assert abs(float(x_train.mean())) < 1e-5
  assert abs(float(x_train.std()) - 1.0) < 1e-4
  assert data.steps_per_epoch("digits", 100) == 14


def test_digits_train_shapes_dtypes():
  batch = next(data.train_batches("digits", global_batch_size=64, seed=0))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (64, 8, 8, 1)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,)
  assert batch["label"].dtype == np.int32
  assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


def test_digits_eval_covers_every_example_once(digits_arrays):
  x_test, y_test = digits_arrays["test"]
  batches = list(data.eval_batches("digits", global_batch_size=64))
  assert len(batches) == 6  # ceil(360 / 64)
  for b in batches:
    assert b["image"].shape == (64, 8, 8, 1) and b["image"].dtype == np.float32
    assert b["mask"].shape == (64,) and b["mask"].dtype == np.bool_
  assert [int(b["mask"].sum()) for b in batches] == [64] * 5 + [40]
  assert not batches[-1]["mask"][40:].any()
  merged = concat_shards(batches)
  m = merged["mask"]
  np.testing.assert_array_equal(merged["image"][m], x_test)
  np.testing.assert_array_equal(merged["label"][m], y_test)


def test_digits_eval_max_examples_and_train_split(digits_arrays):
  batches = list(
    data.eval_batches("digits", global_batch_size=32, max_examples=50)
  )
  assert [int(b["mask"].sum()) for b in batches] == [32, 18]
  train = list(data.eval_batches("digits", "train", global_batch_size=500))
  assert sum(int(b["mask"].sum()) for b in train) == 1437


def test_digits_epochs_are_permutations(digits_arrays):
  x_train, _ = digits_arrays["train"]
  index = row_index(x_train)
  spe = data.steps_per_epoch(
    "digits", 100
  )  # 14; 37 examples dropped each epoch
  batches = take(
    data.train_batches("digits", global_batch_size=100, seed=3), 2 * spe
  )
  epochs = []
  for e in range(2):
    epoch_batches = batches[e * spe : (e + 1) * spe]
    ids = [index[img.tobytes()] for b in epoch_batches for img in b["image"]]
    assert len(ids) == len(set(ids)) == spe * 100  # No repeats within an epoch.
    epochs.append(ids)
  assert epochs[0] != epochs[1]  # Reshuffled every epoch.
  assert len(set(epochs[0]) | set(epochs[1])) > spe * 100  # Different drops.


def test_digits_deterministic_and_seeded():
  a = take(data.train_batches("digits", global_batch_size=50, seed=7), 4)
  b = take(data.train_batches("digits", global_batch_size=50, seed=7), 4)
  c = take(data.train_batches("digits", global_batch_size=50, seed=8), 4)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["label"], c[0]["label"])


@pytest.mark.parametrize("start_step", [1, 5, 9])
def test_digits_resume_from_start_step(start_step):
  # 1437 // 256 = 5 steps per epoch: 5 and 9 resume at/after an epoch boundary.
  full = take(data.train_batches("digits", global_batch_size=256, seed=1), 12)
  resumed = take(
    data.train_batches(
      "digits", global_batch_size=256, seed=1, start_step=start_step
    ),
    12 - start_step,
  )
  assert_batches_equal(resumed, full[start_step:])


def test_digits_process_shards_make_the_global_batch():
  kw = dict(global_batch_size=64, seed=2, start_step=20)  # crosses epoch 0 -> 1
  whole = take(data.train_batches("digits", **kw), 4)
  shards = [
    take(
      data.train_batches("digits", process_index=p, process_count=2, **kw), 4
    )
    for p in range(2)
  ]
  for s in shards:
    assert s[0]["image"].shape == (32, 8, 8, 1)
  assert_batches_equal([concat_shards(pair) for pair in zip(*shards)], whole)

  whole_eval = list(data.eval_batches("digits", global_batch_size=64))
  eval_shards = [
    list(
      data.eval_batches(
        "digits", global_batch_size=64, process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]
  assert len(eval_shards[0]) == len(eval_shards[1]) == len(whole_eval)
  assert_batches_equal(
    [concat_shards(pair) for pair in zip(*eval_shards)], whole_eval
  )


def test_worker_processes_do_not_change_the_batches():
  kw = dict(global_batch_size=128, seed=4, start_step=3)
  threads = take(data.train_batches("digits", **kw), 3)
  it = data.train_batches("digits", worker_count=1, **kw)
  workers = [{k: np.array(v) for k, v in b.items()} for b in take(it, 3)]
  it.close()  # Stops the worker now rather than at interpreter exit.
  assert_batches_equal(workers, threads)


def test_argument_errors():
  with pytest.raises(ValueError, match="divisible"):
    data.train_batches("digits", global_batch_size=63, seed=0, process_count=2)
  with pytest.raises(ValueError, match="divisible"):
    data.eval_batches("digits", global_batch_size=63, process_count=2)
  with pytest.raises(ValueError, match="digits, cifar10, imagenet2012"):
    data.get_info("mnist")
  with pytest.raises(ValueError, match="split"):
    data.eval_batches("digits", "validation", global_batch_size=8)
  with pytest.raises(ValueError, match="exceeds"):
    data.train_batches("digits", global_batch_size=2000, seed=0)


def test_digits_minival_is_stratified_and_disjoint(digits_arrays):
  x_train, y_train = digits_arrays["train"]
  index = row_index(x_train)
  info = data.get_info("digits", minival_examples=200)
  assert info == data.DatasetInfo("digits", (8, 8, 1), 10, 1237, 360, 200)

  def ids(split):
    batches = list(
      data.eval_batches(
        "digits", split, global_batch_size=500, minival_examples=200
      )
    )
    merged = concat_shards(batches)
    images = merged["image"][merged["mask"]]
    out = [index[img.tobytes()] for img in images]
    np.testing.assert_array_equal(merged["label"][merged["mask"]], y_train[out])
    return out

  minival, rest = ids("minival"), ids("train")
  assert len(minival) == 200 and len(rest) == 1237
  assert not set(minival) & set(rest)
  assert set(minival) | set(rest) == set(range(len(x_train)))
  # Stratified: each class's share of 200 within one example of exact.
  counts = np.bincount(y_train[minival], minlength=10)
  exact = 200 * np.bincount(y_train, minlength=10) / len(y_train)
  assert np.abs(counts - exact).max() < 1
  assert ids("minival") == minival  # Fixed.
  # Training reads only the rest.
  spe = data.steps_per_epoch("digits", 100, minival_examples=200)
  assert spe == 12
  trained = {
    index[img.tobytes()]
    for b in take(
      data.train_batches(
        "digits", global_batch_size=100, seed=0, minival_examples=200
      ),
      2 * spe,
    )
    for img in b["image"]
  }
  assert not trained & set(minival)
  with pytest.raises(ValueError, match="minival_examples"):
    data.eval_batches("digits", "minival", global_batch_size=8)


def test_digits_without_minival_batches_are_unchanged():
  # minival_examples=0 and no max_train_examples read the official split
  # itself, not a subset of it: the same batches as before they existed.
  kw = dict(global_batch_size=64, seed=5)
  plain = take(data.train_batches("digits", **kw), 3)
  explicit = take(
    data.train_batches(
      "digits", minival_examples=0, max_train_examples=None, **kw
    ),
    3,
  )
  assert_batches_equal(explicit, plain)
  big = take(data.train_batches("digits", max_train_examples=5000, **kw), 3)
  assert_batches_equal(big, plain)  # More than there are: all, unchanged.
  assert data.get_info("digits", minival_examples=0).num_minival == 0


# ------------------------------------------------------------------ image ops


def test_cifar_augmentation_is_a_padded_crop_maybe_flipped():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  windows = set()
  for top, left in itertools.product(range(9), repeat=2):
    window = padded[top : top + 32, left : left + 32]
    windows |= {window.tobytes(), window[:, ::-1].tobytes()}
  outs = [data._pad_crop_flip(image, rng) for _ in range(50)]  # pylint: disable=protected-access
  assert all(o.shape == (32, 32, 3) and o.tobytes() in windows for o in outs)
  assert len({o.tobytes() for o in outs}) > 25


def test_inception_crop_box_stays_inside_the_image():
  rng = np.random.default_rng(0)
  for height, width in [
    (375, 500),
    (500, 375),
    (7, 11),
    (10, 1000),
    (1000, 10),
  ]:
    for _ in range(200):
      top, left, h, w = data._inception_crop_box(height, width, rng)  # pylint: disable=protected-access
      assert 0 < h and 0 < w and top >= 0 and left >= 0
      assert top + h <= height and left + w <= width
  # Extreme shapes fall back to the centred crop with the extreme allowed ratio.
  assert data._inception_crop_box(10, 1000, rng) == (0, 493, 10, 13)  # pylint: disable=protected-access


# ------------------------------------------------------------------ tfds (mocked)


@pytest.fixture
def mock_tfds():
  # USE_CODE: no metadata files needed; every split serves the same
  # MOCK_EXAMPLES deterministic random examples.
  with tfds.testing.mock_data(
    num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    yield


@pytest.mark.parametrize(
  "name, shape, classes",
  [("cifar10", (32, 32, 3), 10), ("imagenet2012", (224, 224, 3), 1000)],
)
def test_tfds_pipelines(mock_tfds, name, shape, classes):
  del mock_tfds
  info = data.get_info(name)
  assert info == data.DatasetInfo(
    name, shape, classes, MOCK_EXAMPLES, MOCK_EXAMPLES
  )

  # One step per epoch, so consecutive steps hold the same 20 examples,
  # reshuffled and re-augmented.
  train = take(
    data.train_batches(name, global_batch_size=MOCK_EXAMPLES, seed=0), 2
  )
  for b in train:
    assert b["image"].shape == (MOCK_EXAMPLES, *shape)
    assert b["image"].dtype == np.float32 and np.isfinite(b["image"]).all()
    assert b["label"].dtype == np.int32
    assert ((b["label"] >= 0) & (b["label"] < classes)).all()
  np.testing.assert_array_equal(
    np.sort(train[0]["label"]), np.sort(train[1]["label"])
  )
  seen = {img.tobytes() for img in train[0]["image"]}
  changed = sum(img.tobytes() not in seen for img in train[1]["image"])
  assert changed >= MOCK_EXAMPLES // 2, (
    "augmentation should differ between epochs"
  )

  evals = list(data.eval_batches(name, global_batch_size=8))
  assert [int(b["mask"].sum()) for b in evals] == [8, 8, 4]
  last = evals[-1]
  assert last["image"].shape == (8, *shape) and last["mask"].dtype == np.bool_
  assert not last["image"][4:].any()  # Padding is zeros, masked out.
  # Evaluation is deterministic: the same pass twice gives the same batches.
  assert_batches_equal(
    evals, list(data.eval_batches(name, global_batch_size=8))
  )
  # Sanity of the normalisation on random uint8 pixels: roughly centred.
  assert abs(float(evals[0]["image"].mean())) < 1.0


def test_imagenet_test_means_validation(mock_tfds):
  del mock_tfds
  batches = list(
    data.eval_batches(
      "imagenet2012", "test", global_batch_size=16, max_examples=5
    )
  )
  assert len(batches) == 1 and int(batches[0]["mask"].sum()) == 5


def test_tfds_resume_and_sharding(mock_tfds):
  del mock_tfds
  kw = dict(global_batch_size=8, seed=5)  # 2 steps per epoch
  full = take(data.train_batches("cifar10", **kw), 5)
  resumed = take(data.train_batches("cifar10", start_step=3, **kw), 2)
  assert_batches_equal(resumed, full[3:])
  shards = [
    take(
      data.train_batches("cifar10", process_index=p, process_count=2, **kw), 5
    )
    for p in range(2)
  ]
  assert_batches_equal([concat_shards(pair) for pair in zip(*shards)], full)


# ------------------------------------------------------------------ missing data


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_missing_data_says_how_to_prepare(tmp_path, name):
  with pytest.raises(data.DatasetNotFoundError) as err:
    data.get_info(name, data_dir=str(tmp_path))
  assert isinstance(err.value, FileNotFoundError)
  msg = str(err.value)
  assert (
    f"tfds build {name} --file_format=array_record --data_dir={tmp_path}" in msg
  )
  assert "pip install tensorflow" in msg
  if name == "imagenet2012":
    assert f"{tmp_path}/downloads/manual" in msg
    assert "ILSVRC2012_img_train.tar" in msg
  with pytest.raises(data.DatasetNotFoundError):
    data.train_batches(
      name, global_batch_size=8, seed=0, data_dir=str(tmp_path)
    )
