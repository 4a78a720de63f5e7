"""The paper's protocol as one command: bases, λ by the paper's rule, methods, PTQ.

``python study.py --config configs/studies/NAME.py --workdir DIR`` runs
:func:`run_study`, which does, in order (every step resumable):

1. **Bases**: train the base model once per seed (``config.train`` for
   ``base_epochs``), holding ``minival_examples`` training images out as the
   validation split ``minival``.
2. **λ by the paper's rule** (§4.1): fine-tune the first seed's base with
   every λ of ``lambda_grid`` (ℓ1) and ``l2_lambda_grid`` (ℓ2) and keep the
   largest λ whose float *minival* accuracy stays within
   ``selection_tolerance`` points of the unregularized fine-tune's (a
   collapsed run, float accuracy near chance, never qualifies). The test
   split is never read before step 4.
3. **Methods**: fine-tune every seed's base with each method of ``methods``:
   ``none``, ``l1`` (exact, ``reg.method="hvp"``), ``l1_fd`` (the
   finite-difference variant at the same λ), ``l2``, ``dq`` (Defensive
   Quantization, β = ``dq_beta``) and ``ste`` (straight-through quantization-
   aware fine-tuning at ``ste_bits``, batch norm folded as PTQ evaluates),
   plus ``extra_methods``. An extra method whose fields use ``@lambda``
   gets its own λ by the same rule over ``extra_lambda_grids[name]``
   (e.g. the bound-weighted penalty, whose λ multiplies Δ/2, or lazy
   regularization, whose λ is the mean coefficient per step). Each fine-tune has the same start, length and
   learning-rate schedule; only the regularization differs.
4. **PTQ**: every fine-tuned model quantized after training at every pair of
   ``bits`` on the test split (batch norm folded, per-tensor weights,
   activation ranges from batch norm: the paper's setting).
5. **FD check**: for each base, the cosine between the finite-difference and
   the exact penalty gradients on ``fd_cosine_batches`` training batches.

It writes ``DIR/study.md`` (tables: λ selection, accuracy mean ± std over
seeds per method, paired differences to ``none``, FD cosines, timings),
``study.json`` (``results``: one entry per method, seed and bit pair;
``lambda_selection``; ``fd_cosines``; ``timings``; ``versions``),
``study.csv`` (the results) and ``study.png`` (accuracy vs bit-width, one
line per method, ± std band). Runs live in ``DIR/runs/<name>``; a finished
run keeps a ``study_run.json`` beside its checkpoints, so a rerun skips it
(an interrupted one resumes from its last checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import copy
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import threading
import time
from typing import Any

import ml_collections
import numpy as np

from l1grad import bits as bits_lib
from l1grad import errors
from l1grad import report as report_lib

__all__ = [
  "METHODS",
  "Job",
  "plan_finetunes",
  "run_study",
  "select_lambda",
  "validate",
]

# Built-in methods, in table order; extra_methods add rows after them.
METHODS = ("none", "l1", "l1_fd", "l2", "dq", "ste")
_LABELS = {
  "none": "none",
  "l1": "ℓ1 exact",
  "l1_fd": "ℓ1 finite diff.",
  "l2": "ℓ2",
  "dq": "DQ",
  "ste": "STE",
}
# Cost of a step relative to a plain one, for the ETA until each kind has
# been measured (benchmarks/RESULTS.md, 2-core CPU).
_PRIOR_STEP_COST = {
  "base": 1.0,
  "none": 1.0,
  "l1": 2.4,
  "l1_fd": 1.8,
  "l2": 2.4,
  "dq": 1.1,
  "ste": 1.3,
  "extra": 2.4,
}
# One evaluation example relative to one training example (forward only, at
# a large batch: 0.1 measured on the Fashion-MNIST study's PTQ sweeps).
_EVAL_COST = 0.1
# In an extra method's fields: its own λ, chosen over extra_lambda_grids.
_OWN_LAMBDA = "@lambda"
RESULTS_FORMAT = "l1grad.study/1"


# --------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------


def _fail(field: str, message: str) -> None:
  raise errors.ConfigError(f"config.{field} {message}")


def _parse_extra(spec: str, field: str) -> dict[str, str]:
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      _fail(field, f"must be 'field=value;field=value', got {spec!r}.")
    out[key.strip()] = value.strip()
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a study config; raises ``errors.ConfigError`` naming the field."""
  seeds = list(config.seeds)
  if not seeds or any(int(s) != s or s < 0 for s in seeds):
    _fail("seeds", f"must be non-negative integers, got {seeds!r}.")
  if len(set(seeds)) != len(seeds):
    _fail("seeds", f"has duplicates: {seeds!r}.")
  for field in ("base_epochs", "finetune_epochs"):
    if config[field] < 1:
      _fail(field, f"must be >= 1, got {config[field]}.")
  for name in config.methods:
    if name not in METHODS and name not in config.extra_methods:
      _fail(
        "methods",
        f"has an unknown method {name!r}; built in: {', '.join(METHODS)};"
        " others must be defined in config.extra_methods.",
      )
  needs = {"l1": "lambda_grid", "l1_fd": "lambda_grid", "l2": "l2_lambda_grid"}
  for method, grid in needs.items():
    if method in config.methods:
      values = list(config[grid])
      if not values or any(v <= 0 for v in values):
        _fail(grid, f"must hold positive λ values, got {values!r}.")
  selecting = any(m in config.methods for m in needs) or any(
    m in config.methods for m in config.get("extra_lambda_grids", {})
  )
  if selecting and "none" not in config.methods:
    _fail(
      "methods",
      "must include 'none': λ is chosen against the unregularized fine-tune.",
    )
  if selecting and config.train.get("minival_examples", 0) <= 0:
    _fail(
      "train.minival_examples",
      "must be > 0: λ is chosen on the validation split (minival), never on"
      " the test split.",
    )
  if config.get("selection_seeds", 1) < 1:
    _fail("selection_seeds", "must be >= 1 (1: the paper's single model).")
  if config.selection_tolerance < 0:
    _fail("selection_tolerance", "must be >= 0 (accuracy points).")
  if config.fd_cosine_batches < 0:
    _fail("fd_cosine_batches", "must be >= 0 (0: skip the FD check).")
  for ref in config.get("paired_references", ("none",)):
    if ref not in config.methods:
      _fail("paired_references", f"names {ref!r}, which is not in methods.")
  bits_lib.parse_pairs(config.bits)
  if "ste" in config.methods:
    bits_lib.parse_pair(config.ste_bits)
  grids = config.get("extra_lambda_grids", {})
  for name, spec in config.extra_methods.items():
    _parse_extra(spec, f"extra_methods.{name}")
    if _OWN_LAMBDA in spec and name not in grids:
      _fail(
        f"extra_methods.{name}",
        f"uses {_OWN_LAMBDA} (its own λ, chosen by the paper's rule) but"
        f" config.extra_lambda_grids has no grid {name!r}: add"
        f" --config.extra_lambda_grids.{name}='(0.01, 0.02)'.",
      )
  for name in grids:
    spec = config.extra_methods.get(name)
    if spec is None or _OWN_LAMBDA not in spec:
      _fail(
        f"extra_lambda_grids.{name}",
        f"is a grid for a method whose fields do not use {_OWN_LAMBDA}"
        " (define it in config.extra_methods with e.g."
        f" 'reg.weight_coef={_OWN_LAMBDA}').",
      )
    values = list(grids[name])
    if not values or any(v <= 0 for v in values):
      _fail(
        f"extra_lambda_grids.{name}", f"must hold positive λ, got {values!r}."
      )


