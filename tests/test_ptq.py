"""Post-training quantization: ranges, the one-compile sweep, STE, reports, CLI."""

import json
import os
import shutil
import subprocess
import sys

from absl import flags
from absl import logging
from conftest import ROOT
from conftest import load_script
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from l1grad import cli
from l1grad import errors
from l1grad import models
from l1grad import params as params_lib
from l1grad import perturb
from l1grad import ptq
from l1grad import quant as quant_lib
from l1grad import ranges as ranges_lib
from l1grad import report as report_lib
from l1grad import runs as runs_lib

# ---------------------------------------------------------------------------
# Batch-norm (Data-Free Quantization) ranges.
# ---------------------------------------------------------------------------


def _bn(name):
  return nn.BatchNorm(use_running_average=True, name=name)


def _conv(name, features=3):
  return nn.Conv(features, (1, 1), use_bias=False, name=name)


class Branches(nn.Module):
  """stem→BN→ReLU → (a→BN + b→BN) → ReLU → max-pool → c→BN → mean → head.

  Covers the rule's cases: a ReLU clamp (input of ``a``/``b``, one shared
  point), two branches summed then ReLU (input of ``c``), and a BN output
  with no ReLU, average-pooled (input of ``head``: a signed range).
  """

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(_bn("bn_stem")(_conv("stem")(x)))
    y = nn.relu(_bn("bn_a")(_conv("a")(x)) + _bn("bn_b")(_conv("b")(x)))
    y = nn.max_pool(y, (2, 2), strides=(2, 2))
    y = _bn("bn_c")(_conv("c")(y))
    return nn.Dense(2, name="head")(jnp.mean(y, axis=(1, 2)))


BN_PARAMS = {  # (beta, gamma) per channel; negative γ: the rule uses |γ|
  "bn_stem": ([-1.0, 0.5, 2.0], [0.1, -0.2, 0.05]),
  "bn_a": ([0.0, 3.0, 1.0], [0.1, 0.2, 0.05]),
  "bn_b": ([4.0, -1.0, 0.5], [0.05, 0.1, -0.1]),
  "bn_c": ([-2.0, 0.0, 1.0], [0.2, 0.1, 0.3]),
}


def _hand_built():
  model = Branches()
  x = jnp.zeros((1, 4, 4, 2))
  variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), x))
  params = variables["params"]
  for name, (beta, gamma) in BN_PARAMS.items():
    params[name]["bias"] = np.asarray(beta, np.float32)
    params[name]["scale"] = np.asarray(gamma, np.float32)
  return model, variables, x


def _bounds(name):
  beta, gamma = (np.asarray(v, np.float32) for v in BN_PARAMS[name])
  return beta - 6 * np.abs(gamma), beta + 6 * np.abs(gamma)


def test_bn_ranges_follow_the_dfq_rule_on_a_hand_built_network():
  model, variables, x = _hand_built()
  ranges = ranges_lib.bn_activation_ranges(model, variables, x)
  assert set(ranges) == {"a", "c", "head"}  # "b" reads the same tensor as "a"

  lo, hi = _bounds("bn_stem")  # [-1.6, -0.7, 1.7], [-0.4, 1.7, 2.3]
  np.testing.assert_allclose(
    ranges["a"], (np.maximum(lo, 0).min(), np.maximum(hi, 0).max()), rtol=1e-6
  )
  assert ranges["a"][0] == 0.0  # clamped by the ReLU

  (la, ua), (lb, ub) = _bounds("bn_a"), _bounds("bn_b")
  # Bounds add per channel, then the ReLU clamps and max-pool keeps them.
  np.testing.assert_allclose(
    ranges["c"],
    (np.maximum(la + lb, 0).min(), np.maximum(ua + ub, 0).max()),
    rtol=1e-6,
  )
  # Per-channel sums are tighter than adding the per-tensor bounds (4.6 vs 8.2).
  assert ranges["c"][1] < ua.max() + ub.max()

  lc, uc = _bounds("bn_c")  # no ReLU: a signed range, the BN's own bounds
  np.testing.assert_allclose(ranges["head"], (lc.min(), uc.max()), rtol=1e-6)
  assert ranges["head"][0] < 0


