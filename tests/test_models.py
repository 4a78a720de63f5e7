"""Tests for l1grad.models: sizes, shapes, and the layer conventions.

The full-size models are only traced (``jax.eval_shape``), never run; the
forward passes use tiny widths, so the file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from l1grad import models
from l1grad import params as params_lib

# name -> (overrides giving a tiny network, input shape without batch).
TINY = {
  "digits_cnn": (dict(width=4), (8, 8, 1)),
  "vgg_like": (dict(width_multiplier=1 / 32), (8, 8, 3)),
  "resnet18_cifar": (dict(num_filters=2), (8, 8, 3)),
  "resnet18_imagenet": (dict(num_filters=2), (32, 32, 3)),
  "tiny_resnet": ({}, (8, 8, 3)),
  "tiny_vgg": ({}, (8, 8, 3)),
}
NUM_CLASSES = 5
BATCH = 2


def _count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_init(
  model: nn.Module, shape: tuple[int, ...]
) -> tuple[Any, jax.ShapeDtypeStruct]:
  """Shapes of the variables and of a batch, with nothing computed."""
  x = jax.ShapeDtypeStruct((BATCH, *shape), jnp.float32)
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), x
  )
  return variables, x


def _bn_params(channels: int) -> int:
  return 2 * channels  # scale γ and bias β; running statistics are not params


@dataclasses.dataclass
class _Call:
  module: nn.Module
  inputs: jax.Array
  outputs: jax.Array


def _record_calls(
  model: nn.Module, variables: Any, x: Any, *, train: bool
) -> list[_Call]:
  """Traces the model (no compute) and records every submodule __call__.

  Inputs and outputs are the tracers themselves, so identity (``is``) shows
  which layer output feeds which layer, as it does for the perturbation code.
  """
  calls: list[_Call] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.path:
      inputs = args[0] if args else kwargs["inputs"]
      calls.append(_Call(context.module, inputs, out))
    return out

  def apply(variables, x):
    with nn.intercept_methods(record):
      if train:
        return model.apply(variables, x, train=True, mutable=["batch_stats"])
      return model.apply(variables, x, train=False)

  jax.eval_shape(apply, variables, x)
  return calls


# ----------------------------------------------------------------- sizes ----


def test_resnet18_imagenet_matches_torchvision_count():
  model = models.get_model("resnet18_imagenet", num_classes=1000)
  variables, _ = _abstract_init(model, (224, 224, 3))
  assert _count(variables["params"]) == 11_689_512
  # Running mean and variance of the 20 BNs: 2 × (64 + 4·64 + 4·128 + 4·256
  # + 4·512 + 128 + 256 + 512) channels.
  assert _count(variables["batch_stats"]) == 9_600


def test_resnet18_cifar_count():
  model = models.get_model("resnet18_cifar", num_classes=10)
  variables, _ = _abstract_init(model, (32, 32, 3))
  assert _count(variables["params"]) == 11_173_962


def test_vgg_like_count_from_architecture():
  # 2×128C3 – MP2 – 2×256C3 – MP2 – 2×512C3 – MP2 – 1024FC(+BN) – 10.
  channels = [3, 128, 128, 256, 256, 512, 512]
  convs = sum(9 * cin * cout for cin, cout in zip(channels, channels[1:]))
  assert convs == 4_574_592
  conv_bns = sum(_bn_params(c) for c in channels[1:])
  flat = 4 * 4 * 512  # 32 / 2³ = 4
  fc = flat * 1024 + _bn_params(1024)  # no FC bias: the BN's β replaces it
  head = 1024 * 10 + 10
  expected = convs + conv_bns + fc + head
  assert expected == 12_979_082

  model = models.get_model("vgg_like", num_classes=10)
  variables, _ = _abstract_init(model, (32, 32, 3))
  assert _count(variables["params"]) == expected


def test_vgg_like_without_fc_batch_norm_count():
  model = models.get_model("vgg_like", num_classes=10, fc_batch_norm=False)
  variables, _ = _abstract_init(model, (32, 32, 3))
  # The FC's BN (2·1024) is replaced by its bias (1024).
  assert _count(variables["params"]) == 12_979_082 - 2 * 1024 + 1024


@pytest.mark.parametrize("width", [32, 8])
def test_digits_cnn_count(width):
  w = width
  convs = 9 * (1 * w + w * 2 * w + 2 * w * 2 * w)
  bns = _bn_params(w) + 2 * _bn_params(2 * w) + _bn_params(4 * w)
  fc = (4 * 4 * 2 * w) * (4 * w)  # 8×8 → one 2×2 max-pool → 4×4
  head = 4 * w * 10 + 10
  model = models.get_model("digits_cnn", num_classes=10, width=width)
  variables, _ = _abstract_init(model, (8, 8, 1))
  assert _count(variables["params"]) == convs + bns + fc + head
  if width == 32:
    assert convs + bns + fc + head == 188_522  # stated in the docstring


# ---------------------------------------------------------- forward pass ----


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_forward_shapes_dtypes_and_batch_stats(name):
  overrides, shape = TINY[name]
  model = models.get_model(name, num_classes=NUM_CLASSES, **overrides)
  x = jax.random.normal(jax.random.key(1), (BATCH, *shape))

  # One compiled function per model: compiling dominates on CPU.
  @jax.jit
  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    train_logits, updates = model.apply(
      variables, x, train=True, mutable=["batch_stats"]
    )
    eval_batch = model.apply(variables, x, train=False)
    eval_first = model.apply(variables, x[:1], train=False)
    return variables, train_logits, updates, eval_batch, eval_first

  variables, train_logits, updates, eval_batch, eval_first = run(x)
  assert set(variables) == {"params", "batch_stats"}
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  for logits in (train_logits, eval_batch):
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))

  assert set(updates) == {"batch_stats"}
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
    variables["batch_stats"]
  )
  # Every running statistic moved towards the batch's (random inputs).
  changed = jax.tree.map(
    lambda new, old: bool(jnp.any(new != old)),
    updates["batch_stats"],
    variables["batch_stats"],
  )
  assert all(jax.tree.leaves(changed))

  # Evaluation uses the running averages: an example's logits do not depend
  # on the rest of its batch (batch statistics would make them).
  np.testing.assert_allclose(eval_first, eval_batch[:1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(train_logits, eval_batch)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  overrides, shape = TINY[name]
  model = models.get_model(
    name, num_classes=NUM_CLASSES, dtype=jnp.bfloat16, **overrides
  )
  variables, x = _abstract_init(model, shape)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  calls = _record_calls(model, variables, x, train=True)
  layer_dtypes = {
    c.outputs.dtype
    for c in calls
    if isinstance(c.module, (nn.Conv, nn.Dense, nn.BatchNorm))
  }
  assert layer_dtypes == {jnp.dtype(jnp.bfloat16)}
  logits = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False), variables, x
  )
  assert logits.dtype == jnp.float32


def test_imagenet_stem_on_tiny_resnet():
  model = models.get_model("tiny_resnet", num_classes=3, stem="imagenet")
  variables, x = _abstract_init(model, (16, 16, 3))
  assert variables["params"]["conv_init"]["kernel"].shape == (7, 7, 3, 8)
  logits = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False), variables, x
  )
  assert logits.shape == (BATCH, 3)


def test_unknown_stem_raises():
  model = models.get_model("tiny_resnet", num_classes=3, stem="mnist")
  with pytest.raises(ValueError, match="imagenet"):
    _abstract_init(model, (8, 8, 3))


def test_vgg_dropout_only_in_training():
  model = models.get_model("tiny_vgg", num_classes=3, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (BATCH, 8, 8, 3))

  @jax.jit
  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)

    def train_logits(seed):
      logits, _ = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(seed)},
      )
      return logits

    return (
      train_logits(0),
      train_logits(1),
      model.apply(variables, x, train=False),
    )

  train_0, train_1, _ = run(x)
  assert not np.allclose(train_0, train_1)
  # Evaluation needs no dropout rng (it would raise if Dropout were active).
  variables, _ = _abstract_init(model, (8, 8, 3))
  jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


@pytest.mark.parametrize(
  "variant, base, fields",
  [
    (
      models.TinyResNet,
      models.ResNet,
      dict(stage_sizes=(1, 1), num_filters=8, stem="cifar"),
    ),
    (models.TinyVGG, models.VGGLike, dict(width_multiplier=1 / 32)),
  ],
  ids=["tiny_resnet", "tiny_vgg"],
)
def test_tiny_models_are_the_real_ones_with_other_defaults(
  variant, base, fields
):
  # What the tests of the tiny models say about the real ones holds only if
  # they run the same code: same variables and logits as the real class with
  # the tiny sizes set explicitly.
  x = jax.random.normal(jax.random.key(1), (BATCH, 8, 8, 3))

  @jax.jit
  def run(x):
    out = []
    for model in (variant(num_classes=3), base(num_classes=3, **fields)):
      variables = model.init(jax.random.key(0), x, train=False)
      out.append((variables, model.apply(variables, x, train=False)))
    return out

  (tiny_vars, tiny_logits), (base_vars, base_logits) = run(x)
  chex.assert_trees_all_equal(tiny_vars, base_vars)
  np.testing.assert_array_equal(tiny_logits, base_logits)


# -------------------------------------------------------------- registry ----


def test_get_model_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as info:
    models.get_model("resnet50", num_classes=10)
  for name in models.MODEL_NAMES:
    assert name in str(info.value)


def test_get_model_unknown_override_lists_fields():
  with pytest.raises(TypeError, match="width_multiplier"):
    models.get_model("vgg_like", num_classes=10, widht=3)


def test_from_config_builds_the_configured_model():
  config = ml_collections.ConfigDict(
    {
      "model": "resnet18_cifar",
      "model_kwargs": {"num_filters": 16},
      "compute_dtype": "float32",
    }
  )
  model = models.from_config(config, 100)
  assert model == models.get_model(
    "resnet18_cifar", num_classes=100, num_filters=16
  )
  config.compute_dtype = "bfloat16"
  config.model_kwargs = None
  model = models.from_config(config, num_classes=7)
  assert model == models.get_model(
    "resnet18_cifar", num_classes=7, dtype=jnp.bfloat16
  )
  config.model = "resnet50"
  with pytest.raises(ValueError, match="resnet18_cifar"):
    models.from_config(config, 7)


def test_get_model_forwards_overrides():
  model = models.get_model("resnet18_cifar", num_classes=100, num_filters=16)
  assert isinstance(model, models.ResNet18CIFAR)
  assert model.num_classes == 100 and model.num_filters == 16
  assert model.stem == "cifar" and tuple(model.stage_sizes) == (2, 2, 2, 2)
  assert models.MODEL_NAMES == (
    "digits_cnn",
    "vgg_like",
    "resnet18_cifar",
    "resnet18_imagenet",
    "tiny_resnet",
    "tiny_vgg",
  )


# ------------------------------------------- conventions the library uses ----


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_kernel_belongs_to_a_plain_conv_or_dense(name):
  overrides, shape = TINY[name]
  model = models.get_model(name, num_classes=NUM_CLASSES, **overrides)
  variables, x = _abstract_init(model, shape)
  calls = _record_calls(model, variables, x, train=False)
  layer_calls = [c for c in calls if isinstance(c.module, (nn.Conv, nn.Dense))]
  # Exactly the two classes the interceptors look for: no subclasses, no
  # DenseGeneral or other kernel-holding module.
  for c in layer_calls:
    assert type(c.module) in (nn.Conv, nn.Dense), type(c.module)
  # And each layer's kernel goes by the layer's name, as its input's
  # perturbation point does.
  kernels, _ = params_lib.split_kernels(variables["params"])
  assert len(layer_calls) == len(kernels)
  assert sorted(
    params_lib.layer_name(c.module.path) for c in layer_calls
  ) == sorted(kernels)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_reads_a_bias_free_conv_or_dense_output(name, train):
  overrides, shape = TINY[name]
  model = models.get_model(name, num_classes=NUM_CLASSES, **overrides)
  variables, x = _abstract_init(model, shape)
  calls = _record_calls(model, variables, x, train=train)
  producers = {
    id(c.outputs): c.module
    for c in calls
    if isinstance(c.module, (nn.Conv, nn.Dense))
  }
  norms = [c for c in calls if isinstance(c.module, nn.BatchNorm)]
  assert norms
  for c in norms:
    # Applied directly to the layer's output (so it can be folded into it),
    # with PyTorch's BN hyper-parameters.
    assert id(c.inputs) in producers, c.module.path
    assert not producers[id(c.inputs)].use_bias, c.module.path
    assert c.module.use_running_average == (not train)
    assert c.module.momentum == 0.9
    assert c.module.epsilon == 1e-5
  # Every Conv feeds a BN (the logits layer is a Dense).
  normed = {id(c.inputs) for c in norms}
  convs = [c for c in calls if isinstance(c.module, nn.Conv)]
  assert all(id(c.outputs) in normed for c in convs)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_projection_shortcut_reads_the_block_input_itself(stem):
  # The perturbation code treats one traced array read by two layers as one
  # activation; that requires the very same array object, not a copy.
  model = models.get_model("tiny_resnet", num_classes=3, stem=stem)
  variables, x = _abstract_init(model, (16, 16, 3))
  calls = _record_calls(model, variables, x, train=False)
  convs = {c.module.path: c for c in calls if isinstance(c.module, nn.Conv)}
  projections = [p for p in convs if p[-1] == "conv_proj"]
  assert projections == [("ResNetBlock_1", "conv_proj")]
  for path in projections:
    first = convs[(*path[:-1], "Conv_0")]
    assert convs[path].inputs is first.inputs
    assert convs[path].module.strides == (2, 2)