# --------------------------------------------------------------------------
# Jobs.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
  """One training run of the study.

  Attributes:
    name: Its workdir's name under ``DIR/runs``.
    phase: ``"base"``, ``"grid"`` (λ selection) or ``"finetune"``.
    method: The method (``"base"`` for a base).
    seed: The seed.
    coef: λ (or β) where the method has one.
    config: The trainer config.
  """

  name: str
  phase: str
  method: str
  seed: int
  coef: float | None
  config: ml_collections.ConfigDict


def _train_config(study: ml_collections.ConfigDict) -> Any:
  config = copy.deepcopy(study.train)
  config.max_train_examples = study.max_train_examples
  config.checkpoint_every_steps = -1
  config.keep_checkpoints = 1
  # Training evaluates on minival only: the test split is read once, by PTQ.
  if "eval_split" in config and config.get("minival_examples", 0) > 0:
    config.eval_split = "minival"
  return config


def base_job(study: ml_collections.ConfigDict, seed: int) -> Job:
  config = _train_config(study)
  config.seed = seed
  config.num_epochs = study.base_epochs
  return Job(f"base_s{seed}", "base", "base", seed, None, config)


def _coef_name(coef: float) -> str:
  return f"{coef:g}"


def finetune_job(
  study: ml_collections.ConfigDict,
  workdir: str,
  method: str,
  seed: int,
  coef: float | None = None,
  phase: str = "finetune",
  l1_coef: float | None = None,
) -> Job:
  """The fine-tune of ``method`` from seed ``seed``'s base.

  ``coef`` is the method's λ (β); for an extra method, the value of its
  ``@lambda``, while ``@l1`` takes ``l1_coef`` (the chosen ℓ1 λ; ``coef``
  when the method has no ``@lambda``).
  """
  config = _train_config(study)
  config.seed = seed
  config.init_from = os.path.join(workdir, "runs", f"base_s{seed}")
  config.num_epochs = study.finetune_epochs
  config.learning_rate = study.finetune_lr
  config.warmup_epochs = float(study.get("finetune_warmup_epochs", 0.0))
  if method in ("l1", "l1_fd", "l2"):
    config.reg.kind = "l2" if method == "l2" else "l1"
    config.reg.weight_coef = float(coef)
    config.reg.act_coef = -1.0
    if method == "l1_fd":
      config.reg.method = "finite_difference"
  elif method == "dq":
    coef = float(study.dq_beta)
    config.reg.kind = "dq"
    config.reg.weight_coef = coef
  elif method == "ste":
    config.qat.bits = study.ste_bits
    config.qat.scheme = "folded"
  elif method != "none":
    fields = _parse_extra(
      study.extra_methods[method], f"extra_methods.{method}"
    )
    own = _OWN_LAMBDA in study.extra_methods[method]
    l1 = l1_coef if own else coef
    for key, value in fields.items():
      _set_field(config, key, _resolve_value(value, l1, coef if own else None))
    if "reg.weight_coef" in fields:  # Named and labelled by what it trains.
      coef = float(config.reg.weight_coef)
  suffix = "" if coef is None else f"_{_coef_name(coef)}"
  return Job(f"{method}{suffix}_s{seed}", phase, method, seed, coef, config)