class HalfBN(nn.Module):
  """A BN-fed Dense, then a Dense with bias → ReLU (no BN) feeding the head."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(_bn("bn")(_conv("stem")(x)))
    x = nn.relu(nn.Dense(4, name="hidden")(x.reshape((x.shape[0], -1))))
    return nn.Dense(2, name="head")(x)


def test_bn_ranges_refuse_points_not_fed_by_batch_norm():
  model = HalfBN()
  x = jnp.zeros((1, 2, 2, 1))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(errors.UserError, match="calibrate") as info:
    ranges_lib.bn_activation_ranges(model, variables, x)
  assert "'head'" in str(info.value) and "'hidden'" not in str(info.value)


def _randomize_bn(variables, seed, spread=0.5):
  """Random BN affine params and statistics (as after training)."""
  rng = np.random.default_rng(seed)

  def visit(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    if not any(n.startswith(("BatchNorm", "bn", "norm")) for n in names[:-1]):
      return np.asarray(leaf)
    if names[-1] in ("var", "scale"):
      return rng.uniform(1 - spread, 1 + 2 * spread, leaf.shape).astype(
        np.float32
      )
    return rng.normal(0.0, spread, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(visit, variables)


def test_bn_ranges_bound_every_activation_when_bn_outputs_are_in_range():
  # The monotone trick on a real residual network: if every BN output lies in
  # its [β - 6|γ|, β + 6|γ|], every quantized activation lies in its range.
  model = models.TinyResNet(num_classes=3, num_filters=4)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3)) * 3
  variables = _randomize_bn(model.init(jax.random.key(1), x, train=False), 0)
  ranges = ranges_lib.bn_activation_ranges(model, variables, x)
  assert set(ranges) == set(
    perturb.activation_shapes(
      lambda v, x: model.apply(v, x, train=False), variables, x
    )
  )

  def clip_bn(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(
      context.module, nn.BatchNorm
    ):
      p = context.module.variables["params"]
      y = jnp.clip(
        y,
        p["bias"] - 6 * jnp.abs(p["scale"]),
        p["bias"] + 6 * jnp.abs(p["scale"]),
      )
    return y

  seen = {}

  def record(key, a):
    seen[key] = np.asarray(a)
    return a

  with nn.intercept_methods(clip_bn), perturb.transform_layer_inputs(record):
    model.apply(variables, x, train=False)
  for key, (lo, hi) in ranges.items():
    assert lo - 1e-5 <= seen[key].min() and seen[key].max() <= hi + 1e-5, key
  # The residual sums add bounds: the stage-2 input exceeds the stem's range.
  assert ranges["ResNetBlock_1/Conv_0"][1] > ranges["ResNetBlock_0/Conv_0"][1]


# ---------------------------------------------------------------------------
# The sweep: one compile, 16 bits = float, 2 bits worse, STE both ways.
# ---------------------------------------------------------------------------

SWEEP = [(16, 16), (8, 8), (8, 4), (6, 4), (4, 4), (3, 3), (2, 2)]


@pytest.fixture(scope="module")
def digits_setup():
  model = models.get_model("digits_cnn", num_classes=10, width=4)
  images = np.asarray(
    jax.random.normal(jax.random.key(0), (40, 8, 8, 1)), np.float32
  )
  variables = _randomize_bn(
    model.init(jax.random.key(1), images[:1], train=False), 1, 0.1
  )
  # Labels = the float model's predictions: float accuracy is exactly 1.
  labels = np.asarray(
    jnp.argmax(model.apply(variables, images, train=False), -1), np.int32
  )
  assert len(np.unique(labels)) >= 4  # not a constant predictor
  batches = []
  for start in range(0, 40, 16):  # 16, 16, 8 + 8 padding
    n = min(16, 40 - start)
    pad = 16 - n
    batches.append(
      {
        "image": np.concatenate(
          [
            images[start : start + n],
            np.full((pad, 8, 8, 1), 100.0, np.float32),
          ]
        ),
        "label": np.concatenate(
          [labels[start : start + n], np.zeros(pad, np.int32)]
        ),
        "mask": np.arange(16) < n,
      }
    )
  folded = runs_lib.prepare_variables(model, variables, images[:1])
  ranges = ranges_lib.bn_activation_ranges(model, variables, images[:1])
  evaluator = ptq.Evaluator(model, max_traces=1)
  return model, variables, folded, ranges, batches, evaluator


def test_sweep_one_trace_16_bits_is_float_2_bits_is_worse(digits_setup):
  _, _, folded, ranges, batches, evaluator = digits_setup
  float_stats, stats = ptq.sweep(evaluator, folded, ranges, SWEEP, batches)
  assert float_stats.count == 40 and float_stats.accuracy == 1.0
  assert stats[(16, 16)].accuracy == float_stats.accuracy
  assert stats[(16, 16)].kl < 1e-6
  assert (
    stats[(8, 8)].kl < 1e-3
  )  # (a random net's logits nearly tie: no accuracy bound)
  assert stats[(2, 2)].accuracy < float_stats.accuracy
  assert stats[(2, 2)].kl > stats[(8, 8)].kl > stats[(16, 16)].kl
  # Another sweep with other bit-widths and other ranges: still no retrace
  # (max_traces=1 raises otherwise).
  wider = {k: (lo, 2 * hi) for k, (lo, hi) in ranges.items()}
  ptq.sweep(evaluator, folded, wider, [(5, 7), (12, 3)], batches)


def test_unfolded_evaluation_matches_float_at_16_bits(digits_setup):
  model, variables, _, ranges, batches, _ = digits_setup
  plain = runs_lib.prepare_variables(
    model, variables, batches[0]["image"], fold=False
  )
  assert "batch_stats" in plain
  float_stats, stats = ptq.sweep(
    ptq.Evaluator(model), plain, ranges, [(16, 16)], batches
  )
  assert stats[(16, 16)].accuracy == float_stats.accuracy == 1.0


def test_calibrated_ranges_are_the_masked_min_max(digits_setup):
  model, _, folded, _, batches, _ = digits_setup
  ranges = ranges_lib.calibrated_activation_ranges(model, folded, batches)
  seen = {}

  def record(key, a):
    a = np.asarray(a)
    lo, hi = seen.get(key, (np.inf, -np.inf))
    seen[key] = (min(lo, a.min()), max(hi, a.max()))
    return a

  with perturb.transform_layer_inputs(record):  # real examples only
    for b in batches:
      ranges_lib.apply_model(model, folded, b["image"][b["mask"]])
  assert set(ranges) == set(seen)
  for key in seen:
    np.testing.assert_allclose(ranges[key], seen[key], rtol=1e-6)


def _prepared(digits_setup, config):
  model, variables, folded, ranges, batches, _ = digits_setup
  return runs_lib.PreparedRun(
    "ste_run",
    "/tmp/ste_run",
    7,
    ml_collections.ConfigDict(config),
    model,
    variables,
    folded,
    ranges,
    "bn",
    batches[0]["image"][:1],
  )


def test_ste_run_reports_the_better_of_own_grid_and_requantized(digits_setup):
  *_, batches, evaluator = digits_setup
  config = {
    "seed": 3,
    "reg": {"kind": "none"},
    "qat": {"bits": "4:4", "scheme": "folded"},
  }
  settings = ptq.Settings(bits=((8, 8), (4, 4), (2, 2), (8, 2)))
  result = ptq.evaluate_prepared(
    _prepared(digits_setup, config), settings, batches, evaluator=evaluator
  )
  rows = {(r["w_bits"], r["a_bits"]): r for r in result.results}
  assert rows[(None, None)]["kl"] == 0.0 and result.info["qat_bits"] == "4:4"
  assert rows[(4, 4)]["ste_grid"] is None and rows[(2, 2)]["ste_grid"] is None
  for pair, own in (((8, 8), (4, 4)), ((8, 2), (4, 2))):
    row = rows[pair]
    alt = row["ste_alternatives"]
    assert (alt["own"]["w_bits"], alt["own"]["a_bits"]) == own
    best = max(alt["own"]["accuracy"], alt["requantized"]["accuracy"])
    assert row["accuracy"] == best
    assert row["ste_grid"] == (
      "own"
      if alt["own"]["accuracy"] >= alt["requantized"]["accuracy"]
      else "requantized"
    )
  # The own grid at (8,8) is the (4,4) result.
  assert (
    rows[(8, 8)]["ste_alternatives"]["own"]["accuracy"]
    == rows[(4, 4)]["accuracy"]
  )
  assert all(
    r["method"] == "ste 4:4" and r["seed"] == 3 for r in result.results
  )


def test_method_labels():
  def label(**reg):
    qat = reg.pop("qat", "")
    return runs_lib.method_label(
      ml_collections.ConfigDict(
        {"reg": reg, "qat": {"bits": qat, "scheme": "folded"}}
      )
    )

  assert label(kind="none") == "none"
  assert label(kind="l1", weight_coef=0.05, act_coef=-1.0) == "l1 λ=0.05"
  assert label(kind="l2", weight_coef=0.1, act_coef=0.02) == "l2 λw=0.1 λa=0.02"
  assert label(kind="dq", weight_coef=0.001, act_coef=-1.0) == "dq β=0.001"
  assert label(kind="none", qat="4:4") == "ste 4:4"


# ---------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------


def _results(run, method, seed, accs):
  cols = [(None, None), (8, 4), (4, 4)]
  return [
    {
      "run": run,
      "method": method,
      "seed": seed,
      "step": 10,
      "w_bits": w,
      "a_bits": a,
      "accuracy": acc,
      "kl": 0.0 if w is None else 0.1,
      "correct": 0,
      "count": 100,
    }
    for (w, a), acc in zip(cols, accs)
  ]


def test_two_run_table_and_report_files(tmp_path):
  results = _results("base", "none", 0, [0.92, 0.79, 0.11]) + _results(
    "reg", "l1 λ=0.05", 0, [0.93, 0.90, 0.86]
  )
  results[-1]["ste_grid"] = "own"
  table = report_lib.markdown_table(results)
  lines = table.strip().splitlines()
  assert lines[0] == "| run | method | FP | (8,4) | (4,4) |"
  assert lines[2] == "| base | none | 92.00 | 79.00 | 11.00 |"
  assert lines[3] == "| reg | l1 λ=0.05 | 93.00 | 90.00 | 86.00† |"

  settings = ptq.Settings(bits=((8, 4), (4, 4)))
  runs = [{"run": "base", "step": 10}, {"run": "reg", "step": 10}]
  files = report_lib.write_report(
    report_lib.Report(settings, runs, results), str(tmp_path)
  )
  assert sorted(files) == ["csv", "json", "md", "png"]
  assert all(os.path.getsize(f) > 0 for f in files.values())
  data = json.load(open(files["json"]))
  assert data["act_ranges"] == "bn" and data["settings"]["bits"] == [
    "8:4",
    "4:4",
  ]
  assert {"run", "method", "w_bits", "a_bits", "accuracy", "kl"} <= set(
    data["results"][0]
  )
  assert data["results"][0]["w_bits"] is None
  md = open(files["md"]).read()
  assert (
    "| base | none |" in md
    and "| reg | l1 λ=0.05 |" in md
    and "Data-Free" in md
  )
  csv_lines = open(files["csv"]).read().splitlines()
  assert len(csv_lines) == 7 and csv_lines[1].startswith(
    "base,none,0,10,,,0.92"
  )


def test_a_second_report_keeps_the_first_aside(tmp_path):
  settings = ptq.Settings(bits=((8, 4), (4, 4)))
  runs = [{"run": "base", "step": 10}]
  first = report_lib.Report(
    settings, runs, _results("base", "none", 0, [0.92, 0.79, 0.11])
  )
  files = report_lib.write_report(first, str(tmp_path), plot=False)
  assert first.replaced == [] and first.kept == {}
  first_json = open(files["json"]).read()
  os.utime(files["json"], (1700000000, 1700000000))  # 2023-11-14 22:13:20 UTC

  # The same results again: rewritten in place, nothing to keep.
  again = report_lib.Report(
    settings, runs, _results("base", "none", 0, [0.92, 0.79, 0.11])
  )
  report_lib.write_report(again, str(tmp_path), plot=False)
  assert (
    again.replaced == [files["json"], files["md"], files["csv"]]
    and again.kept == {}
  )
  os.utime(files["json"], (1700000000, 1700000000))

  # Different results: the earlier files move to ptq.<UTC write time>.*, and a
  # name already taken gets a suffix.
  (tmp_path / "ptq.20231114-221320.json").write_text("taken")
  second = report_lib.Report(
    settings, runs, _results("base", "none", 0, [0.90, 0.70, 0.20])
  )
  report_lib.write_report(second, str(tmp_path))
  kept = {
    os.path.basename(k): os.path.basename(v) for k, v in second.kept.items()
  }
  assert kept == {
    f"ptq.{ext}": f"ptq.20231114-221320-1.{ext}"
    for ext in ("json", "md", "csv")
  }
  assert open(tmp_path / "ptq.20231114-221320-1.json").read() == first_json
  assert (tmp_path / "ptq.20231114-221320.json").read_text() == "taken"
  assert json.load(open(files["json"]))["results"][1]["accuracy"] == 0.70

  # overwrite=True replaces without keeping (and says what it replaced).
  third = report_lib.Report(
    settings, runs, _results("base", "none", 0, [0.5, 0.5, 0.5])
  )
  report_lib.write_report(third, str(tmp_path), overwrite=True)
  assert len(third.replaced) == 4 and third.kept == {}
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
    [
      "ptq.json",
      "ptq.md",
      "ptq.csv",
      "ptq.png",
      "ptq.20231114-221320.json",
      *(f"ptq.20231114-221320-1.{ext}" for ext in ("json", "md", "csv")),
    ]
  )


def test_grouping_by_method_gives_mean_and_std():
  results = _results("l1_s0", "l1 λ=0.05", 0, [0.90, 0.80, 0.70]) + _results(
    "l1_s1", "l1 λ=0.05", 1, [0.92, 0.84, 0.74]
  )
  lines = (
    report_lib.markdown_table(results, group_by="method").strip().splitlines()
  )
  assert lines[0] == "| method | n | FP | (8,4) | (4,4) |"
  assert (
    lines[2] == "| l1 λ=0.05 | 2 | 91.00 ± 1.41 | 82.00 ± 2.83 | 72.00 ± 2.83 |"
  )


def test_grouping_by_config_fields_pools_seeds():
  results = (
    _results("a_s0", "l1 λ=0.05", 0, [0.90, 0.80, 0.70])
    + _results("a_s1", "l1 λ=0.05", 1, [0.92, 0.84, 0.74])
    + _results("b_s0", "none", 0, [0.91, 0.50, 0.10])
  )
  runs = [
    {
      "run": "a_s0",
      "config": {"seed": 0, "reg": {"kind": "l1", "weight_coef": 0.05}},
    },
    {
      "run": "a_s1",
      "config": {"seed": 1, "reg": {"kind": "l1", "weight_coef": 0.05}},
    },
    {
      "run": "b_s0",
      "config": {"seed": 0, "reg": {"kind": "none", "weight_coef": 0.0}},
    },
  ]
  lines = (
    report_lib.markdown_table(
      results, group_by="reg.kind,reg.weight_coef", runs=runs
    )
    .strip()
    .splitlines()
  )
  assert lines[0] == "| reg.kind | reg.weight_coef | n | FP | (8,4) | (4,4) |"
  assert (
    lines[2] == "| l1 | 0.05 | 2 | 91.00 ± 1.41 | 82.00 ± 2.83 | 72.00 ± 2.83 |"
  )
  assert lines[3] == "| none | 0 | 1 | 91.00 | 50.00 | 10.00 |"
  with pytest.raises(errors.ConfigError, match="reg.nope"):
    report_lib.markdown_table(results, group_by="reg.nope", runs=runs)
  with pytest.raises(errors.ConfigError, match="group_by"):
    report_lib.parse_group_by("reg.kind,,seed")


def test_collapsed_runs_are_flagged_not_hidden(tmp_path):
  assert report_lib.is_collapsed(0.10, 10) and report_lib.is_collapsed(0.2, 10)
  assert not report_lib.is_collapsed(0.25, 10) and not report_lib.is_collapsed(
    0.01, None
  )
  ok = _results("l1_s0", "l1 λ=1", 0, [0.95, 0.90, 0.80])
  dead = _results("l1_s1", "l1 λ=1", 1, [0.10, 0.10, 0.10])
  for r in dead:
    r["collapsed"] = True
  lines = (
    report_lib.markdown_table(ok + dead, group_by="method").strip().splitlines()
  )
  assert (
    lines[2]
    == "| l1 λ=1 (1/2 collapsed) | 2 | 52.50 ± 60.10 | 50.00 ± 56.57 | 45.00 ± 49.50 |"
  )
  lines = report_lib.markdown_table(ok + dead).strip().splitlines()
  assert lines[3].startswith("| l1_s1 | l1 λ=1 (collapsed) | 10.00 |")
  runs = [
    {"run": "l1_s0", "step": 1, "collapsed": False, "chance_accuracy": 0.1},
    {"run": "l1_s1", "step": 1, "collapsed": True, "chance_accuracy": 0.1},
  ]
  report = report_lib.Report(
    ptq.Settings(bits=((8, 4), (4, 4))), runs, ok + dead, group_by="method"
  )
  files = report_lib.write_report(report, str(tmp_path))
  md = open(files["md"]).read()
  assert "1 run(s) collapsed" in md and "l1_s1" in md and "## Per run" in md
  assert json.load(open(files["json"]))["group_by"] == "method"
  assert open(files["csv"]).read().splitlines()[4].endswith(",True")


# ---------------------------------------------------------------------------
# Bad input (library level).
# ---------------------------------------------------------------------------


def test_settings_reject_bits_outside_2_to_16():
  for pair in ((1, 4), (8, 17)):
    with pytest.raises(errors.ConfigError, match="between 2 and 16"):
      ptq.Settings(bits=(pair,))
  with pytest.raises(errors.ConfigError, match="act_ranges"):
    ptq.Settings(act_ranges="percentile")


def test_settings_share_one_validation_and_keep_their_json_order():
  assert isinstance(ptq.Settings(), runs_lib.Settings)
  for settings in (runs_lib.Settings, ptq.Settings):
    with pytest.raises(errors.ConfigError, match="--batch_size must be >= 1"):
      settings(batch_size=0)
    with pytest.raises(errors.ConfigError, match="--calib_batches"):
      settings(calib_batches=0)
  with pytest.raises(errors.ConfigError, match="--max_examples"):
    ptq.Settings(max_examples=0)
  with pytest.raises(TypeError):  # keyword-only: no silent field swaps
    ptq.Settings(((8, 4),))
  assert list(ptq.Settings().to_json()) == [
    "bits",
    "act_ranges",
    "per_channel",
    "fold",
    "first_last_bits",
    "calib_batches",
    "max_examples",
    "batch_size",
    "num_std",
    "step",
    "act_points",
  ]


def test_moved_names_still_work_from_ptq():
  moved = {
    ranges_lib: [
      "ACT_RANGE_METHODS",
      "EVAL_KWARGS",
      "apply_model",
      "bn_activation_ranges",
      "calibrated_activation_ranges",
      "range_tree",
    ],
    runs_lib: [
      "PreparedRun",
      "check_variables_match",
      "config_json",
      "eval_batch_size",
      "method_label",
      "prepare_run",
      "prepare_variables",
    ],
    report_lib: [
      "COLLAPSE_FACTOR",
      "Report",
      "TableRow",
      "column_name",
      "is_collapsed",
      "markdown_table",
      "parse_group_by",
      "plot_results",
      "results_csv",
      "summarize",
      "write_report",
    ],
  }
  for module, names in moved.items():
    for name in names:
      assert getattr(ptq, name) is getattr(module, name), name


def test_eval_batch_size_is_the_setting_else_the_configs():
  config = ml_collections.ConfigDict({"batch_size": 64, "eval_batch_size": -1})
  assert runs_lib.eval_batch_size(config) == 64
  assert runs_lib.eval_batch_size(config, ptq.Settings(batch_size=8)) == 8
  config.eval_batch_size = 100
  assert runs_lib.eval_batch_size(config, ptq.Settings()) == 100


def test_variables_that_do_not_fit_the_model_are_a_checkpoint_error():
  small = models.get_model("digits_cnn", num_classes=10, width=4)
  big = models.get_model("digits_cnn", num_classes=10, width=8)
  x = jnp.zeros((1, 8, 8, 1))
  variables = jax.eval_shape(
    lambda: small.init(jax.random.key(0), x, train=False)
  )
  with pytest.raises(errors.CheckpointError, match="does not match.*shape"):
    runs_lib.check_variables_match(big, variables, x)
  runs_lib.check_variables_match(small, variables, x)  # no error


# ---------------------------------------------------------------------------
# End to end: train digits for a few steps, then eval_ptq.py's main.
# ---------------------------------------------------------------------------


def _train_digits(workdir, **overrides):
  from tiny_configs import tiny_digits  # pylint: disable=g-import-not-at-top

  from l1grad import train  # pylint: disable=g-import-not-at-top

  config = tiny_digits(
    **{
      "num_epochs": 1,
      "max_steps": 4,
      "log_every_steps": 4,
      "max_eval_examples": 64,
      **overrides,
    }
  )
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp("runs")
  return (
    _train_digits(base / "plain"),
    _train_digits(base / "ste", **{"qat.bits": "4:4", "seed": 1}),
  )


def _main(*argv):
  """Runs eval_ptq.py as ``python eval_ptq.py ARGV`` would, in process.

  ``main`` runs inside :func:`l1grad.cli.guard`, as ``cli.run`` runs it: a
  ``UserError`` ends in ``error: ...`` on stderr and ``SystemExit(2)``.
  """
  eval_ptq = load_script("eval_ptq.py")
  verbosity = logging.get_verbosity()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["eval_ptq.py", *argv])
  try:
    cli.guard(eval_ptq.main)(["eval_ptq.py"])
  finally:
    flags.FLAGS.unparse_flags()
    logging.set_verbosity(verbosity)


def test_eval_ptq_two_runs_table_json_plot_and_export(
  trained, tmp_path, capsys
):
  plain, ste = trained
  out, exported = tmp_path / "report", tmp_path / "exported"
  _main(
    "--workdir",
    plain,
    "--workdir",
    ste,
    "--bits",
    "16:16,8:8,4:4,2:8",
    "--out",
    str(out),
    "--max_examples",
    "100",
    "--export",
    "4:4",
    "--export_dir",
    str(exported),
  )
  printed = capsys.readouterr().out
  assert "| plain | none |" in printed and "| ste | ste 4:4 |" in printed
  assert "bytes" in printed and "larger" in printed
  data = json.load(open(out / "ptq.json"))
  assert [r["run"] for r in data["runs"]] == ["plain", "ste"]
  assert data["runs"][0]["step"] == 4 and data["runs"][1]["seed"] == 1
  assert data["runs"][0]["config"]["model"] == "digits_cnn"
  assert len(data["results"]) == 2 * 5
  for r in data["results"]:
    assert 0.0 <= r["accuracy"] <= 1.0 and r["count"] == 100 and r["kl"] >= 0.0
  float_row, *rows = [r for r in data["results"] if r["run"] == "plain"]
  assert float_row["w_bits"] is None and float_row["kl"] == 0.0
  assert rows[0]["accuracy"] == float_row["accuracy"]  # 16:16
  ste_rows = {
    (r["w_bits"], r["a_bits"]): r for r in data["results"] if r["run"] == "ste"
  }
  assert ste_rows[(8, 8)]["ste_grid"] in ("own", "requantized")
  assert ste_rows[(4, 4)]["ste_grid"] is None
  assert all((out / f"ptq.{ext}").exists() for ext in ("md", "csv", "png"))

  # One export per run; each reproduces the fake-quantized logits.
  from l1grad import export  # pylint: disable=g-import-not-at-top

  for name in ("plain", "ste"):
    loaded = export.load_exported(str(exported / name))
    assert loaded.w_bits == 4 and loaded.manifest["source"]["step"] == 4


def test_eval_ptq_default_out_is_the_first_workdir(trained, tmp_path):
  work = tmp_path / "run"
  shutil.copytree(trained[0], work)
  _main(
    "--workdir",
    str(work),
    "--bits",
    "8:8",
    "--max_examples",
    "32",
    "--act_ranges",
    "calibrate",
    "--calib_batches",
    "1",
    "--per_channel",
  )
  data = json.load(open(work / "ptq.json"))
  assert data["act_ranges"] == "calibrate" and data["settings"]["per_channel"]
  assert (
    "calibrated min/max over 1 training batches" in open(work / "ptq.md").read()
  )


def test_eval_ptq_never_replaces_a_report_silently(trained, tmp_path, capsys):
  work = tmp_path / "run"
  shutil.copytree(trained[0], work)
  _main("--workdir", str(work), "--bits", "8:8,4:4", "--max_examples", "32")
  first = (work / "ptq.json").read_text()
  assert "2 bit-widths," in capsys.readouterr().out

  # An export-only call (no --bits) leaves the report alone.
  _main(
    "--workdir",
    str(work),
    "--export",
    "4:4",
    "--export_dir",
    str(tmp_path / "exp"),
  )
  printed = capsys.readouterr().out
  assert "Export only" in printed and "Exported integer model" in printed
  assert (work / "ptq.json").read_text() == first
  assert sorted(p.name for p in work.glob("ptq*")) == [
    "ptq.csv",
    "ptq.json",
    "ptq.md",
    "ptq.png",
  ]

  # A new sweep writes ptq.* and keeps the earlier report, saying where.
  _main("--workdir", str(work), "--bits", "8:8", "--max_examples", "32")
  printed = capsys.readouterr().out
  assert "1 bit-width," in printed and "bit-widths" not in printed
  archived = sorted(p.name for p in work.glob("ptq.*.json"))
  assert len(archived) == 1 and (work / archived[0]).read_text() == first
  stamp = archived[0][len("ptq.") : -len(".json")]
  assert (
    f"Kept the earlier report in {work}: ptq.json -> ptq.{stamp}.json"
    in printed
  )
  assert len(json.load(open(work / "ptq.json"))["settings"]["bits"]) == 1

  # --overwrite replaces it instead, and says so.
  _main(
    "--workdir",
    str(work),
    "--bits",
    "4:4",
    "--max_examples",
    "32",
    "--overwrite",
  )
  printed = capsys.readouterr().out
  assert (
    f"Replaced the earlier report {work / 'ptq.json'}" in printed
    and "--overwrite" in printed
  )
  assert sorted(p.name for p in work.glob("ptq.*.json")) == archived


def _expect_user_error(capsys, *argv, match):
  with pytest.raises(SystemExit) as exit_info:
    _main(*argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err
  for text in match:
    assert text in err, err
  return err


def test_eval_ptq_bad_input_exits_2_with_a_message(trained, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  _expect_user_error(
    capsys, "--workdir", str(empty), match=["No checkpoint", "train.py"]
  )
  _expect_user_error(
    capsys, "--workdir", str(tmp_path / "missing"), match=["does not exist"]
  )
  _expect_user_error(
    capsys, "--workdir", trained[0], "--bits", "8:1", match=["between 2 and 16"]
  )
  _expect_user_error(
    capsys,
    "--workdir",
    trained[0],
    "--bits",
    "8:4",
    "--export",
    "4:4",
    match=["--export_dir"],
  )

  corrupt = tmp_path / "corrupt"
  shutil.copytree(trained[0], corrupt)
  state = corrupt / "checkpoints" / "4" / "state"
  for root, _, files in os.walk(state):
    for f in files:
      if not f.endswith(".txt"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  _expect_user_error(
    capsys,
    "--workdir",
    str(corrupt),
    "--bits",
    "8:4",
    match=["Could not read checkpoint"],
  )

  mismatch = tmp_path / "mismatch"
  shutil.copytree(trained[0], mismatch)
  config_file = mismatch / "checkpoints" / "4" / "config" / "metadata"
  config = json.loads(config_file.read_text())
  config["model_kwargs"]["width"] = 8
  config_file.write_text(json.dumps(config))
  _expect_user_error(
    capsys,
    "--workdir",
    str(mismatch),
    "--bits",
    "8:4",
    match=["does not match the model", "shape"],
  )


def test_eval_ptq_script_reports_errors_without_traceback(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "eval_ptq.py"),
      "--workdir",
      str(tmp_path),
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 2, proc.stderr
  assert "No checkpoint" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------
# First and last layers kept at 8 bits (--first_last_bits).
# ---------------------------------------------------------------------------


def _grid_levels(x, bits, max_abs):
  """``x`` in units of its symmetric b-bit bin (max|x| / (2^(b-1) - 1))."""
  return np.asarray(x, np.float64) / (max_abs / (2 ** (bits - 1) - 1))


def _layer_inputs_seen(model, variables, ranges, a_bits, images, point_bits):
  """The input each Conv/Dense reads in the quantized forward pass, by name."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(
      context.module, (nn.Conv, nn.Dense)
    ):
      seen[context.module.name] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with quant_lib.quantized_activations(a_bits, ranges, point_bits=point_bits):
    with nn.intercept_methods(record):  # inside: sees the quantized inputs
      ranges_lib.apply_model(model, variables, images)
  return seen


