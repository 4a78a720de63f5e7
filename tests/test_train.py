"""The trainer: every config end to end, resume, schedule, STE, devices."""

import os
import subprocess
import sys

import chex
from conftest import ROOT
from conftest import history
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tiny_configs import tiny_digits

from configs import cifar10_r18
from configs import cifar10_vgg
from configs import imagenet_r18
from l1grad import checkpoint
from l1grad import config_lib
from l1grad import perturb
from l1grad import quant
from l1grad import train
from l1grad.errors import CheckpointError


def test_digits_trains_checkpoints_and_resumes_exactly(tmp_path):
  config = tiny_digits(
    **{"reg.kind": "l1", "reg.weight_coef": 0.01, "reg.last_epochs": 1}
  )
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

  interrupted = str(tmp_path / "interrupted")
  config.max_steps = 30  # past the first epoch's checkpoint (44 steps in all)
  train.train_and_evaluate(config, interrupted)
  assert checkpoint.load_run(interrupted).step == 30
  config.max_steps = -1
  resumed = train.train_and_evaluate(config, interrupted)

  assert int(resumed.step) == int(straight.step) == 44
  chex.assert_trees_all_equal(resumed.params, straight.params)
  chex.assert_trees_all_equal(resumed.batch_stats, straight.batch_stats)
  run = checkpoint.load_run(interrupted)
  assert run.step == 44 and run.config.reg.kind == "l1"
  rows = history(interrupted)
  assert [r["step"] for r in rows] == list(range(1, 45))
  assert rows[-1]["test_accuracy"] > 0.3
  assert os.listdir(os.path.join(interrupted, "tensorboard"))


def test_penalty_is_off_before_the_last_epochs_and_on_after(tmp_path):
  config = tiny_digits(
    **{
      "reg.kind": "l1",
      "reg.weight_coef": 0.01,
      "reg.last_epochs": 1,
      "max_steps": 26,
    }
  )
  plan = config_lib.step_plan(config, 22)
  assert plan.reg_start_step == 22 and not plan.regularized(21)
  train.train_and_evaluate(config, str(tmp_path))
  rows = history(str(tmp_path))
  for row in rows:
    on = row["step"] > 22  # row "step" counts steps done; step 22 is the 23rd
    assert row["regularized"] == float(on)
    assert (row["penalty"] > 0) == on
    assert row["weight_grad_l1"] > 0 and row["act_grad_l1"] > 0
  on_row = rows[-1]
  np.testing.assert_allclose(
    on_row["penalty"],
    0.01 * (on_row["weight_grad_l1"] + on_row["act_grad_l1"]),
    rtol=1e-5,
  )


def test_step_plan_arithmetic():
  config = tiny_digits(
    num_epochs=10, **{"reg.kind": "l1", "reg.last_epochs": 3}
  )
  plan = config_lib.step_plan(config, 7)
  assert (plan.total_steps, plan.reg_start_step, plan.checkpoint_every) == (
    70,
    49,
    7,
  )
  config.reg.last_epochs = -1
  assert config_lib.step_plan(config, 7).reg_start_step == 0
  config.reg.kind = "none"
  assert not config_lib.step_plan(config, 7).regularized(69)