def _resolve_value(
  text: str, l1_coef: float | None, own_coef: float | None = None
) -> Any:
  """An extra method's value.

  ``@l1`` (× a factor: ``@l1*4``) is the chosen ℓ1 λ, ``@lambda`` (``@lambda*4``)
  the method's own λ.
  """
  for token, coef in ((_OWN_LAMBDA, own_coef), ("@l1", l1_coef)):
    if text.startswith(token):
      rest = text[len(token) :]
      factor = float(rest[1:]) if rest.startswith("*") else 1.0
      return float(coef) * factor
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise errors.ConfigError(f"extra_methods: no config field {key!r}.")
  old = node[leaf]
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  node[leaf] = value


def plan_finetunes(
  study: ml_collections.ConfigDict,
  workdir: str,
  lambdas: Mapping[str, float | None],
) -> list[Job]:
  """Every method's fine-tune for every seed, with the chosen λ values."""
  jobs = []
  for seed in study.seeds:
    for method in study.methods:
      if method in ("l1", "l1_fd"):
        coef = lambdas["l1"]
      elif method == "l2":
        coef = lambdas["l2"]
      elif method in METHODS:
        coef = None
      else:
        spec = study.extra_methods[method]
        if _OWN_LAMBDA in spec:
          coef = lambdas[method]
        else:
          coef = lambdas["l1"] if "@l1" in spec else None
      jobs.append(
        finetune_job(
          study, workdir, method, seed, coef, l1_coef=lambdas.get("l1")
        )
      )
  return jobs


def select_lambda(
  grid: Sequence[Mapping[str, Any]], reference: float, tolerance: float
) -> tuple[float, bool]:
  """The paper's rule: the largest λ within ``tolerance`` of ``reference``.

  Args:
    grid: Entries with ``lambda``, ``minival_accuracy`` (fraction) and
      ``collapsed``.
    reference: The unregularized fine-tune's minival accuracy (fraction).
    tolerance: Allowed drop, in accuracy points.

  Returns:
    ``(λ, kept)``: ``kept`` is False when no λ qualified; λ is then the
    smallest of the grid (the least harmful), and the caller says so.
  """
  ok = [
    g["lambda"]
    for g in grid
    if not g["collapsed"]
    and 100.0 * g["minival_accuracy"] >= 100.0 * reference - tolerance - 1e-9
  ]
  if ok:
    return max(ok), True
  return min(g["lambda"] for g in grid), False


# --------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------

_DONE_FILE = "study_run.json"


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False, default=_json_default)
  os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"not JSON serializable: {type(obj)}")


def _steps(config: ml_collections.ConfigDict) -> int:
  from l1grad import config_lib  # pylint: disable=g-import-not-at-top
  from l1grad import data  # pylint: disable=g-import-not-at-top

  return config_lib.step_plan(
    config,
    data.steps_per_epoch(
      config.dataset, config.batch_size, **config_lib.data_kwargs(config)
    ),
  ).total_steps