def test_first_last_bits_put_the_end_layers_on_the_8_bit_grid(digits_setup):
  model, _, folded, ranges, batches, _ = digits_setup
  images = batches[0]["image"][:8]
  # Call order, not dict order (which would give Conv_0 ... Dense_1 too, so
  # the layers' names alone do not tell: see the perturb test below).
  layers = ptq.first_last_layers(model, folded, images)
  assert layers == ptq.FirstLast("Conv_0", "Dense_1", "Dense_1")
  assert ptq.layer_bits(layers, 2, 2, None) == ({}, {})
  w_bits, a_bits = ptq.layer_bits(layers, 2, 2, 8)
  assert w_bits == {"Conv_0": 8, "Dense_1": 8} and a_bits == {"Dense_1": 8}
  # Never fewer bits than the other layers: (16,16) stays lossless.
  assert ptq.layer_bits(layers, 16, 12, 8) == (
    {"Conv_0": 16, "Dense_1": 16},
    {"Dense_1": 12},
  )

  # Weights: the end kernels on the 8-bit grid, the others on the 2-bit one.
  qvars = ptq.quantize_variables(folded, 2, layer_bits=w_bits)
  kernels, _ = params_lib.split_kernels(folded.params)
  quantized, _ = params_lib.split_kernels(qvars.params)
  assert list(quantized) == ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"]
  for name, k in kernels.items():
    bits = 8 if name in ("Conv_0", "Dense_1") else 2
    levels = _grid_levels(quantized[name], bits, np.abs(k).max())
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert np.abs(levels).max() <= 2 ** (bits - 1) - 1 + 1e-4
    assert len(np.unique(np.round(levels))) > (8 if bits == 8 else 1), name

  # Activations: the last layer reads its input on the unsigned 8-bit grid
  # (a ReLU output), the other points on the 2-bit one.
  seen = _layer_inputs_seen(model, qvars, ranges, 2, images, a_bits)
  for name in ("Conv_1", "Conv_2", "Dense_0", "Dense_1"):
    bits = 8 if name == "Dense_1" else 2
    _, high = ranges[name]
    levels = seen[name] / (high / (2**bits - 1))
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert 0 <= levels.min() and levels.max() <= 2**bits - 1 + 1e-3
    assert len(np.unique(np.round(levels))) > (4 if bits == 8 else 1), name

  # The jitted evaluator computes exactly that.
  range_arg = ranges_lib.range_tree(ranges)
  evaluator = ptq.Evaluator(model, first_last_bits=8)
  two = jnp.int32(2)
  want = ptq.quantized_apply(
    model, qvars, range_arg, 2, images, point_bits=a_bits
  )
  got = evaluator.quantized_logits(folded, range_arg, two, two, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  plain = ptq.Evaluator(model).quantized_logits(
    folded, range_arg, two, two, images
  )
  assert not np.allclose(got, plain)


def test_first_last_bits_sweep_compiles_once_and_changes_nothing_at_8_bits(
  digits_setup,
):
  _, _, folded, ranges, batches, evaluator = digits_setup
  model = evaluator.model
  kept = ptq.Evaluator(model, first_last_bits=8, max_traces=1)
  pairs = [(16, 16), (8, 8), (4, 4), (2, 2), (3, 2)]
  float_kept, kept_stats = ptq.sweep(kept, folded, ranges, pairs, batches)
  float_all, all_stats = ptq.sweep(evaluator, folded, ranges, pairs, batches)
  assert float_kept == float_all
  # At W, A >= 8 the option changes nothing, bit for bit.
  for pair in [(16, 16), (8, 8)]:
    assert kept_stats[pair] == all_stats[pair]
  # Below, the end layers are quantized less: other numbers.
  assert kept_stats[(2, 2)] != all_stats[(2, 2)]
  # New bit-widths and ranges: still one trace (max_traces=1 raises).
  wider = {k: (lo, 2 * hi) for k, (lo, hi) in ranges.items()}
  ptq.sweep(kept, folded, wider, [(5, 7), (2, 3)], batches)


def test_default_evaluation_is_the_every_layer_quantizer(digits_setup):
  """The default path is bit for bit quantize_kernels + quantized_activations."""
  model, _, folded, ranges, batches, _ = digits_setup
  images = batches[0]["image"]
  range_arg = ranges_lib.range_tree(ranges)
  for w, a in [(4, 4), (3, 2)]:

    def reference(variables, r, w_bits, a_bits, x):
      q = folded.replace(
        params=quant_lib.quantize_kernels(variables.params, w_bits)
      )
      with quant_lib.quantized_activations(a_bits, r):
        return ranges_lib.apply_model(model, q, x)

    want = jax.jit(reference)(
      folded, range_arg, jnp.int32(w), jnp.int32(a), images
    )
    for evaluator in (
      ptq.Evaluator(model),
      ptq.Evaluator(model, first_last_bits=0),
    ):
      got = evaluator.quantized_logits(
        folded, range_arg, jnp.int32(w), jnp.int32(a), images
      )
      np.testing.assert_array_equal(got, want)


def test_first_last_layers_follow_call_order_not_names():
  class Reversed(nn.Module):
    """``z_first`` runs first and ``a_last`` last: dict order is reversed."""

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.Dense(4, name="z_first")(x))
      x = nn.relu(nn.Dense(4, name="m_middle")(x))
      return nn.Dense(2, name="a_last")(x)

  model = Reversed()
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.key(0), x)
  kernels, _ = params_lib.split_kernels(variables["params"])
  assert list(kernels) == ["a_last", "m_middle", "z_first"]  # sorted names
  calls = perturb.layer_inputs(lambda v, x: model.apply(v, x), variables, x)
  assert calls == [
    perturb.LayerInput("z_first", None),
    perturb.LayerInput("m_middle", "m_middle"),
    perturb.LayerInput("a_last", "a_last"),
  ]
  assert ptq.first_last_layers(model, variables, x) == ptq.FirstLast(
    "z_first", "a_last", "a_last"
  )