def test_ste_forward_uses_quantized_values_and_training_moves_weights(
  tmp_path, tiny_runs
):
  base_dir = tiny_runs(max_steps=3)
  config = tiny_digits(
    max_steps=3,
    init_from=base_dir,
    learning_rate=0.01,
    **{"qat.bits": "2:2", "qat.scheme": "unfolded"},
  )
  model = train.create_model(config)
  run = checkpoint.load_run(base_dir)
  x = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 1), jnp.float32)
  y = jnp.zeros((4,), jnp.int32)
  loss_fn = train.make_loss_fn(model, config, regularized=False)
  _, aux = loss_fn(run.params, run.batch_stats, x, y, jax.random.key(0))

  # The same forward pass written out: quantized kernels, 2-bit activations.
  q_params = quant.quantize_kernels(run.params, 2)
  with perturb.quantized_activations(2, None):
    expected, _ = model.apply(
      {"params": q_params, "batch_stats": run.batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
    )
  np.testing.assert_allclose(aux["logits"], expected, rtol=1e-5, atol=1e-6)
  float_logits, _ = model.apply(
    {"params": run.params, "batch_stats": run.batch_stats},
    x,
    train=True,
    mutable=["batch_stats"],
  )
  assert not np.allclose(aux["logits"], float_logits, atol=1e-3)
  kernel = run.params["Conv_0"]["kernel"]
  q = quant.fake_quant(kernel, 2, quant.symmetric_scale(kernel, 2))
  assert len(np.unique(np.asarray(q))) <= 3

  state = train.train_and_evaluate(config, str(tmp_path / "ste"))
  assert int(state.step) == 3
  moved = np.abs(
    np.asarray(state.params["Conv_0"]["kernel"]) - np.asarray(kernel)
  )
  assert moved.max() > 0


def test_init_from_checks_the_model(tmp_path, tiny_runs):
  source = tiny_runs(max_steps=1)  # test_reliability.py's source run too
  config = tiny_digits(max_steps=1, init_from=source)
  config.model_kwargs.width = 8
  with pytest.raises(CheckpointError, match="do not match"):
    train.train_and_evaluate(config, str(tmp_path / "target"))


@pytest.mark.parametrize(
  "module,model,dataset,kwargs",
  [
    (cifar10_vgg, "tiny_vgg", "cifar10", {}),
    (cifar10_r18, "tiny_resnet", "cifar10", {"num_filters": 4}),
    (imagenet_r18, "tiny_resnet", "imagenet2012", {"num_filters": 4}),
  ],
)
def test_paper_configs_run_on_mock_tfds(
  tmp_path, module, model, dataset, kwargs
):
  config = module.get_config()
  assert config.dataset == dataset and config.reg.kind == "l1"
  config.model = model
  config.model_kwargs = kwargs
  config.batch_size = 2
  config.num_epochs = 1
  config.reg.last_epochs = 1
  config.max_steps = 2
  config.worker_count = 0
  config.checkpoint_every_steps = 1
  config.max_eval_examples = 4
  with tfds.testing.mock_data(
    num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    config.max_steps = 3  # resume one more step from the checkpoint
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 3
  rows = history(str(tmp_path))
  assert rows[-1]["penalty"] > 0 and np.isfinite(rows[-1]["cross_entropy"])


_DEVICE_SCRIPT = r"""
import sys, numpy as np, jax
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from tiny_configs import tiny_digits
from l1grad import train
config = tiny_digits(max_steps=3, batch_size=16, **{{"reg.kind": "l1",
    "reg.weight_coef": 0.02, "reg.last_epochs": -1}})
state = train.train_and_evaluate(config, sys.argv[1])
assert jax.device_count() == int(sys.argv[2]), jax.device_count()
np.savez(sys.argv[1] + "/params.npz",
         *[np.asarray(x) for x in jax.tree.leaves(state.params)])
"""


def test_one_and_eight_devices_take_the_same_steps(tmp_path):
  script = _DEVICE_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
  results = {}
  for n in (1, 8):
    env = dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
      JAX_PLATFORMS="cpu",
    )
    workdir = str(tmp_path / f"dev{n}")
    subprocess.run(
      [sys.executable, "-c", script, workdir, str(n)],
      check=True,
      env=env,
      cwd=ROOT,
      capture_output=True,
    )
    with np.load(workdir + "/params.npz") as f:
      results[n] = [f[k] for k in sorted(f.files, key=lambda s: int(s[4:]))]
    results[n, "rows"] = history(workdir)
  for a, b in zip(results[1], results[8]):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  for r1, r8 in zip(results[1, "rows"], results[8, "rows"]):
    np.testing.assert_allclose(r1["total_loss"], r8["total_loss"], rtol=1e-5)
    np.testing.assert_allclose(r1["penalty"], r8["penalty"], rtol=1e-4)
