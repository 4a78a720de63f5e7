"""The "tensors" point convention: a tensor transformed once for every reader.

Under the default ("layer_inputs") a ResNet identity shortcut's residual add
reads the float block input; under "tensors" it reads the perturbed /
quantized one, like an integer deployment that stores the tensor once.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from l1grad import config_lib
from l1grad import errors
from l1grad import models
from l1grad import penalty
from l1grad import perturb
from l1grad import ptq
from l1grad import quant
from l1grad import report as report_lib
from tests import tiny_configs


class ShortcutBlock(nn.Module):
  """``conv(x)·0 + x``: the output depends on the shortcut alone."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1])(x) * 0.0 + x


class ShortcutOnly(nn.Module):
  """First layer, then a block whose conv branch is multiplied by 0."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = nn.Dense(5)(x)  # reads the input: no point
    return ShortcutBlock()(h)  # the point is h, read by Dense and the add


class TwoBranches(nn.Module):
  """One tensor fed to two blocks: each block's add reads it."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = nn.Dense(4)(x)
    return ShortcutBlock()(h) + ShortcutBlock()(h)


def _shortcut_problem(model=None):
  model = model or ShortcutOnly()
  x = jax.random.normal(jax.random.key(0), (6, 3))
  variables = model.init(jax.random.key(1), x)
  first = variables["params"]["Dense_0"]
  hidden = x @ first["kernel"] + first["bias"]  # the point's float value
  return model, variables, x, hidden


def test_sites_are_the_enclosing_blocks_and_keys_do_not_change():
  model, variables, x, _ = _shortcut_problem()
  fn = lambda v, x: model.apply(v, x)
  assert perturb.tensor_sites(fn, variables, x) == {
    "ShortcutBlock_0": "ShortcutBlock_0/Dense_0"
  }
  assert list(perturb.activation_shapes(fn, variables, x)) == [
    "ShortcutBlock_0/Dense_0"
  ]
  assert perturb.point_sites("layer_inputs", fn, variables, x) is None
  with pytest.raises(ValueError, match="points must be one of"):
    perturb.point_sites("everything", fn, variables, x)

  resnet = models.get_model("tiny_resnet", num_classes=3)
  images = jnp.zeros((2, 8, 8, 3))
  rvars = jax.eval_shape(
    lambda: resnet.init(jax.random.key(0), images, train=False)
  )
  rfn = lambda v, x: resnet.apply(v, x, train=False)
  # Never the model itself (its input is the image): the blocks, whose input
  # the stem (block 0) or the previous block (block 1) produced.
  assert perturb.tensor_sites(rfn, rvars, images) == {
    "ResNetBlock_0": "ResNetBlock_0/Conv_0",
    "ResNetBlock_1": "ResNetBlock_1/Conv_0",
  }


@pytest.mark.parametrize("points", ["layer_inputs", "tensors"])
def test_quantized_shortcut_shows_only_under_tensors(points):
  model, variables, x, hidden = _shortcut_problem()
  low, high = float(hidden.min()), float(hidden.max())
  ranges = {"ShortcutBlock_0/Dense_0": (low, high)}
  logits = ptq.quantized_apply(
    model, variables, ranges, 2, x, {}, points=points
  )
  if points == "layer_inputs":  # the add reads the float tensor
    np.testing.assert_array_equal(logits, hidden)
  else:  # the add reads the 2-bit tensor: on the grid, not the float one
    expected = quant.quantize_activation(hidden, 2, low, high)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)
    assert len(np.unique(np.asarray(logits))) <= 4
    assert np.abs(np.asarray(logits - hidden)).max() > 0.05


def test_a_tensor_read_by_two_blocks_is_quantized_once_for_both():
  model, variables, x, hidden = _shortcut_problem(TwoBranches())
  fn = lambda v, x: model.apply(v, x)
  sites = perturb.tensor_sites(fn, variables, x)
  assert sites == {
    "ShortcutBlock_0": "ShortcutBlock_0/Dense_0",
    "ShortcutBlock_1": "ShortcutBlock_0/Dense_0",
  }
  calls = []

  def transform(key, h):
    calls.append(key)
    return jnp.round(h)

  with perturb.transform_layer_inputs(transform, sites=sites):
    out = model.apply(variables, x)
  assert calls == ["ShortcutBlock_0/Dense_0"]
  np.testing.assert_allclose(out, 2 * jnp.round(hidden), atol=1e-6)


def _resnet_problem(name="tiny_resnet", batch=4, size=8):
  model = models.get_model(name, num_classes=5)
  x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 5)
  variables = jax.jit(model.init, static_argnames='train')(
    jax.random.key(2), x, train=False
  )

  def loss_fn(params, stats, x, y):  # batch norm in train mode
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates

  return loss_fn, variables, (variables["batch_stats"], x, y)


