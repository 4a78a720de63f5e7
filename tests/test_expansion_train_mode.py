"""Expansion helpers in train mode, the second-order building blocks, dtypes.

The building blocks (:func:`l1grad.expansion.uniform_noise`,
:func:`~l1grad.expansion.hutchinson_curvature`,
:func:`~l1grad.expansion.antithetic_gap`) are checked against brute force on
a network small enough for its full Hessian over (weights, activation
points): Σ (Δ²/24)·Hᵢᵢ from ``jax.hessian``'s diagonal.
"""

import functools

import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from l1grad import expansion
from l1grad import models
from l1grad import penalty
from l1grad.models import common


class TinyBN(nn.Module):
  """Dense → BN → tanh twice, then the logits: smooth, with train-mode BN."""

  dtype: object = None

  @nn.compact
  def __call__(self, x, train=False):
    for width in (6, 5):
      x = nn.Dense(width, use_bias=False, dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
      x = nn.tanh(x)
    return common.logits_float32(nn.Dense(3, dtype=self.dtype)(x))


def _setup(dtype=jnp.float32):
  model = TinyBN()
  x = jax.random.normal(jax.random.key(0), (8, 4))
  # Jitted: op-by-op init compiles every primitive on its own (slower).
  variables = jax.jit(model.init)(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v.astype(dtype), variables)
  batch = {"image": x.astype(dtype), "label": jnp.arange(8) % 3}
  return model, variables, batch


def _train_loss(model):
  """A user's train-mode loss: ``(params, stats, batch) -> (loss, stats)``."""

  def loss_fn(params, stats, batch):
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats},
      batch["image"],
      train=True,
      mutable=["batch_stats"],
    )
    return expansion.cross_entropy(logits, batch["label"]), updates

  return loss_fn


def _steps(z):
  """Bin widths of different sizes: per tensor, and one per channel."""
  w = z["weights"]
  step = {
    "weights": {
      k: 0.05 * (i + 1) * jnp.ones((), v.dtype)
      for i, (k, v) in enumerate(w.items())
    },
    "acts": {k: 0.1 * jnp.ones((), v.dtype) for k, v in z["acts"].items()},
  }
  # Per output channel on the last kernel, as per-channel weight scales are.
  last = list(w)[-1]
  step["weights"][last] = jnp.linspace(0.02, 0.2, w[last].shape[-1])[None, :]
  return step


def test_eval_mode_is_unchanged_and_train_mode_returns_batch_stats():
  model, variables, batch = _setup()
  train = dict(
    apply_kwargs=expansion.TRAIN_KWARGS, mutable=expansion.TRAIN_MUTABLE
  )
  params, stats = variables["params"], variables["batch_stats"]

  @jax.jit
  def everything(variables, batch):
    images = batch["image"]
    z = expansion.expansion_point(model, variables, images)
    z_train = expansion.expansion_point(model, variables, images, **train)
    loss_train = functools.partial(expansion.loss_at, model, variables, **train)
    # A user's own train-mode loss as a function of the same point.
    z_user, fn = expansion.point_loss(_train_loss(model), params, stats, batch)
    return {
      "z": z,
      "z_train": z_train,
      "z_user": z_user,
      "logits": expansion.apply_at(model, variables, z, images),
      "ref_logits": model.apply(variables, images, train=False),
      "train_out": expansion.apply_at(
        model, variables, z_train, images, **train
      ),
      "ref_train_out": model.apply(
        variables, images, train=True, mutable=["batch_stats"]
      ),
      "loss": expansion.loss_at(model, variables, z, batch),
      "loss_train": loss_train(z_train, batch),
      # "mutable" inside apply_kwargs (model.apply's own keywords).
      "loss_kwargs": expansion.loss_at(
        model,
        variables,
        z_train,
        batch,
        apply_kwargs={"train": True, "mutable": ["batch_stats"]},
      ),
      "grad": jax.grad(loss_train, has_aux=True)(z_train, batch)[0],
      "user": fn(z_user),
      "user_grad": jax.grad(fn, has_aux=True)(z_user)[0],
    }

  out = everything(variables, batch)
  structure = jax.tree.structure(out["z"])
  for k in ("z_train", "z_user", "grad", "user_grad"):
    assert jax.tree.structure(out[k]) == structure, k
  # Eval mode: exactly the model's logits.
  np.testing.assert_array_equal(out["logits"], out["ref_logits"])
  # Train mode: (logits, updates) as model.apply returns them, not logits.
  got, ref = out["train_out"], out["ref_train_out"]
  assert set(got[1]) == {"batch_stats"}
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)
  loss, updates = out["loss_train"]
  np.testing.assert_allclose(
    loss, expansion.cross_entropy(ref[0], batch["label"]), rtol=1e-6
  )
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref[1])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(out["loss_kwargs"][0], loss)
  assert float(loss) != float(out["loss"])  # batch statistics, not running
  np.testing.assert_allclose(out["user"][0], loss, rtol=1e-6)
  for a, b in zip(
    jax.tree.leaves(out["user_grad"]), jax.tree.leaves(out["grad"])
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_uniform_noise_lies_in_its_bins():
  model, variables, batch = _setup()
  z = expansion.expansion_point(model, variables, batch["image"])
  step = _steps(z)
  step["acts"]["Dense_1"] = jnp.zeros(())  # not quantized: no noise
  delta = jax.jit(expansion.uniform_noise)(jax.random.key(3), z, step)
  assert jax.tree.structure(delta) == jax.tree.structure(z)
  for d, x, s in zip(
    jax.tree.leaves(delta), jax.tree.leaves(z), jax.tree.leaves(step)
  ):
    assert d.shape == x.shape and d.dtype == x.dtype
    bound = np.broadcast_to(np.asarray(s), d.shape) / 2
    assert np.all(np.abs(np.asarray(d)) <= bound + 1e-7)
    if np.all(bound > 0):  # spread over the bin, not stuck at 0
      assert np.std(np.asarray(d) / (2 * bound)) > 0.2
  assert not np.any(np.asarray(delta["acts"]["Dense_1"]))


@functools.cache
def _hessian_setup():
  """A train-mode z, its loss, Δ and the exact Σ (Δ²/24)·Hᵢᵢ (float64).

  Call it under ``jax.enable_x64(True)``.
  """
  model, variables, batch = _setup(jnp.float64)
  params, stats = variables["params"], variables["batch_stats"]
  z, fn = expansion.point_loss(_train_loss(model), params, stats, batch)
  loss = lambda z_: fn(z_)[0]
  step = _steps(z)
  flat, unravel = ravel_pytree(z)
  hess = jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat)
  step_flat, _ = ravel_pytree(
    jax.tree.map(lambda s, x: jnp.broadcast_to(s, x.shape), step, z)
  )
  exact = float(jnp.sum(step_flat**2 / 24 * jnp.diag(hess)))
  return z, loss, step, hess, unravel, exact


