"""Trained runs as the evaluation commands see them: settings, loading, labels.

What ``eval_ptq.py``, ``analyze.py`` and the integer export share:

* :class:`Settings`: which checkpoint and how to prepare it (batch norm
  folded or not, activation ranges, weight scales, batch size), validated
  once; :class:`l1grad.ptq.Settings` and :class:`l1grad.analysis.Settings`
  extend it;
* :func:`prepare_run`: load a workdir's checkpoint and config, rebuild its
  model, check they fit, fold batch norm, compute the activation ranges;
* :func:`training_log`: a run's ``metrics.jsonl`` (after its source
  run's, for a fine-tune);
* names: :func:`run_labels` (a run's name in tables), :func:`method_label`
  (``"l1 λ=0.05"``), :func:`config_value` (one field of a ConfigDict or of
  a plain mapping, e.g. a config read back from ``ptq.json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import json
import math
import os
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from l1grad import bits as bits_lib
from l1grad import errors
from l1grad import fold as fold_lib
from l1grad import models
from l1grad import ranges as ranges_lib

__all__ = [
  "PreparedRun",
  "Settings",
  "check_variables_match",
  "config_json",
  "config_value",
  "data_dir",
  "eval_batch_size",
  "json_float",
  "method_label",
  "prepare_run",
  "prepare_variables",
  "qat_bits",
  "qat_scheme",
  "run_labels",
  "training_log",
]

Pair = tuple[int, int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """How to load and prepare a run (the flags every command shares).

  Subclasses add their own fields and may widen :attr:`ACT_RANGE_METHODS`.

  Attributes:
    bits: (weight bits, activation bits) pairs, in table column order.
    act_ranges: ``"bn"`` (Data-Free Quantization rule) or ``"calibrate"``.
    per_channel: Per-output-channel weight scales (default per tensor, the
      paper's setting).
    fold: Fold batch norm into the preceding kernel before quantizing (what a
      deployed integer model does); False quantizes the unfolded kernels and
      keeps batch norm in float (``--nofold``).
    calib_batches: Training batches for ``calibrate``.
    batch_size: Evaluation batch size; None takes the run's config.
    num_std: The 6 of the Data-Free Quantization rule.
    step: Checkpoint step to load; None takes the latest.
    first_last_bits: Keep the first and last Conv/Dense layers (in call
      order) at this many bits, or more where (W,A) has more: their kernels
      and the last layer's input activation (``--first_last_bits 8``, the
      convention of many deployments and PTQ baselines). None (or 0, the
      default) quantizes them like every layer, the paper's setting.
  """

  ACT_RANGE_METHODS: ClassVar[tuple[str, ...]] = ranges_lib.ACT_RANGE_METHODS
  # The order of the fields in to_json (None: the declaration order).
  JSON_FIELDS: ClassVar[tuple[str, ...] | None] = None

  bits: tuple[Pair, ...] = ()
  act_ranges: str = "bn"
  per_channel: bool = False
  fold: bool = True
  calib_batches: int = 8
  batch_size: int | None = None
  num_std: float = ranges_lib.DFQ_NUM_STD
  step: int | None = None
  first_last_bits: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "bits", tuple(tuple(p) for p in self.bits))
    for w, a in self.bits:
      bits_lib.check_bits(w, "weight bits")
      bits_lib.check_bits(a, "activation bits")
    if not self.first_last_bits:  # 0 means off, like None
      object.__setattr__(self, "first_last_bits", None)
    else:
      bits_lib.check_bits(self.first_last_bits, "--first_last_bits")
    methods = type(self).ACT_RANGE_METHODS
    if self.act_ranges not in methods:
      raise errors.ConfigError(
        f"--act_ranges must be one of {', '.join(methods)}, got"
        f" {self.act_ranges!r}."
      )
    _check_positive("--calib_batches", self.calib_batches)
    _check_positive("--batch_size", self.batch_size)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["bits"] = [bits_lib.format_pair(p) for p in self.bits]
    order = type(self).JSON_FIELDS
    return d if order is None else {k: d[k] for k in order}


def _check_positive(flag: str, value: int | None) -> None:
  if value is not None and value < 1:
    raise errors.ConfigError(f"{flag} must be >= 1, got {value}.")


# ---------------------------------------------------------------------------
# Config fields and labels.
# ---------------------------------------------------------------------------


def config_value(config: Any, name: str, default: Any) -> Any:
  """``config.name``, or ``default`` where absent.

  Args:
    config: An ``ml_collections.ConfigDict``, a mapping (a config read back
      from JSON), any object (read by attribute), or None.
    name: The field.
    default: Returned when ``config`` is None or has no such field.

  Returns:
    The value.
  """
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)


def config_json(config: Any) -> Any:
  """A config as plain JSON data (ConfigDict or mapping)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def run_labels(workdirs: Sequence[str]) -> list[str]:
  """The runs' names in tables: base names, or full paths where those clash."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(set(names)) == len(names):
    return names
  return [os.path.normpath(w) for w in workdirs]


def qat_bits(config: Any) -> Pair | None:
  """The (W, A) an STE run trained at (``config.qat.bits``), else None."""
  text = config_value(config_value(config, "qat", None), "bits", "")
  return bits_lib.parse_pair(text) if text else None


def qat_scheme(config: Any) -> str | None:
  """What an STE run simulated (``config.qat.scheme``), else None.

  ``"folded"`` or ``"unfolded"`` (l1grad/qat.py); a run stored before the
  field existed trained ``"unfolded"``.
  """
  if qat_bits(config) is None:
    return None
  qat = config_value(config, "qat", None)
  return str(config_value(qat, "scheme", "unfolded"))


def method_label(config: Any) -> str:
  """A readable method name from a run's config, e.g. ``"l1 λ=0.05"``.

  ``"none"``; ``"l1 λ=…"`` / ``"l2 λ=…"`` (``λw=… λa=…`` when the two
  coefficients differ; ``act_coef == -1`` means the same as
  ``weight_coef``); ``"dq β=…"`` (β is ``reg.weight_coef``); ``"ste 4:4"``
  for quantization-aware training (``"ste 4:4 unfolded"`` for the unfolded
  scheme, :func:`qat_scheme`); combined with ``+`` when both are set.
  """
  reg = config_value(config, "reg", {})
  kind = str(config_value(reg, "kind", "none") or "none")
  w = config_value(reg, "weight_coef", 0.0)
  a = config_value(reg, "act_coef", -1.0)
  a = w if a == -1 else a  # -1: the paper's single λ
  if kind in ("l1", "l2"):
    coef = f"λ={w:g}" if w == a else f"λw={w:g} λa={a:g}"
    label = f"{kind} {coef}"
  elif kind == "dq":
    label = f"dq β={w:g}"
  else:
    label = kind
  qat = qat_bits(config)
  if qat is not None:
    ste = f"ste {bits_lib.format_pair(qat)}"
    if qat_scheme(config) != "folded":
      ste += f" {qat_scheme(config)}"
    label = ste if kind == "none" else f"{ste} + {label}"
  return label


def eval_batch_size(config: Any, settings: Settings | None = None) -> int:
  """The evaluation batch size: the setting, else the config's."""
  if settings is not None and settings.batch_size is not None:
    return settings.batch_size
  # Imported here: config_lib pulls in the input pipeline.
  from l1grad import config_lib  # pylint: disable=g-import-not-at-top

  return config_lib.eval_batch_size(config)