def test_settings_first_last_bits():
  assert ptq.Settings().first_last_bits is None
  assert ptq.Settings(first_last_bits=0).first_last_bits is None
  assert ptq.Settings(first_last_bits=8).to_json()["first_last_bits"] == 8
  for bad in (1, 17, -8):
    with pytest.raises(errors.ConfigError, match="--first_last_bits"):
      runs_lib.Settings(first_last_bits=bad)


def test_report_names_its_conventions_under_every_table():
  results = _results("a", "none", 0, [0.9, 0.8]) + _results(
    "b", "none", 1, [0.9, 0.7]
  )
  ends = {"first": "Conv_0", "last": "Dense_1", "last_input": "Dense_1"}
  runs = [
    {"run": r, "step": 1, "first_last_layers": {**ends, "bits": 8}}
    for r in ("a", "b")
  ]
  settings = ptq.Settings(bits=((8, 4),), first_last_bits=8, per_channel=True)
  report = report_lib.Report(settings, runs, results, group_by="method")
  conv = report.to_json()["conventions"]
  assert list(conv) == list(report_lib.CONVENTION_KEYS)
  assert "Conv_0 and Dense_1 weights" in conv["first_last_layers"]
  assert "8 bits" in conv["first_last_layers"]
  assert "per output channel" in conv["weights"]
  assert "folded" in conv["batch_norm"]
  assert "layer_inputs" in conv["shortcuts"]
  assert report.to_json()["settings"]["first_last_bits"] == 8
  md = report.markdown
  # Under the accuracy, KL and per-run tables.
  assert md.count("Conventions — ") == 3
  assert "first/last layers: Conv_0 and Dense_1 weights" in md
  default = report_lib.Report(ptq.Settings(bits=((8, 4),)), runs, results)
  text = default.to_json()["conventions"]["first_last_layers"]
  assert "like every layer" in text and "Conv_0 and Dense_1" in text
  assert "per tensor" in default.markdown


