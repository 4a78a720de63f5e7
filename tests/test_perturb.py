"""Activation perturbation points found by interception."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l1grad import params
from l1grad import perturb


class Block(nn.Module):
  """A residual block whose input feeds both the conv and the projection."""

  @nn.compact
  def __call__(self, x, train=True):
    y = nn.Conv(4, (3, 3), use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
    y = nn.Conv(4, (3, 3), use_bias=False)(y)
    shortcut = nn.Conv(4, (1, 1), use_bias=False, name="proj")(x)
    return nn.relu(y + shortcut)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    x = Block()(x, train)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = jnp.mean(x, axis=(1, 2))
    shared = nn.Dense(4, name="shared")
    x = shared(nn.relu(shared(x)))
    return nn.Dense(2)(x)


def _setup():
  model = Net()
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 1))
  variables = model.init({"params": jax.random.key(1)}, x, train=False)
  return model, variables, x


def _apply_train(model, variables, x):
  return model.apply(
    variables,
    x,
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": jax.random.key(2)},
  )


def test_points_skip_first_layer_share_inputs_and_count_repeats():
  model, variables, x = _setup()
  shapes = perturb.activation_shapes(
    lambda v, x: _apply_train(model, v, x), variables, x
  )
  # Conv_0 reads the image; proj reads the same tensor as Block_0/Conv_0.
  assert list(shapes) == [
    "Block_0/Conv_0",
    "Block_0/Conv_1",
    "shared",
    "shared#1",
    "Dense_0",
  ]
  assert shapes["Block_0/Conv_0"].shape == (2, 5, 5, 3)
  assert shapes["shared"].shape == (2, 4)


def test_zero_perturbation_is_identity_and_gradient_is_activation_gradient():
  model, variables, x = _setup()
  shapes = perturb.activation_shapes(
    lambda v, x: _apply_train(model, v, x), variables, x
  )
  eps = perturb.zero_perturbations(shapes)
  plain, _ = _apply_train(model, variables, x)

  def out(e):
    with perturb.perturbed(e):
      logits, _ = _apply_train(model, variables, x)
    return logits

  np.testing.assert_array_equal(out(eps), plain)
  # The shared block input is perturbed once: a bump on it moves both readers,
  # so the derivative along it equals the directional derivative of the net.
  bump = {k: jnp.zeros_like(v) for k, v in eps.items()}
  bump["Block_0/Conv_0"] = jnp.ones_like(eps["Block_0/Conv_0"])
  _, directional = jax.jvp(lambda e: out(e).sum(), (eps,), (bump,))
  grads = jax.grad(lambda e: out(e).sum())(eps)
  np.testing.assert_allclose(
    directional, grads["Block_0/Conv_0"].sum(), rtol=1e-5
  )


def test_missing_key_names_the_point():
  model, variables, x = _setup()
  with pytest.raises(KeyError, match="Block_0/Conv_0"):
    with perturb.perturbed({}):
      _apply_train(model, variables, x)


def test_keys_restart_for_each_model_application():
  model, variables, x = _setup()

  def twice(variables, x):
    a, _ = _apply_train(model, variables, x)
    b, _ = _apply_train(model, variables, x)
    return a + b

  shapes = perturb.activation_shapes(twice, variables, x)
  assert len(shapes) == 5


def test_points_are_named_like_the_kernels_of_their_readers():
  model, variables, x = _setup()
  shapes = perturb.activation_shapes(
    lambda v, x: _apply_train(model, v, x), variables, x
  )
  kernels, _ = params.split_kernels(variables["params"])
  # Every point but a repeated call's ("shared#1") is the name of the kernel
  # of the layer that reads it.
  assert {k for k in shapes if "#" not in k} <= set(kernels)
