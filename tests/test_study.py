"""The study (study.py, l1grad/study.py): a reduced study end to end, the rule.

The end-to-end test runs ``study.py``'s ``main`` on the real digits study
config with a tiny model, one seed, one epoch per run and short grids: every
method, the λ grid, the PTQ sweep and the FD check run and write their files;
a rerun skips every finished run; the test split is read only after the last
run trained.
"""

import csv
import json
import os

import pytest

from l1grad import data
from l1grad import errors
from l1grad import study
from l1grad import train


def tiny_study_config():
  from configs.studies import digits as digits_study

  config = digits_study.get_config()
  config.update_from_flattened_dict(
    {
      "seeds": (0,),
      "base_epochs": 1,
      "finetune_epochs": 1,
      "train.model_kwargs.width": 4,
      "lambda_grid": (0.01, 0.1),
      "l2_lambda_grid": (1.0,),
      "bits": "8:8,3:3",
      "fd_cosine_batches": 2,
      "extra_lambda_grids.l1_bound44": (0.5,),
    }
  )
  config.methods = tuple(m for m in config.methods if m != "l1_fd_short")
  return config


METHODS = [
  "none",
  "l1",
  "l1_fd",
  "l2",
  "dq",
  "ste",
  "ste_unfolded",
  "l1_bound44",
  "l1_cd",
]


