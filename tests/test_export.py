"""Integer export: packing, and the loaded model reproducing the fake-quantized logits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l1grad import errors
from l1grad import export
from l1grad import models
from l1grad import ptq


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
  images = jax.random.normal(jax.random.key(0), (6, 8, 8, 1 if name == "digits_cnn" else 3))
  variables = model.init(jax.random.key(1), images, train=False)
  rng = np.random.default_rng(0)
  # Non-trivial batch norm (as after training), so folding changes the kernels.
  variables = {
      "params": variables["params"],
      "batch_stats": jax.tree.map(
          lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), variables["batch_stats"]),
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
    tmp_path, name, kwargs, w_bits, a_bits, per_channel, storage):
  model, variables, images = _model_and_variables(name, **kwargs)
  folded = ptq.prepare_variables(model, variables, images)
  ranges = ptq.bn_activation_ranges(model, variables, images)
  out = str(tmp_path / "exported")
  info = export.export_model(
      out, model_name=name, num_classes=5, model_kwargs=kwargs, variables=folded,
      ranges=ranges, w_bits=w_bits, a_bits=a_bits, per_channel=per_channel,
      metadata={"step": 3}, check_images=images)
  assert info.max_abs_diff == 0.0
  assert info.bytes == sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))

  loaded = export.load_exported(out)
  want = ptq.Evaluator(model, per_channel=per_channel).quantized_logits(
      folded, ptq.range_tree(ranges), jnp.int32(w_bits), jnp.int32(a_bits), images)
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
      assert np.abs(codes).max() == hi  # the largest weight sits on the grid's edge
      scale = npz[f"scales/{kernel}"]
      assert scale.shape == ((1,) * (len(spec["shape"]) - 1) + (spec["shape"][-1],)
                             if per_channel else ())
    assert not any(k.startswith("params/") and k.endswith("kernel") for k in npz.files)


@pytest.mark.parametrize("w_bits, storage", [(3, "int4x2"), (8, "int8"), (12, "int16")])
def test_dequantized_kernels_are_the_fake_quantized_kernels(tmp_path, w_bits, storage):
  model, variables, images = _model_and_variables("digits_cnn", width=4)
  folded = ptq.prepare_variables(model, variables, images)
  out = str(tmp_path / "exported")
  export.export_model(out, model_name="digits_cnn", num_classes=5, model_kwargs={"width": 4},
                      variables=folded, ranges={}, w_bits=w_bits, a_bits=8)
  loaded = export.load_exported(out)
  assert {s["storage"] for s in loaded.manifest["kernels"].values()} == {storage}
  want = ptq.quantize_params(folded.params, w_bits)
  jax.tree.map(np.testing.assert_array_equal, loaded.variables.params,
               jax.tree.map(np.asarray, want))
  jax.tree.map(np.testing.assert_array_equal, loaded.variables.biases, folded.biases)


def test_load_exported_rejects_a_directory_that_is_not_an_export(tmp_path):
  with pytest.raises(errors.UserError, match="not an l1grad export"):
    export.load_exported(str(tmp_path))