def _block_input_gradient_l1(loss_fn, params, args):
  """‖∇_A L‖₁ with each block input perturbed explicitly, by hand.

  ``eps`` is added to every ResNetBlock's input (so the conv, the projection
  and the residual add all read it) and to the input of each Conv/Dense that
  reads something else (the second conv of a block, the head); the stem conv
  reads the image and gets none.
  """
  block_inputs = []
  other_inputs = []

  def spy(next_fun, a, kw, context):
    module = context.module
    if context.method_name == "__call__":
      if isinstance(module, models.ResNetBlock):
        block_inputs.append(a[0])
      elif isinstance(module, (nn.Conv, nn.Dense)) and not any(
        a[0] is b for b in block_inputs
      ):
        other_inputs.append(a[0])
    return next_fun(*a, **kw)

  with nn.intercept_methods(spy):
    jax.eval_shape(lambda p: loss_fn(p, *args), params)
  other_shapes = [o.shape for o in other_inputs[1:]]  # not the image
  block_shapes = [b.shape for b in block_inputs]

  def loss_eps(p, eps):
    blocks, others = list(eps[0]), list(eps[1])
    first = [True]

    def add(next_fun, a, kw, context):
      module = context.module
      if context.method_name != "__call__":
        return next_fun(*a, **kw)
      if isinstance(module, models.ResNetBlock):
        return next_fun(a[0] + blocks.pop(0), *a[1:], **kw)
      if isinstance(module, (nn.Conv, nn.Dense)):
        if first[0]:
          first[0] = False
        elif module.name not in ("Conv_0", "conv_proj"):
          return next_fun(a[0] + others.pop(0), *a[1:], **kw)
      return next_fun(*a, **kw)

    with nn.intercept_methods(add):
      return loss_fn(p, *args)[0]

  eps = (
    [jnp.zeros(s) for s in block_shapes],
    [jnp.zeros(s) for s in other_shapes],
  )
  grads = jax.jit(jax.grad(loss_eps, argnums=1))(params, eps)
  return sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))


def test_penalty_tensors_matches_explicit_block_input_perturbation():
  loss_fn, variables, args = _resnet_problem()
  params = variables["params"]
  info = {}
  for points in ("layer_inputs", "tensors"):
    f = jax.jit(penalty.value_and_grad(loss_fn, has_aux=True, points=points))
    (_, info[points]), _ = f(params, *args)
  reference = _block_input_gradient_l1(loss_fn, params, args)
  np.testing.assert_allclose(
    info["tensors"]["act_grad_l1"], reference, rtol=1e-5
  )
  # Same loss and weight gradient; only the activation gradient differs.
  for k in ("loss", "weight_grad_l1"):
    assert info["tensors"][k] == info["layer_inputs"][k]
  assert float(info["tensors"]["act_grad_l1"]) != pytest.approx(
    float(info["layer_inputs"]["act_grad_l1"]), rel=1e-3
  )


def test_penalty_gradient_under_tensors_matches_reverse_mode():
  loss_fn, variables, args = _resnet_problem(batch=2)
  params = variables["params"]
  kw = dict(has_aux=True, points="tensors", weight_coef=0.1, act_coef=0.2)
  (v_hvp, _), g_hvp = jax.jit(penalty.value_and_grad(loss_fn, **kw))(
    params, *args
  )
  (v_rev, _), g_rev = jax.jit(
    penalty.value_and_grad(loss_fn, method="reverse", **kw)
  )(params, *args)
  np.testing.assert_allclose(v_hvp, v_rev, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_hvp), jax.tree.leaves(g_rev)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_conventions_coincide_without_shortcuts():
  model = models.get_model("tiny_vgg", num_classes=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  fn = lambda v, x: model.apply(v, x, train=False)
  assert perturb.tensor_sites(fn, variables, x) == {}
  ranges = {k: (-3.0, 3.0) for k in perturb.activation_shapes(fn, variables, x)}
  out = {
    points: jax.jit(
      lambda v, x, points=points: ptq.quantized_apply(
        model, v, ranges, 3, x, points=points
      )
    )(variables, x)
    for points in ("layer_inputs", "tensors")
  }
  np.testing.assert_array_equal(out["layer_inputs"], out["tensors"])


def test_settings_config_and_report_name_the_convention():
  assert ptq.Settings().act_points == "layer_inputs"
  with pytest.raises(errors.ConfigError, match="--act_points"):
    ptq.Settings(act_points="outputs")
  text = report_lib.conventions(ptq.Settings(act_points="tensors"))
  assert "act_points=tensors" in text["shortcuts"]
  assert (
    "act_points=layer_inputs"
    in report_lib.conventions(ptq.Settings())["shortcuts"]
  )
  assert ptq.Settings(act_points="tensors").to_json()["act_points"] == "tensors"
  with pytest.raises(ValueError, match="points must be one of"):
    penalty.value_and_grad(lambda p: 0.0, points="outputs")
  config = tiny_configs.tiny_digits()
  assert config.reg.points == "layer_inputs"
  config.reg.points = "outputs"
  with pytest.raises(errors.ConfigError, match="reg.points"):
    config_lib.validate(config)
  # A config stored before the field existed still validates.
  old = tiny_configs.tiny_digits()
  del old.reg["points"]
  config_lib.validate(ml_collections.ConfigDict(old))


def test_a_run_stored_before_reg_points_resumes_as_layer_inputs():
  old = tiny_configs.tiny_digits()
  del old.reg["points"]
  config_lib.check_same_run(tiny_configs.tiny_digits(), old, "w")
  with pytest.raises(errors.ConfigError, match="reg.points"):
    config_lib.check_same_run(
      tiny_configs.tiny_digits(**{"reg.points": "tensors"}), old, "w"
    )