def data_dir(config: Any) -> str | None:
  """The run's ``config.data_dir``, None for the default location."""
  return config_value(config, "data_dir", "") or None


def json_float(x: Any) -> float | None:
  """``float(x)``, None where not finite (JSON has no NaN or infinity)."""
  x = float(x)
  return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------
# A run's training log.
# ---------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a line cut by a killed run
  return rows


def training_log(workdir: str, config: Any = None) -> dict[str, Any] | None:
  """The run's training curve from ``metrics.jsonl`` (paper Fig. 7).

  A fine-tune (``config.init_from``) is preceded by its source run's log when
  that is readable, its steps shifted to continue the source's, so the curve
  shows the natural decrease of the gradient norm and then the regularized
  phase (paper Appendix D).

  Args:
    workdir: The run's directory.
    config: Its config (for ``init_from``); None reads this log only.

  Returns:
    ``{"step", "cross_entropy", "penalty", "weight_grad_l1", "act_grad_l1",
    "weight_grad_l2", "act_grad_l2", "regularized", "test_accuracy"}`` lists
    (None where a row lacks the value), ``"phase"`` (0 source, 1 this run),
    ``"sources"`` (the files read, as absolute paths: the source run's log
    first, if read, then this run's); None if there is no log.
  """
  own_path = os.path.join(workdir, "metrics.jsonl")
  own = _read_jsonl(own_path)
  if not own:
    return None
  # (rows, step offset, phase, path): phase 0 is the source run of a fine-tune.
  parts: list[tuple[list[dict[str, Any]], int, int, str]] = []
  init_from = config_value(config, "init_from", "")
  offset = 0
  if init_from:
    parent_path = os.path.join(init_from, "metrics.jsonl")
    parent = _read_jsonl(parent_path)
    if parent:
      parts.append((parent, 0, 0, parent_path))
      offset = max(int(r.get("step", 0)) for r in parent)
  parts.append((own, offset, 1, own_path))
  keys = (
    "cross_entropy",
    "penalty",
    "weight_grad_l1",
    "act_grad_l1",
    "weight_grad_l2",
    "act_grad_l2",
    "regularized",
    "test_accuracy",
  )
  log: dict[str, Any] = {"step": [], "phase": [], **{k: [] for k in keys}}
  for rows, shift, phase, _ in parts:
    for r in rows:
      log["step"].append(int(r.get("step", 0)) + shift)
      log["phase"].append(phase)
      for k in keys:
        v = r.get(k)
        log[k].append(json_float(v) if isinstance(v, (int, float)) else None)
  log["sources"] = [os.path.abspath(path) for *_, path in parts]
  return log


