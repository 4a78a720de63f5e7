"""Checkpoints move between machines: saved on 8 devices, read on 1.

One tiny digits run trains on 8 fake CPU devices (a subprocess with
``--xla_force_host_platform_device_count=8``); then ``eval_ptq.py`` reads it
in an 8-device and in a 1-device process, the analysis CLI and the export run
in a 1-device process, and ``load_run`` (in this 1-device test process) hands
back arrays that eager and jitted JAX code both take.
"""

import json
import os
import subprocess
import sys

import chex
from conftest import ROOT
import jax
import numpy as np
import pytest

from l1grad import checkpoint
from l1grad import data
from l1grad import export
from l1grad import penalty
from l1grad import train

_BASE_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
_BASE_ENV.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
ONE_DEVICE = dict(_BASE_ENV)
EIGHT_DEVICES = dict(
  _BASE_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8"
)
# tests/tiny_configs.py's tiny digits, 4 steps.
TINY = (
  "--config.model_kwargs.width=4",
  "--config.num_epochs=1",
  "--config.max_steps=4",
  "--config.batch_size=64",
  "--config.log_every_steps=4",
  "--config.eval_every_epochs=-1",
  "--config.max_eval_examples=64",
)
EVAL = ("--bits", "8:8,4:4", "--max_examples", "64")


def _run(args, env, timeout=300):
  proc = subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def saved_on_8(tmp_path_factory):
  """``(workdir, ptq.json of an 8-device reader)``, trained on 8 devices."""
  base = tmp_path_factory.mktemp("portable")
  workdir = str(base / "run")
  proc = _run(
    [
      os.path.join(ROOT, "train.py"),
      "--config",
      os.path.join(ROOT, "configs", "digits.py"),
      "--workdir",
      workdir,
      *TINY,
    ],
    EIGHT_DEVICES,
  )
  assert "8 device(s)" in proc.stdout + proc.stderr
  out8 = str(base / "report8")
  _run(
    [
      os.path.join(ROOT, "eval_ptq.py"),
      "--workdir",
      workdir,
      *EVAL,
      "--out",
      out8,
    ],
    EIGHT_DEVICES,
  )
  with open(os.path.join(out8, "ptq.json")) as f:
    return workdir, json.load(f)


def _restored_devices(workdir):
  """Devices the restored arrays sit on (checked in this process)."""
  run = checkpoint.load_run(workdir)
  return {
    d
    for leaf in jax.tree.leaves((run.params, run.batch_stats))
    for d in leaf.sharding.device_set
  }


@pytest.mark.slow
def test_eval_ptq_and_export_on_one_device_match_eight(saved_on_8, tmp_path):
  workdir, report8 = saved_on_8
  out1, exported = str(tmp_path / "report1"), str(tmp_path / "exported")
  proc = _run(
    [
      os.path.join(ROOT, "eval_ptq.py"),
      "--workdir",
      workdir,
      *EVAL,
      "--out",
      out1,
      "--export",
      "4:4",
      "--export_dir",
      exported,
    ],
    ONE_DEVICE,
  )
  assert "Topology" not in proc.stderr
  with open(os.path.join(out1, "ptq.json")) as f:
    report1 = json.load(f)
  assert report1["runs"] == report8["runs"]
  assert report1["settings"] == report8["settings"]
  assert len(report1["results"]) == len(report8["results"]) == 3
  for r1, r8 in zip(report1["results"], report8["results"]):
    assert r1["step"] == 4 and r1["count"] == 64
    # The restored arrays are bit-identical (test_load_run_...); accuracy is
    # too. XLA:CPU compiles a convolution differently by the process's
    # device count, so the float logits — hence the KL — differ in the last
    # bits (~1e-5 relative), as they would for a checkpoint saved on 1 device.
    for key in (
      "run",
      "w_bits",
      "a_bits",
      "accuracy",
      "correct",
      "count",
      "collapsed",
    ):
      assert r1[key] == r8[key], (key, r1, r8)
    assert r1["kl"] == pytest.approx(r8["kl"], rel=1e-4, abs=1e-9)

  loaded = export.load_exported(exported)
  assert loaded.w_bits == 4 and loaded.manifest["source"]["step"] == 4
  run = checkpoint.load_run(workdir)
  batch = next(
    iter(
      data.eval_batches(
        run.config.dataset, "test", global_batch_size=8, max_examples=8
      )
    )
  )
  logits = np.asarray(loaded(batch["image"], normalized=True))
  assert logits.shape == (8, 10) and np.all(np.isfinite(logits))


