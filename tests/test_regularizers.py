"""Tests for l1grad.regularizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l1grad import regularizers


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
    "Conv_0": {
      "kernel": normal(3, 3, 2, 4),
      "bias": normal(4),
    },  # fan_in 18 > fan_out 4
    "Block_0": {
      "Conv_0": {"kernel": normal(1, 1, 3, 5)}
    },  # fan_in 3 < fan_out 5
    "BatchNorm_0": {"scale": normal(4), "bias": normal(4)},
    "Dense_0": {"kernel": normal(6, 6), "bias": normal(6)},
  }


def np_penalty(params, beta, *, larger_gram=False):
  total = 0.0
  for k in (
    params["Conv_0"]["kernel"],
    params["Block_0"]["Conv_0"]["kernel"],
    params["Dense_0"]["kernel"],
  ):
    w = np.asarray(k, np.float64).reshape(-1, k.shape[-1])
    small = w.shape[1] <= w.shape[0]
    g = w.T @ w if small != larger_gram else w @ w.T
    total += np.sum((g - np.eye(g.shape[0])) ** 2)
  return beta / 2 * total


def test_kernel_leaves(params):
  paths = [p for p, _ in regularizers.kernel_leaves(params)]
  assert sorted(paths) == [
    "Block_0/Conv_0/kernel",
    "Conv_0/kernel",
    "Dense_0/kernel",
  ]


def test_penalty_matches_numpy(params):
  got = regularizers.orthogonality_penalty(params, beta=0.3)
  np.testing.assert_allclose(got, np_penalty(params, 0.3), rtol=1e-5)


def test_smaller_gram_differs_by_a_constant_with_the_same_gradient(params):
  # The documented reason the orientation does not affect training.
  offset = (18 - 4) + (5 - 3) + 0
  np.testing.assert_allclose(
    np_penalty(params, 2.0, larger_gram=True) - np_penalty(params, 2.0),
    offset,
    rtol=1e-6,
  )

  def larger(w):
    g = w @ w.T if w.shape[1] <= w.shape[0] else w.T @ w
    return jnp.sum((g - jnp.eye(g.shape[0])) ** 2)

  w = params["Conv_0"]["kernel"].reshape(-1, 4)
  small_grad = jax.grad(
    lambda w: regularizers.orthogonality_penalty({"kernel": w}, beta=2.0)
  )(w)
  np.testing.assert_allclose(
    small_grad, jax.grad(larger)(w), rtol=1e-4, atol=1e-4
  )


def test_orthogonal_kernels_give_zero():
  rng = np.random.default_rng(1)
  tall, _ = np.linalg.qr(rng.normal(size=(18, 4)))  # orthonormal columns
  wide, _ = np.linalg.qr(
    rng.normal(size=(5, 3))
  )  # wide kernel: orthonormal rows
  params = {
    "Conv_0": {"kernel": jnp.asarray(tall.reshape(3, 3, 2, 4), jnp.float32)},
    "Dense_0": {"kernel": jnp.asarray(wide.T, jnp.float32)},
  }
  np.testing.assert_allclose(
    regularizers.orthogonality_penalty(params, beta=1.0), 0.0, atol=1e-5
  )
  assert (
    regularizers.orthogonality_penalty(
      {"Dense_0": {"bias": jnp.ones(3)}}, beta=1.0
    )
    == 0.0
  )