def _within_monte_carlo_error(samples, exact, k=4.0):
  samples = np.asarray(samples)
  mean = samples.mean()
  err = samples.std(ddof=1) / np.sqrt(samples.size)
  assert abs(mean - exact) < k * err, (mean, exact, err)
  return mean, err


def test_hutchinson_and_uniform_noise_match_the_hessian_diagonal():
  with jax.enable_x64(True):
    z, loss, step, hess, _, exact = _hessian_setup()
    assert exact > 0
    n = 4000
    keys = jax.random.split(jax.random.key(7), n)

    one = lambda k: expansion.hutchinson_curvature(loss, z, step, k)
    hutch = jax.jit(jax.vmap(one))(keys)
    mean, err = _within_monte_carlo_error(hutch, exact)
    assert err < 0.1 * exact  # the check has teeth

    # ½δᵀHδ of real uniform noise, averaged: the same expectation.
    def quad(k):
      d, _ = ravel_pytree(expansion.uniform_noise(k, z, step))
      return 0.5 * d @ hess @ d

    _within_monte_carlo_error(jax.jit(jax.vmap(quad))(keys), exact)

    # num_samples averages the probes of the split key.
    three = jax.jit(
      lambda k: expansion.hutchinson_curvature(loss, z, step, k, num_samples=3)
    )(jax.random.key(9))
    each = [jax.jit(one)(k) for k in jax.random.split(jax.random.key(9), 3)]
    np.testing.assert_allclose(float(three), np.mean(each), rtol=1e-10)


def test_antithetic_gap_is_the_curvature_on_a_quadratic():
  with jax.enable_x64(True):
    z = {
      "weights": {"Dense_0": jnp.zeros((3, 2))},
      "acts": {"Dense_1": jnp.zeros((4,))},
    }
    flat, unravel = ravel_pytree(z)
    n = flat.size
    keys = jax.random.split(jax.random.key(2), 4)
    m = jax.random.normal(keys[0], (n, n), jnp.float64)
    a = m + m.T
    b = jax.random.normal(keys[1], (n,), jnp.float64)
    z = unravel(jax.random.normal(keys[2], (n,), jnp.float64))

    def loss(z_):
      v, _ = ravel_pytree(z_)
      return 0.5 * v @ a @ v + b @ v

    step = jax.tree.map(lambda x: jnp.ones((), x.dtype), z)
    delta = expansion.uniform_noise(keys[3], z, step)
    d, _ = ravel_pytree(delta)
    gap = jax.jit(functools.partial(expansion.antithetic_gap, loss))(z, delta)
    np.testing.assert_allclose(float(gap), 0.5 * float(d @ a @ d), rtol=1e-12)
    given = expansion.antithetic_gap(loss, z, delta, loss=loss(z))
    np.testing.assert_allclose(float(given), float(gap), rtol=1e-12)


