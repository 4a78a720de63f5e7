"""Tests for l1grad.fold: batch-norm folding."""

from __future__ import annotations

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l1grad import fold


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(6, (3, 3), use_bias=True)(x)
    x = nn.BatchNorm(
      use_running_average=not train, use_scale=False, epsilon=1e-3
    )(x)
    return nn.relu(x)


class _Net(nn.Module):
  """Every folding case: BN on the input (unfoldable), Conv(no bias)→BN,
  a nested Conv(bias)→BN(no scale), Dense→BN(no bias)."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(use_running_average=not train, name="bn_in")(x)
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = _Block()(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(8)(x)
    x = nn.relu(
      nn.BatchNorm(use_running_average=not train, use_bias=False, epsilon=1e-4)(
        x
      )
    )
    return nn.Dense(3)(x)


def _randomize_bn(variables, seed=0):
  """Non-trivial BN statistics and affine params, so folding is really tested."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    shape = np.shape(leaf)
    if name == "mean":
      return jnp.asarray(rng.normal(size=shape), leaf.dtype)
    if name == "var":
      return jnp.asarray(rng.uniform(0.3, 3.0, size=shape), leaf.dtype)
    if name == "scale":
      return jnp.asarray(
        rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1, 1], size=shape),
        leaf.dtype,
      )
    if name == "bias" and any(
      "BatchNorm" in str(k) or "bn_in" in str(k) for k in path
    ):
      return jnp.asarray(rng.normal(size=shape), leaf.dtype)
    if name == "bias":  # conv/dense bias: non-zero too
      return jnp.asarray(rng.normal(size=shape) * 0.1, leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.fixture(scope="module")
def net_and_vars():
  model = _Net()
  x = jnp.asarray(
    np.random.default_rng(2).normal(size=(2, 6, 6, 3)), jnp.float32
  )
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
    x
  )
  return model, _randomize_bn(variables), x


def test_find_conv_bn_pairs(net_and_vars):
  model, variables, x = net_and_vars
  pairs = fold.find_conv_bn_pairs(model, variables, x, train=False)
  assert pairs == {
    ("Conv_0",): fold.BatchNormLink(("BatchNorm_0",), 1e-5),
    ("_Block_0", "Conv_0"): fold.BatchNormLink(
      ("_Block_0", "BatchNorm_0"), 1e-3
    ),
    ("Dense_0",): fold.BatchNormLink(("BatchNorm_1",), 1e-4),
  }


def test_folded_model_matches_unfolded(net_and_vars):
  model, variables, x = net_and_vars
  pairs = fold.find_conv_bn_pairs(model, variables, x, train=False)
  folded = fold.fold_batch_norm(variables, pairs)
  expected = model.apply(variables, x, train=False)
  # The folded BNs' variables are gone; the input BN keeps its own.
  assert set(folded.params) == {
    "bn_in",
    "Conv_0",
    "_Block_0",
    "Dense_0",
    "Dense_1",
  }
  assert set(folded.params["_Block_0"]) == {"Conv_0"}
  assert set(folded.state["batch_stats"]) == {"bn_in"}
  assert set(folded.biases) == {
    ("Conv_0",)
  }  # the only paired layer without bias
  # The caller's variables are untouched.
  assert "BatchNorm_0" in variables["params"]
  got = fold.folded_apply(model, folded, x, train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # A pytree with static pairs: jit over it works.
  jitted = jax.jit(lambda f, x: fold.folded_apply(model, f, x, train=False))
  np.testing.assert_allclose(jitted(folded, x), expected, rtol=1e-5, atol=1e-5)


def test_folding_composes_with_an_outer_interceptor(net_and_vars):
  # Post-training quantization will wrap folded_apply in its own interceptor
  # on Conv/Dense inputs; it must run, and must see the folded layers.
  model, variables, x = net_and_vars
  folded = fold.fold_batch_norm(
    variables, fold.find_conv_bn_pairs(model, variables, x, train=False)
  )
  seen = []

  def outer(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(
      context.module, (nn.Conv, nn.Dense)
    ):
      seen.append(context.module.path)
      return next_fun(args[0] * 1.0, *args[1:], **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(outer):
    got = fold.folded_apply(model, folded, x, train=False)
  assert sorted(seen) == [
    ("Conv_0",),
    ("Dense_0",),
    ("Dense_1",),
    ("_Block_0", "Conv_0"),
  ]
  np.testing.assert_allclose(
    got, model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5
  )


class _Unfoldable(nn.Module):
  """Layer outputs with a second reader, and a BN on a non-channel axis."""

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(4, (1, 1))(x)
    z = nn.BatchNorm(use_running_average=not train)(y)
    w = nn.Conv(4, (1, 1))(y)  # second reader of y: folding would change w
    v = nn.Dense(4)(z + w)
    u = nn.BatchNorm(use_running_average=not train, axis=1)(
      v
    )  # not the channel axis
    return u


def test_unfoldable_patterns_are_not_paired():
  model = _Unfoldable()
  x = jnp.ones((2, 3, 3, 2))
  variables = _randomize_bn(
    jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  )
  pairs = fold.find_conv_bn_pairs(model, variables, x, train=False)
  assert pairs == {}
  folded = fold.fold_batch_norm(variables, pairs)
  np.testing.assert_allclose(
    fold.folded_apply(model, folded, x, train=False),
    model.apply(variables, x, train=False),
    rtol=1e-6,
  )


def test_fold_factors_are_the_batch_norms_affine_maps(net_and_vars):
  model, variables, x = net_and_vars
  pairs = fold.find_conv_bn_pairs(model, variables, x, train=False)
  factors = fold.fold_factors(variables, pairs)
  # Keyed by layer name, as kernels and activation points are.
  assert list(factors) == ["Conv_0", "_Block_0/Conv_0", "Dense_0"]
  folded = fold.fold_batch_norm(variables, pairs)
  params = traverse_util.flatten_dict(variables["params"])
  folded_params = traverse_util.flatten_dict(folded.params)
  for path in pairs:
    scale, shift = factors["/".join(path)]
    # The folded kernel is the kernel times the scale, bit for bit.
    np.testing.assert_array_equal(
      folded_params[(*path, "kernel")], params[(*path, "kernel")] * scale
    )
    if (*path, "bias") not in params:
      np.testing.assert_array_equal(folded.biases[path], shift)
  # BN(y) = y·scale + shift on the real BatchNorm output.
  captured = {}

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      captured[context.module.path] = (args[0] if args else None, out)
    return out

  with nn.intercept_methods(capture):
    model.apply(variables, x, train=False)
  for path, link in pairs.items():
    y, bn_out = captured[link.path]
    scale, shift = factors["/".join(path)]
    np.testing.assert_allclose(y * scale + shift, bn_out, rtol=1e-5, atol=1e-5)
  assert fold.fold_factors(variables, {}) == {}
