r"""The paper's theory measured against the real quantization noise of runs.

One kind of thing, the per-run analysis (the maths is in
:mod:`l1grad.expansion`, the figures in :mod:`l1grad.plots`).

For each trained run, batch, (W, A) pair and kind of perturbation (weights
only, activations only, both), the model is quantized as post-training
quantization does, the real noise δ and bin widths Δ are recorded, and every
term of the loss expansion (:mod:`l1grad.expansion`, which holds the maths)
is measured: induced loss, first-order term, worst-case ℓ1 bound,
second-order prediction, gradient norms, KL(p_float ‖ p_quant), histograms of
δ/Δ per layer (keyed by module path, as the perturbation points).

Decisions (the same as :mod:`l1grad.ptq`, so the analysis explains the PTQ
table and not some other network):

* evaluation mode (batch-norm running statistics), and batch norm **folded**
  into the preceding kernels by default: W are the folded kernels, the
  tensors PTQ rounds. (The training penalty acts on the unfolded kernels; the
  folded gradient is the unfolded one divided per channel by γ/√(var+ε).)
  ``Settings(fold=False)`` measures the unfolded model with BN in float;
* weights quantized per tensor (per output channel as an option), activations
  with the PTQ ranges: batch-norm (Data-Free Quantization rule) by default,
  calibrated, or each batch's own min/max (``"dynamic"``);
* the activation noise is recorded in the quantized network, so
  L(z + δ) − L(z) is the real PTQ loss change (checked per batch and
  reported as ``reconstruction_error``).

Command (writes ``analysis.json``, ``analysis.md`` and PNG figures, through
:func:`l1grad.report.write_analysis`)::

  python analyze.py --workdir runs/digits --workdir runs/digits_l1 \
      [--bits 8:8,4:4,3:3,4:2] [--num_batches N] [--batch_size B] [--out DIR]

``python -m l1grad.analysis`` is the same command.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
import os
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from l1grad import bits as bits_lib
from l1grad import errors
from l1grad import expansion
from l1grad import fold
from l1grad import params as params_lib
from l1grad import penalty
from l1grad import plots
from l1grad import ptq
from l1grad import ranges as ranges_lib
from l1grad import report as report_lib
from l1grad import runs

__all__ = [
  "ACT_RANGE_METHODS",
  "DEFAULT_BITS",
  "KINDS",
  "Settings",
  "analyze",
  "analyze_run",
  "finite_difference_cosines",
  "pearson",
  "spearman",
]

Pair = tuple[int, int]

# Where the digits gaps open: 8:8 as the near-lossless reference, 4:4, 3:3,
# and 4-bit weights with 2-bit activations.
DEFAULT_BITS = "8:8,4:4,3:3,4:2"
# Which parts of z are quantized: (weights, activations).
KINDS: Mapping[str, tuple[bool, bool]] = {
  "weights": (True, False),
  "activations": (False, True),
  "both": (True, True),
}
ACT_RANGE_METHODS = ("bn", "calibrate", "dynamic")
SPLITS = ("test", "train")
JSON_FORMAT = "l1grad.analysis/1"


# ---------------------------------------------------------------------------
# Correlations over batches.
# ---------------------------------------------------------------------------


def _finite_pairs(
  x: Sequence[float], y: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | None:
  """The finite (x, y) pairs; None where no correlation is defined."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return None
  return x, y


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
  """Pearson correlation; NaN with fewer than 2 points or a constant series."""
  pairs = _finite_pairs(x, y)
  return float("nan") if pairs is None else float(stats.pearsonr(*pairs)[0])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman rank correlation (ties share their average rank).

  Robust to the few batches whose induced loss dominates a Pearson
  correlation (a batch holding one low-margin example).
  """
  pairs = _finite_pairs(x, y)
  return float("nan") if pairs is None else float(stats.spearmanr(*pairs)[0])


# ---------------------------------------------------------------------------
# Compiled per-batch functions.
# ---------------------------------------------------------------------------


class _Functions(NamedTuple):
  float_pass: Callable[..., Any]
  terms: Callable[..., Any]
  weight_hist: Callable[..., Any]


@functools.lru_cache(maxsize=8)
def _functions(
  model: nn.Module, per_channel: bool, dynamic: bool
) -> _Functions:
  """Jitted per-batch functions; bit-widths and kinds are traced arguments.

  Cached per architecture (linen modules hash by their fields), so two runs
  of one model compile once.
  """
  kwargs = dict(ranges_lib.EVAL_KWARGS)

  def float_pass(variables, batch):
    z = expansion.expansion_point(
      model, variables, batch["image"], apply_kwargs=kwargs
    )

    def loss_and_logits(z_):
      logits = expansion.apply_at(
        model, variables, z_, batch["image"], apply_kwargs=kwargs
      )
      return (
        expansion.cross_entropy(logits, batch["label"], batch["mask"]),
        logits,
      )

    (loss, logits), grad = jax.value_and_grad(loss_and_logits, has_aux=True)(z)
    mask = batch["mask"].astype(jnp.float32)
    out = {
      "loss": loss,
      "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
      "count": jnp.sum(mask),
      **expansion.gradient_norms(grad),
    }
    return out, logits

  def terms(
    variables, ranges, batch, float_logits, w_bits, a_bits, use_w, use_a
  ):
    z = expansion.expansion_point(
      model, variables, batch["image"], apply_kwargs=kwargs
    )
    noise = expansion.quantization_noise(
      model,
      variables,
      batch["image"],
      w_bits,
      a_bits,
      None if dynamic else ranges,
      weights=use_w,
      activations=use_a,
      per_channel=per_channel,
      apply_kwargs=kwargs,
    )
    loss_fn = functools.partial(
      expansion.loss_at, model, variables, apply_kwargs=kwargs
    )
    out = expansion.expansion_terms(loss_fn, z, noise.delta, noise.step, batch)
    mask = batch["mask"]
    out["kl"] = expansion.kl_divergence(float_logits, noise.logits, mask)
    out["correct"] = jnp.sum(
      (jnp.argmax(noise.logits, -1) == batch["label"])
      * mask.astype(jnp.float32)
    )
    # The directly quantized network's loss; equals perturbed_loss when the
    # noise tree reproduces PTQ (the reconstruction check).
    out["quantized_loss"] = expansion.cross_entropy(
      noise.logits, batch["label"], mask
    )
    hists = {
      k: expansion.noise_histogram(
        noise.delta["acts"][k], noise.step["acts"][k], mask=mask
      )
      for k in noise.delta["acts"]
    }
    return out, hists

  def weight_hist(variables, w_bits):
    kernels = expansion.weights_of(variables)
    _, delta, step = expansion.weight_noise(
      kernels, w_bits, per_channel=per_channel
    )
    return {k: expansion.noise_histogram(delta[k], step[k]) for k in kernels}

  return _Functions(jax.jit(float_pass), jax.jit(terms), jax.jit(weight_hist))


# ---------------------------------------------------------------------------
# Settings, one run, several runs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(runs.Settings):
  """What to analyse (the flags of ``analyze.py``).

  The fields of :class:`l1grad.runs.Settings` (bits, act_ranges, per_channel,
  fold, calib_batches, batch_size, num_std, step), where ``bits`` defaults to
  :data:`DEFAULT_BITS` (repeated pairs dropped) and ``act_ranges`` may also
  be ``"dynamic"`` (each batch's own min/max, as STE training does), and:

  Attributes:
    num_batches: Analyse only the first N batches of the split (None: all).
    split: ``"test"`` or ``"train"``.

  The batch size defaults to the run's evaluation batch size; the
  correlations are over batches, so smaller batches give more points.
  """

  ACT_RANGE_METHODS: ClassVar[tuple[str, ...]] = ACT_RANGE_METHODS
  JSON_FIELDS: ClassVar[tuple[str, ...]] = (
    "bits",
    "num_batches",
    "batch_size",
    "split",
    "act_ranges",
    "calib_batches",
    "per_channel",
    "fold",
    "step",
  )

  bits: tuple[Pair, ...] = tuple(bits_lib.parse_pairs(DEFAULT_BITS))
  num_batches: int | None = None
  split: str = "test"

  def __post_init__(self):
    pairs = tuple(dict.fromkeys(tuple(int(b) for b in p) for p in self.bits))
    object.__setattr__(self, "bits", pairs)
    if not pairs:
      raise errors.ConfigError(
        "No bit-width pairs given; use e.g. --bits 8:8,4:4."
      )
    super().__post_init__()
    if self.num_batches is not None and self.num_batches < 1:
      raise errors.ConfigError(
        f"--num_batches must be >= 1, got {self.num_batches}."
      )
    if self.split not in SPLITS:
      raise errors.ConfigError(
        f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}."
      )

  def ptq_settings(self) -> ptq.Settings:
    """The PTQ settings that load and prepare a run the same way."""
    # "dynamic" needs no fixed ranges, but prepare_run always computes some:
    # one calibration batch is the cheapest that works for every model.
    dynamic = self.act_ranges == "dynamic"
    return ptq.Settings(
      bits=self.bits,
      act_ranges="calibrate" if dynamic else self.act_ranges,
      per_channel=self.per_channel,
      fold=self.fold,
      calib_batches=1 if dynamic else self.calib_batches,
      batch_size=self.batch_size,
      num_std=self.num_std,
      step=self.step,
    )

  def describe_ranges(self) -> str:
    return {
      "bn": "from batch-norm parameters, Data-Free Quantization rule"
      f" [β ± {self.num_std:g}|γ|] (no data)",
      "calibrate": f"min/max of the float model over {self.calib_batches}"
      " training batches",
      "dynamic": "each batch's own min/max (per batch, padding included)",
    }[self.act_ranges]


def _summarize_kind(
  rows: Mapping[str, list[float]], counts: Sequence[float]
) -> dict[str, Any]:
  """Means over batches, correlations with the induced loss, errors.

  Means are weighted by each batch's example count (a padded last batch
  counts for its real examples), so they are means over examples, like
  ``ptq.json``'s KL; correlations treat every batch as one point.
  """
  counts = np.asarray(counts, np.float64)
  weights = counts / max(float(np.sum(counts)), 1.0)
  mean = lambda v: float(np.sum(weights * np.asarray(v, np.float64)))
  induced = np.asarray(rows["induced"], np.float64)
  mean_abs = mean(np.abs(induced))
  out: dict[str, Any] = {}
  for name in (
    "induced",
    "first_order",
    "second_order",
    "curvature",
    "bound",
    "kl",
  ):
    out[f"{name}_mean"] = runs.json_float(mean(rows[name]))
  for name in ("first_order", "second_order", "bound"):
    out[f"r_{name}"] = runs.json_float(pearson(induced, rows[name]))
    out[f"rho_{name}"] = runs.json_float(spearman(induced, rows[name]))
  for name in ("first_order", "second_order"):
    err = mean(np.abs(np.asarray(rows[name]) - induced))
    # Mean absolute error relative to the mean |induced loss|: 0 is exact,
    # 1 is as bad as predicting 0.
    out[f"rel_err_{name}"] = (
      runs.json_float(err / mean_abs) if mean_abs > 0 else None
    )
  out["bound_over_induced"] = (
    runs.json_float(mean(rows["bound"]) / mean_abs) if mean_abs > 0 else None
  )
  out["accuracy"] = runs.json_float(
    np.sum(rows["correct"]) / max(float(np.sum(counts)), 1.0)
  )
  out["reconstruction_error"] = runs.json_float(
    np.max(
      np.abs(
        np.asarray(rows["quantized_loss"]) - np.asarray(rows["perturbed_loss"])
      )
    )
  )
  return out


def _noise_summary(hist: Mapping[str, np.ndarray]) -> dict[str, Any]:
  n = max(float(hist["n"]), 1.0)
  mean = float(hist["sum"]) / n
  var = max(float(hist["sum_sq"]) / n - mean * mean, 0.0)
  return {
    "n": float(hist["n"]),
    "mean": mean,
    # A uniform [−½, ½] has std 1/√12 ≈ 0.289.
    "std": math.sqrt(var),
    "zero_fraction": float(hist["zeros"]) / n,
    "clipped_fraction": float(hist["clipped"]) / n,
    "max_abs": float(hist["max_abs"]),
    "counts": [float(c) for c in np.asarray(hist["counts"])],
  }


def _accumulate(
  total: dict[str, Any] | None, new: Mapping[str, Any]
) -> dict[str, Any]:
  new = {k: np.asarray(v, np.float64) for k, v in new.items()}
  if total is None:
    return new
  out = {k: total[k] + new[k] for k in total if k != "max_abs"}
  out["max_abs"] = np.maximum(total["max_abs"], new["max_abs"])
  return out


def analyze_run(
  workdir: str,
  settings: Settings = Settings(),
  *,
  label: str | None = None,
  progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Analyses one run: per batch, every bit-width and kind of perturbation.

  Args:
    workdir: A directory the trainer wrote.
    settings: What to analyse.
    label: The run's name in outputs (default: the workdir's base name).
    progress: Called with a line per bit-width (default: silent).

  Returns:
    The run's entry of ``analysis.json`` (see the README): run metadata,
    per-batch gradient norms, per pair and kind the per-batch terms and their
    summary, per-layer noise statistics (keyed by module path) and the
    training log.

  Raises:
    errors.UserError: No or unreadable checkpoint, unprepared data, BN
      ranges impossible for this model, empty data.
  """
  from l1grad import data  # pylint: disable=g-import-not-at-top

  say = progress or (lambda line: None)
  prepared = runs.prepare_run(workdir, settings.ptq_settings(), label=label)
  config = prepared.config
  dynamic = settings.act_ranges == "dynamic"
  fns = _functions(prepared.model, settings.per_channel, dynamic)
  batch_size = runs.eval_batch_size(config, settings)
  max_examples = (
    None if settings.num_batches is None else settings.num_batches * batch_size
  )
  batches = data.eval_batches(
    config.dataset,
    settings.split,
    global_batch_size=batch_size,
    data_dir=runs.data_dir(config),
    max_examples=max_examples,
    minival_examples=int(runs.config_value(config, "minival_examples", 0)),
  )
  variables = prepared.eval_variables
  ranges = None if dynamic else ranges_lib.range_tree(prepared.ranges)
  kind_args = {
    k: (jnp.asarray(w), jnp.asarray(a)) for k, (w, a) in KINDS.items()
  }

  # Weights-only results depend on the weight bits alone, activations-only
  # on the activation bits alone: each distinct case is computed once.
  def case(pair: Pair, kind: str) -> tuple[str, int | None, int | None]:
    use_w, use_a = KINDS[kind]
    return kind, pair[0] if use_w else None, pair[1] if use_a else None

  cases = list(dict.fromkeys(case(p, k) for p in settings.bits for k in KINDS))
  per_batch: dict[str, list[float]] = {}
  rows: dict[tuple[str, int | None, int | None], dict[str, list[float]]] = {
    c: {} for c in cases
  }
  act_hists: dict[Pair, dict[str, Any]] = {p: {} for p in settings.bits}
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    base, float_logits = fns.float_pass(variables, batch)
    for k, v in jax.device_get(base).items():
      per_batch.setdefault(k, []).append(float(v))
    for c in cases:
      kind, w, a = c
      # Unused bits are dummies (their part is not quantized).
      w_bits = jnp.asarray(w or 16, jnp.int32)
      a_bits = jnp.asarray(a or 16, jnp.int32)
      out, hists = fns.terms(
        variables, ranges, batch, float_logits, w_bits, a_bits, *kind_args[kind]
      )
      for k, v in jax.device_get(out).items():
        rows[c].setdefault(k, []).append(float(v))
      if kind == "both":  # the deployed network's activation noise
        for key, h in jax.device_get(hists).items():
          act_hists[(w, a)][key] = _accumulate(act_hists[(w, a)].get(key), h)
  if not per_batch:
    raise errors.UserError(
      f"No {settings.split} data to analyse for {workdir}; check the"
      " dataset and --num_batches."
    )
  count = float(np.sum(per_batch["count"]))

  fmt = report_lib.fmt
  pairs_out = []
  for pair in settings.bits:
    w_hist = jax.device_get(
      fns.weight_hist(variables, jnp.asarray(pair[0], jnp.int32))
    )
    kinds = {}
    for kind in KINDS:
      r = rows[case(pair, kind)]
      kinds[kind] = {
        "summary": _summarize_kind(r, per_batch["count"]),
        "per_batch": {
          k: [runs.json_float(v) for v in vs] for k, vs in r.items()
        },
      }
    both = kinds["both"]["summary"]
    say(
      f"  (W,A)=({pair[0]},{pair[1]}) accuracy"
      f" {100 * both['accuracy']:.2f} %, induced loss"
      f" {both['induced_mean']:.4g}, 1st order"
      f" {both['first_order_mean']:.4g} (r={fmt(both['r_first_order'])}),"
      f" 2nd order {both['second_order_mean']:.4g}"
      f" (r={fmt(both['r_second_order'])}), bound {both['bound_mean']:.4g}"
    )
    pairs_out.append(
      {
        "w_bits": pair[0],
        "a_bits": pair[1],
        "kinds": kinds,
        "noise": {
          "weights": {k: _noise_summary(h) for k, h in w_hist.items()},
          "acts": {k: _noise_summary(h) for k, h in act_hists[pair].items()},
        },
      }
    )

  shapes = jax.eval_shape(
    lambda v, x: expansion.expansion_point(prepared.model, v, x),
    variables,
    jax.ShapeDtypeStruct((1, *prepared.sample.shape[1:]), jnp.float32),
  )
  folded = (
    [params_lib.layer_name(p) for p in variables.pairs]
    if isinstance(variables, fold.FoldedVariables)
    else []
  )
  return {
    "run": prepared.label,
    "workdir": os.path.abspath(workdir),
    "step": prepared.step,
    "method": runs.method_label(config),
    "dataset": runs.config_value(config, "dataset", None),
    "model": runs.config_value(config, "model", type(prepared.model).__name__),
    "split": settings.split,
    "batch_size": batch_size,
    "num_batches": len(per_batch["count"]),
    "num_examples": int(count),
    "float_accuracy": float(np.sum(per_batch["correct"])) / max(count, 1.0),
    "folded_layers": folded,
    "act_ranges": settings.act_ranges,
    "activation_ranges": (
      None
      if dynamic
      else {k: [lo, hi] for k, (lo, hi) in prepared.ranges.items()}
    ),
    # Dimensions: ‖g‖₁ ≤ √n·‖g‖₂, the gap the paper's §2.3 is about.
    "num_weights": int(
      sum(math.prod(s.shape) for s in shapes["weights"].values())
    ),
    "num_acts_per_example": int(
      sum(math.prod(s.shape) for s in shapes["acts"].values())
    ),
    "per_batch": {
      k: [runs.json_float(v) for v in vs] for k, vs in per_batch.items()
    },
    "pairs": pairs_out,
    "training_log": runs.training_log(workdir, config),
  }


