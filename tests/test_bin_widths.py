"""Bin widths as data, and the bin-width-weighted ℓ1 penalty of the trainer.

``quant.bin_widths`` must give the Δ that post-training quantization uses
(fake-quantizing at it reproduces PTQ's kernels and activations bit for bit),
and ``reg.weighting="bin_width"`` must train λ·Σ (Δ/2)·|∇L|, checked against
a penalty computed from PTQ's own functions.
"""

import chex
from conftest import history
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_configs import tiny_digits

from l1grad import config_lib
from l1grad import fold
from l1grad import params as params_lib
from l1grad import perturb
from l1grad import ptq
from l1grad import quant
from l1grad import ranges as ranges_lib
from l1grad import runs
from l1grad import train
from l1grad.errors import ConfigError
from l1grad.models.cnn import DigitsCNN


def _random_variables(width=4, seed=0):
  """A digits CNN with non-trivial BN parameters and running statistics."""
  model = DigitsCNN(num_classes=10, width=width)

  @jax.jit  # one compile instead of many eager random ops
  def init(key):
    variables = model.init(key, jnp.zeros((1, 8, 8, 1)), train=False)
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [
      leaf + 0.5 * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)
    ]
    variables = jax.tree.unflatten(treedef, leaves)
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
    return variables

  return model, init(jax.random.key(seed))


def _images(n=4):
  return jax.random.normal(jax.random.key(2), (n, 8, 8, 1))


def test_bin_widths_are_ptqs():
  model, variables = _random_variables()
  images = _images()
  w_bits, a_bits = 4, 3
  # PTQ's path: fold, quantize the kernels, DFQ ranges.
  folded = runs.prepare_variables(model, variables, images)
  kernels = params_lib.split_kernels(folded.params)[0]
  for channels in (True, False):  # the per-tensor widths are used below
    widths = quant.bin_widths(
      model, variables, images, w_bits, a_bits, per_channel=channels
    )
    qvars = ptq.quantize_variables(folded, w_bits, per_channel=channels)
    quantized = params_lib.split_kernels(qvars.params)[0]
    assert list(widths.weights) == list(kernels)
    for name, kernel in kernels.items():
      np.testing.assert_array_equal(
        quant.fake_quant(kernel, w_bits, widths.weights[name]), quantized[name]
      )
  ranges = ranges_lib.bn_activation_ranges(model, variables, images)
  tree = ranges_lib.range_tree(ranges)
  assert list(widths.activations) == list(ranges)
  for key, (low, high) in tree.items():
    np.testing.assert_array_equal(
      widths.activations[key], quant.activation_scale(a_bits, low, high)
    )

  # From the evaluator's own folded variables and ranges: its Δ exactly.
  from_folded = quant.bin_widths(
    model, folded, images, w_bits, a_bits, ranges=tree
  )
  chex.assert_trees_all_equal(from_folded.weights, widths.weights)
  chex.assert_trees_all_equal(from_folded.activations, widths.activations)
  # Under jit, bits traced: the same numbers up to the fold's rounding.
  jitted = jax.jit(
    lambda v, wb, ab: quant.bin_widths(model, v, images, wb, ab)
  )(variables, w_bits, a_bits)
  chex.assert_trees_all_close(jitted, widths, rtol=1e-6)

  # The whole quantized network: each point fake-quantized at its Δ (the
  # DFQ ranges here are all non-negative: the unsigned grid) gives the
  # evaluator's logits.
  assert all(low >= 0 for low, _ in ranges.values())
  qkernels = {
    n: quant.fake_quant(k, w_bits, widths.weights[n])
    for n, k in kernels.items()
  }

  def by_widths(images):
    qfolded = folded.replace(
      params=params_lib.split_kernels(folded.params)[1](qkernels)
    )
    with perturb.transform_layer_inputs(
      lambda k, x: quant.fake_quant(
        x, a_bits, widths.activations[k], signed=False
      )
    ):
      return ranges_lib.apply_model(model, qfolded, images)

  evaluator = ptq.Evaluator(model)
  np.testing.assert_allclose(
    jax.jit(by_widths)(images),
    evaluator.quantized_logits(folded, tree, w_bits, a_bits, images),
    rtol=1e-6,
    atol=1e-6,
  )


def test_unfolded_and_given_ranges():
  model, variables = _random_variables()
  images = _images()
  ranges = {"Conv_1": (0.0, 2.0), "Conv_2": (-1.0, 3.0)}
  ranges.update({"Dense_0": (0.0, 1.0), "Dense_1": (0.0, 5.0)})
  widths = quant.bin_widths(
    model, variables, images, 8, 4, folded=False, ranges=ranges
  )
  assert widths.fold_scales == {}
  for name, kernel in params_lib.split_kernels(variables["params"])[0].items():
    np.testing.assert_array_equal(
      widths.weights[name], quant.kernel_scale(kernel, 8, per_channel=False)
    )
  np.testing.assert_allclose(widths.activations["Conv_1"], 2.0 / 15)
  np.testing.assert_allclose(widths.activations["Conv_2"], 3.0 / 7)


