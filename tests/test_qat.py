"""STE training simulates what PTQ evaluates (``qat.scheme``, l1grad/qat.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tiny_configs import tiny_digits

from l1grad import checkpoint
from l1grad import config_lib
from l1grad import data
from l1grad import fold
from l1grad import ptq
from l1grad import qat
from l1grad import ranges
from l1grad import runs
from l1grad import train
from l1grad.errors import ConfigError
from l1grad.models.cnn import DigitsCNN


def _random_variables(width=4, seed=0):
  """A digits CNN with non-trivial BN parameters and running statistics."""
  model = DigitsCNN(num_classes=10, width=width)
  variables = model.init(
    jax.random.key(seed), jnp.zeros((1, 8, 8, 1)), train=False
  )
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [
    leaf + 0.5 * jax.random.normal(k, leaf.shape)
    for leaf, k in zip(leaves, keys)
  ]
  variables = jax.tree.unflatten(treedef, leaves)
  variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
  return model, variables


def _images(n=32, seed=2):
  return jax.random.normal(jax.random.key(seed), (n, 8, 8, 1))


def test_traced_dfq_ranges_are_ptqs_and_the_rule():
  model, variables = _random_variables()
  sample = _images(2)
  expected = ranges.bn_activation_ranges(model, variables, sample)
  traced = jax.jit(lambda v: ranges.dfq_activation_ranges(model, v, (8, 8, 1)))(
    variables
  )
  assert list(traced) == list(expected)
  for key, (lo, hi) in expected.items():
    assert (float(traced[key][0]), float(traced[key][1])) == (lo, hi)
  # The rule written out: each point reads ReLU(BN_k) (pooled or flattened),
  # so its range is [min_c max(0, β - 6|γ|), max_c max(0, β + 6|γ|)].
  readers = {"Conv_1": 0, "Conv_2": 1, "Dense_0": 2, "Dense_1": 3}
  for key, k in readers.items():
    bn = variables["params"][f"BatchNorm_{k}"]
    gamma = np.abs(np.asarray(bn["scale"], np.float32))
    beta = np.asarray(bn["bias"], np.float32)
    lo = np.min(np.maximum(beta - 6 * gamma, 0))
    hi = np.max(np.maximum(beta + 6 * gamma, 0))
    assert expected[key] == (float(lo), float(hi)), key


def test_folded_forward_in_float_is_batch_norm_in_train_mode():
  model, variables = _random_variables()
  params, stats = variables["params"], variables["batch_stats"]
  x = _images()
  pairs = fold.find_conv_bn_pairs(model, variables, x, train=False)
  assert len(pairs) == 4

  def loss(p, fold_kernels):
    if fold_kernels:  # W·a/a: the folded path without the quantizer
      p = qat.folded_kernels(p, stats, pairs, 8, quantize=False)
    logits, updates = model.apply(
      {"params": p, "batch_stats": stats},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    return jnp.mean(logits**2), (logits, updates["batch_stats"])

  grad = jax.jit(
    jax.value_and_grad(loss, has_aux=True), static_argnames="fold_kernels"
  )
  (_, (lf, sf)), gf = grad(params, fold_kernels=True)
  (_, (lp, sp)), gp = grad(params, fold_kernels=False)
  np.testing.assert_allclose(lf, lp, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    sf,
    sp,
  )
  # The fold factor is held fixed, so the gradients are plain training's.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    gf,
    gp,
  )


def test_frozen_forward_is_the_ptq_forward_and_keeps_statistics(tiny_run):
  run = checkpoint.load_run(tiny_run)
  model = train.create_model(run.config)
  ste = qat.FoldedSTE.create(model, (4, 3), (8, 8, 1))
  batch = next(iter(data.eval_batches("digits", "test", global_batch_size=64)))
  x = jnp.asarray(batch["image"])
  forward = jax.jit(ste.apply, static_argnames="bn_frozen")
  logits, stats = forward(run.params, run.batch_stats, x, bn_frozen=True)
  jax.tree.map(np.testing.assert_array_equal, stats, run.batch_stats)

  variables = {"params": run.params, "batch_stats": run.batch_stats}
  folded = fold.fold_batch_norm(variables, ste.pairs)
  act = ranges.range_tree(ranges.bn_activation_ranges(model, variables, x))
  expected = jax.jit(
    lambda f, r: ptq.quantized_apply(
      model, ptq.quantize_variables(f, 4), r, 3, x
    )
  )(folded, act)
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(expected))) > 1.0  # not a trivial network

  # Before the freeze: batch statistics, and the running ones move.
  _, moved = forward(run.params, run.batch_stats, x, bn_frozen=False)
  change = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), moved, run.batch_stats
  )
  assert max(jax.tree.leaves(change)) > 0


def test_default_loss_is_plain_training_and_unfolded_ste_unchanged(tiny_run):
  run = checkpoint.load_run(tiny_run)
  x, y = _images(16), jnp.arange(16) % 10
  config = tiny_digits()
  model = train.create_model(config)
  loss_fn = train.make_loss_fn(model, config, regularized=False)
  loss, aux = loss_fn(run.params, run.batch_stats, x, y, jax.random.key(0))
  logits, updates = model.apply(
    {"params": run.params, "batch_stats": run.batch_stats},
    x,
    train=True,
    mutable=["batch_stats"],
  )
  np.testing.assert_array_equal(aux["logits"], logits)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  assert float(loss) == float(xent)
  jax.tree.map(
    np.testing.assert_array_equal, aux["batch_stats"], updates["batch_stats"]
  )


@pytest.mark.slow
def test_folded_ste_evaluates_the_ptq_way_as_it_trained(tiny_run, tmp_path):
  # A few dozen folded STE steps at (4,3) from the tiny base; the last
  # quarter with frozen statistics.
  config = tiny_digits(
    init_from=tiny_run,
    learning_rate=0.01,
    **{"qat.bits": "4:3", "qat.freeze_bn_fraction": 0.25},
  )
  assert config.qat.scheme == "folded"
  workdir = str(tmp_path / "ste")
  train.train_and_evaluate(config, workdir)
  run = checkpoint.load_run(workdir)
  model = train.create_model(run.config)
  ste = qat.from_config(model, run.config)((8, 8, 1), jnp.float32)

  # Its training-time forward passes over the test split: batch statistics
  # (batches of about the training size: 360 = 5 × 72, no padding) and
  # frozen statistics.
  forward = jax.jit(ste.apply, static_argnames="bn_frozen")
  correct = {False: 0, True: 0}
  count = 0
  for batch in data.eval_batches("digits", "test", global_batch_size=72):
    assert np.all(batch["mask"])
    for frozen in correct:
      logits, _ = forward(
        run.params, run.batch_stats, batch["image"], bn_frozen=frozen
      )
      correct[frozen] += int(np.sum(np.argmax(logits, -1) == batch["label"]))
    count += len(batch["label"])
  train_mode = correct[False] / count
  frozen_mode = correct[True] / count
  print(f"train mode {train_mode:.4f}, frozen {frozen_mode:.4f}")

  report = ptq.evaluate([workdir], ptq.Settings(bits=((4, 3),)), write=False)
  (row,) = [r for r in report.results if r["w_bits"] == 4]
  assert row["method"] == "ste 4:3"
  assert row["accuracy"] == pytest.approx(frozen_mode, abs=1e-9)
  # Within noise of the accuracy it trained at (360 test images: one
  # standard error is ~1.5 points at 90 %).
  assert abs(row["accuracy"] - train_mode) <= 0.03, (row, train_mode)
  assert row["accuracy"] > 0.5


def test_config_checks_and_resuming_runs_stored_before_the_scheme():
  config = tiny_digits(**{"qat.bits": "4:4", "qat.scheme": "folded_bn"})
  with pytest.raises(ConfigError, match="qat.scheme"):
    config_lib.validate(config)
  config = tiny_digits(**{"qat.bits": "4:4", "qat.freeze_bn_fraction": 1.5})
  with pytest.raises(ConfigError, match="freeze_bn_fraction"):
    config_lib.validate(config)

  def stored(**overrides):
    old = tiny_digits(**overrides)
    del old.qat["scheme"], old.qat["freeze_bn_fraction"]
    return old

  # A run without STE resumes whatever the new fields say ...
  config_lib.check_same_run(tiny_digits(), stored(), "w")
  # ... an old STE run was unfolded: it resumes as such, not as folded.
  ste = {"qat.bits": "4:4"}
  config_lib.check_same_run(
    tiny_digits(**ste, **{"qat.scheme": "unfolded"}), stored(**ste), "w"
  )
  with pytest.raises(ConfigError, match="qat.scheme"):
    config_lib.check_same_run(tiny_digits(**ste), stored(**ste), "w")
  assert qat.freeze_start(220, 0.2) == 176 and qat.freeze_start(7, 0) == 7
  # -1: every step of a fine-tune, the last fifth from scratch.
  assert qat.freeze_fraction(tiny_digits(init_from="runs/base")) == 1.0
  assert qat.freeze_fraction(tiny_digits()) == 0.2


def test_labels_name_the_scheme():
  def label(**qat_fields):
    return runs.method_label(
      ml_collections.ConfigDict({"reg": {"kind": "none"}, "qat": qat_fields})
    )

  assert label(bits="3:2", scheme="folded") == "ste 3:2"
  assert label(bits="3:2", scheme="unfolded") == "ste 3:2 unfolded"
  assert label(bits="3:2") == "ste 3:2 unfolded"  # stored before the field