# ---------------------------------------------------------------------------
# Variables: check, fold.
# ---------------------------------------------------------------------------


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): tuple(
      np.shape(leaf)
    )
    for path, leaf in flat
  }


def check_variables_match(
  model: nn.Module,
  variables: Mapping[str, Any],
  sample: ArrayLike,
  *,
  where: str = "the checkpoint",
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
) -> None:
  """Raises :class:`l1grad.errors.CheckpointError` unless ``variables`` fit.

  Compares names and shapes with ``model.init`` traced under
  :func:`jax.eval_shape` (nothing is computed).
  """
  expected = jax.eval_shape(
    functools.partial(model.init, **dict(apply_kwargs)),
    jax.random.key(0),
    jnp.asarray(sample),
  )
  problems = []
  for collection in sorted(set(expected) | set(variables)):
    want = _shapes(expected.get(collection, {}))
    have = _shapes(variables.get(collection, {}) or {})
    for k in sorted(set(want) - set(have)):
      problems.append(f"missing {collection}/{k} {want[k]}")
    for k in sorted(set(have) - set(want)):
      problems.append(f"unexpected {collection}/{k} {have[k]}")
    for k in sorted(set(want) & set(have)):
      if want[k] != have[k]:
        problems.append(
          f"{collection}/{k} has shape {have[k]}, the model wants {want[k]}"
        )
  if problems:
    more = len(problems) - 6
    shown = "; ".join(problems[:6]) + (f"; and {more} more" if more > 0 else "")
    raise errors.CheckpointError(
      f"{where} does not match the model built from its config"
      f" ({type(model).__name__}): {shown}. The config was probably changed"
      " after training, or the checkpoint comes from another run: restore"
      " the config the run was trained with, or evaluate the workdir that"
      " holds its checkpoint."
    )