def test_reduced_study_end_to_end_resumes_and_never_selects_on_test(
  tmp_path, monkeypatch, capsys
):
  workdir = str(tmp_path / "study")
  events = []
  real_eval, real_train = data.eval_batches, train.train_and_evaluate

  def eval_batches(name, split="test", **kw):
    events.append(("eval", split))
    return real_eval(name, split, **kw)

  def train_and_evaluate(config, run_dir):
    events.append(("train", os.path.basename(run_dir)))
    return real_train(config, run_dir)

  monkeypatch.setattr(data, "eval_batches", eval_batches)
  monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
  study.run_study(tiny_study_config(), workdir)

  trained = [name for kind, name in events if kind == "train"]
  # 1 base, none, l1 at 2 λ, l2 and the bound at 1 λ (the grids), then the
  # other methods; the chosen λ's grid runs are the seed's fine-tunes, so
  # they train once.
  assert trained[0] == "base_s0"
  assert len(trained) == len(set(trained)) == 1 + 1 + 2 + 1 + 1 + 5
  assert "l1_bound44_0.5_s0" in trained and "l1_cd_0.01_s0" in trained
  last_train = max(i for i, e in enumerate(events) if e[0] == "train")
  first_test = min(i for i, e in enumerate(events) if e == ("eval", "test"))
  assert first_test > last_train
  assert ("eval", "minival") in events[:last_train]

  with open(os.path.join(workdir, "study.json")) as f:
    out = json.load(f)
  assert out["methods"] == METHODS
  methods = {r["method"] for r in out["results"]}
  assert methods == set(METHODS)
  pairs = {(r["w_bits"], r["a_bits"]) for r in out["results"]}
  assert pairs == {(None, None), (8, 8), (3, 3)}
  for r in out["results"]:
    assert set(r) >= {"method", "seed", "w_bits", "a_bits", "accuracy", "kl"}
    assert 0.0 <= r["accuracy"] <= 1.0
  sel = out["lambda_selection"]["l1"]
  assert [g["lambda"] for g in sel["grid"]] == [0.01, 0.1]
  assert sel["chosen"] in (0.01, 0.1)
  for g in sel["grid"]:
    assert set(g) >= {"minival_accuracy", "penalty_to_cross_entropy"}
    assert isinstance(g["collapsed"], bool)
  assert out["lambdas"]["l2"] == 1.0
  # The bound chooses its own λ by the same rule, on its own grid.
  assert out["lambdas"]["l1_bound44"] == 0.5
  assert [
    g["lambda"] for g in out["lambda_selection"]["l1_bound44"]["grid"]
  ] == [0.5]
  fd = out["fd_cosines"]["base_s0"]
  assert fd["num_batches"] == 2 and -1.0 <= fd["median"] <= 1.0
  # A finite-difference extra method gets the check with its own rule.
  cd = out["fd_variant_cosines"]["l1_cd"]["base_s0"]
  assert cd["method"] == "central_difference" and cd["num_batches"] == 2
  assert out["versions"]["jax"]
  assert set(out["timings"]["train_runs"]) == set(trained)

  md = open(os.path.join(workdir, "study.md")).read()
  for heading in ("Paired difference", "λ selection", "Finite difference"):
    assert heading in md
  assert "| ℓ1 exact λ=" in md and "| method | n | FP | (8,8) | (3,3) |" in md
  with open(os.path.join(workdir, "study.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(out["results"])
  assert os.path.getsize(os.path.join(workdir, "study.png")) > 0
  assert "study.md" in capsys.readouterr().out

  # A rerun trains nothing and gives the same results.
  events.clear()
  study.run_study(tiny_study_config(), workdir)
  assert not [e for e in events if e[0] == "train"]
  with open(os.path.join(workdir, "study.json")) as f:
    again = json.load(f)
  assert again["results"] == out["results"]


def test_select_lambda_is_the_papers_rule():
  grid = [
    {"lambda": 0.01, "minival_accuracy": 0.950, "collapsed": False},
    {"lambda": 0.02, "minival_accuracy": 0.946, "collapsed": False},
    {"lambda": 0.05, "minival_accuracy": 0.930, "collapsed": False},
    {"lambda": 0.1, "minival_accuracy": 0.960, "collapsed": True},
  ]
  # Within 0.5 points of 95.0 %: 0.01 and 0.02 (94.6); 0.1 collapsed.
  assert study.select_lambda(grid, 0.950, 0.5) == (0.02, True)
  assert study.select_lambda(grid, 0.950, 2.0) == (0.05, True)
  # None qualifies: the smallest, flagged.
  assert study.select_lambda(grid, 0.990, 0.5) == (0.01, False)


def test_paired_differences_pair_by_seed_and_column():
  def r(method, seed, acc, w=4, a=4):
    return {
      "method": method,
      "label": method,
      "seed": seed,
      "w_bits": w,
      "a_bits": a,
      "accuracy": acc,
    }

  results = [r("none", 0, 0.5), r("none", 1, 0.7), r("l1", 1, 0.8)]
  results += [r("l1", 0, 0.9)]
  diffs = study.paired_differences(results)
  assert diffs["l1"]["(4,4)"] == pytest.approx([0.1, 0.4])


@pytest.mark.parametrize(
  "overrides, field",
  [
    ({"seeds": ()}, "seeds"),
    ({"seeds": (0, 0)}, "seeds"),
    ({"methods": ("none", "l3")}, "methods"),
    ({"methods": ("l1",)}, "methods"),
    ({"lambda_grid": ()}, "lambda_grid"),
    ({"train.minival_examples": 0}, "train.minival_examples"),
    ({"bits": "9x9"}, ""),
    ({"extra_lambda_grids.l1_bound44": ()}, "extra_lambda_grids.l1_bound44"),
  ],
)
def test_bad_configs_name_the_field(overrides, field):
  from configs.studies import digits as digits_study

  config = digits_study.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(errors.ConfigError, match=field):
    study.validate(config)


def test_extra_methods_resolve_the_chosen_lambda():
  from configs.studies import digits as digits_study

  config = digits_study.get_config()
  config.extra_methods.l1_x4 = "reg.kind=l1;reg.weight_coef=@l1*4"
  config.methods = ("none", "l1", "l1_x4")
  jobs = study.plan_finetunes(config, "/w", {"l1": 0.02, "l2": None})
  by_name = {j.name: j for j in jobs}
  job = by_name["l1_x4_0.08_s0"]
  assert job.config.reg.weight_coef == pytest.approx(0.08)
  assert job.config.init_from == "/w/runs/base_s0"
  assert by_name["l1_0.02_s1"].config.reg.method == "hvp"


def test_extra_methods_with_their_own_lambda():
  """``@lambda`` is the method's own λ (its grid's choice); ``@l1`` ℓ1's."""
  from configs.studies import fashion_mnist as fashion_study

  config = fashion_study.get_config()
  study.validate(config)
  lambdas = {"l1": 0.0005, "l2": 0.02, "l1_lazy4": 0.001}
  lambdas.update(l1_lazy16=0.0002, l1_bound44=0.005)
  jobs = {j.name: j for j in study.plan_finetunes(config, "/w", lambdas)}
  lazy = jobs["l1_lazy4_0.001_s2"].config.reg
  assert (lazy.weight_coef, lazy.every_steps, lazy.act_coef) == (0.001, 4, -1)
  bound = jobs["l1_bound44_0.005_s0"].config.reg
  assert (bound.weighting, bound.target_bits) == ("bin_width", "4:4")
  cd = jobs["l1_cd_0.0005_s1"].config.reg
  assert (cd.method, cd.weight_coef) == ("central_difference", 0.0005)
  assert jobs["l1_fd_short_0.0005_s0"].config.reg.fd_step == 1e-4

  config.extra_methods.l1_x = "reg.kind=l1;reg.weight_coef=@lambda"
  config.methods = (*config.methods, "l1_x")
  with pytest.raises(errors.ConfigError, match="extra_lambda_grids has no"):
    study.validate(config)
  config.extra_lambda_grids.l1_cd = (0.1,)  # l1_cd has no @lambda
  del config.extra_methods["l1_x"]
  config.methods = config.methods[:-1]
  with pytest.raises(errors.ConfigError, match="extra_lambda_grids.l1_cd"):
    study.validate(config)