def test_unfolded_weights_bound_the_noise_on_the_unfolded_kernel():
  """q(W·a)/a − W, the noise PTQ puts on W, is at most Δ/(2|a|) per element."""
  model, variables = _random_variables()
  widths = quant.bin_widths(model, variables, _images(), 3, 3)
  pairs = fold.find_conv_bn_pairs(model, variables, _images(), train=False)
  factors = fold.fold_factors(variables, pairs)
  assert set(widths.fold_scales) == set(factors)
  unfolded = widths.unfolded_weights()
  for name, kernel in params_lib.split_kernels(variables["params"])[0].items():
    if name not in factors:  # the head: no batch norm after it
      np.testing.assert_array_equal(unfolded[name], widths.weights[name])
      continue
    a = factors[name].scale
    noise = quant.fake_quant(kernel * a, 3, widths.weights[name]) / a - kernel
    assert unfolded[name].shape == a.shape
    assert np.all(np.abs(noise) <= unfolded[name] / 2 * (1 + 1e-5))


# ---------------------------------------------------------------------------
# The trainer's reg.weighting = "bin_width".
# ---------------------------------------------------------------------------

BIN_WIDTH = {
  "reg.kind": "l1",
  "reg.weight_coef": 0.5,
  "reg.weighting": "bin_width",
  "reg.target_bits": "4:3",
}


def _independent_penalty(model, config, params, stats, images, labels, rng):
  """λ·Σ (Δ/2)·|∇L| from PTQ's functions and plain jax.grad."""
  loss_fn = train.make_loss_fn(model, config, regularized=True)
  variables = {"params": params, "batch_stats": stats}
  shapes = perturb.activation_shapes(
    lambda p: loss_fn(p, stats, images, labels, rng), params
  )

  def loss(p, eps):
    with perturb.perturbed(eps):
      return loss_fn(p, stats, images, labels, rng)[0]

  g_p, g_e = jax.jit(jax.grad(loss, argnums=(0, 1)))(
    params, perturb.zero_perturbations(shapes)
  )
  folded = runs.prepare_variables(model, variables, images)
  factors = fold.fold_factors(variables, folded.pairs)
  lam = config.reg.weight_coef
  total = 0.0
  for name, g in params_lib.split_kernels(g_p)[0].items():
    kernel = params_lib.split_kernels(folded.params)[0][name]
    delta = quant.kernel_scale(kernel, 4, per_channel=False)
    if name in factors:  # the noise on the unfolded W: Δ/|a| per channel
      delta = delta / jnp.abs(factors[name].scale)
    total += lam * jnp.sum(delta / 2 * jnp.abs(g))
  ranges = ranges_lib.bn_activation_ranges(model, variables, images)
  for key, g in g_e.items():
    low, high = ranges[key]
    total += lam * quant.activation_scale(3, low, high) / 2 * jnp.abs(g).sum()
  return total


def test_bin_width_penalty_is_the_weighted_bound():
  config = tiny_digits(**BIN_WIDTH)
  config_lib.validate(config)
  model, variables = _random_variables()
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(0.01)
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=stats,
    opt_state=tx.init(params),
  )
  images = _images(8)
  labels = jnp.arange(8) % 10
  step = train.make_train_step(
    model, config, tx, optax.constant_schedule(0.01), regularized=True
  )
  rng = jax.random.key(0)
  _, metrics = jax.jit(step)(state, {"image": images, "label": labels}, rng)
  expected = _independent_penalty(
    model,
    config,
    params,
    stats,
    images,
    labels,
    jax.random.fold_in(rng, state.step),
  )
  np.testing.assert_allclose(metrics["penalty"], expected, rtol=1e-5)
  np.testing.assert_allclose(
    metrics["total_loss"], metrics["cross_entropy"] + expected, rtol=1e-5
  )


def test_bin_width_training_runs(tiny_runs):
  rows = history(tiny_runs(max_steps=3, **BIN_WIDTH))
  steps = [r for r in rows if "penalty" in r]
  assert len(steps) == 3
  assert all(np.isfinite(r["total_loss"]) and r["penalty"] > 0 for r in steps)


@pytest.mark.parametrize(
  "overrides, field",
  [
    ({**BIN_WIDTH, "reg.kind": "l2"}, "reg.weighting"),
    ({**BIN_WIDTH, "reg.target_bits": ""}, "reg.target_bits"),
    ({**BIN_WIDTH, "reg.target_bits": "4"}, "reg.target_bits"),
    ({**BIN_WIDTH, "reg.weighting": "delta"}, "reg.weighting"),
    ({"reg.target_bits": "4:4"}, "reg.target_bits"),
  ],
)
def test_bin_width_config_checks(overrides, field):
  with pytest.raises(ConfigError, match=field):
    config_lib.validate(tiny_digits(**overrides))