def prepare_variables(
  model: nn.Module,
  variables: Mapping[str, Any],
  sample: ArrayLike,
  *,
  fold: bool = True,
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
) -> ranges_lib.EvalVariables:
  """Folds batch norm into the preceding kernels (``fold=True``) or not."""
  variables = {k: v for k, v in variables.items() if v}
  if not fold:
    return variables
  pairs = fold_lib.find_conv_bn_pairs(
    model, variables, jnp.asarray(sample), **dict(apply_kwargs)
  )
  return fold_lib.fold_batch_norm(variables, pairs)


# ---------------------------------------------------------------------------
# One run, loaded and prepared.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedRun:
  """A run's model, variables and activation ranges, ready to quantize.

  Attributes:
    label: The run's name in tables (derived from its workdir).
    workdir: The run's directory.
    step: The checkpoint step.
    config: The run's config (an ``ml_collections.ConfigDict`` or mapping).
    model: The linen model.
    variables: Unfolded float variables (``params``, ``batch_stats``).
    eval_variables: Variables as evaluated (folded unless ``--nofold``).
    ranges: Activation ranges ``{point key: (low, high)}``.
    act_ranges: How the ranges were obtained (``"bn"``/``"calibrate"``).
    sample: One input batch (shape and dtype of the model input).
  """

  label: str
  workdir: str
  step: int
  config: Any
  model: nn.Module
  variables: dict[str, Any]
  eval_variables: ranges_lib.EvalVariables
  ranges: ranges_lib.Ranges
  act_ranges: str
  sample: np.ndarray


def prepare_run(
  workdir: str, settings: Settings, *, label: str | None = None
) -> PreparedRun:
  """Loads a run's checkpoint and config and prepares it for quantization.

  Args:
    workdir: A directory the trainer wrote.
    settings: Evaluation settings (step, fold, activation ranges).
    label: Name in tables; default the workdir's base name.

  Returns:
    The prepared run.

  Raises:
    errors.UserError: No/corrupt checkpoint, a config/checkpoint mismatch,
      unprepared data, or BN ranges impossible for this model.
  """
  if not os.path.isdir(workdir):
    raise errors.CheckpointError(
      f"Workdir {workdir!r} does not exist. Pass the --workdir a training"
      " run wrote (python train.py --config configs/digits.py --workdir"
      " DIR)."
    )
  # Imported here: Orbax and the input pipeline are slow to import, and the
  # quantized evaluation itself does not need them.
  from l1grad import checkpoint  # pylint: disable=g-import-not-at-top
  from l1grad import data  # pylint: disable=g-import-not-at-top

  run = checkpoint.load_run(workdir, step=settings.step)
  config = run.config
  info = data.get_info(config.dataset, data_dir=data_dir(config))
  model = models.from_config(config, info.num_classes)
  sample = np.zeros((1, *info.image_shape), np.float32)
  variables = {"params": run.params}
  if run.batch_stats:
    variables["batch_stats"] = run.batch_stats
  check_variables_match(
    model,
    variables,
    sample,
    where=f"The checkpoint in {workdir} (step {run.step})",
  )
  eval_variables = prepare_variables(
    model, variables, sample, fold=settings.fold
  )
  if settings.act_ranges == "bn":
    ranges = ranges_lib.bn_activation_ranges(
      model, variables, sample, num_std=settings.num_std
    )
  else:
    batch_size = eval_batch_size(config, settings)
    batches = data.eval_batches(
      config.dataset,
      "train",
      global_batch_size=batch_size,
      data_dir=data_dir(config),
      max_examples=settings.calib_batches * batch_size,
      # The run's hold-out stays held out: calibration reads its train split.
      minival_examples=int(config_value(config, "minival_examples", 0)),
    )
    ranges = ranges_lib.calibrated_activation_ranges(
      model, eval_variables, batches
    )
  return PreparedRun(
    label=label or os.path.basename(os.path.normpath(workdir)),
    workdir=workdir,
    step=int(run.step),
    config=config,
    model=model,
    variables=variables,
    eval_variables=eval_variables,
    ranges=ranges,
    act_ranges=settings.act_ranges,
    sample=sample,
  )
