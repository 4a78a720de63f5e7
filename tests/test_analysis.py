"""The loss-expansion analysis: its terms against exact derivatives, and the command."""

import contextlib
import functools
import json
import os
import subprocess
import sys

from absl import flags
from absl import logging
from conftest import ROOT
from conftest import load_script
import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_configs import tiny_digits

from l1grad import analysis
from l1grad import cli
from l1grad import errors
from l1grad import expansion
from l1grad import ptq
from l1grad import runs
from l1grad import train

# tanh outputs lie in [-1, 1]: a fixed range every activation point respects.
RANGES = {"Dense_1": (-1.0, 1.0), "Dense_2": (-1.0, 1.0)}


class Tiny(nn.Module):
  """A smooth MLP (tanh, so the Taylor expansion holds at every scale)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.tanh(nn.Dense(6)(x))
    x = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(x)


def _setup(dtype=jnp.float32):
  model = Tiny()
  x = jax.random.normal(jax.random.key(0), (8, 4))
  variables = model.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v.astype(dtype), variables)
  batch = {
    "image": x.astype(dtype),
    "label": jnp.array([0, 1, 2, 0, 1, 2, 0, 1]),
    # The last example is padding: the loss must ignore it.
    "mask": jnp.array([True] * 7 + [False]),
  }
  return model, variables, batch


def _noise_and_terms(
  model,
  variables,
  batch,
  scale=1.0,
  w_bits=4,
  a_bits=4,
  weights=True,
  activations=True,
):
  """Real noise at (w_bits, a_bits), scaled, and every expansion term."""
  run = _compiled(model, w_bits, a_bits, weights, activations)
  return run(variables, batch, jnp.asarray(scale, batch["image"].dtype))


@functools.cache
def _compiled(model, w_bits, a_bits, weights, activations):
  # One jitted function per setting, shared by the tests (compiles dominate).

  @jax.jit
  def run(variables, batch, scale):
    z = expansion.expansion_point(model, variables, batch["image"])
    noise = expansion.quantization_noise(
      model,
      variables,
      batch["image"],
      w_bits,
      a_bits,
      RANGES,
      weights=weights,
      activations=activations,
    )
    delta = jax.tree.map(lambda d: d * scale, noise.delta)
    loss = functools.partial(expansion.loss_at, model, variables)
    terms = expansion.expansion_terms(loss, z, delta, noise.step, batch)
    _, directional = jax.jvp(lambda z_: loss(z_, batch), (z,), (delta,))
    grad = jax.grad(loss)(z, batch)
    return z, noise, delta, terms, directional, grad

  return run


def test_first_order_term_is_the_directional_derivative():
  model, variables, batch = _setup()
  _, noise, _, terms, directional, _ = _noise_and_terms(model, variables, batch)
  # Real 4-bit noise on both weights and activations.
  assert (
    float(expansion.inner(noise.delta["weights"], noise.delta["weights"])) > 0
  )
  assert float(expansion.inner(noise.delta["acts"], noise.delta["acts"])) > 0
  np.testing.assert_allclose(
    float(terms["first_order"]), float(directional), rtol=1e-5
  )
  np.testing.assert_allclose(
    float(terms["second_order"]),
    float(terms["first_order"] + terms["curvature"]),
    rtol=1e-6,
  )


def test_induced_loss_approaches_the_expansion_as_noise_shrinks():
  with jax.enable_x64(True):
    model, variables, batch = _setup(jnp.float64)
    err1, err2 = [], []
    for scale in (1e-1, 1e-2, 1e-3):
      *_, terms, _, _ = _noise_and_terms(model, variables, batch, scale=scale)
      induced, first = float(terms["induced"]), float(terms["first_order"])
      err1.append(abs(induced - first) / abs(first))
      err2.append(abs(induced - float(terms["second_order"])) / abs(first))
  # First order: relative error O(scale); second order: O(scale²).
  assert err1[0] > err1[1] > err1[2] and err1[2] < 1e-2, err1
  assert err1[1] < 0.3 * err1[0] and err1[2] < 0.3 * err1[1], err1
  assert all(e2 < e1 for e1, e2 in zip(err1, err2)), (err1, err2)
  assert err2[1] < 0.05 * err2[0] and err2[2] < 0.05 * err2[1], err2


def test_second_order_prediction_is_exact_on_a_quadratic():
  with jax.enable_x64(True):
    z = {
      "weights": {"Dense_0": jnp.zeros((3, 2))},
      "acts": {"Dense_1": jnp.zeros((4,))},
    }
    flat, unravel = ravel_pytree(z)
    n = flat.size
    keys = jax.random.split(jax.random.key(2), 4)
    m = jax.random.normal(keys[0], (n, n), jnp.float64)
    a = m + m.T  # symmetric, indefinite
    b = jax.random.normal(keys[1], (n,), jnp.float64)
    z = unravel(jax.random.normal(keys[2], (n,), jnp.float64))

    def loss(z_):
      v, _ = ravel_pytree(z_)
      return 0.5 * v @ a @ v + b @ v

    d = jax.random.uniform(keys[3], (n,), jnp.float64, -0.5, 0.5)
    delta = unravel(d)
    step = jax.tree.map(lambda _: jnp.float64(1.0), z)
    terms = jax.jit(functools.partial(expansion.expansion_terms, loss))(
      z, delta, step
    )
    induced = float(terms["induced"])
    np.testing.assert_allclose(
      float(terms["second_order"]), induced, rtol=1e-12
    )
    np.testing.assert_allclose(
      float(terms["curvature"]), 0.5 * float(d @ a @ d), rtol=1e-12
    )
    assert abs(float(terms["second_order"]) - induced) < 1e-6 * abs(
      float(terms["first_order"]) - induced
    )


def test_hvp_matches_reverse_over_reverse():
  model, variables, batch = _setup()
  z, noise, *_ = _noise_and_terms(model, variables, batch)
  loss = functools.partial(expansion.loss_at, model, variables)

  @jax.jit
  def both(z, v):
    grad, hv = expansion.hvp(loss, z, v, batch)
    rr = jax.grad(lambda z_: expansion.inner(jax.grad(loss)(z_, batch), v))(z)
    return grad, hv, rr, jax.grad(loss)(z, batch)

  grad, hv, rr, g = both(z, noise.delta)
  for x, y in zip(jax.tree.leaves(hv), jax.tree.leaves(rr)):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7
    )
  for x, y in zip(jax.tree.leaves(grad), jax.tree.leaves(g)):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9
    )


def test_worst_case_bound_is_attained_by_the_sign_perturbation():
  model, variables, batch = _setup()
  z, noise, _, terms, _, grad = _noise_and_terms(model, variables, batch)
  step = noise.step
  bound = float(expansion.worst_case_bound(grad, step))
  np.testing.assert_allclose(float(terms["bound"]), bound, rtol=1e-6)
  worst = expansion.worst_case_perturbation(grad, step)
  np.testing.assert_allclose(
    float(expansion.inner(worst, grad)), bound, rtol=1e-5
  )
  # Every |δ| ≤ Δ/2 stays below it: the real noise and random ones.
  assert abs(float(terms["first_order"])) <= bound
  for i in range(5):
    leaves, treedef = jax.tree.flatten(grad)
    keys = jax.random.split(jax.random.key(10 + i), len(leaves))
    rand = jax.tree.unflatten(
      treedef,
      [
        jax.random.uniform(k, g.shape, minval=-0.5, maxval=0.5)
        for k, g in zip(keys, leaves)
      ],
    )
    rand = jax.tree.map(lambda r, s: r * s, rand, step)
    assert abs(float(expansion.inner(rand, grad))) <= bound


def test_noise_tree_is_the_real_ptq_noise():
  model, variables, batch = _setup()
  x = batch["image"]
  z, noise, _, terms, _, _ = _noise_and_terms(
    model, variables, batch, w_bits=3, a_bits=4
  )
  # The recorded network is exactly l1grad.ptq's quantized network...
  qvars = ptq.quantize_variables(variables, 3)
  ptq_logits = ptq.quantized_apply(model, qvars, RANGES, 4, x)
  np.testing.assert_allclose(
    np.asarray(noise.logits), np.asarray(ptq_logits), rtol=1e-6, atol=1e-6
  )
  # ...and the float network moved by δ reproduces it.
  moved = jax.tree.map(jnp.add, z, noise.delta)
  np.testing.assert_allclose(
    np.asarray(expansion.apply_at(model, variables, moved, x)),
    np.asarray(ptq_logits),
    atol=1e-5,
  )
  ptq_loss = expansion.cross_entropy(ptq_logits, batch["label"], batch["mask"])
  np.testing.assert_allclose(
    float(terms["perturbed_loss"]), float(ptq_loss), rtol=1e-5
  )
  # Rounding noise is bounded by half a bin (no clipping in these ranges).
  for d, s in zip(jax.tree.leaves(noise.delta), jax.tree.leaves(noise.step)):
    assert float(jnp.max(jnp.abs(d) - 0.5 * s)) <= 1e-6
  hist = expansion.noise_histogram(
    noise.delta["weights"]["Dense_0"], noise.step["weights"]["Dense_0"]
  )
  assert float(hist["n"]) == 4 * 6 and float(hist["clipped"]) == 0
  assert float(jnp.sum(hist["counts"])) == 24


@pytest.mark.parametrize("kind", ["weights", "activations"])
def test_one_kind_leaves_the_other_unperturbed(kind):
  model, variables, batch = _setup()
  use_w, use_a = analysis.KINDS[kind]
  _, noise, *_ = _noise_and_terms(
    model, variables, batch, weights=use_w, activations=use_a
  )
  on, off = ("weights", "acts") if use_w else ("acts", "weights")
  assert all(
    float(jnp.max(jnp.abs(d))) == 0 for d in jax.tree.leaves(noise.delta[off])
  )
  assert all(float(jnp.max(s)) == 0 for s in jax.tree.leaves(noise.step[off]))
  assert any(
    float(jnp.max(jnp.abs(d))) > 0 for d in jax.tree.leaves(noise.delta[on])
  )


def test_pearson_and_spearman():
  assert analysis.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(
    0.9986, abs=1e-3
  )
  assert np.isnan(analysis.pearson([1], [2]))
  assert np.isnan(analysis.pearson([1, 1, 1], [1, 2, 3]))
  # Monotone but far from linear: rank correlation 1; ties share ranks.
  assert analysis.spearman([1, 2, 3, 4], [1, 10, 100, 1e4]) == pytest.approx(
    1.0
  )
  assert analysis.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
  assert analysis.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ---------------------------------------------------------------------------
# Settings, the training log, names that moved.


def test_settings_extend_the_shared_ones():
  assert isinstance(analysis.Settings(), runs.Settings)
  assert analysis.Settings(bits=((4, 4), (4, 4), (8, 8))).bits == (
    (4, 4),
    (8, 8),
  )
  assert (
    analysis.Settings(act_ranges="dynamic").ptq_settings().act_ranges
    == "calibrate"
  )
  with pytest.raises(errors.ConfigError, match="dynamic"):
    ptq.Settings(act_ranges="dynamic")  # PTQ needs fixed ranges
  for bad, match in (
    ({"bits": ()}, "No bit-width pairs"),
    ({"bits": ((8, 1),)}, "between 2"),
    ({"num_batches": 0}, "--num_batches"),
    ({"batch_size": 0}, "--batch_size"),
    ({"split": "val"}, "--split"),
    ({"act_ranges": "x"}, "--act_ranges"),
  ):
    with pytest.raises(errors.ConfigError, match=match):
      analysis.Settings(**bad)
  assert list(analysis.Settings().to_json()) == [
    "bits",
    "num_batches",
    "batch_size",
    "split",
    "act_ranges",
    "calib_batches",
    "per_channel",
    "fold",
    "step",
  ]


def _write_log(workdir, steps):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in steps:
      f.write(json.dumps({"step": step, "cross_entropy": 1.0 / step}) + "\n")
    f.write('{"step": 99, "cross_')  # a line cut by a killed run


def test_training_log_reads_the_source_run_first_and_lists_both_files(tmp_path):
  source, tune = str(tmp_path / "source"), str(tmp_path / "tune")
  _write_log(source, [1, 2, 3])
  _write_log(tune, [1, 2])
  log = analysis.training_log(tune, {"init_from": source})
  assert log["step"] == [1, 2, 3, 4, 5] and log["phase"] == [0, 0, 0, 1, 1]
  assert log["cross_entropy"][3] == 1.0
  # The run's own log is among the sources (it was left out once).
  assert log["sources"] == [
    os.path.join(os.path.abspath(d), "metrics.jsonl") for d in (source, tune)
  ]
  alone = analysis.training_log(tune)
  assert alone["step"] == [1, 2] and alone["sources"] == [
    os.path.join(os.path.abspath(tune), "metrics.jsonl")
  ]
  # An unreadable source: this run's log only.
  assert (
    analysis.training_log(tune, {"init_from": str(tmp_path / "gone")})[
      "sources"
    ]
    == (alone["sources"])
  )
  assert analysis.training_log(str(tmp_path / "none")) is None


def test_moved_names_still_work_from_analysis():
  for name in (
    "expansion_point",
    "apply_at",
    "loss_at",
    "hvp",
    "inner",
    "expansion_terms",
    "quantization_noise",
    "noise_histogram",
    "worst_case_bound",
    "worst_case_perturbation",
    "split_weights",
    "weight_noise",
    "QuantNoise",
  ):
    assert getattr(analysis, name) is getattr(expansion, name), name
  assert analysis.training_log is runs.training_log


# ---------------------------------------------------------------------------
# The command, end to end on a tiny trained digits checkpoint.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  config = tiny_digits(num_epochs=30, max_steps=5)
  workdir = str(tmp_path_factory.mktemp("analysis") / "tiny")
  train.train_and_evaluate(config, workdir)
  return workdir


# Top-level scripts whose absl flags may be registered in this process.
_SCRIPTS = frozenset(
  os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")
)
_SET_ASIDE = {}


@contextlib.contextmanager
def _flags_of(script):
  """The block runs with ``script``'s absl flags, other scripts' set aside.

  eval_ptq.py (loaded by other test files of this process) and analyze.py
  define flags of the same names (--workdir, --bits, ...); absl holds one
  flag per name.
  """
  fv = flags.FLAGS
  others = {
    m: list(fl)
    for m, fl in fv.flags_by_module_dict().items()
    if m in _SCRIPTS and m != script
  }

  def register(module, module_flags):
    for flag in module_flags:
      fv[flag.name] = flag
      fv.register_flag_by_module(module, flag)

  for module_flags in others.values():
    for flag in module_flags:
      delattr(fv, flag.name)
  register(script, _SET_ASIDE.pop(script, []))
  try:
    yield load_script(f"{script}.py")
  finally:
    own = list(fv.flags_by_module_dict().get(script, []))
    for flag in own:
      delattr(fv, flag.name)
    _SET_ASIDE[script] = own
    for module, module_flags in others.items():
      register(module, module_flags)


def _analyze(*argv):
  """Runs analyze.py as ``python analyze.py ARGV`` would, in this process."""
  with _flags_of("analyze") as script:
    verbosity = logging.get_verbosity()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["analyze.py", *argv])
    try:
      cli.guard(script.main)(["analyze.py"])
    finally:
      flags.FLAGS.unparse_flags()
      logging.set_verbosity(verbosity)


def test_command_writes_json_summary_and_figures(tiny_run, tmp_path, capsys):
  out = str(tmp_path / "out")
  _analyze(
    "--workdir",
    tiny_run,
    "--bits",
    "8:8,3:3",
    "--num_batches",
    "2",
    "--batch_size",
    "16",
    "--out",
    out,
  )
  printed = capsys.readouterr().out
  assert "| (3,3) | both |" in printed
  names = sorted(os.listdir(out))
  assert names == sorted(
    [
      "analysis.json",
      "analysis.md",
      "analysis_expansion.png",
      "analysis_grad_norms_kl.png",
      "analysis_noise_tiny.png",
      "analysis_penalty.png",
    ]
  )
  with open(os.path.join(out, "analysis.json")) as f:
    report = json.load(f)
  (run,) = report["runs"]
  assert run["num_batches"] == 2 and run["num_examples"] == 32
  assert run["folded_layers"] and run["act_ranges"] == "bn"
  assert len(run["per_batch"]["act_grad_l1"]) == 2
  assert [(p["w_bits"], p["a_bits"]) for p in run["pairs"]] == [(8, 8), (3, 3)]
  for pair in run["pairs"]:
    assert set(pair["kinds"]) == {"weights", "activations", "both"}
    for entry in pair["kinds"].values():
      s = entry["summary"]
      # L(z + δ) is the quantized network's loss (BN folded, DFQ ranges).
      assert s["reconstruction_error"] < 1e-5
      assert s["bound_mean"] >= abs(s["first_order_mean"])
      assert len(entry["per_batch"]["induced"]) == 2
    assert set(pair["noise"]["weights"]) == {
      "Conv_0",
      "Conv_1",
      "Conv_2",
      "Dense_0",
      "Dense_1",
    }
    assert set(pair["noise"]["acts"]) == {
      "Conv_1",
      "Conv_2",
      "Dense_0",
      "Dense_1",
    }
    # One name per tensor: per-layer reports use the perturbation points' keys.
    assert set(pair["noise"]["acts"]) == set(run["activation_ranges"])
  assert run["training_log"]["step"] == [1, 2, 3, 4, 5]
  assert run["training_log"]["sources"] == [
    os.path.join(tiny_run, "metrics.jsonl")
  ]


def _expect_exit_2(capsys, *argv):
  with pytest.raises(SystemExit) as exit_info:
    _analyze(*argv)
  assert exit_info.value.code == 2
  return capsys.readouterr().err


def test_command_bad_input_exits_2_without_traceback(
  tiny_run, tmp_path, capsys
):
  assert "W:A" in _expect_exit_2(capsys, "--workdir", tiny_run, "--bits", "9")
  assert "--num_batches" in _expect_exit_2(
    capsys, "--workdir", tiny_run, "--num_batches", "0"
  )
  # As a module, from a shell (the same command as analyze.py): no checkpoint.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "l1grad.analysis",
      "--workdir",
      str(tmp_path / "none"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
