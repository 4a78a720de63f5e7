"""Integer export: packing, and the loaded model reproducing the fake-quantized logits."""

import json
import os
import re
import shlex

from conftest import ROOT
from conftest import run_main
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l1grad import data
from l1grad import errors
from l1grad import export
from l1grad import models
from l1grad import ptq
from l1grad import ranges as ranges_lib
from l1grad import runs as runs_lib


@pytest.mark.parametrize("size", [0, 1, 7, 64])
def test_int4_packing_round_trip(size):
  codes = np.random.default_rng(size).integers(-8, 8, size=size).astype(np.int8)
  packed = export.pack_int4(codes)
  assert packed.dtype == np.uint8 and packed.size == (size + 1) // 2
  np.testing.assert_array_equal(export.unpack_int4(packed, (size,)), codes)
  with pytest.raises(ValueError):
    export.pack_int4(np.array([8]))


def _model_and_variables(name, **kwargs):
  model = models.get_model(name, num_classes=5, **kwargs)
  images = jax.random.normal(
    jax.random.key(0), (6, 8, 8, 1 if name == "digits_cnn" else 3)
  )
  variables = model.init(jax.random.key(1), images, train=False)
  rng = np.random.default_rng(0)
  # Non-trivial batch norm (as after training), so folding changes the kernels.
  variables = {
    "params": variables["params"],
    "batch_stats": jax.tree.map(
      lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32),
      variables["batch_stats"],
    ),
  }
  return model, variables, images