def analyze(
  workdirs: Sequence[str],
  settings: Settings = Settings(),
  *,
  out_dir: str | None = None,
  write: bool = True,
  plot: bool = True,
  progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
  """Analyses runs and writes ``analysis.json``, ``analysis.md`` and figures.

  Args:
    workdirs: Training run directories; several runs share the figures
      (e.g. unregularized and regularized, as the paper's Fig. 2).
    settings: What to analyse.
    out_dir: Where the outputs go (default: the first workdir).
    write: Write the files.
    plot: Also write the PNG figures.
    progress: Called with progress lines (default: silent).

  Returns:
    ``(report, files)``: the ``analysis.json`` content and ``{name: path}``
    of the files written.

  Raises:
    errors.UserError: Bad input (see :func:`analyze_run`).
  """
  if not workdirs:
    raise errors.ConfigError(
      "Pass at least one --workdir (a directory train.py wrote)."
    )
  say = progress or (lambda line: None)
  results = []
  for workdir, label in zip(workdirs, runs.run_labels(workdirs)):
    say(
      f"{label}: analysing {settings.split} batches at"
      f" {', '.join(bits_lib.format_pair(p) for p in settings.bits)}"
    )
    run = analyze_run(workdir, settings, label=label, progress=say)
    say(
      f"  {run['num_batches']} batches, {run['num_examples']} examples,"
      f" float accuracy {100 * run['float_accuracy']:.2f} %"
    )
    results.append(run)
  weights = (
    "symmetric, per output channel"
    if settings.per_channel
    else "symmetric, per tensor"
  )
  report = {
    "format": JSON_FORMAT,
    "settings": settings.to_json(),
    "conventions": {
      "batch_norm": (
        "folded into the preceding kernels (W are the folded"
        " kernels, as PTQ quantizes them)"
        if settings.fold
        else "not folded: unfolded kernels quantized, batch norm in float"
      ),
      "weights": weights + ", every Conv/Dense kernel",
      "activation_ranges": settings.describe_ranges(),
      "activation_noise": (
        "δ_A = Q(x') − x' recorded in the quantized"
        " network (upstream points already quantized),"
        " so L(z+δ) is the quantized network's loss"
      ),
      "loss": (
        "mean cross-entropy over a batch's unpadded examples, eval mode"
      ),
      "hist_range": [-expansion.HIST_LIMIT, expansion.HIST_LIMIT],
      "hist_bins": expansion.NUM_BINS,
      "kinds": {
        k: {"weights": w, "activations": a} for k, (w, a) in KINDS.items()
      },
    },
    "runs": results,
  }
  files: dict[str, str] = {}
  if write:
    files = report_lib.write_analysis(report, out_dir or workdirs[0], plot=plot)
  return report, files


# ---------------------------------------------------------------------------
# How well the finite-difference penalty gradient points (training mode).
# ---------------------------------------------------------------------------


def _penalty_coefs(config: Any, coef: Any) -> tuple[float, float]:
  """(λ_w, λ_a): ``coef`` (one number or a pair), else the run's, else 1."""
  if coef is not None:
    if isinstance(coef, (int, float)):
      return float(coef), float(coef)
    w, a = coef
    return float(w), float(a)
  reg = runs.config_value(config, "reg", None)
  kind = runs.config_value(reg, "kind", "none")
  w = float(runs.config_value(reg, "weight_coef", 0.0))
  a = float(runs.config_value(reg, "act_coef", -1.0))
  a = w if a == -1 else a  # -1: the paper's single λ
  if kind in ("l1", "l2") and (w or a):
    return w, a
  # A base model has no λ: the cosine depends only on λ_a/λ_w, and the
  # paper's single λ makes that 1.
  return 1.0, 1.0


def finite_difference_cosines(
  workdir: str,
  *,
  num_batches: int = 16,
  batch_size: int | None = None,
  split: str = "train",
  seed: int = 0,
  coef: float | tuple[float, float] | None = None,
  fd_step: float | None = None,
  minival_examples: int | None = None,
  data_dir: str | None = None,
  step: int | None = None,
  method: str = "finite_difference",
  reference: str = "hvp",
) -> dict[str, Any]:
  """Per batch, cos∠(finite-difference, exact) gradient of a run's penalty.

  The loss is the trainer's (:func:`l1grad.train.make_loss_fn`, batch norm
  in train mode on the batch's own statistics, the regularized variant), at
  the run's trained parameters and batch statistics, so each cosine compares
  the direction the regularized training step would add with
  ``reg.method=finite_difference`` to the exact one
  (:func:`l1grad.penalty.penalty_gradient_cosine`). A folded-STE run's
  activation ranges are computed outside the penalty, as the step does.
  The norm is the ℓ1 of the paper unless the run is ``reg.kind=l2``.

  Args:
    workdir: A directory the trainer wrote.
    num_batches: How many distinct batches.
    batch_size: Examples per batch; default the run's training batch size.
    split: ``"train"``: the first ``num_batches`` training batches of data
      seed ``seed``, augmented as in training; another split (``"test"``):
      its first full batches in order (a padded last batch is skipped, so
      fewer than ``num_batches`` may come back).
    seed: Data seed of ``"train"`` and the dropout key of each batch.
    coef: λ_w = λ_a, or a pair (λ_w, λ_a); default the run's
      ``reg.weight_coef``/``reg.act_coef`` when it is an l1/l2 run, else
      1.0. A common scale of λ_w and λ_a leaves the cosine unchanged; their
      ratio does not.
    fd_step: The probe distance; default the run's ``reg.fd_step``.
    minival_examples: Training examples held out as the minival split,
      passed to the input pipeline when non-zero; default the run's
      ``config.minival_examples`` (0 where it has none).
    data_dir: tfds data directory; default the run's.
    step: Checkpoint step; default the latest.
    method: The method measured (:data:`l1grad.penalty.METHODS`).
    reference: The method compared with.

  Returns:
    ``{"cosines", "norms", "reference_norms"}`` per batch (None where not
    finite), ``"median"``, ``"min"``, ``"max"`` over the finite cosines
    (None if none), ``"fd_step"``, ``"coef"`` (``{"weight_coef",
    "act_coef"}``), ``"num_batches"`` (batches measured), ``"batch_size"``,
    ``"split"``, ``"method"``, ``"reference"``, ``"step"``, ``"workdir"``.

  Raises:
    errors.UserError: No or unreadable checkpoint, a checkpoint that does
      not fit its config, unprepared data, bad arguments.
  """
  # Imported here, like analyze_run's: the trainer pulls in Orbax and the
  # input pipeline.
  # pylint: disable=g-import-not-at-top
  from l1grad import checkpoint
  from l1grad import data
  from l1grad import models
  from l1grad import qat
  from l1grad import train
  # pylint: enable=g-import-not-at-top

  if num_batches < 1:
    raise errors.ConfigError(f"num_batches must be >= 1, got {num_batches}.")
  for name, m in (("method", method), ("reference", reference)):
    if m not in penalty.METHODS:
      raise errors.ConfigError(
        f"{name} must be one of {penalty.METHODS}, got {m!r}."
      )
  run = checkpoint.load_run(workdir, step=step)
  config = run.config
  reg = runs.config_value(config, "reg", None)
  data_dir = data_dir or runs.data_dir(config)
  batch_size = batch_size or int(config.batch_size)
  if batch_size < 1:
    raise errors.ConfigError(f"batch_size must be >= 1, got {batch_size}.")
  if fd_step is None:
    fd_step = float(runs.config_value(reg, "fd_step", 1e-3))
  if minival_examples is None:
    minival_examples = int(runs.config_value(config, "minival_examples", 0))
  weight_coef, act_coef = _penalty_coefs(config, coef)

  info = data.get_info(config.dataset, data_dir=data_dir)
  model = models.from_config(config, info.num_classes)
  params = jax.tree.map(jnp.asarray, run.params)
  batch_stats = jax.tree.map(jnp.asarray, run.batch_stats or {})
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  runs.check_variables_match(
    model,
    variables,
    np.zeros((1, *info.image_shape), np.float32),
    where=f"The checkpoint in {workdir} (step {run.step})",
  )
  loss_fn = train.make_loss_fn(model, config, regularized=True)
  folded_ste = qat.from_config(model, config)

  @jax.jit
  def measure(params, batch_stats, images, labels, rng):
    extra = ()
    if folded_ste is not None:
      ste = folded_ste(images.shape[1:], images.dtype)
      extra = (ste.ranges(params, batch_stats),)
    return penalty.penalty_gradient_cosine(
      loss_fn,
      params,
      batch_stats,
      images,
      labels,
      rng,
      *extra,
      has_aux=True,
      weight_coef=weight_coef,
      act_coef=act_coef,
      method=method,
      reference=reference,
      fd_step=fd_step,
      points=runs.config_value(reg, "points", "layer_inputs"),
      act_norm=runs.config_value(reg, "act_norm", "none"),
      ord=2 if runs.config_value(reg, "kind", "none") == "l2" else 1,
    )

  # Passed only when set: the keyword is newer than the input pipeline's
  # other arguments.
  extra_data = (
    {"minival_examples": minival_examples} if minival_examples else {}
  )
  if split == "train":
    batches = data.train_batches(
      config.dataset,
      global_batch_size=batch_size,
      seed=seed,
      data_dir=data_dir,
      **extra_data,
    )
  else:
    batches = data.eval_batches(
      config.dataset,
      split,
      global_batch_size=batch_size,
      data_dir=data_dir,
      max_examples=num_batches * batch_size,
      **extra_data,
    )
  cosines, norms, ref_norms = [], [], []
  key = jax.random.key(seed)
  for batch in batches:
    if "mask" in batch and not np.all(batch["mask"]):
      continue  # padding would enter the batch statistics and the loss
    out = jax.device_get(
      measure(
        params,
        batch_stats,
        jnp.asarray(batch["image"]),
        jnp.asarray(batch["label"]),
        jax.random.fold_in(key, len(cosines)),
      )
    )
    cosines.append(float(out.cosine))
    norms.append(float(out.norm))
    ref_norms.append(float(out.reference_norm))
    if len(cosines) == num_batches:
      break  # "train" batches never end
  if not cosines:
    raise errors.UserError(
      f"No full {split} batch of {batch_size} examples for {workdir}; pass"
      " a smaller batch_size or split='train'."
    )
  finite = [c for c in cosines if math.isfinite(c)]
  stat = lambda f: runs.json_float(f(finite)) if finite else None
  return {
    "cosines": [runs.json_float(c) for c in cosines],
    "norms": [runs.json_float(n) for n in norms],
    "reference_norms": [runs.json_float(n) for n in ref_norms],
    "median": stat(np.median),
    "min": stat(min),
    "max": stat(max),
    "fd_step": fd_step,
    "coef": {"weight_coef": weight_coef, "act_coef": act_coef},
    "num_batches": len(cosines),
    "batch_size": batch_size,
    "split": split,
    "method": method,
    "reference": reference,
    "step": int(run.step),
    "workdir": os.path.abspath(workdir),
  }


# ---------------------------------------------------------------------------
# Names that moved, still importable from here.
# ---------------------------------------------------------------------------

# l1grad.expansion: the maths.
CLIP_TOLERANCE = expansion.CLIP_TOLERANCE
HIST_LIMIT = expansion.HIST_LIMIT
NUM_BINS = expansion.NUM_BINS
QuantNoise = expansion.QuantNoise
activation_step = expansion.activation_step
apply_at = expansion.apply_at
cross_entropy = expansion.cross_entropy
expansion_point = expansion.expansion_point
expansion_terms = expansion.expansion_terms
gradient_norms = expansion.gradient_norms
hvp = expansion.hvp
inner = expansion.inner
kl_divergence = expansion.kl_divergence
loss_at = expansion.loss_at
noise_histogram = expansion.noise_histogram
quantization_noise = expansion.quantization_noise
split_weights = expansion.split_weights
weight_noise = expansion.weight_noise
worst_case_bound = expansion.worst_case_bound
worst_case_perturbation = expansion.worst_case_perturbation
# l1grad.runs: reading a run.
training_log = runs.training_log
# l1grad.report and l1grad.plots: the outputs.
markdown = report_lib.analysis_markdown
write_outputs = report_lib.write_analysis
plot_all = plots.plot_analysis
plot_expansion = plots.plot_expansion
plot_noise = plots.plot_noise
plot_norms_and_kl = plots.plot_norms_and_kl
plot_training_log = plots.plot_training_log


if __name__ == "__main__":
  # `python -m l1grad.analysis` is analyze.py, the command beside train.py.
  import runpy  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  _script = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "analyze.py"
  )
  if not os.path.isfile(_script):
    print(
      f"error: python -m l1grad.analysis runs analyze.py of a source"
      f" checkout, and {_script} does not exist; run analyze.py from the"
      " repository instead.",
      file=sys.stderr,
    )
    sys.exit(2)
  sys.argv[0] = _script
  runpy.run_path(_script, run_name="__main__")
