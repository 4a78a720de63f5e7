"""Smoke run of benchmarks/step_time.py: it builds, runs and reports (no timings asserted)."""

import importlib.util
import json
import os

import jax
import numpy as np

from l1grad import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  path = os.path.join(ROOT, "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_step_time_smoke_on_digits(tmp_path):
  step_time = _load("step_time")
  out = tmp_path / "digits.json"
  result = step_time.main(
    [
      "--models",
      "digits",
      "--digits-width",
      "4",
      "--digits-batch",
      "16",
      "--variants",
      "plain,l1_hvp,l1_fd",
      "--repeats",
      "1",
      "--steps",
      "1",
      "--warmup",
      "0",
      "--quiet",
      "--out",
      str(out),
    ]
  )
  stored = json.loads(out.read_text())
  assert stored["models"][0]["model"] == "digits"
  rows = result["models"][0]["variants"]
  assert set(rows) == {"plain", "l1_hvp", "l1_fd"}
  for row in rows.values():
    assert row["median_s"] > 0 and row["images_per_s"] > 0
    assert row["flops"] > 0 and row["memory"]["peak_bytes"] > 0
  assert rows["plain"]["ratio_to_plain"] == 1.0
  # XLA's flop count is deterministic: the exact penalty costs more than a
  # plain step (one HVP), the finite difference about one more gradient.
  assert rows["l1_hvp"]["flops_ratio"] > rows["l1_fd"]["flops_ratio"] > 1.0
  table = (tmp_path / "digits.md").read_text()
  assert "| l1_hvp |" in table


def test_both_hvp_forms_the_benchmark_compares_take_the_same_step():
  """``l1_hvp`` (jax.linearize) and ``l1_hvp_jvp`` (jax.jvp) agree."""
  step_time = _load("step_time")
  args = step_time.parse_args(["--digits-width", "4", "--digits-batch", "16"])
  setup = step_time.model_setup("digits", args)
  model = train.create_model(setup["config"], 10)
  params, stats = train.init_variables(model, (8, 8, 1), 0)
  rs = np.random.RandomState(0)
  batch = {
    "image": rs.randn(16, 8, 8, 1).astype(np.float32),
    "label": rs.randint(0, 10, 16).astype(np.int32),
  }
  lr = lambda step: 0.01
  new_params = {}
  for variant in ("l1_hvp", "l1_hvp_jvp"):
    config, regularized = step_time.variant_config(
      setup["config"], variant, "4:4"
    )
    tx = train.create_optimizer(config, lr)
    state = train.TrainState(
      step=np.int32(0),
      params=params,
      batch_stats=stats,
      opt_state=tx.init(params),
    )
    step = train.make_train_step(model, config, tx, lr, regularized=regularized)
    state, _ = jax.jit(step)(state, batch, jax.random.key(0))
    new_params[variant] = state.params
  for a, b in zip(
    jax.tree.leaves(new_params["l1_hvp"]),
    jax.tree.leaves(new_params["l1_hvp_jvp"]),
  ):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6
    )
