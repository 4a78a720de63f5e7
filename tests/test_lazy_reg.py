"""Lazy regularization (``reg.every_steps``): schedule, scaling, resume, checks."""

import functools

import chex
from conftest import history
from conftest import load_script
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_configs import tiny_digits

from l1grad import config_lib
from l1grad import train
from l1grad.errors import ConfigError

# The tiny digits run has 22 steps an epoch; regularizing the last of its 2
# epochs starts the penalty at step 22 (0-based), so k = 4 regularizes steps
# 22, 26 and 30 of the 31 run here.
_STEPS = 31
_REG_START = 22


def _config(**overrides):
  return tiny_digits(
    **{
      "reg.kind": "l1",
      "reg.weight_coef": 0.01,
      "reg.last_epochs": 1,
      "max_steps": _STEPS,
      **overrides,
    }
  )


def _counting_steps(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
  """Records, per variant the trainer builds, λ_w and how often it traces."""
  calls = []
  build = train.make_train_step

  def counted(model, config, tx, lr, *, regularized, bn_frozen=False):
    record = {
      "regularized": regularized,
      "weight_coef": config.reg.weight_coef,
      "traces": 0,
    }
    calls.append(record)
    step = build(
      model, config, tx, lr, regularized=regularized, bn_frozen=bn_frozen
    )

    # Same name, same program: the compilation cache still hits.
    @functools.wraps(step)
    def traced(*args):
      record["traces"] += 1  # Python runs only while jit traces
      return step(*args)

    return traced

  monkeypatch.setattr(train, "make_train_step", counted)
  return calls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """``{name: (workdir, final state, variants built)}`` for k = 1 and 4."""
  root = tmp_path_factory.mktemp("lazy")
  out = {}
  for name, k in (("k1", 1), ("k4", 4)):
    workdir = str(root / name)
    with pytest.MonkeyPatch.context() as monkeypatch:
      calls = _counting_steps(monkeypatch)
      state = train.train_and_evaluate(
        _config(**{"reg.every_steps": k}), workdir
      )
    out[name] = (workdir, state, calls)
  return out


def test_k1_is_the_run_without_the_field(runs, tmp_path):
  config = _config()
  del config.reg["every_steps"]  # a config from before the field existed
  assert config_lib.step_plan(config, 22).reg_every == 1
  state = train.train_and_evaluate(config, str(tmp_path))
  chex.assert_trees_all_equal(state.params, runs["k1"][1].params)
  chex.assert_trees_all_equal(state.batch_stats, runs["k1"][1].batch_stats)


def test_k4_regularizes_every_4th_step_with_4x_coefficients(runs):
  rows = {r["step"] - 1: r for r in history(runs["k4"][0])}
  assert sorted(rows) == list(range(_STEPS))
  lazy = [s for s, r in rows.items() if r["regularized"]]
  assert lazy == [22, 26, 30]
  # Every row logs the latest penalty step's penalty per step (÷ k): on the
  # k = 1 scale, and carried over the plain steps, so a logging interval
  # that is a multiple of k still shows it.
  for step, row in rows.items():
    assert (row["penalty"] > 0) == (step >= _REG_START)
    assert row["weight_grad_l1"] > 0 and row["act_grad_l1"] > 0
    if step in lazy:  # λ_a = -1 follows λ_w; the step ran at 4 × 0.01
      np.testing.assert_allclose(
        row["penalty"],
        0.01 * (row["weight_grad_l1"] + row["act_grad_l1"]),
        rtol=1e-5,
      )
    elif step > _REG_START:
      last = max(s for s in lazy if s < step)
      assert row["penalty"] == rows[last]["penalty"]
      assert row["act_penalty"] == rows[last]["act_penalty"]
  # Steps 0-21 are plain in both runs, so step 22 starts from the same
  # parameters: the same logged penalty as the every-step run's (the step
  # itself ran at 4 × λ, checked below).
  k1 = {r["step"] - 1: r for r in history(runs["k1"][0])}
  assert [s for s, r in k1.items() if r["regularized"]] == list(
    range(_REG_START, _STEPS)
  )
  first = rows[_REG_START]
  np.testing.assert_allclose(
    first["weight_grad_l1"], k1[_REG_START]["weight_grad_l1"], rtol=1e-6
  )
  np.testing.assert_allclose(
    first["penalty"], k1[_REG_START]["penalty"], rtol=1e-6
  )

  # Two programs, each traced (so compiled) once; the penalty's at 4 × λ_w,
  # the k = 1 run's at λ_w.
  for name, coef in (("k4", 0.04), ("k1", 0.01)):
    calls = runs[name][2]
    assert sorted((c["regularized"], c["weight_coef"]) for c in calls) == [
      (False, 0.01),
      (True, coef),
    ]
    assert [c["traces"] for c in calls] == [1, 1]


def test_resume_mid_cycle_keeps_the_schedule(runs, tmp_path):
  config = _config(**{"reg.every_steps": 4, "max_steps": 28})  # 28 = 22 + 6
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  config.max_steps = _STEPS
  state = train.train_and_evaluate(config, workdir)
  chex.assert_trees_all_equal(state.params, runs["k4"][1].params)
  lazy = [r["step"] - 1 for r in history(workdir) if r["regularized"]]
  assert lazy == [22, 26, 30]


def test_step_plan_and_the_scaled_config():
  config = _config(
    num_epochs=10, **{"reg.every_steps": 3, "reg.last_epochs": 2}
  )
  plan = config_lib.step_plan(config, 7)
  assert [s for s in range(70) if plan.regularized(s)] == [
    56,
    59,
    62,
    65,
    68,
  ]
  config.reg.last_epochs = -1
  plan = config_lib.step_plan(config, 7)
  assert [s for s in range(10) if plan.regularized(s)] == [0, 3, 6, 9]

  config.reg.every_steps = 1
  assert train.lazy_step_config(config) is config  # k = 1: the same step
  config.reg.every_steps = 4
  config.reg.act_coef = 0.5
  scaled = train.lazy_step_config(config)
  assert (scaled.reg.weight_coef, scaled.reg.act_coef) == (0.04, 2.0)
  assert (config.reg.weight_coef, config.reg.act_coef) == (0.01, 0.5)
  config.reg.act_coef = -1.0  # "same as λ_w" follows the scaled λ_w
  assert config_lib.act_coef(train.lazy_step_config(config)) == 0.04
  config.reg.kind, config.reg.weight_coef = "dq", 1e-4  # DQ's β scales too
  assert train.lazy_step_config(config).reg.weight_coef == 4e-4


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"reg.every_steps": 0}, "whole number k >= 1"),
    ({"reg.every_steps": -4}, "whole number k >= 1"),
    ({"reg.every_steps": True}, "whole number k >= 1"),
    (
      {"reg.every_steps": 4, "reg.kind": "none", "reg.weight_coef": 0.0},
      "no penalty to apply",
    ),
    (
      {
        "reg.every_steps": 4,
        "reg.kind": "none",
        "reg.weight_coef": 0.0,
        "qat.bits": "4:4",
      },
      "STE training",
    ),
  ],
)
def test_bad_every_steps_is_a_config_error(overrides, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(_config(**overrides))


def test_a_fractional_every_steps_is_a_config_error():
  config = _config()
  del config.reg["every_steps"]  # the field is an int: set it untyped
  config.reg.every_steps = 2.5
  with pytest.raises(ConfigError, match="config.reg.every_steps: is 2.5"):
    config_lib.validate(config)


def _benchmark_step(step_time, setup, model, variant, state, batch, lr):
  """One step of a ``benchmarks/step_time.py`` variant: its new params."""
  config, regularized = step_time.variant_config(
    setup["config"], variant, "4:4"
  )
  tx = train.create_optimizer(config, lr)
  state = state.replace(opt_state=tx.init(state.params))
  rng = jax.random.key(0)
  if variant in step_time.JVP_VARIANTS:
    step, init_signs = step_time.make_jvp_step(
      model, config, tx, lr, tangent=step_time.JVP_VARIANTS[variant]
    )
    # The known tangent set to this step's own sign: the exact step.
    new, _ = jax.jit(step)(init_signs(state, batch, rng), batch, rng)
    return new["train"].params
  if variant in step_time.REMAT_VARIANTS:
    with step_time._remat_loss(train, step_time.REMAT_VARIANTS[variant]):
      step = train.make_train_step(model, config, tx, lr, regularized=True)
  else:
    step = train.make_train_step(model, config, tx, lr, regularized=regularized)
  new, metrics = jax.jit(step)(state, batch, rng)
  assert float(metrics["act_grad_l1"]) > 0  # the activation term is there
  return new.params


def test_benchmark_prototypes_take_the_exact_step(tmp_path):
  """Remat, the two-pass jvp and the jvp along the known (here: exact) sign
  compute the trainer's exact ℓ1 step; the lazy cycle runs."""
  step_time = load_script("benchmarks/step_time.py", "benchmarks_step_time")
  args = step_time.parse_args(["--digits-width", "4", "--digits-batch", "16"])
  setup = step_time.model_setup("digits", args)
  model = train.create_model(setup["config"], 10)
  params, stats = train.init_variables(model, (8, 8, 1), 0)
  rs = np.random.RandomState(0)
  batch = {
    "image": jnp.asarray(rs.randn(16, 8, 8, 1).astype(np.float32)),
    "label": jnp.asarray(rs.randint(0, 10, 16).astype(np.int32)),
  }
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=stats,
    opt_state=None,
  )
  lr = lambda step: 0.01
  exact = _benchmark_step(step_time, setup, model, "l1_hvp", state, batch, lr)
  for variant in ("l1_remat", "l1_hvp_two_pass", "l1_jvp_known_tangent"):
    got = _benchmark_step(step_time, setup, model, variant, state, batch, lr)
    chex.assert_trees_all_close(got, exact, rtol=1e-5, atol=1e-6)

  result = step_time.main(
    [
      *("--models", "digits", "--digits-width", "4", "--digits-batch", "16"),
      *("--variants", "plain,l1_lazy4", "--repeats", "1", "--steps", "1"),
      *("--warmup", "0", "--quiet", "--out", str(tmp_path / "lazy.json")),
    ]
  )
  row = result["models"][0]["variants"]["l1_lazy4"]
  assert row["median_s"] > 0 and 1 < row["flops_ratio"] < 1.6
  assert row["peak_ratio"] > 1  # the cycle's peak is the ℓ1 step's


def test_two_pass_trains_like_the_default_step(runs, tmp_path):
  """``reg.hvp_impl="two_pass"`` (≤ 2× memory) trains the same run."""
  config = _config(**{"reg.hvp_impl": "two_pass"})
  state = train.train_and_evaluate(config, str(tmp_path))
  chex.assert_trees_all_close(
    state.params, runs["k1"][1].params, rtol=1e-4, atol=1e-5
  )
  with pytest.raises(ConfigError, match="reg.hvp_impl"):
    config_lib.validate(_config(**{"reg.hvp_impl": "fast"}))