@pytest.mark.parametrize(
  "name, kwargs, w_bits, a_bits, per_channel, storage",
  [
    ("digits_cnn", {"width": 4}, 4, 4, False, "int4x2"),
    ("tiny_resnet", {"num_filters": 4}, 6, 8, True, "int8"),
  ],
)
def test_exported_model_reproduces_fake_quantized_logits(
  tmp_path, name, kwargs, w_bits, a_bits, per_channel, storage
):
  model, variables, images = _model_and_variables(name, **kwargs)
  folded = runs_lib.prepare_variables(model, variables, images)
  ranges = ranges_lib.bn_activation_ranges(model, variables, images)
  out = str(tmp_path / "exported")
  info = export.export_model(
    out,
    model_name=name,
    num_classes=5,
    model_kwargs=kwargs,
    variables=folded,
    ranges=ranges,
    w_bits=w_bits,
    a_bits=a_bits,
    per_channel=per_channel,
    metadata={"step": 3},
    check_images=images,
  )
  assert info.max_abs_diff == 0.0
  assert info.bytes == sum(
    os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
  )

  loaded = export.load_exported(out)
  want = ptq.Evaluator(model, per_channel=per_channel).quantized_logits(
    folded,
    ranges_lib.range_tree(ranges),
    jnp.int32(w_bits),
    jnp.int32(a_bits),
    images,
  )
  np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(want))

  manifest = json.load(open(os.path.join(out, export.MANIFEST)))
  assert manifest["w_bits"] == w_bits and manifest["a_bits"] == a_bits
  assert manifest["source"] == {"step": 3}
  assert set(manifest["activation_ranges"]) == set(ranges)
  assert manifest["folded"]  # batch norms folded into the kernels
  hi = 2 ** (w_bits - 1) - 1
  with np.load(os.path.join(out, export.WEIGHTS)) as npz:
    for kernel, spec in manifest["kernels"].items():
      assert spec["storage"] == storage
      stored = npz[f"codes/{kernel}"]
      size = int(np.prod(spec["shape"]))
      assert stored.nbytes == ((size + 1) // 2 if storage == "int4x2" else size)
      codes = loaded.codes[kernel]
      assert (
        np.abs(codes).max() == hi
      )  # the largest weight sits on the grid's edge
      scale = npz[f"scales/{kernel}"]
      assert scale.shape == (
        (1,) * (len(spec["shape"]) - 1) + (spec["shape"][-1],)
        if per_channel
        else ()
      )
    assert not any(
      k.startswith("params/") and k.endswith("kernel") for k in npz.files
    )


@pytest.mark.parametrize(
  "w_bits, storage", [(3, "int4x2"), (8, "int8"), (12, "int16")]
)
def test_dequantized_kernels_are_the_fake_quantized_kernels(
  tmp_path, w_bits, storage
):
  model, variables, images = _model_and_variables("digits_cnn", width=4)
  folded = runs_lib.prepare_variables(model, variables, images)
  out = str(tmp_path / "exported")
  export.export_model(
    out,
    model_name="digits_cnn",
    num_classes=5,
    model_kwargs={"width": 4},
    variables=folded,
    ranges={},
    w_bits=w_bits,
    a_bits=8,
  )
  loaded = export.load_exported(out)
  assert {s["storage"] for s in loaded.manifest["kernels"].values()} == {
    storage
  }
  want = ptq.quantize_params(folded.params, w_bits)
  jax.tree.map(
    np.testing.assert_array_equal,
    loaded.variables.params,
    jax.tree.map(np.asarray, want),
  )
  jax.tree.map(
    np.testing.assert_array_equal, loaded.variables.biases, folded.biases
  )


def test_load_exported_rejects_a_directory_that_is_not_an_export(tmp_path):
  with pytest.raises(errors.UserError, match="not an l1grad export"):
    export.load_exported(str(tmp_path))


# ---------------------------------------------------------------------------
# Input preprocessing: the loaded model takes raw images.
# ---------------------------------------------------------------------------


def _digits_export(tmp_path, preprocessing):
  model, variables, images = _model_and_variables("digits_cnn", width=4)
  out = str(tmp_path / "exported")
  export.export_model(
    out,
    model_name="digits_cnn",
    num_classes=5,
    model_kwargs={"width": 4},
    variables=runs_lib.prepare_variables(model, variables, images),
    ranges=ranges_lib.bn_activation_ranges(model, variables, images),
    w_bits=8,
    a_bits=8,
    preprocessing=preprocessing,
  )
  return out


def test_raw_digits_are_normalised_bit_for_bit_as_in_training(tmp_path):
  out = _digits_export(tmp_path, data.input_normalization("digits"))
  manifest = json.load(open(os.path.join(out, export.MANIFEST)))
  spec = manifest["preprocessing"]
  assert spec["dataset"] == "digits" and spec["pixel_max"] == 16.0
  assert spec["image_shape"] == [8, 8, 1] and "0..16" in spec["raw"]
  assert spec["formula"] == export.PREPROCESSING_FORMULA

  loaded = export.load_exported(out)
  test_images = data._digits_splits()["test"][0]  # pylint: disable=protected-access
  raw = data._digits_scaled()[1] * 16  # pylint: disable=protected-access
  assert raw.shape == (360, 8, 8) and raw.max() == 16
  # Exactly the pipeline's model input, from [N, 8, 8] or [N, 8, 8, 1].
  np.testing.assert_array_equal(loaded.normalize(raw), test_images)
  np.testing.assert_array_equal(
    loaded.normalize(raw[..., None].astype(np.uint8)), test_images
  )
  np.testing.assert_array_equal(
    np.asarray(loaded(raw)), np.asarray(loaded(test_images, normalized=True))
  )
  with pytest.raises(errors.UserError, match="normalized=True"):
    loaded(test_images)  # already normalised (negative values), not raw
  with pytest.raises(errors.UserError, match=r"\[N, 8, 8, 1\]"):
    loaded(np.zeros((2, 8, 8, 3)))


@pytest.mark.parametrize("name, size", [("cifar10", 32), ("imagenet2012", 224)])
def test_uint8_normalisation_is_the_pipelines(name, size):
  # pylint: disable=protected-access
  spec = export._preprocessing_json(data.input_normalization(name))
  model = export.ExportedModel(
    None,
    {"activation_ranges": {}, "w_bits": 8, "a_bits": 8, "preprocessing": spec},
    {},
    {},
    {},
  )
  raw = (
    np.random.default_rng(0)
    .integers(0, 256, (2, size, size, 3))
    .astype(np.uint8)
  )
  mean, std = (
    (data._CIFAR10_MEAN, data._CIFAR10_STD)
    if name == "cifar10"
    else (data._IMAGENET_MEAN, data._IMAGENET_STD)
  )
  want = np.stack([data._normalize(x, mean, std) for x in raw])
  np.testing.assert_array_equal(model.normalize(raw), want)
  if (
    name == "cifar10"
  ):  # its evaluation preprocessing is the normalisation alone
    np.testing.assert_array_equal(want[0], data._PREPROCESS[name](raw[0], None))


def test_exports_without_recorded_preprocessing(tmp_path):
  # "preprocessing": null (export_model called without one): input as given.
  out = _digits_export(tmp_path, None)
  loaded = export.load_exported(out)
  assert loaded.manifest["preprocessing"] is None
  images = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(
    np.asarray(loaded(images)), np.asarray(loaded(images, normalized=True))
  )

  # An export from before the field existed: only normalized=True input.
  manifest_path = os.path.join(out, export.MANIFEST)
  manifest = json.load(open(manifest_path))
  del manifest["preprocessing"]
  manifest["source"] = {"workdir": "/runs/digits", "step": 4}
  json.dump(manifest, open(manifest_path, "w"))
  old = export.load_exported(out)
  np.testing.assert_array_equal(
    np.asarray(old(images, normalized=True)), np.asarray(loaded(images))
  )
  with pytest.raises(errors.UserError) as e:
    old(images)
  assert "normalized=True" in str(e.value)
  assert "--workdir /runs/digits --export 8:8" in str(e.value)


# ---------------------------------------------------------------------------
# The README's export example, run as written on a tiny trained run.
# ---------------------------------------------------------------------------


def _readme_export_blocks():
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = text[text.index("**Export on demand.**") :]
  section = section[: section.index("\n#")]  # up to the next heading
  blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
  (command,) = [code for lang, code in blocks if lang == "bash"]
  (example,) = [code for lang, code in blocks if lang == "python"]
  return command.strip(), example


def _eval_ptq_main(*argv):
  run_main("eval_ptq.py", *argv)


def test_readme_export_example_runs_as_written(tmp_path, monkeypatch, capsys):
  from tiny_configs import tiny_digits  # pylint: disable=g-import-not-at-top

  from l1grad import train  # pylint: disable=g-import-not-at-top

  command, example = _readme_export_blocks()
  argv = shlex.split(command)
  assert argv[:2] == ["python", "eval_ptq.py"]
  workdir = argv[argv.index("--workdir") + 1]
  monkeypatch.chdir(tmp_path)
  # The tiny digits run (2 epochs, width 4) where the README has its run.
  train.train_and_evaluate(tiny_digits(log_every_steps=1000), workdir)
  _eval_ptq_main(*argv[2:])
  capsys.readouterr()

  exec(compile(example, "README.md", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  match = re.search(r"all 1797 digits: (\d+\.\d+) %", printed)
  assert match, printed
  accuracy = float(match.group(1))

  # The same number as the exported model on the pipeline's own input, and
  # close to the float model's accuracy on it.
  loaded = export.load_exported(argv[argv.index("--export_dir") + 1])
  prepared = runs_lib.prepare_run(workdir, ptq.Settings())
  correct_q = correct_f = 0
  for split in ("train", "test"):
    batch = next(data.eval_batches("digits", split, global_batch_size=2000))
    mask = batch["mask"]
    labels = batch["label"][mask]
    q = np.argmax(loaded(batch["image"], normalized=True), -1)[mask]
    f = np.argmax(
      ranges_lib.apply_model(
        prepared.model, prepared.variables, batch["image"]
      ),
      -1,
    )[mask]
    correct_q += int((q == labels).sum())
    correct_f += int((f == labels).sum())
  assert (
    abs(accuracy - 100 * correct_q / 1797) < 0.006
  )  # printed with 2 decimals
  float_accuracy = 100 * correct_f / 1797
  assert float_accuracy > 80, float_accuracy
  assert abs(accuracy - float_accuracy) < 6, (accuracy, float_accuracy)