def test_antithetic_gap_approaches_the_curvature_for_small_noise():
  with jax.enable_x64(True):
    z, loss, step, hess, unravel, _ = _hessian_setup()
    delta = expansion.uniform_noise(jax.random.key(5), z, step)
    gap_fn = jax.jit(functools.partial(expansion.antithetic_gap, loss, z))
    for scale, rtol in ((1e-1, 5e-2), (1e-2, 5e-4)):
      small = jax.tree.map(lambda d, s=scale: d * s, delta)
      d, _ = ravel_pytree(small)
      gap = float(gap_fn(small))
      np.testing.assert_allclose(gap, 0.5 * float(d @ hess @ d), rtol=rtol)


def test_the_penalty_linearization_gives_the_same_estimate():
  """Inside ``penalty.value_and_grad(extra=...)``: the same probe, value."""
  model, variables, batch = _setup()
  params, stats = variables["params"], variables["batch_stats"]
  loss_fn = _train_loss(model)
  key = jax.random.key(8)

  @jax.jit
  def both(params):
    z, fn = expansion.point_loss(loss_fn, params, stats, batch)
    step = _steps(z)
    direct = expansion.hutchinson_curvature(lambda z_: fn(z_)[0], z, step, key)
    draw = expansion.second_order_draw(lambda z_: fn(z_)[0], z, step, key)

    def extra(lin):
      z_lin, hvp_fn = expansion.linearization_point(lin)
      assert jax.tree.structure(z_lin) == jax.tree.structure(z)
      return expansion.hutchinson_from_hvp(hvp_fn, z_lin, step, key)

    (_, info), _ = penalty.value_and_grad(loss_fn, has_aux=True, extra=extra)(
      params, stats, batch
    )
    return direct, info["extra"], draw

  direct, via_penalty, draw = both(params)
  np.testing.assert_allclose(via_penalty, direct, rtol=1e-5)
  # One draw: its antithetic gap and induced loss are consistent.
  np.testing.assert_allclose(
    draw["antithetic"], draw["curvature"], rtol=0.1, atol=1e-6
  )
  assert abs(float(draw["induced"] - draw["first_order"])) < abs(
    float(draw["first_order"])
  )


def test_logits_are_at_least_float32():
  x32 = jnp.linspace(-1, 1, 6, dtype=jnp.float32)
  out = common.logits_float32(x32)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, x32)
  assert common.logits_float32(x32.astype(jnp.bfloat16)).dtype == jnp.float32
  with jax.enable_x64(True):
    x64 = jnp.linspace(-1, 1, 6, dtype=jnp.float64)
    assert common.logits_float32(x64).dtype == jnp.float64


def test_models_follow_float64_inputs():
  """``dtype=None``: a model of l1grad.models runs in float64, no copy."""
  with jax.enable_x64(True):
    model = models.get_model("digits_cnn", num_classes=3, width=2, dtype=None)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(1), x
    )
    v64 = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
    apply = jax.jit(
      functools.partial(model.apply, train=True, mutable=["batch_stats"])
    )
    (out32, _), (out64, stats64) = (
      apply(variables, x),
      apply(v64, x.astype(jnp.float64)),
    )
    assert out32.dtype == jnp.float32 and out64.dtype == jnp.float64
    assert all(s.dtype == jnp.float64 for s in jax.tree.leaves(stats64))
    np.testing.assert_allclose(out64, out32, rtol=1e-4, atol=1e-5)


def test_float64_checks_the_third_order_gradient():
  """d/dt of the Hutchinson term along u: autodiff against finite differences.

  Third-order autodiff (the gradient of an HVP) through batch norm in train
  mode, checked in float64, where a central difference agrees to ~1e-6.
  """
  with jax.enable_x64(True):
    z, loss, step, *_ = _hessian_setup()
    key = jax.random.key(4)
    u = expansion.uniform_noise(jax.random.key(6), z["weights"], 1.0)

    def along(t):
      weights = jax.tree.map(lambda w, d: w + t * d, z["weights"], u)
      moved = {"weights": weights, "acts": z["acts"]}
      return expansion.hutchinson_curvature(loss, moved, step, key)

    auto = float(jax.jit(jax.grad(along))(0.0))
    h = 1e-4
    f = jax.jit(along)
    fd = float((f(h) - f(-h)) / (2 * h))
    assert abs(auto) > 1e-6
    np.testing.assert_allclose(auto, fd, rtol=1e-5)


if __name__ == "__main__":
  raise SystemExit(pytest.main([__file__, "-q"]))
