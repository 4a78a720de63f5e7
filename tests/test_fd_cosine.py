"""The cosine between two methods' penalty gradients, per batch and per run."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l1grad import analysis
from l1grad import penalty


class MLP(nn.Module):
  """Three Dense layers; with batch norm (train mode) when ``norm``."""

  act: Any = jnp.tanh
  norm: bool = False

  @nn.compact
  def __call__(self, x):
    for width in (6, 5):
      x = nn.Dense(width)(x)
      if self.norm:
        x = nn.BatchNorm(use_running_average=False)(x)
      x = self.act(x)
    return nn.Dense(3)(x)


def _problem(act=jnp.tanh, norm=False, batch=8):
  """``(loss_fn, params, args, has_aux)`` of a tiny classification batch."""
  model = MLP(act=act, norm=norm)
  x = jax.random.normal(jax.random.key(1), (batch, 4))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 3)
  variables = model.init(jax.random.key(0), x)

  def loss_fn(p, x, y):
    logits, updates = model.apply(
      {**variables, "params": p}, x, mutable=["batch_stats"]
    )
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return (xent, updates) if norm else xent

  return loss_fn, variables["params"], (x, y), norm


def _cosine(problem, **kwargs):
  loss_fn, params, args, has_aux = problem
  kwargs = {"weight_coef": 0.3, "act_coef": 0.7, **kwargs}
  return jax.jit(
    lambda p, *a: penalty.penalty_gradient_cosine(
      loss_fn, p, *a, has_aux=has_aux, **kwargs
    )
  )(params, *args)


def test_method_against_itself_and_reverse():
  problem = _problem(act=nn.relu, norm=True)
  same = _cosine(problem, method="hvp", reference="hvp")
  np.testing.assert_allclose(same.cosine, 1.0, atol=1e-6)
  np.testing.assert_allclose(same.norm, same.reference_norm, rtol=1e-6)
  assert same.norm > 0
  rev = _cosine(problem, method="reverse", reference="hvp")
  np.testing.assert_allclose(rev.cosine, 1.0, atol=1e-5)
  np.testing.assert_allclose(rev.norm, rev.reference_norm, rtol=1e-4)


def test_finite_difference_matches_on_a_smooth_model():
  problem = _problem(act=jnp.tanh)
  out = _cosine(problem, fd_step=1e-3)
  assert out.cosine > 0.999
  np.testing.assert_allclose(out.norm, out.reference_norm, rtol=1e-2)
  # One term at a time, and a static zero coefficient.
  for w, a in ((1.0, 0.0), (0.0, 1.0)):
    assert _cosine(problem, weight_coef=w, act_coef=a).cosine > 0.999


def test_common_scale_of_the_coefficients_does_not_matter():
  problem = _problem(act=nn.softplus)
  small = _cosine(problem, weight_coef=0.1, act_coef=0.2)
  large = _cosine(problem, weight_coef=10.0, act_coef=20.0)
  np.testing.assert_allclose(small.cosine, large.cosine, atol=1e-5)
  np.testing.assert_allclose(large.norm, 100 * small.norm, rtol=1e-4)


def test_relu_model_gives_a_cosine():
  out = _cosine(_problem(act=nn.relu, norm=True), fd_step=1e-1)
  assert np.isfinite(out.cosine) and -1.0 <= out.cosine <= 1.0
  assert out.norm > 0 and out.reference_norm > 0


def test_bad_method():
  with pytest.raises(ValueError, match="reference"):
    _cosine(_problem(), reference="secant")


def test_run_level_cosines(tiny_run):
  out = analysis.finite_difference_cosines(tiny_run, num_batches=4)
  assert out["num_batches"] == 4 and len(out["cosines"]) == 4
  assert all(c is not None and -1.0 <= c <= 1.0 for c in out["cosines"])
  assert out["min"] <= out["median"] <= out["max"]
  assert all(n > 0 for n in out["norms"] + out["reference_norms"])
  # An unregularized run: λ_w = λ_a = 1, the run's probe distance.
  assert out["coef"] == {"weight_coef": 1.0, "act_coef": 1.0}
  assert out["fd_step"] == 1e-3
  # The same batches, exact method against itself.
  same = analysis.finite_difference_cosines(
    tiny_run, num_batches=2, method="hvp", coef=(0.5, 0.0), split="test"
  )
  np.testing.assert_allclose(same["cosines"], 1.0, atol=1e-6)
  assert same["coef"] == {"weight_coef": 0.5, "act_coef": 0.0}