def test_eval_ptq_first_last_bits_flag(trained, tmp_path, capsys):
  plain = trained[0]
  common = ["--workdir", plain, "--bits", "8:8,2:2", "--max_examples", "100"]
  _main(*common, "--out", str(tmp_path / "all"))
  _main(*common, "--out", str(tmp_path / "ends"), "--first_last_bits", "8")
  capsys.readouterr()
  every = json.load(open(tmp_path / "all" / "ptq.json"))
  ends = json.load(open(tmp_path / "ends" / "ptq.json"))
  assert every["settings"]["first_last_bits"] is None
  assert ends["settings"]["first_last_bits"] == 8
  assert ends["runs"][0]["first_last_layers"] == {
    "first": "Conv_0",
    "last": "Dense_1",
    "last_input": "Dense_1",
    "bits": 8,
  }
  by_pair = lambda d: {(r["w_bits"], r["a_bits"]): r for r in d["results"]}
  assert by_pair(ends)[(8, 8)] == by_pair(every)[(8, 8)]
  md = (tmp_path / "ends" / "ptq.md").read_text()
  assert "Dense_1 kept at 8 bits" in md
  _expect_user_error(
    capsys, *common, "--first_last_bits", "1", match=["--first_last_bits"]
  )
  _expect_user_error(
    capsys,
    *common,
    "--first_last_bits",
    "8",
    "--export",
    "4:4",
    "--export_dir",
    str(tmp_path / "x"),
    match=["--first_last_bits"],
  )
