"""Config checks and the quantities derived from a config (``-1`` fields).

Everything is checked before anything compiles: a bad value is a
:class:`ConfigError` whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import os

from flax import traverse_util
import jax
import ml_collections

from l1grad import bits as bits_lib
from l1grad import data
from l1grad import models
from l1grad import penalty
from l1grad import perturb
from l1grad import qat
from l1grad.errors import ConfigError

REG_KINDS = ("none", "l1", "l2", "dq")
REG_METHODS = penalty.METHODS
# How the ℓ1 penalty weights each tensor (configs/default.py, reg.weighting).
REG_WEIGHTINGS = ("none", "bin_width")
QAT_SCHEMES = qat.SCHEMES
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DATASETS = data.DATASETS
EVAL_SPLITS = ("test", data.MINIVAL)

# Fields that do not change what a run computes: a resumed run may differ in
# these from the run that wrote the checkpoint.
_RUN_NEUTRAL = (
  "log_every_steps",
  "eval_every_epochs",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "max_steps",
  "worker_count",
  "data_dir",
  "max_eval_examples",
  "track_act_grad",
)


# What a stored config without the field ran as (STE before the folded
# scheme existed; the whole training split, evaluated on test, before the
# hold-out existed; the penalty on every step before lazy regularization).
_LEGACY_FIELDS = {
  "qat.scheme": "unfolded",
  "reg.every_steps": 1,
  "reg.hvp_impl": "linearize",
  "reg.weighting": "none",
  "reg.target_bits": "",
  "minival_examples": 0,
  "max_train_examples": -1,
  "eval_split": "test",
}
_QAT_FIELDS = ("qat.scheme", "qat.freeze_bn_fraction")


def act_coef(config: ml_collections.ConfigDict) -> float:
  """λ_a; ``-1`` means the same as λ_w (the paper's single λ)."""
  a = config.reg.act_coef
  return config.reg.weight_coef if a == -1 else a


def minival_examples(config: ml_collections.ConfigDict) -> int:
  """Examples held out of the training split as ``"minival"`` (0: none)."""
  return int(config.get("minival_examples", 0))


def eval_split(config: ml_collections.ConfigDict) -> str:
  """The split the trainer's periodic evaluation reads."""
  return str(config.get("eval_split", "test"))


def data_kwargs(config: ml_collections.ConfigDict) -> dict[str, object]:
  """The keyword arguments of the ``l1grad.data`` training functions.

  For ``get_info``, ``steps_per_epoch`` and ``train_batches``: the data dir,
  the hold-out and the training subset. Reads configs stored before the last
  two existed as their legacy values (none, all).
  """
  max_train = int(config.get("max_train_examples", -1))
  return {
    "data_dir": config.get("data_dir", "") or None,
    "minival_examples": minival_examples(config),
    "max_train_examples": None if max_train == -1 else max_train,
  }


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return (
    config.batch_size
    if config.eval_batch_size == -1
    else config.eval_batch_size
  )


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """All epoch/step arithmetic of a run."""

  steps_per_epoch: int
  total_steps: int  # the schedule's length (num_epochs × steps_per_epoch)
  last_step: int  # where this invocation stops (max_steps may cut it)
  reg_start_step: int  # first regularized step
  checkpoint_every: int
  # Lazy regularization (reg.every_steps): the penalty runs on every
  # reg_every-th step of the regularized phase, counted from its start.
  reg_every: int = 1

  def regularized(self, step: int) -> bool:
    """Whether ``step`` (0-based) runs the regularized step variant."""
    return (
      step >= self.reg_start_step
      and (step - self.reg_start_step) % self.reg_every == 0
    )


def reg_every_steps(config: ml_collections.ConfigDict) -> int:
  """k of lazy regularization (``reg.every_steps``; 1 in configs without it)."""
  return int(config.reg.get("every_steps", 1))


def step_plan(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> StepPlan:
  """The run's step arithmetic; ``steps_per_epoch`` comes from the data.

  Raises:
    ConfigError: the global batch is larger than the training split.
  """
  if steps_per_epoch <= 0:
    _fail(
      "batch_size",
      f"({config.batch_size}) is larger than the"
      f" {config.dataset!r} training split, so an epoch has no step.",
      "Use a smaller global batch size.",
    )
  total = config.num_epochs * steps_per_epoch
  last = total if config.max_steps < 0 else min(total, config.max_steps)
  if config.reg.kind == "none":
    reg_start = total + 1
  elif config.reg.last_epochs < 0:
    reg_start = 0
  else:
    reg_start = total - config.reg.last_epochs * steps_per_epoch
  every = (
    steps_per_epoch
    if config.checkpoint_every_steps < 0
    else config.checkpoint_every_steps
  )
  return StepPlan(
    steps_per_epoch,
    total,
    last,
    reg_start,
    max(every, 1),
    reg_every=reg_every_steps(config),
  )


def _fail(field: str, problem: str, fix: str) -> None:
  raise ConfigError(f"config.{field}: {problem} {fix}")


def _check_choice(
  field: str, value: object, choices: tuple[str, ...], what: str
) -> None:
  if value not in choices:
    _fail(
      field, f"unknown {what} {value!r}.", f"Use one of {', '.join(choices)}."
    )


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a training config; raises :class:`ConfigError` on the first problem."""
  _check_choice("dataset", config.dataset, DATASETS, "dataset")
  _check_choice("model", config.model, models.MODEL_NAMES, "model")
  reg = config.reg
  _check_choice("reg.kind", reg.kind, REG_KINDS, "regularization")
  _check_choice("reg.method", reg.method, REG_METHODS, "method")
  _check_choice(
    "reg.hvp_impl",
    reg.get("hvp_impl", "linearize"),
    penalty.HVP_IMPLS,
    "Hessian-vector product implementation",
  )
  _check_choice(
    "reg.points",
    reg.get("points", "layer_inputs"),
    perturb.POINTS,
    "activation point convention",
  )
  _check_choice(
    "reg.act_norm",
    reg.get("act_norm", "none"),
    penalty.ACT_NORMS,
    "activation-term normalisation",
  )
  if reg.weight_coef < 0:
    _fail(
      "reg.weight_coef",
      f"is negative ({reg.weight_coef}).",
      "Coefficients must be >= 0 (0 switches the term off).",
    )
  if reg.act_coef < 0 and reg.act_coef != -1:
    _fail(
      "reg.act_coef",
      f"is negative ({reg.act_coef}).",
      "Use a value >= 0, or -1 for 'same as reg.weight_coef'.",
    )
  if reg.kind == "none":
    # A coefficient without a kind is a forgotten flag, not a choice.
    ignored = [
      f"reg.{f}={reg[f]}"
      for f, off in (("weight_coef", (0,)), ("act_coef", (0, -1)))
      if reg[f] not in off
    ]
    if ignored:
      _fail(
        "reg.kind",
        f"is 'none', so {' and '.join(ignored)} would be silently ignored.",
        "Set --config.reg.kind=l1 (or l2, dq) to"
        " regularize, or --config.reg.weight_coef=0 (and"
        " --config.reg.act_coef=-1) for an unregularized run.",
      )
  _validate_every_steps(config)
  _validate_weighting(config)
  if reg.fd_step <= 0:
    _fail(
      "reg.fd_step",
      f"must be positive, got {reg.fd_step}.",
      "The default 1e-3 suits float32.",
    )
  if config.num_epochs <= 0:
    _fail(
      "num_epochs",
      f"must be positive, got {config.num_epochs}.",
      "Set the number of training epochs.",
    )
  if reg.last_epochs > config.num_epochs:
    _fail(
      "reg.last_epochs",
      f"({reg.last_epochs}) is longer than the run"
      f" (num_epochs={config.num_epochs}).",
      "Regularize at most every epoch: lower reg.last_epochs, or use -1.",
    )
  if reg.last_epochs < -1:
    _fail(
      "reg.last_epochs",
      f"is {reg.last_epochs}.",
      "Use N >= 0 for the last N epochs, or -1 for every epoch.",
    )
  if config.qat.bits:
    try:
      bits_lib.parse_pair(config.qat.bits)
    except ConfigError as e:
      raise ConfigError(f"config.qat.bits: {e}") from None
  _check_choice("qat.scheme", config.qat.scheme, QAT_SCHEMES, "STE scheme")
  freeze = config.qat.freeze_bn_fraction
  if freeze != -1 and not 0.0 <= freeze <= 1.0:
    _fail(
      "qat.freeze_bn_fraction",
      f"must be between 0 and 1, got {freeze}.",
      "Use the fraction of the steps that run with frozen batch norm,"
      " or -1 (all when fine-tuning, the last 20 % otherwise).",
    )
  _check_choice("optimizer", config.optimizer, OPTIMIZERS, "optimizer")
  _check_choice("schedule", config.schedule, SCHEDULES, "schedule")
  if config.learning_rate <= 0:
    _fail(
      "learning_rate",
      f"must be positive, got {config.learning_rate}.",
      "Set a positive peak learning rate.",
    )
  _validate_data_subsets(config)
  for field in ("log_every_steps", "keep_checkpoints"):
    if config[field] <= 0:
      _fail(
        field,
        f"must be positive, got {config[field]}.",
        "Use a positive number (see configs/default.py).",
      )
  if config.checkpoint_every_steps == 0 or config.checkpoint_every_steps < -1:
    _fail(
      "checkpoint_every_steps",
      f"is {config.checkpoint_every_steps}.",
      "Use a positive number of steps, or -1 for once per epoch.",
    )
  if config.warmup_epochs < 0:
    _fail(
      "warmup_epochs",
      f"is negative ({config.warmup_epochs}).",
      "Use 0 for no warmup or a positive number of epochs.",
    )
  if config.compute_dtype not in ("float32", "bfloat16"):
    _fail(
      "compute_dtype",
      f"is {config.compute_dtype!r}.",
      "Use 'float32' or 'bfloat16'.",
    )
  n = jax.device_count()
  for field, size in (
    ("batch_size", config.batch_size),
    ("eval_batch_size", eval_batch_size(config)),
  ):
    if size <= 0 or size % n:
      _fail(
        field,
        f"({size}) is not a positive multiple of the {n} device(s).",
        f"Use a global batch size divisible by {n}, e.g."
        f" {max(n, (max(size, 1) // n) * n)}.",
      )
  if config.init_from and not os.path.isdir(
    os.path.join(config.init_from, "checkpoints")
  ):
    what = (
      "does not exist"
      if not os.path.exists(config.init_from)
      else "holds no checkpoints/ folder"
    )
    _fail(
      "init_from",
      f"{config.init_from!r} {what}.",
      "Point it at the --workdir of a finished training run.",
    )


def _is_int(value: object) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _validate_every_steps(config: ml_collections.ConfigDict) -> None:
  """reg.every_steps: a whole k >= 1, and > 1 only with a penalty to skip."""
  reg = config.reg
  every = reg.get("every_steps", 1)
  if not _is_int(every) or every < 1:
    _fail(
      "reg.every_steps",
      f"is {every!r}.",
      "Use a whole number k >= 1: the penalty then runs on every k-th step"
      " of the regularized phase with its coefficients multiplied by k"
      " (1: every step; StyleGAN2 uses 16).",
    )
  if every > 1 and reg.kind == "none":
    # STE training (qat.bits) with no penalty lands here too: its forward
    # pass is the training itself, there is nothing to apply every k steps.
    _fail(
      "reg.every_steps",
      f"is {every} but reg.kind is 'none', so there is no penalty to apply"
      " every k steps (STE training, qat.bits, has none either).",
      "Set --config.reg.kind=l1 (or l2, dq), or leave reg.every_steps at 1.",
    )


def _validate_weighting(config: ml_collections.ConfigDict) -> None:
  """reg.weighting and reg.target_bits (the bin-width-weighted ℓ1 penalty)."""
  reg = config.reg
  weighting = reg.get("weighting", "none")
  target = reg.get("target_bits", "")
  _check_choice("reg.weighting", weighting, REG_WEIGHTINGS, "weighting")
  if weighting == "none":
    if target:
      _fail(
        "reg.target_bits",
        f"is {target!r} but reg.weighting is 'none', so it would be ignored.",
        "Set --config.reg.weighting=bin_width to weight the penalty by the"
        " bin widths at those bits, or leave reg.target_bits empty.",
      )
    return
  if reg.kind != "l1":
    _fail(
      "reg.weighting",
      f"is 'bin_width' but reg.kind is {reg.kind!r}.",
      "The bin-width weights make the ℓ1 penalty the first-order bound"
      " Σ (Δ/2)·|∇L|: use --config.reg.kind=l1.",
    )
  if not target:
    _fail(
      "reg.target_bits",
      "is empty but reg.weighting is 'bin_width'.",
      "Give the bit-widths whose bin widths weight the penalty, e.g."
      " --config.reg.target_bits=4:4 (W:A).",
    )
  try:
    bits_lib.parse_pair(target)
  except ConfigError as e:
    raise ConfigError(f"config.reg.target_bits: {e}") from None


def _validate_data_subsets(config: ml_collections.ConfigDict) -> None:
  """minival_examples, max_train_examples and eval_split.

  Whether the hold-out is smaller than the training split needs the data;
  ``l1grad.data`` checks that, before the workdir is created.
  """
  minival = config.get("minival_examples", 0)
  if not _is_int(minival) or minival < 0:
    _fail(
      "minival_examples",
      f"is {minival!r}.",
      "Use 0 (no hold-out) or the number of training examples to hold out"
      " as the 'minival' split, e.g. 5000.",
    )
  max_train = config.get("max_train_examples", -1)
  if not _is_int(max_train) or (max_train < 1 and max_train != -1):
    _fail(
      "max_train_examples",
      f"is {max_train!r}.",
      "Use a positive number of training examples, or -1 for all of them.",
    )
  split = config.get("eval_split", "test")
  _check_choice("eval_split", split, EVAL_SPLITS, "evaluation split")
  if split == data.MINIVAL and not minival:
    _fail(
      "eval_split",
      "is 'minival' but config.minival_examples is 0, so nothing is held out.",
      "Set --config.minival_examples=N (examples to hold out of the training"
      " split, e.g. 5000), or use --config.eval_split=test.",
    )


def _flat_fields(config: ml_collections.ConfigDict) -> dict[str, object]:
  """``{"reg.kind": "l1", ...}``; tuples as lists, as a stored config has."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def check_same_run(
  config: ml_collections.ConfigDict,
  stored: ml_collections.ConfigDict,
  workdir: str,
) -> None:
  """Refuses to resume a workdir whose checkpoints come from another config."""
  now, then = _flat_fields(config), _flat_fields(stored)
  # A run stored before a field existed ran as that field's legacy value;
  # the STE fields matter only to STE runs, the freeze only to folded ones.
  then = {**_LEGACY_FIELDS, **then}
  ignored = ()
  if not now.get("qat.bits") and not then.get("qat.bits"):
    ignored = _QAT_FIELDS
  elif "folded" not in (now.get("qat.scheme"), then.get("qat.scheme")):
    ignored = ("qat.freeze_bn_fraction",)
  for k in ignored:
    now.pop(k, None)
    then.pop(k, None)
  # Stored before reg.points existed: the layer-input convention.
  then.setdefault("reg.points", "layer_inputs")
  then.setdefault("reg.act_norm", "none")
  diffs = [
    f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}"
    for k in sorted(set(now) | set(then))
    if k not in _RUN_NEUTRAL and now.get(k) != then.get(k)
  ]
  if diffs:
    raise ConfigError(
      f"{workdir} holds a run of a different config ("
      + "; ".join(diffs[:6])
      + ("; …" if len(diffs) > 6 else "")
      + "). Use a new --workdir for a new run, or rerun with the original"
      " config to resume it."
    )