def _last_metrics(workdir: str) -> dict[str, float]:
  """Mean of the last logged training metrics (the final quarter, ≥ 1 row)."""
  from l1grad import runs  # pylint: disable=g-import-not-at-top

  log = runs.training_log(workdir)
  if log is None:
    return {}
  rows = [i for i, ce in enumerate(log["cross_entropy"]) if ce is not None]
  tail = rows[-max(1, len(rows) // 4) :]
  out = {}
  for key in ("cross_entropy", "penalty", "weight_grad_l1", "act_grad_l1"):
    values = [log[key][i] for i in tail if log[key][i] is not None]
    if values:
      out[key] = float(np.mean(values))
  return out


class _Progress:
  """Overall progress and ETA, in units of plain training steps.

  The ETA is elapsed wall time (compilation included) per unit done in
  this invocation times the units left; units a previous invocation
  finished count as done but not towards the rate (``skip``); a run in
  progress counts by its logged step. Step
  costs relative to a plain step start from benchmark priors and are
  replaced by the measured ratio once a run of that kind has finished.
  """

  def __init__(self, say: Callable[[str], None]):
    self.say = say
    self.start = time.monotonic()
    self.units_total = 0.0
    self.units_done = 0.0
    self.units_skipped = 0.0  # done by an earlier invocation
    self.current: tuple[str, float, int] | None = None  # (workdir, cost, steps)
    self.seconds_per_step: dict[str, float] = {}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def cost(self, kind: str) -> float:
    kind = kind if kind in _PRIOR_STEP_COST else "extra"
    base = self.seconds_per_step.get("base")
    if base and kind in self.seconds_per_step:
      return self.seconds_per_step[kind] / base
    return _PRIOR_STEP_COST[kind]

  def skip(self, units: float) -> None:
    """Counts units an earlier invocation finished."""
    self.units_done += units
    self.units_skipped += units

  def _current_units(self) -> float:
    if self.current is None:
      return 0.0
    workdir, cost, steps = self.current
    step = 0
    try:
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
          if '"step"' in line:
            step = max(step, int(json.loads(line).get("step", 0)))
    except (FileNotFoundError, ValueError):
      pass
    return cost * min(step, steps)

  def line(self) -> str:
    elapsed = time.monotonic() - self.start
    done = self.units_done + self._current_units()
    worked = done - self.units_skipped
    text = f"{_duration(elapsed)} elapsed"
    if self.units_total > 0:
      text += f", {100.0 * min(done / self.units_total, 1.0):.0f} % done"
    if worked > 0 and self.units_total > 0:
      left = max(self.units_total - done, 0.0) * elapsed / worked
      text += f", about {_duration(left)} left"
    return text

  def __enter__(self) -> _Progress:
    def tick():
      while not self._stop.wait(60.0):
        self.say(f"[study] {self.line()}")

    self._thread = threading.Thread(target=tick, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self._stop.set()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
  if seconds >= 60:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds} s"


def _train(job: Job, workdir: str, progress: _Progress, say) -> dict[str, Any]:
  """Trains ``job`` unless done; returns its ``study_run.json`` record."""
  from l1grad import train  # pylint: disable=g-import-not-at-top

  run_dir = os.path.join(workdir, "runs", job.name)
  done_path = os.path.join(run_dir, _DONE_FILE)
  steps = _steps(job.config)
  kind = job.method if job.phase != "base" else "base"
  cost = progress.cost(kind)
  record = _read_json(done_path)
  if record is not None:
    progress.skip(cost * steps)
    return record
  say(f"[study] {job.phase} {job.name}: {steps} steps ({progress.line()})")
  progress.current = (run_dir, cost, steps)
  t0 = time.monotonic()
  state = train.train_and_evaluate(job.config, run_dir)
  seconds = time.monotonic() - t0
  progress.current = None
  if int(state.step) < steps:  # SIGTERM: the trainer saved and returned.
    raise train.TrainingInterrupted(
      f"{job.name} stopped at step {int(state.step)} of {steps}; rerun the"
      " same command to resume."
    )
  progress.units_done += cost * steps
  progress.seconds_per_step.setdefault(kind, seconds / steps)
  record = {
    "name": job.name,
    "phase": job.phase,
    "method": job.method,
    "seed": job.seed,
    "coef": job.coef,
    "steps": steps,
    "seconds": seconds,
    "final_train_metrics": _last_metrics(run_dir),
  }
  _write_json(done_path, record)
  return record


def _sweep(
  run_dir: str, settings: Any, split: str, max_examples: int | None = None
) -> Any:
  """``ptq.evaluate_prepared`` of a run on ``split`` at ``settings.bits``."""
  from l1grad import data  # pylint: disable=g-import-not-at-top
  from l1grad import ptq  # pylint: disable=g-import-not-at-top
  from l1grad import runs  # pylint: disable=g-import-not-at-top

  prepared = runs.prepare_run(run_dir, settings)
  config = prepared.config
  batches = data.eval_batches(
    config.dataset,
    split,
    global_batch_size=runs.eval_batch_size(config, settings),
    data_dir=runs.data_dir(config),
    max_examples=max_examples,
    minival_examples=config.get("minival_examples", 0),
  )
  return ptq.evaluate_prepared(prepared, settings, batches)


def _float_accuracy(
  run_dir: str, split: str, settings: Any, record: dict[str, Any]
) -> dict[str, float]:
  """Float accuracy of a run on ``split``; cached in its record."""
  key = f"{split}_float"
  if key in record:
    return record[key]
  result = _sweep(run_dir, dataclasses.replace(settings, bits=()), split)
  value = {
    "accuracy": result.info["float_accuracy"],
    "num_examples": result.info["num_examples"],
    "collapsed": result.info["collapsed"],
  }
  record[key] = value
  _write_json(os.path.join(run_dir, _DONE_FILE), record)
  return value


def _ptq(
  run_dir: str, settings: Any, record: dict[str, Any], max_examples: int | None
) -> dict[str, Any]:
  """The PTQ sweep of a fine-tuned run on the test split; cached."""
  if "ptq" in record:
    return record["ptq"]
  t0 = time.monotonic()
  result = _sweep(run_dir, settings, "test", max_examples)
  value = {
    "results": result.results,
    "float_accuracy": result.info["float_accuracy"],
    "num_examples": result.info["num_examples"],
    "collapsed": result.info["collapsed"],
    "seconds": time.monotonic() - t0,
  }
  record["ptq"] = value
  _write_json(os.path.join(run_dir, _DONE_FILE), record)
  return value


def _fd_cosines(
  run_dir: str,
  study: ml_collections.ConfigDict,
  coef: float,
  record,
  variant: Job | None = None,
) -> dict[str, Any] | None:
  """FD-vs-exact penalty-gradient cosines of a base; cached in its record.

  With ``variant`` (a fine-tune of a finite-difference extra method) the
  cosines of that method's rule (``reg.method``, ``reg.fd_step``) at its λ.
  """
  if study.fd_cosine_batches <= 0:
    return None
  cache = record if variant is None else record.setdefault("fd_variants", {})
  key = "fd_cosines" if variant is None else variant.method
  if key in cache:
    return cache[key]
  from l1grad import analysis  # pylint: disable=g-import-not-at-top

  t0 = time.monotonic()
  reg = (study.train if variant is None else variant.config).reg
  value = dict(
    analysis.finite_difference_cosines(
      run_dir,
      num_batches=study.fd_cosine_batches,
      coef=coef if variant is None else float(reg.weight_coef),
      fd_step=reg.fd_step,
      minival_examples=study.train.get("minival_examples", 0),
      method="finite_difference" if variant is None else reg.method,
    )
  )
  value["seconds"] = time.monotonic() - t0
  cache[key] = value
  _write_json(os.path.join(run_dir, _DONE_FILE), record)
  return value


def _selection(
  study,
  workdir,
  progress,
  say,
  settings,
  method: str,
  grid_values: Sequence[float],
  l1_coef: float | None = None,
) -> dict[str, Any]:
  """Fine-tunes the selection seeds at each λ and applies the paper's rule.

  The paper fine-tunes one model per λ; with ``selection_seeds = n > 1`` the
  first n seeds each fine-tune every λ, and the rule compares minival
  accuracies averaged over them (a λ collapsed on any seed never qualifies).
  The grid runs at the chosen λ are those seeds' fine-tunes: they train once.
  """
  seeds = list(study.seeds)[: max(1, study.get("selection_seeds", 1))]
  refs = []
  for seed in seeds:
    none_job = finetune_job(study, workdir, "none", seed)
    none_rec = _train(none_job, workdir, progress, say)
    refs.append(
      _float_accuracy(
        os.path.join(workdir, "runs", none_job.name),
        "minival",
        settings,
        none_rec,
      )["accuracy"]
    )
  grid = []
  for coef in sorted(grid_values):
    accs, collapsed, ratios, names = [], False, [], []
    for seed in seeds:
      job = finetune_job(
        study, workdir, method, seed, coef, phase="grid", l1_coef=l1_coef
      )
      rec = _train(job, workdir, progress, say)
      acc = _float_accuracy(
        os.path.join(workdir, "runs", job.name), "minival", settings, rec
      )
      accs.append(acc["accuracy"])
      collapsed = collapsed or acc["collapsed"]
      names.append(job.name)
      m = rec.get("final_train_metrics", {})
      ce, pen = m.get("cross_entropy"), m.get("penalty")
      ratios.append(pen / ce if pen is not None and ce else None)
    grid.append(
      {
        "lambda": coef,
        "run": names[0],
        "runs": names,
        "minival_accuracy": float(np.mean(accs)),
        "minival_accuracy_per_seed": accs,
        "collapsed": collapsed,
        "penalty_to_cross_entropy": ratios[0],
        "penalty_to_cross_entropy_per_seed": ratios,
      }
    )
  reference = float(np.mean(refs))
  chosen, kept = select_lambda(grid, reference, study.selection_tolerance)
  if not kept:
    say(
      f"[study] warning: no {method} λ of {list(grid_values)} kept"
      f" minival accuracy within {study.selection_tolerance} points of"
      f" {100 * reference:.2f} %; using the smallest, {chosen:g}."
      " Extend the grid downwards."
    )
  else:
    say(f"[study] {method}: λ = {chosen:g} chosen on minival (paper's rule)")
  return {
    "method": method,
    "seed": seeds[0],
    "seeds": seeds,
    "reference_minival_accuracy": reference,
    "reference_minival_accuracy_per_seed": refs,
    "tolerance_points": study.selection_tolerance,
    "grid": grid,
    "chosen": chosen,
    "within_tolerance": kept,
  }


def _extra_grids(study: ml_collections.ConfigDict) -> dict[str, Any]:
  """The λ grids of the extra methods in the table that choose their own."""
  grids = study.get("extra_lambda_grids", {})
  return {m: grids[m] for m in study.methods if m in grids}


def _settings(study: ml_collections.ConfigDict) -> Any:
  from l1grad import ptq  # pylint: disable=g-import-not-at-top

  return ptq.Settings(
    bits=bits_lib.parse_pairs(study.bits),
    act_ranges="bn",
    per_channel=False,
    fold=True,
    batch_size=study.eval_batch_size if study.eval_batch_size > 0 else None,
  )


def _units_planned(study, progress: _Progress) -> float:
  """The whole study in plain-step units (for the ETA)."""
  base = base_job(study, study.seeds[0])
  base_steps = _steps(base.config)
  ft_steps = _steps(finetune_job(study, "", "none", study.seeds[0]).config)
  units = len(study.seeds) * base_steps * progress.cost("base")
  fts = [(m, s) for s in study.seeds for m in study.methods]
  units += sum(progress.cost(m) * ft_steps for m, _ in fts)
  # The chosen λ's grid run is the first seed's fine-tune itself.
  n_sel = min(len(study.seeds), max(1, study.get("selection_seeds", 1)))
  for method, grid in (("l1", "lambda_grid"), ("l2", "l2_lambda_grid")):
    if method in study.methods or (method == "l1" and "l1_fd" in study.methods):
      extra = len(study[grid]) - (method in study.methods)
      units += n_sel * extra * ft_steps * progress.cost(method)
  for method, grid in _extra_grids(study).items():
    units += n_sel * (len(grid) - 1) * ft_steps * progress.cost(method)
  from l1grad import data  # pylint: disable=g-import-not-at-top

  base_train = base.config
  test = data.get_info(
    base_train.dataset, data_dir=base_train.get("data_dir") or None
  ).num_test
  if study.max_test_examples > 0:
    test = min(test, study.max_test_examples)
  evals = len(fts) * (len(bits_lib.parse_pairs(study.bits)) + 1) * test
  units += _EVAL_COST * evals / study.train.batch_size
  return units


def run_study(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  say: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs (or resumes) the whole study in ``workdir`` and writes its report.

  Args:
    config: A config from ``configs/studies/``.
    workdir: Where the runs and the report go.
    say: Progress lines (default ``print``).

  Returns:
    The ``study.json`` content.

  Raises:
    errors.UserError: A bad config or missing data (before anything runs).
    l1grad.train.TrainingInterrupted: Ctrl-C or SIGTERM stopped a run (it
      saved; rerunning resumes).
  """
  from l1grad import config_lib  # pylint: disable=g-import-not-at-top
  from l1grad import data  # pylint: disable=g-import-not-at-top
  from l1grad import penalty  # pylint: disable=g-import-not-at-top

  validate(config)
  train_config = _train_config(config)
  config_lib.validate(train_config)
  data.get_info(train_config.dataset, **config_lib.data_kwargs(train_config))
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  stored = _read_json(os.path.join(workdir, "study_config.json"))
  now = json.loads(config.to_json_best_effort())
  if stored is not None and stored != now:
    changed = sorted(
      k for k in set(stored) | set(now) if stored.get(k) != now.get(k)
    )
    say(
      "[study] note: the config differs from the one this workdir was"
      f" started with (fields {', '.join(changed)}); finished runs with the"
      " same name are reused, runs whose training config changed refuse to"
      " resume."
    )
  _write_json(os.path.join(workdir, "study_config.json"), now)
  settings = _settings(config)
  started = datetime.datetime.now(datetime.timezone.utc)
  t_start = time.monotonic()
  timings: dict[str, float] = {}

  with _Progress(say) as progress:
    progress.units_total = _units_planned(config, progress)
    t = time.monotonic()
    base_records = {}
    for seed in config.seeds:
      job = base_job(config, seed)
      base_records[seed] = _train(job, workdir, progress, say)
    timings["bases"] = time.monotonic() - t

    t = time.monotonic()
    selection = {}
    lambdas: dict[str, float | None] = {"l1": None, "l2": None}
    grids = {}
    if "l1" in config.methods or "l1_fd" in config.methods:
      grids["l1"] = config.lambda_grid
    if "l2" in config.methods:
      grids["l2"] = config.l2_lambda_grid
    grids.update(_extra_grids(config))
    for method, grid in grids.items():
      selection[method] = _selection(
        config,
        workdir,
        progress,
        say,
        settings,
        method,
        grid,
        l1_coef=lambdas["l1"],
      )
      lambdas[method] = selection[method]["chosen"]
    timings["lambda_selection"] = time.monotonic() - t

    t = time.monotonic()
    jobs = plan_finetunes(config, workdir, lambdas)
    records = {job.name: _train(job, workdir, progress, say) for job in jobs}
    timings["finetunes"] = time.monotonic() - t

    t = time.monotonic()
    results = []
    max_test = (
      config.max_test_examples if config.max_test_examples > 0 else None
    )
    for i, job in enumerate(jobs):
      run_dir = os.path.join(workdir, "runs", job.name)
      cached = "ptq" in records[job.name]
      if not cached:
        say(f"[study] PTQ [{i + 1}/{len(jobs)}] {job.name} ({progress.line()})")
      sweep = _ptq(run_dir, settings, records[job.name], max_test)
      units = (
        _EVAL_COST
        * (len(settings.bits) + 1)
        * sweep["num_examples"]
        / config.train.batch_size
      )
      if cached:
        progress.skip(units)
      else:
        progress.units_done += units
      for r in sweep["results"]:
        results.append(
          {
            "method": job.method,
            "label": _label(job.method, job.coef),
            "seed": job.seed,
            "run": job.name,
            "w_bits": r["w_bits"],
            "a_bits": r["a_bits"],
            "accuracy": r["accuracy"],
            "kl": r["kl"],
            "collapsed": r.get("collapsed", False),
            **({"ste_grid": r["ste_grid"]} if "ste_grid" in r else {}),
          }
        )
    timings["ptq"] = time.monotonic() - t

    t = time.monotonic()
    fd = {}
    if lambdas["l1"] is not None and "l1_fd" in config.methods:
      for seed in config.seeds:
        name = f"base_s{seed}"
        if "fd_cosines" not in base_records[seed]:
          say(f"[study] FD cosines of {name} ({progress.line()})")
        value = _fd_cosines(
          os.path.join(workdir, "runs", name),
          config,
          lambdas["l1"],
          base_records[seed],
        )
        if value is not None:
          fd[name] = value
    # The same check for each finite-difference extra method's own rule.
    fd_variants: dict[str, dict[str, Any]] = {}
    for job in jobs:
      fd_method = job.config.reg.get("method", "hvp")
      if job.method in METHODS or job.seed != config.seeds[0]:
        continue
      if job.config.reg.kind != "l1" or fd_method not in penalty.FD_METHODS:
        continue
      for seed in config.seeds:
        name = f"base_s{seed}"
        value = _fd_cosines(
          os.path.join(workdir, "runs", name),
          config,
          lambdas["l1"],
          base_records[seed],
          variant=job,
        )
        if value is not None:
          fd_variants.setdefault(job.method, {})[name] = value
    timings["fd_cosines"] = time.monotonic() - t

  timings["this_invocation"] = time.monotonic() - t_start
  train_seconds = {
    name: rec["seconds"]
    for name, rec in {
      **{f"base_s{s}": r for s, r in base_records.items()},
      **records,
      **{
        name: _read_json(os.path.join(workdir, "runs", name, _DONE_FILE))
        for sel in selection.values()
        for g in sel["grid"]
        for name in g.get("runs", [g["run"]])
      },
    }.items()
  }
  ptq_seconds = sum(r["ptq"]["seconds"] for r in records.values())
  fd_seconds = sum(v.get("seconds", 0.0) for v in fd.values()) + sum(
    v.get("seconds", 0.0) for by in fd_variants.values() for v in by.values()
  )
  timings["compute_total"] = (
    sum(train_seconds.values()) + ptq_seconds + (fd_seconds)
  )
  out = {
    "format": RESULTS_FORMAT,
    "name": config.name,
    "started": started.isoformat(timespec="seconds"),
    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"
    ),
    "config": now,
    "seeds": list(config.seeds),
    "methods": list(config.methods),
    "bits": config.bits,
    "ptq_settings": settings.to_json(),
    "lambdas": lambdas,
    "lambda_selection": selection,
    "results": results,
    "fd_cosines": fd,
    "fd_variant_cosines": fd_variants,
    "timings": {
      **timings,
      "train_runs": train_seconds,
      "ptq_total": ptq_seconds,
      "fd_total": fd_seconds,
    },
    "versions": versions(),
  }
  paths = write_report(out, workdir)
  say(
    f"[study] done ({_duration(timings['compute_total'])} of compute over"
    f" all invocations). Results: {paths['md']}, {paths['json']},"
    f" {paths['csv']}, {paths['png']}"
  )
  return out


def _label(method: str, coef: float | None) -> str:
  label = _LABELS.get(method, method)
  if coef is None:
    return label
  symbol = "β" if method == "dq" else "λ"
  return f"{label} {symbol}={coef:g}"


def versions() -> dict[str, str | None]:
  """Package versions, Python, platform and the project's git commit."""
  out: dict[str, str | None] = {
    "python": platform.python_version(),
    "platform": platform.platform(),
  }
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out["git_commit"] = subprocess.run(
      ["git", "-C", root, "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      check=True,
      timeout=10,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    out["git_commit"] = None
  return out


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------


def _by_label(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Results with ``method`` replaced by the display label (for tables)."""
  return [{**r, "method": r["label"]} for r in results]


def paired_differences(
  results: Sequence[Mapping[str, Any]], reference: str = "none"
) -> dict[str, dict[str, list[float]]]:
  """Per method and column, accuracy minus ``reference``'s, seed by seed."""
  ref = {
    (r["seed"], report_lib.column_name(r["w_bits"], r["a_bits"])): r["accuracy"]
    for r in results
    if r["method"] == reference
  }
  out: dict[str, dict[str, list[float]]] = {}
  for r in results:
    if r["method"] == reference:
      continue
    col = report_lib.column_name(r["w_bits"], r["a_bits"])
    key = (r["seed"], col)
    if key in ref:
      out.setdefault(r["label"], {}).setdefault(col, []).append(
        r["accuracy"] - ref[key]
      )
  return out


def _diff_cell(values: Sequence[float]) -> str:
  v = 100.0 * np.asarray(values, np.float64)
  if len(v) == 1:
    return f"{v[0]:+.2f}"
  wins = int((v > 0).sum())
  return f"{v.mean():+.2f} ± {v.std(ddof=1):.2f} ({wins}/{len(v)})"


def markdown(out: Mapping[str, Any]) -> str:
  """``study.md``: every table of the study."""
  results = out["results"]
  table = report_lib.markdown_table(_by_label(results), group_by="method")
  columns, _ = report_lib.summarize(_by_label(results), group_by="method")
  n = len(out["seeds"])
  lines = [
    f"# Study `{out['name']}`",
    "",
    f"Seeds {out['seeds']}; started {out['started']}, finished"
    f" {out['finished']}; {_duration(out['timings']['compute_total'])} of"
    " compute (training, PTQ and FD check, summed over the runs of every"
    " invocation).",
    "",
    "## Post-training quantization, top-1 % on the test split",
    "",
    f"Mean ± std over {n} seed{'s' if n > 1 else ''}. (W,A) = (weight bits,"
    " activation bits); batch norm folded into the kernels, per-tensor"
    " symmetric weights, activation ranges from batch norm (Data-Free"
    " Quantization rule); nothing calibrated; the float model is FP."
    " STE cells marked † kept their own (training) grid.",
    "",
    table.rstrip(),
    "",
  ]
  references = out["config"].get("paired_references", ["none"])
  labels = {r["method"]: r["label"] for r in results}
  for ref in references:
    if ref not in labels:
      continue
    lines += [
      f"## Paired difference to `{labels[ref]}`, accuracy points",
      "",
      f"Per seed, the method's accuracy minus that of `{labels[ref]}` on"
      " the same seed (same base); mean ± std over seeds and (in brackets)"
      " how many seeds gained.",
      "",
      "| method | " + " | ".join(columns) + " |",
      "|---|" + "---:|" * len(columns),
    ]
    for label, cols in paired_differences(results, ref).items():
      cells = [_diff_cell(cols[c]) if c in cols else "–" for c in columns]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## λ selection (the paper's rule, on minival)", ""]
  for method, sel in out["lambda_selection"].items():
    lines.append(
      f"{method}: reference (unregularized fine-tune, seed"
      f"{'s' if len(sel.get('seeds', [0])) > 1 else ''}"
      f" {', '.join(map(str, sel.get('seeds', [sel['seed']])))}; mean)"
      f" {100 * sel['reference_minival_accuracy']:.2f} % on minival;"
      f" tolerance {sel['tolerance_points']} points; chosen λ ="
      f" {sel['chosen']:g}"
      + ("" if sel["within_tolerance"] else " (none within tolerance!)")
      + "."
    )
    lines += [
      "",
      "| λ | minival % | penalty / CE (end) | collapsed |",
      "|---:|---:|---:|---|",
    ]
    for g in sel["grid"]:
      ratio = g["penalty_to_cross_entropy"]
      lines.append(
        f"| {g['lambda']:g} | {100 * g['minival_accuracy']:.2f} |"
        f" {'–' if ratio is None else f'{ratio:.3g}'} |"
        f" {'yes' if g['collapsed'] else 'no'} |"
      )
    lines.append("")
  variants = out.get("fd_variant_cosines", {})
  if out["fd_cosines"] or variants:
    lines += [
      "## Finite difference vs exact penalty gradient",
      "",
      "Cosine between the gradients (w.r.t. the parameters) of the ℓ1"
      " penalty computed by finite difference and exactly, at the chosen λ,"
      " on training batches of each trained base (BN in train mode, as"
      " training sees it).",
      "",
      "| rule | base | batches | median | min | max | fd_step |",
      "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows = [("l1_fd", out["fd_cosines"])] + list(variants.items())
    for rule, by_base in rows:
      for name, v in by_base.items():
        lines.append(
          f"| {rule} ({v.get('method', 'finite_difference')}) | {name} |"
          f" {v['num_batches']} | {v['median']:.3f} | {v['min']:.3f} |"
          f" {v['max']:.3f} | {v['fd_step']:g} |"
        )
    lines.append("")
  t = out["timings"]
  lines += [
    "## Time",
    "",
    "| part | seconds |",
    "|---|---:|",
    f"| training runs (sum) | {sum(t['train_runs'].values()):.0f} |",
    f"| PTQ sweeps (sum) | {t['ptq_total']:.0f} |",
    f"| FD check (sum) | {t['fd_total']:.0f} |",
    f"| this invocation, wall | {t['this_invocation']:.0f} |",
    "",
    "Per run (seconds, compilation included):",
    "",
    "| run | seconds |",
    "|---|---:|",
  ]
  lines += [f"| {k} | {v:.0f} |" for k, v in t["train_runs"].items()]
  v = out["versions"]
  lines += [
    "",
    "Versions: "
    + ", ".join(f"{k} {v[k]}" for k in v if v[k] is not None)
    + ".",
    "",
  ]
  return "\n".join(lines)


def write_report(out: Mapping[str, Any], workdir: str) -> dict[str, str]:
  """Writes ``study.{md,json,csv,png}``; returns their paths."""
  from l1grad import plots  # pylint: disable=g-import-not-at-top

  paths = {
    ext: os.path.join(workdir, f"study.{ext}")
    for ext in ("md", "json", "csv", "png")
  }
  _write_json(paths["json"], out)
  with open(paths["md"], "w") as f:
    f.write(markdown(out))
  fields = ("method", "label", "seed", "run", "w_bits", "a_bits", "accuracy")
  with open(paths["csv"], "w") as f:
    f.write(",".join(fields + ("kl",)) + "\n")
    for r in out["results"]:
      row = ["" if r[k] is None else str(r[k]) for k in fields]
      f.write(",".join(row + [repr(float(r["kl"]))]) + "\n")
  columns, rows = report_lib.summarize(
    _by_label(out["results"]), group_by="method"
  )
  lines = []
  for row in rows:
    means = np.array(
      [
        100 * np.mean(row.cells[c]) if row.cells.get(c) else math.nan
        for c in columns
      ]
    )
    stds = np.array(
      [
        100 * np.std(row.cells[c], ddof=1)
        if len(row.cells.get(c, [])) > 1
        else 0.0
        for c in columns
      ]
    )
    lines.append((row.labels["method"], means, stds))
  plots.accuracy_vs_bits(
    columns,
    lines,
    paths["png"],
    title=f"{out['name']}: post-training quantization, mean ± std over"
    f" {len(out['seeds'])} seed(s)",
    ylabel="top-1 accuracy (%)",
  )
  return paths
