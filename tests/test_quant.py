"""Tests for l1grad.quant: the fake quantizer, weights and activations."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l1grad import perturb
from l1grad import quant

BITS = range(2, 9)


def np_grid(bits: int, signed: bool) -> tuple[int, int]:
  hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
  return (-hi if signed else 0), hi


def np_fake_quant(x, bits, scale, signed):
  lo, hi = np_grid(bits, signed)
  x = np.asarray(x, np.float32)
  scale = np.asarray(scale, np.float32)
  return np.clip(np.round(x / scale), lo, hi) * scale


def np_scale(x, bits, signed, axis):
  x = np.asarray(x, np.float32)
  reduce = (
    None
    if axis is None
    else tuple(i for i in range(x.ndim) if i != axis % x.ndim)
  )
  keep = axis is not None
  rmax = (
    np.max(np.abs(x), reduce, keepdims=keep)
    if signed
    else np.maximum(np.max(x, reduce, keepdims=keep), 0)
  )
  return rmax / np.float32(np_grid(bits, signed)[1])


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
  # Per-channel magnitudes differ, so per-channel and per-tensor scales differ.
  rng = np.random.default_rng(0)
  return (rng.normal(size=(3, 3, 4, 5)) * np.array([0.1, 1, 3, 0.5, 2])).astype(
    np.float32
  )


# ---------------------------------------------------------------------------
# fake_quant and friends.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, -1])
def test_fake_quant_matches_numpy(weights, signed, axis):
  x = weights
  for bits in BITS:
    scale = quant.symmetric_scale(x, bits, signed=signed, axis=axis)
    np.testing.assert_allclose(
      scale, np_scale(x, bits, signed, axis), rtol=1e-6
    )
    expected_shape = () if axis is None else (1, 1, 1, x.shape[-1])
    assert scale.shape == expected_shape
    q = quant.fake_quant(x, bits, scale, signed=signed)
    np.testing.assert_allclose(
      q, np_fake_quant(x, bits, scale, signed), rtol=1e-6, atol=0
    )
    # Codes: integers, inside the grid, and the same codes fake_quant used.
    codes = quant.quantize_to_int(x, bits, scale, signed=signed)
    assert codes.dtype == jnp.int32
    lo, hi = np_grid(bits, signed)
    assert codes.min() >= lo and codes.max() <= hi
    np.testing.assert_array_equal(
      np.asarray(codes, np.float32) * np.asarray(scale), q
    )
    # The range-defining element lands on the outermost code.
    reduce = None if axis is None else (0, 1, 2)
    np.testing.assert_array_equal(np.abs(np.asarray(codes)).max(reduce), hi)
    if not signed:
      assert codes.min() == 0  # negative inputs clip to 0 on the unsigned grid


def test_grid_max():
  for bits in BITS:
    assert quant.grid_max(bits) == 2 ** (bits - 1) - 1
    assert quant.grid_max(jnp.float32(bits), signed=False) == 2**bits - 1


def test_round_half_to_even_and_clip():
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5, 100.0, -100.0])
  np.testing.assert_array_equal(
    quant.quantize_to_int(x, 4, 1.0), [0, 2, 2, 0, -2, 7, -7]
  )
  np.testing.assert_array_equal(
    quant.quantize_to_int(x, 4, 1.0, signed=False), [0, 2, 2, 0, 0, 15, 0]
  )


def test_zero_scale_is_nan_free():
  x = jnp.zeros((4, 3))
  for signed in (True, False):
    for ste in (False, True):

      def f(x, signed=signed, ste=ste):
        return jnp.sum(
          quant.fake_quant(
            x,
            4,
            quant.symmetric_scale(x, 4, signed=signed),
            signed=signed,
            ste=ste,
          )
        )

      np.testing.assert_array_equal(
        quant.fake_quant(x, 4, 0.0, signed=signed, ste=ste), 0.0
      )
      assert np.all(np.isfinite(jax.grad(f)(x)))
  # Per-channel: one dead channel must not poison the others.
  x = jnp.array([[0.0, 1.0], [0.0, -3.0]])
  q = quant.fake_quant(x, 3, quant.symmetric_scale(x, 3, axis=-1))
  np.testing.assert_array_equal(q, x)
  np.testing.assert_array_equal(quant.quantize_to_int(jnp.ones(3), 4, 0.0), 0)


def test_ste_forward_equals_plain_and_gradient_is_clipped_identity():
  x = jnp.linspace(-3.0, 3.0, 61)
  scale, bits = 0.25, 3  # range [-0.75, 0.75]
  plain = quant.fake_quant(x, bits, scale)
  ste = quant.fake_quant(x, bits, scale, ste=True)
  np.testing.assert_array_equal(ste, plain)  # bit for bit
  inside = np.abs(np.asarray(x)) <= 0.75 + 1e-7
  g = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, bits, scale, ste=True)))(x)
  np.testing.assert_array_equal(g, inside.astype(np.float32))
  # Plain rounding has zero derivative.
  g0 = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, bits, scale)))(x)
  np.testing.assert_array_equal(g0, 0.0)


def test_ste_gradient_at_range_defining_element(weights):
  # With scale = max|x| / hi the extreme element sits exactly on the bound; it
  # is inside the range and must get the full gradient, not half of it.
  x = jnp.asarray(weights)
  g = jax.grad(
    lambda x: jnp.sum(
      quant.fake_quant(x, 4, quant.symmetric_scale(x, 4, axis=-1), ste=True)
    )
  )(x)
  np.testing.assert_array_equal(g, 1.0)


def test_ste_is_forward_mode_differentiable(weights):
  x = jnp.asarray(weights)
  scale = 0.8 * quant.symmetric_scale(x, 4)  # some values clipped
  inside = (np.abs(weights) <= 7 * float(scale)).astype(np.float32)
  t = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)

  def loss(x):
    return jnp.sum(quant.fake_quant(x, 4, scale, ste=True) ** 2)

  _, tangent = jax.jvp(
    lambda x: quant.fake_quant(x, 4, scale, ste=True), (x,), (t,)
  )
  np.testing.assert_allclose(tangent, t * inside)
  # Forward-over-reverse HVP (the default penalty-gradient path):
  # grad = 2·q·inside, so H·t = 2·t·inside.
  _, hvp = jax.jvp(jax.grad(loss), (x,), (t,))
  np.testing.assert_allclose(hvp, 2 * t * inside, rtol=1e-6)
  hvp_rr = jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), t))(x)
  np.testing.assert_allclose(hvp_rr, hvp, rtol=1e-6)


def test_one_trace_serves_a_bit_width_sweep(weights):
  x = jnp.asarray(weights)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def evaluate(x, bits):
    q_w = quant.fake_quant(x, bits, quant.symmetric_scale(x, bits, axis=-1))
    q_a = quant.fake_quant(
      x,
      bits,
      quant.symmetric_scale(x, bits, signed=False),
      signed=False,
      ste=True,
    )
    return q_w, q_a

  for bits in BITS:
    q_w, q_a = evaluate(x, jnp.asarray(bits, jnp.int32))
    np.testing.assert_array_equal(
      q_w, quant.fake_quant(x, bits, quant.symmetric_scale(x, bits, axis=-1))
    )
    assert len(np.unique(np.asarray(q_a))) <= 2**bits
  chex.clear_trace_counter()


def test_quantize_kernels_rounds_kernels_only(weights):
  params = {
    "Conv_0": {"kernel": jnp.asarray(weights), "bias": jnp.full((5,), 0.3)},
    "BatchNorm_0": {"scale": jnp.full((5,), 0.7)},
  }
  for per_channel in (False, True):
    q = quant.quantize_kernels(params, 3, per_channel=per_channel)
    scale = quant.kernel_scale(weights, 3, per_channel=per_channel)
    np.testing.assert_array_equal(
      q["Conv_0"]["kernel"], quant.fake_quant(weights, 3, scale)
    )
    chex.assert_trees_all_equal(q["BatchNorm_0"], params["BatchNorm_0"])
    chex.assert_trees_all_equal(q["Conv_0"]["bias"], params["Conv_0"]["bias"])


# ---------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------


def test_quantized_activations_land_on_the_grid():

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(8)(x))
      return nn.Dense(3)(x)

  model = Probe()
  x = jax.random.normal(jax.random.key(0), (4, 3))
  variables = model.init(jax.random.key(1), x)

  captured = {}

  def capture(key, v):
    captured[key] = v
    return v

  ranges = {"Dense_1": (0.0, 2.0)}
  with quant.quantized_activations(3, ranges):
    with perturb.transform_layer_inputs(capture):
      model.apply(variables, x)
  q = np.asarray(captured["Dense_1"]) / (2.0 / 7)
  np.testing.assert_allclose(q, np.round(q), atol=1e-5)
  assert q.min() >= 0 and q.max() <= 7
  # A point without a range is named in the error.
  with pytest.raises(KeyError, match="Dense_1"):
    with quant.quantized_activations(3, {}):
      model.apply(variables, x)


def test_quantize_activation_signed_and_unsigned():
  x = jnp.linspace(-1.0, 1.0, 11)
  unsigned = quant.quantize_activation(jnp.abs(x), 2, 0.0, 1.0)
  np.testing.assert_allclose(
    unsigned * 3, np.round(np.asarray(unsigned) * 3), atol=1e-6
  )
  signed = quant.quantize_activation(x, 2, -1.0, 1.0)
  assert set(np.round(np.asarray(signed), 6)) <= {-1.0, 0.0, 1.0}
  # One compile serves every bit-width.
  f = jax.jit(quant.quantize_activation)
  for b in range(2, 9):
    f(x, jnp.asarray(b), -1.0, 1.0)
  assert f._cache_size() == 1


def test_moved_names_still_resolve_from_their_old_modules():
  from l1grad import fold  # pylint: disable=g-import-not-at-top

  for name in (
    "BatchNormLink",
    "FoldedVariables",
    "find_conv_bn_pairs",
    "fold_batch_norm",
    "folded_apply",
  ):
    assert getattr(quant, name) is getattr(fold, name)
  for name in (
    "activation_scale",
    "dynamic_range",
    "quantize_activation",
    "quantized_activations",
  ):
    assert getattr(perturb, name) is getattr(quant, name)
  with pytest.raises(AttributeError, match="no_such_name"):
    _ = quant.no_such_name