@pytest.mark.slow
def test_analysis_cli_on_one_device(saved_on_8, tmp_path):
  workdir, _ = saved_on_8
  out = str(tmp_path / "analysis")
  _run(
    [
      "-m",
      "l1grad.analysis",
      "--workdir",
      workdir,
      "--bits",
      "4:4",
      "--num_batches",
      "1",
      "--batch_size",
      "16",
      "--noplot",
      "--out",
      out,
    ],
    ONE_DEVICE,
  )
  with open(os.path.join(out, "analysis.json")) as f:
    (run,) = json.load(f)["runs"]
  assert run["num_examples"] == 16


@pytest.mark.slow
def test_load_run_gives_plain_arrays_equal_to_the_eight_device_ones(
  saved_on_8, tmp_path
):
  workdir, _ = saved_on_8
  run = checkpoint.load_run(workdir)
  assert run.step == 4 and run.config.model == "digits_cnn"
  leaves = jax.tree.leaves((run.params, run.batch_stats))
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)
  # Plain arrays: one device of this process, no mesh from the saving job.
  assert _restored_devices(workdir) == {jax.local_devices()[0]}
  assert all(
    isinstance(x.sharding, jax.sharding.SingleDeviceSharding) for x in leaves
  )
  # The same bits as an 8-device process restores.
  dump = str(tmp_path / "eight.npz")
  _run(
    [
      "-c",
      "import sys, jax, numpy as np\n"
      "from l1grad import checkpoint\n"
      "assert jax.device_count() == 8\n"
      "run = checkpoint.load_run(sys.argv[1])\n"
      "leaves = jax.tree.leaves((run.params, run.batch_stats))\n"
      "assert all(x.sharding.is_fully_replicated for x in leaves)\n"
      "np.savez(sys.argv[2], *[np.asarray(x) for x in leaves])\n",
      workdir,
      dump,
    ],
    EIGHT_DEVICES,
  )
  with np.load(dump) as eight:
    assert len(eight.files) == len(leaves)
    chex.assert_trees_all_equal(
      [np.asarray(x) for x in leaves],
      [eight[f"arr_{i}"] for i in range(len(leaves))],
    )
  # restore() without a target (evaluation-style readers) works too.
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    state, config, history = checkpoint.restore(mngr, 4, None)
  finally:
    mngr.close()
  assert int(state["step"]) == 4 and config.model == "digits_cnn" and history


@pytest.mark.slow
def test_penalty_on_load_run_arrays_eager_and_jit(saved_on_8):
  workdir, _ = saved_on_8
  run = checkpoint.load_run(workdir)
  model = train.create_model(run.config, 10)
  value_and_grad = penalty.value_and_grad(
    train.make_loss_fn(model, run.config, regularized=True),
    weight_coef=0.05,
    act_coef=0.01,
    has_aux=True,
  )
  batch = next(
    iter(
      data.eval_batches(
        run.config.dataset, "test", global_batch_size=8, max_examples=8
      )
    )
  )
  args = (
    run.params,
    run.batch_stats,
    batch["image"],
    batch["label"],
    jax.random.key(0),
  )
  (total_e, info_e), grads_e = value_and_grad(*args)  # eager: no jit around it
  (total_j, info_j), grads_j = jax.jit(value_and_grad)(*args)
  assert float(info_e["penalty"]) > 0
  for key in ("loss", "penalty", "weight_penalty", "act_penalty"):
    assert float(info_e[key]) == pytest.approx(float(info_j[key]), rel=1e-5), (
      key
    )
  assert float(total_e) == pytest.approx(float(total_j), rel=1e-5)
  assert jax.tree.structure(grads_e) == jax.tree.structure(run.params)
  # Op-by-op and fused float32 sums round differently; the penalty's HVP
  # amplifies that in a few small entries (its sign tangent), so each leaf is
  # compared relative to its own scale.
  for e, j in zip(jax.tree.leaves(grads_e), jax.tree.leaves(grads_j)):
    e, j = np.asarray(e), np.asarray(j)
    np.testing.assert_allclose(
      e, j, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(j)))
    )
