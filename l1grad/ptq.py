"""Post-training quantization: one float checkpoint, every bit-width.

The paper's promise is "train once, quantize on the fly". This module is the
"on the fly" half: it takes trained float variables and evaluates them with
weights and activations fake-quantized at any (W, A) pair, the way a deployed
integer model would compute (DESIGN.md §2):

* batch norm folded into the preceding Conv/Dense kernel and bias
  (:func:`l1grad.quant.fold_batch_norm`); folded biases stay in float, like
  the int32 accumulators of an integer kernel;
* every kernel, first and last layer included, quantized symmetrically per
  tensor (or per output channel) by :func:`quantize_params`;
* activations fake-quantized at exactly the perturbation points of the
  penalty (inputs of every Conv/Dense but the first), through
  :func:`l1grad.perturb.quantized_activations`: the same interception and the
  same :func:`l1grad.quant.fake_quant`, so the regularizer and the quantizer
  see the same tensors;
* activation ranges from the batch-norm parameters by the Data-Free
  Quantization rule (:func:`bn_activation_ranges`) or calibrated on training
  batches (:func:`calibrated_activation_ranges`).

Bit-widths are traced values: :class:`Evaluator` compiles one function that
serves a whole sweep. :func:`evaluate` is what ``eval_ptq.py`` calls: it loads
each run's checkpoint, sweeps the bit-widths, and writes ``ptq.json``,
``ptq.md``, ``ptq.csv`` and ``ptq.png``.

Example::

  settings = ptq.Settings(bits=bits.parse_pairs("8:4,4:4"))
  report = ptq.evaluate(["runs/l1_seed0", "runs/none_seed0"], settings)
  print(report.markdown)
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.typing import ArrayLike

from l1grad import bits as bits_lib
from l1grad import errors
from l1grad import penalty
from l1grad import perturb
from l1grad import quant

__all__ = [
    "ACT_RANGE_METHODS",
    "COLLAPSE_FACTOR",
    "DEFAULT_BITS",
    "EVAL_KWARGS",
    "Evaluator",
    "PairStats",
    "PreparedRun",
    "Report",
    "RunResult",
    "Settings",
    "TableRow",
    "apply_model",
    "bn_activation_ranges",
    "cached_evaluator",
    "calibrated_activation_ranges",
    "check_variables_match",
    "column_name",
    "config_json",
    "eval_batch_size",
    "evaluate",
    "evaluate_prepared",
    "is_collapsed",
    "kernel_scale",
    "markdown_table",
    "method_label",
    "parse_group_by",
    "plot_results",
    "prepare_run",
    "prepare_variables",
    "quantize_params",
    "quantize_variables",
    "quantized_apply",
    "range_tree",
    "results_csv",
    "summarize",
    "sweep",
    "write_report",
]

PyTree = Any
Pair = tuple[int, int]
Ranges = dict[str, tuple[float, float]]
# Variables as evaluated: folded (the default) or the plain variables dict.
EvalVariables = Any

ACT_RANGE_METHODS = ("bn", "calibrate")
# The paper's columns ((8,4), (6,4), (4,4) on CIFAR-10; (8,8), (6,6), (4,4) on
# ImageNet), 16:16 as a check that quantization itself is lossless, and 3:3 and
# 8:2 where the gaps open on digits (DESIGN.md §1).
DEFAULT_BITS = "16:16,8:8,8:4,6:6,6:4,4:4,3:3,8:2"
# Evaluation-mode arguments of every l1grad model's apply.
EVAL_KWARGS: Mapping[str, Any] = {"train": False}
# Data-Free Quantization: a BN output channel lies in β ± 6|γ|.
DFQ_NUM_STD = 6.0
# Marks a table cell where an STE run's own training grid beat re-quantizing.
OWN_GRID_MARK = "†"
# A run whose float accuracy is at most this multiple of chance (1/classes) is
# flagged as collapsed: a (nearly) constant predictor, e.g. a too-large λ
# (DESIGN.md §1). Flagged in every table, never dropped from a mean.
COLLAPSE_FACTOR = 2.0
COLLAPSE_MARK = "collapsed"
JSON_FORMAT = "l1grad.ptq/1"


# ---------------------------------------------------------------------------
# Quantized forward pass.
# ---------------------------------------------------------------------------


# The weight quantizer lives in l1grad.quant (training's STE uses it too).
quantize_params = quant.quantize_kernels
kernel_scale = quant.kernel_scale


def quantize_variables(
    variables: EvalVariables, bits: ArrayLike, *, per_channel: bool = False
) -> EvalVariables:
  """:func:`quantize_params` applied to folded or plain variables."""
  if isinstance(variables, quant.FoldedVariables):
    return variables.replace(
        params=quantize_params(variables.params, bits, per_channel=per_channel))
  return {**variables,
          "params": quantize_params(variables["params"], bits, per_channel=per_channel)}


def apply_model(
    model: nn.Module,
    variables: EvalVariables,
    images: ArrayLike,
    apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> jax.Array:
  """Runs ``model`` in evaluation mode on folded or plain variables."""
  if isinstance(variables, quant.FoldedVariables):
    return quant.folded_apply(model, variables, images, **apply_kwargs)
  return model.apply(variables, images, **apply_kwargs)


def quantized_apply(
    model: nn.Module,
    variables: EvalVariables,
    ranges: Mapping[str, tuple[ArrayLike, ArrayLike]],
    a_bits: ArrayLike,
    images: ArrayLike,
    apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> jax.Array:
  """Runs ``model`` with its activations fake-quantized at ``a_bits``.

  The weights are used as given: quantize them first with
  :func:`quantize_variables` (the sweep does, inside its jitted function), or
  pass dequantized integer weights (the exported model does). Both paths call
  this one function, which is why the export reproduces the sweep's logits.

  Args:
    model: The linen model.
    variables: Folded (:class:`l1grad.quant.FoldedVariables`) or plain.
    ranges: ``{point key: (low, high)}`` for every perturbation point.
    a_bits: Activation bit-width (may be traced).
    images: A batch of inputs.
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    The logits.
  """
  with perturb.quantized_activations(a_bits, ranges):
    return apply_model(model, variables, images, apply_kwargs)


def range_tree(ranges: Mapping[str, tuple[float, float]]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Activation ranges as the float32 pytree the jitted functions take."""
  # float32 arrays: a stable pytree of fixed dtype, so new range values never
  # retrace, and the same float32 values whichever caller converts them.
  return {k: (jnp.float32(lo), jnp.float32(hi)) for k, (lo, hi) in ranges.items()}


class PairStats(NamedTuple):
  """Accuracy and predictive-distribution shift of one evaluation.

  Attributes:
    accuracy: Fraction of correctly classified test examples.
    kl: Mean over test examples of KL(p_float ‖ p_quant) in nats.
    correct: Number of correctly classified examples.
    count: Number of (unpadded) examples evaluated.
  """

  accuracy: float
  kl: float
  correct: int
  count: int


def kl_per_example(float_logits: ArrayLike, logits: ArrayLike) -> jax.Array:
  """KL(p_float ‖ p) per example, in nats, from the two models' logits."""
  log_pf = jax.nn.log_softmax(jnp.asarray(float_logits, jnp.float32))
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
  return jnp.sum(jnp.exp(log_pf) * (log_pf - log_p), axis=-1)


def _masked_stats(
    logits: jax.Array, float_logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Sum over unpadded examples of correct predictions and KL(p_float ‖ p)."""
  mask = mask.astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  return correct, jnp.sum(kl_per_example(float_logits, logits) * mask)


class Evaluator:
  """Compiled float and fake-quantized evaluation of one model architecture.

  All functions are jitted once per input shape; bit-widths, ranges and
  variables are traced arguments, so a sweep over any number of (W, A) pairs
  compiles :attr:`quantized_stats` once.

  Attributes:
    model: The linen model.
    per_channel: Per-output-channel weight scales.
    float_stats: ``(variables, images, labels, mask) -> (logits, correct)``.
    quantized_stats: ``(variables, ranges, w_bits, a_bits, images, labels,
      mask, float_logits) -> (correct, kl_sum)``: the sweep's function.
    quantized_logits: ``(variables, ranges, w_bits, a_bits, images) ->
      logits``, for inspection and for checking exports.
  """

  def __init__(
      self,
      model: nn.Module,
      *,
      per_channel: bool = False,
      apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
      max_traces: int | None = None,
  ):
    """Builds the jitted functions.

    Args:
      model: The linen model.
      per_channel: Per-output-channel weight scales.
      apply_kwargs: Evaluation-mode arguments of ``model.apply``.
      max_traces: If set, :attr:`quantized_stats` raises when traced more
        often (``chex.assert_max_traces``): a guard against a sweep that
        recompiles per bit-width.
    """
    self.model = model
    self.per_channel = per_channel
    apply_kwargs = dict(apply_kwargs)

    def logits_fn(variables, ranges, w_bits, a_bits, images):
      qvars = quantize_variables(variables, w_bits, per_channel=per_channel)
      return quantized_apply(model, qvars, ranges, a_bits, images, apply_kwargs)

    def quantized_stats(variables, ranges, w_bits, a_bits, images, labels, mask,
                        float_logits):
      logits = logits_fn(variables, ranges, w_bits, a_bits, images)
      return _masked_stats(logits, float_logits, labels, mask)

    def float_stats(variables, images, labels, mask):
      logits = apply_model(model, variables, images, apply_kwargs)
      correct, _ = _masked_stats(logits, logits, labels, mask)
      return logits, correct

    if max_traces is not None:
      quantized_stats = chex.assert_max_traces(quantized_stats, n=max_traces)
    self.quantized_stats = jax.jit(quantized_stats)
    self.quantized_logits = jax.jit(logits_fn)
    self.float_stats = jax.jit(float_stats)


@functools.lru_cache(maxsize=8)
def cached_evaluator(model: nn.Module, per_channel: bool) -> Evaluator:
  """The :class:`Evaluator` of an architecture, shared by every caller."""
  # Linen modules hash by their fields: runs of one architecture share the
  # compiled functions (two workdirs of one sweep compile once).
  return Evaluator(model, per_channel=per_channel)


def _bits_array(b: int) -> jax.Array:
  # One dtype for every call: a Python int would be weakly typed, an int64
  # under x64; either could change the cache key and retrace.
  return jnp.asarray(b, jnp.int32)


def sweep(
    evaluator: Evaluator,
    variables: EvalVariables,
    ranges: Mapping[str, tuple[float, float]],
    pairs: Sequence[Pair],
    batches: Iterable[Mapping[str, np.ndarray]],
) -> tuple[PairStats, dict[Pair, PairStats]]:
  """Evaluates the float model and every (W, A) pair in one pass over the data.

  The data is read once (batches outer, pairs inner), which matters where
  decoding images costs more than a forward pass.

  Args:
    evaluator: The compiled functions for the model.
    variables: Float variables as evaluated (folded or plain).
    ranges: Activation ranges ``{key: (low, high)}``.
    pairs: (weight bits, activation bits) pairs.
    batches: ``{"image", "label", "mask"}`` batches (padded and masked).

  Returns:
    ``(float_stats, {pair: stats})``; the float row's KL is 0.
  """
  pairs = list(dict.fromkeys(tuple(p) for p in pairs))
  ranges_arg = range_tree(ranges)
  bit_args = {p: (_bits_array(p[0]), _bits_array(p[1])) for p in pairs}
  float_correct = jnp.float32(0)
  correct = {p: jnp.float32(0) for p in pairs}
  kl = {p: jnp.float32(0) for p in pairs}
  count = 0
  for batch in batches:
    images = jnp.asarray(batch["image"])
    labels = jnp.asarray(batch["label"])
    mask = jnp.asarray(batch["mask"])
    count += int(np.sum(batch["mask"]))
    float_logits, c = evaluator.float_stats(variables, images, labels, mask)
    float_correct = float_correct + c
    for p in pairs:
      w, a = bit_args[p]
      c, k = evaluator.quantized_stats(variables, ranges_arg, w, a, images, labels,
                                       mask, float_logits)
      correct[p] = correct[p] + c
      kl[p] = kl[p] + k
  if count == 0:
    raise errors.UserError("The evaluation data is empty; check the dataset and --max_examples.")

  def stats(c: jax.Array, k: jax.Array) -> PairStats:
    c = int(round(float(c)))
    return PairStats(c / count, max(float(k), 0.0) / count, c, count)

  return stats(float_correct, jnp.float32(0)), {p: stats(correct[p], kl[p]) for p in pairs}


# ---------------------------------------------------------------------------
# Activation ranges.
# ---------------------------------------------------------------------------


def _feature_shape(module: nn.BatchNorm, ndim: int) -> tuple[int, ...]:
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  return tuple(sorted(a % ndim for a in axes))


def _bn_bound_interceptor(sign: jax.Array, num_std: float) -> Callable[..., Any]:
  """Replaces every BatchNorm output by β + sign·num_std·|γ| per channel."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.BatchNorm):
      return next_fun(*args, **kwargs)
    # Run the BN anyway: its variables are read and its output shape and dtype
    # are the real ones; only the values are replaced.
    y = next_fun(*args, **kwargs)
    params = module.variables.get("params", {})
    axes = _feature_shape(module, y.ndim)
    feature_shape = tuple(y.shape[a] for a in axes)
    gamma = jnp.abs(jnp.asarray(params.get("scale", jnp.ones(feature_shape)), jnp.float32))
    beta = jnp.asarray(params.get("bias", jnp.zeros(feature_shape)), jnp.float32)
    bound = beta + sign * num_std * gamma
    shape = [1] * y.ndim
    for a in axes:
      shape[a] = y.shape[a]
    return jnp.broadcast_to(bound.reshape(shape), y.shape).astype(y.dtype)

  return interceptor


def _poison_layer_outputs(poison: jax.Array) -> Callable[..., Any]:
  """Replaces every Conv/Dense output by ``poison`` (±inf)."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, perturb.LAYER_TYPES):
      return jnp.full_like(y, poison)
    return y

  return interceptor


def _bound_pass_fn(
    model: nn.Module, example_shape: tuple[int, ...], dtype: Any,
    apply_kwargs: Mapping[str, Any], num_std: float,
) -> Callable[[PyTree, jax.Array, jax.Array], dict[str, jax.Array]]:
  """One forward pass with BN outputs at a bound and everything else poisoned."""
  apply_kwargs = dict(apply_kwargs)

  def run(variables, poison, sign):
    image = jnp.full((1, *example_shape), poison, dtype)
    points: dict[str, jax.Array] = {}

    def record(key: str, x: jax.Array) -> jax.Array:
      points[key] = x
      return x

    with nn.intercept_methods(_bn_bound_interceptor(sign, num_std)), \
        nn.intercept_methods(_poison_layer_outputs(poison)), \
        perturb.transform_layer_inputs(record):
      model.apply(variables, image, **apply_kwargs)
    return points

  return jax.jit(run)


def bn_activation_ranges(
    model: nn.Module,
    variables: Mapping[str, Any],
    sample: ArrayLike,
    *,
    num_std: float = DFQ_NUM_STD,
    apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> Ranges:
  """Activation ranges from batch-norm parameters (Data-Free Quantization).

  The rule (Nagel et al., 2019; DESIGN.md §2): a BN output channel lies in
  ``[β - 6|γ|, β + 6|γ|]``; after a ReLU the lower bound is clamped at 0;
  where branches are summed the bounds add; the range of a tensor is the min
  of its lower and the max of its upper bounds over channels (and positions).

  Generic, for any linen model and without model edits: every op between a
  BN output and the next Conv/Dense input in these models (ReLU, add,
  max/average pooling, reshape) is monotone non-decreasing, so the model
  itself propagates the bounds. The unfolded model is run in evaluation mode
  with every BatchNorm output replaced by its per-channel upper bound (resp.
  lower bound); the value arriving at each perturbation point is then its
  upper (lower) bound, per element: ReLU clamps, residual sums add bounds
  per channel (which is at least as tight as adding the per-tensor bounds),
  pooling and flattening keep them.

  A point whose value depends on anything else than BN outputs (the image,
  or a Conv/Dense output not followed by a BN, e.g. Dense(bias) → ReLU →
  Dense) has no BN-derived range. Such points are detected by poisoning: the
  image and every Conv/Dense output are set to +inf in one pass and -inf in
  another; a point that differs between them is not BN-derived. (The check
  cannot prove monotonicity of arbitrary ops: a model that subtracts or
  negates BN outputs before a layer needs ``calibrate``.)

  Args:
    model: The linen model.
    variables: Its unfolded variables (``params`` with BN ``scale``/``bias``).
    sample: An input batch (only its per-example shape and dtype are used).
    num_std: The 6 of the rule.
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    ``{point key: (low, high)}`` as Python floats (exact float32 values).

  Raises:
    errors.UserError: A perturbation point is not downstream of batch norms
      only; the message says to use ``--act_ranges calibrate``.
  """
  sample = jnp.asarray(sample)
  run = _bound_pass_fn(model, tuple(sample.shape[1:]), sample.dtype, apply_kwargs,
                       float(num_std))
  inf = jnp.float32(np.inf)
  upper = [jax.device_get(run(variables, p, jnp.float32(1))) for p in (inf, -inf)]
  lower = [jax.device_get(run(variables, p, jnp.float32(-1))) for p in (inf, -inf)]
  ranges: Ranges = {}
  bad = []
  for key in upper[0]:
    hi_a, hi_b = (np.asarray(u[key], np.float32) for u in upper)
    lo_a, lo_b = (np.asarray(l[key], np.float32) for l in lower)
    derived = (np.array_equal(hi_a, hi_b) and np.array_equal(lo_a, lo_b)
               and np.all(np.isfinite(hi_a)) and np.all(np.isfinite(lo_a)))
    if not derived:
      bad.append(key)
      continue
    ranges[key] = (float(np.min(lo_a)), float(np.max(hi_a)))
  if bad:
    raise errors.UserError(
        "Activation ranges from batch norm (--act_ranges bn, the Data-Free"
        " Quantization rule) need every quantized activation to be computed"
        " from batch-norm outputs through ReLU, sums, pooling or reshapes only;"
        f" the input of {', '.join(repr(k) for k in bad)} is not (it depends on"
        " the image or on a Conv/Dense without a batch norm after it). Use"
        " --act_ranges calibrate, which measures the ranges on training batches.")
  return ranges


def calibrated_activation_ranges(
    model: nn.Module,
    variables: EvalVariables,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> Ranges:
  """Activation ranges as the min/max of the float model on some batches.

  Args:
    model: The linen model.
    variables: Float variables as evaluated (folded or plain).
    batches: ``{"image", "mask"}`` batches (training data; padding masked).
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    ``{point key: (low, high)}`` as Python floats.

  Raises:
    errors.UserError: No batches.
  """
  apply_kwargs = dict(apply_kwargs)

  @jax.jit
  def minmax(variables, images, mask):
    out = {}

    def record(key: str, x: jax.Array) -> jax.Array:
      xf = x.astype(jnp.float32)
      if x.ndim and x.shape[0] == mask.shape[0]:
        m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        out[key] = (jnp.min(jnp.where(m, xf, jnp.inf)), jnp.max(jnp.where(m, xf, -jnp.inf)))
      else:
        out[key] = (jnp.min(xf), jnp.max(xf))
      return x

    with perturb.transform_layer_inputs(record):
      apply_model(model, variables, images, apply_kwargs)
    return out

  low: dict[str, float] = {}
  high: dict[str, float] = {}
  for batch in batches:
    for key, (lo, hi) in jax.device_get(
        minmax(variables, jnp.asarray(batch["image"]), jnp.asarray(batch["mask"]))).items():
      low[key] = min(low.get(key, np.inf), float(lo))
      high[key] = max(high.get(key, -np.inf), float(hi))
  if not low:
    raise errors.UserError("No calibration batches; use --calib_batches of at least 1.")
  return {k: (low[k], high[k]) for k in low}


# ---------------------------------------------------------------------------
# One run: settings, preparation, evaluation.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to quantize and evaluate (the flags of ``eval_ptq.py``).

  Attributes:
    bits: (weight bits, activation bits) pairs, in table column order.
    act_ranges: ``"bn"`` (Data-Free Quantization rule) or ``"calibrate"``.
    per_channel: Per-output-channel weight scales (default per tensor, the
      paper's setting).
    fold: Fold batch norm into the preceding kernel before quantizing (what a
      deployed integer model does); False quantizes the unfolded kernels and
      keeps batch norm in float.
    calib_batches: Training batches for ``calibrate``.
    max_examples: Evaluate on the first examples of the test split only.
    batch_size: Evaluation batch size; None takes the run's config.
    num_std: The 6 of the Data-Free Quantization rule.
    step: Checkpoint step to load; None takes the latest.
  """

  bits: tuple[Pair, ...] = tuple(bits_lib.parse_pairs(DEFAULT_BITS))
  act_ranges: str = "bn"
  per_channel: bool = False
  fold: bool = True
  calib_batches: int = 8
  max_examples: int | None = None
  batch_size: int | None = None
  num_std: float = DFQ_NUM_STD
  step: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "bits", tuple(tuple(p) for p in self.bits))
    for w, a in self.bits:
      bits_lib.check_bits(w, "weight bits")
      bits_lib.check_bits(a, "activation bits")
    if self.act_ranges not in ACT_RANGE_METHODS:
      raise errors.ConfigError(
          f"--act_ranges must be one of {', '.join(ACT_RANGE_METHODS)}, got"
          f" {self.act_ranges!r}.")
    if self.calib_batches < 1:
      raise errors.ConfigError(f"--calib_batches must be >= 1, got {self.calib_batches}.")
    if self.max_examples is not None and self.max_examples < 1:
      raise errors.ConfigError(f"--max_examples must be >= 1, got {self.max_examples}.")
    if self.batch_size is not None and self.batch_size < 1:
      raise errors.ConfigError(f"The batch size must be >= 1, got {self.batch_size}.")

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["bits"] = [bits_lib.format_pair(p) for p in self.bits]
    return d


def method_label(config: Any) -> str:
  """A readable method name from a run's config, e.g. ``"l1 λ=0.05"``.

  ``"none"``; ``"l1 λ=…"`` / ``"l2 λ=…"`` (``λw=… λa=…`` when the two
  coefficients differ; ``act_coef == -1`` means the same as
  ``weight_coef``); ``"dq β=…"`` (β is ``reg.weight_coef``); ``"ste 4:4"``
  for quantization-aware training; combined with ``+`` when both are set.
  """
  reg = _get(config, "reg", {})
  kind = str(_get(reg, "kind", "none") or "none")
  w = _get(reg, "weight_coef", 0.0)
  a = _get(reg, "act_coef", -1.0)
  a = w if a == -1 else a  # -1: the paper's single λ
  if kind in ("l1", "l2"):
    coef = f"λ={w:g}" if w == a else f"λw={w:g} λa={a:g}"
    label = f"{kind} {coef}"
  elif kind == "dq":
    label = f"dq β={_get(reg, 'beta', w):g}"
  else:
    label = kind
  qat = _qat_bits(config)
  if qat is not None:
    ste = f"ste {bits_lib.format_pair(qat)}"
    label = ste if kind == "none" else f"{ste} + {label}"
  return label


def _get(obj: Any, name: str, default: Any) -> Any:
  if obj is None:
    return default
  if isinstance(obj, Mapping):
    return obj.get(name, default)
  return getattr(obj, name, default)


def _qat_bits(config: Any) -> Pair | None:
  text = _get(_get(config, "qat", None), "bits", "")
  return bits_lib.parse_pair(text) if text else None


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


def check_variables_match(
    model: nn.Module, variables: Mapping[str, Any], sample: ArrayLike, *,
    where: str = "the checkpoint",
    apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> None:
  """Raises :class:`l1grad.errors.CheckpointError` unless ``variables`` fit ``model``.

  Compares names and shapes with ``model.init`` traced under
  :func:`jax.eval_shape` (nothing is computed).
  """
  expected = jax.eval_shape(
      functools.partial(model.init, **dict(apply_kwargs)), jax.random.key(0),
      jnp.asarray(sample))
  problems = []
  for collection in sorted(set(expected) | set(variables)):
    want = _shapes(expected.get(collection, {}))
    have = _shapes(variables.get(collection, {}) or {})
    for k in sorted(set(want) - set(have)):
      problems.append(f"missing {collection}{k} {want[k]}")
    for k in sorted(set(have) - set(want)):
      problems.append(f"unexpected {collection}{k} {have[k]}")
    for k in sorted(set(want) & set(have)):
      if want[k] != have[k]:
        problems.append(f"{collection}{k} has shape {have[k]}, the model wants {want[k]}")
  if problems:
    more = len(problems) - 6
    shown = "; ".join(problems[:6]) + (f"; and {more} more" if more > 0 else "")
    raise errors.CheckpointError(
        f"{where} does not match the model built from its config"
        f" ({type(model).__name__}): {shown}. The config was probably changed after"
        " training, or the checkpoint comes from another run: restore the config"
        " the run was trained with, or evaluate the workdir that holds its checkpoint.")


def prepare_variables(
    model: nn.Module, variables: Mapping[str, Any], sample: ArrayLike, *, fold: bool = True,
    apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> EvalVariables:
  """Folds batch norm into the preceding kernels (``fold=True``) or not."""
  variables = {k: v for k, v in variables.items() if v}
  if not fold:
    return variables
  pairs = quant.find_conv_bn_pairs(model, variables, jnp.asarray(sample), **dict(apply_kwargs))
  return quant.fold_batch_norm(variables, pairs)


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
    eval_variables: Variables as evaluated (folded unless ``--no_fold``).
    ranges: Activation ranges ``{key: (low, high)}``.
    act_ranges: How the ranges were obtained (``"bn"``/``"calibrate"``).
    sample: One input batch (shape and dtype of the model input).
  """

  label: str
  workdir: str
  step: int
  config: Any
  model: nn.Module
  variables: dict[str, Any]
  eval_variables: EvalVariables
  ranges: Ranges
  act_ranges: str
  sample: np.ndarray


def eval_batch_size(config: Any, settings: Settings) -> int:
  """The evaluation batch size: the setting, else the config's (-1: batch_size)."""
  if settings.batch_size is not None:
    return settings.batch_size
  size = int(_get(config, "eval_batch_size", -1))
  return size if size > 0 else int(_get(config, "batch_size", 256))


def _data_dir(config: Any) -> str | None:
  return _get(config, "data_dir", "") or None


def prepare_run(workdir: str, settings: Settings, *, label: str | None = None) -> PreparedRun:
  """Loads a run's checkpoint and config and prepares it for quantization.

  Args:
    workdir: A directory the trainer wrote.
    settings: Evaluation settings.
    label: Name in tables; default the workdir's base name.

  Returns:
    The prepared run.

  Raises:
    errors.UserError: No/corrupt checkpoint, a config/checkpoint mismatch,
      unprepared data, or BN ranges impossible for this model.
  """
  if not os.path.isdir(workdir):
    raise errors.CheckpointError(
        f"Workdir {workdir!r} does not exist. Pass the --workdir a training run"
        " wrote (python train.py --config configs/digits.py --workdir DIR).")
  # Imported here: the trainer pulls in optax and Orbax, which the quantizer
  # itself does not need.
  from l1grad import checkpoint  # pylint: disable=g-import-not-at-top
  from l1grad import data  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  run = checkpoint.load_run(workdir, step=settings.step)
  config = run.config
  info = data.get_info(config.dataset, data_dir=_data_dir(config))
  model = train.create_model(config, info.num_classes)
  sample = np.zeros((1, *info.image_shape), np.float32)
  variables = {"params": run.params}
  if run.batch_stats:
    variables["batch_stats"] = run.batch_stats
  check_variables_match(model, variables, sample,
                        where=f"The checkpoint in {workdir} (step {run.step})")
  eval_variables = prepare_variables(model, variables, sample, fold=settings.fold)
  if settings.act_ranges == "bn":
    ranges = bn_activation_ranges(model, variables, sample, num_std=settings.num_std)
  else:
    batch_size = eval_batch_size(config, settings)
    batches = data.eval_batches(
        config.dataset, "train", global_batch_size=batch_size, data_dir=_data_dir(config),
        max_examples=settings.calib_batches * batch_size)
    ranges = calibrated_activation_ranges(model, eval_variables, batches)
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


@dataclasses.dataclass
class RunResult:
  """A run's evaluation: its metadata and its per-pair results.

  Attributes:
    info: Metadata for ``ptq.json``'s ``runs`` list (run, workdir, step, seed,
      method, config, activation ranges, ...).
    results: Entries of ``ptq.json``'s ``results`` list: the float row first
      (``w_bits``/``a_bits`` None), then one per requested pair.
  """

  info: dict[str, Any]
  results: list[dict[str, Any]]


def _own_grid(pair: Pair, trained: Pair | None) -> Pair | None:
  """The STE run's own grid at a wider pair: its training width per component."""
  if trained is None:
    return None
  own = (min(pair[0], trained[0]), min(pair[1], trained[1]))
  return None if own == tuple(pair) else own


def _result(run: str, method: str, seed: Any, step: int, pair: Pair | None,
            stats: PairStats) -> dict[str, Any]:
  return {
      "run": run,
      "method": method,
      "seed": seed,
      "step": step,
      "w_bits": None if pair is None else pair[0],
      "a_bits": None if pair is None else pair[1],
      "accuracy": stats.accuracy,
      "kl": stats.kl,
      "correct": stats.correct,
      "count": stats.count,
  }


def is_collapsed(float_accuracy: float, num_classes: int | None) -> bool:
  """Whether a float accuracy is near chance (≤ ``COLLAPSE_FACTOR``/classes).

  A network that predicts (nearly) one class has zero gradient and stays
  there: the signature of a too-large penalty. ``num_classes`` None (unknown)
  never flags.
  """
  if not num_classes:
    return False
  return float_accuracy <= COLLAPSE_FACTOR / num_classes


def config_json(config: Any) -> Any:
  """A config as plain JSON data (ConfigDict or mapping)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def evaluate_prepared(
    prepared: PreparedRun,
    settings: Settings,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    evaluator: Evaluator | None = None,
) -> RunResult:
  """Sweeps a prepared run over ``settings.bits`` on ``batches``.

  STE runs (``config.qat.bits`` set) at a pair wider than their training
  width are evaluated both ways, their own grid kept (quantized at the
  training width, which a wider integer grid represents exactly by ignoring
  the extra bits) and re-quantized at the wider grid, and the better is
  reported with ``"ste_grid": "own"|"requantized"`` (paper §4.1; a tie keeps
  the own grid, as the paper only reports re-quantization when it is better).

  Args:
    prepared: From :func:`prepare_run` (or built directly).
    settings: Evaluation settings.
    batches: Test batches.
    evaluator: Compiled functions; default one cached per architecture.

  Returns:
    The run's metadata and results.
  """
  evaluator = evaluator or cached_evaluator(prepared.model, settings.per_channel)
  trained = _qat_bits(prepared.config)
  requested = list(settings.bits)
  own = {p: _own_grid(p, trained) for p in requested}
  to_eval = requested + [o for o in own.values() if o is not None]
  float_stats, stats = sweep(evaluator, prepared.eval_variables, prepared.ranges,
                             to_eval, batches)
  method = method_label(prepared.config)
  seed = _get(prepared.config, "seed", None)
  row = functools.partial(_result, prepared.label, method, seed, prepared.step)
  results = [row(None, float_stats)]
  for pair in requested:
    entry = row(pair, stats[pair])
    if trained is not None:
      entry["ste_grid"] = None
      own_pair = own[pair]
      if own_pair is not None:
        own_s, req_s = stats[own_pair], stats[pair]
        use_own = own_s.accuracy >= req_s.accuracy
        entry.update(row(pair, own_s if use_own else req_s))
        entry["ste_grid"] = "own" if use_own else "requantized"
        entry["ste_alternatives"] = {
            "own": {"w_bits": own_pair[0], "a_bits": own_pair[1],
                    "accuracy": own_s.accuracy, "kl": own_s.kl},
            "requantized": {"w_bits": pair[0], "a_bits": pair[1],
                            "accuracy": req_s.accuracy, "kl": req_s.kl},
        }
    results.append(entry)
  num_classes = _get(prepared.model, "num_classes", None)
  chance = 1.0 / num_classes if num_classes else None
  collapsed = is_collapsed(float_stats.accuracy, num_classes)
  for entry in results:
    entry["collapsed"] = collapsed
  info = {
      "run": prepared.label,
      "workdir": os.path.abspath(prepared.workdir),
      "step": prepared.step,
      "seed": seed,
      "method": method,
      "qat_bits": None if trained is None else bits_lib.format_pair(trained),
      "model": _get(prepared.config, "model", type(prepared.model).__name__),
      "dataset": _get(prepared.config, "dataset", None),
      "num_examples": float_stats.count,
      "float_accuracy": float_stats.accuracy,
      "chance_accuracy": chance,
      "collapsed": collapsed,
      "act_ranges": prepared.act_ranges,
      "activation_ranges": {k: [lo, hi] for k, (lo, hi) in prepared.ranges.items()},
      "folded_layers": (["/".join(p) for p in prepared.eval_variables.pairs]
                        if isinstance(prepared.eval_variables, quant.FoldedVariables) else []),
      "config": config_json(prepared.config),
  }
  return RunResult(info, results)


# ---------------------------------------------------------------------------
# Reports: JSON, Markdown, CSV, plot.
# ---------------------------------------------------------------------------

GROUP_BY = ("run", "method")
GroupBy = str | tuple[str, ...]


def parse_group_by(spec: str | Sequence[str]) -> GroupBy:
  """``"run"``, ``"method"``, or config fields (``"reg.kind,reg.weight_coef"``).

  Args:
    spec: A keyword, a comma-separated list of dotted config fields, or a
      sequence of such fields.

  Returns:
    The keyword, or a tuple of dotted field names.

  Raises:
    errors.ConfigError: an empty spec or an empty field name.
  """
  if isinstance(spec, str):
    if spec in GROUP_BY:
      return spec
    fields = tuple(f.strip() for f in spec.split(","))
  else:
    fields = tuple(str(f).strip() for f in spec)
  if not fields or any(not f for f in fields):
    raise errors.ConfigError(
        f"--group_by must be 'run', 'method' or comma-separated config fields"
        f" (e.g. reg.kind,reg.weight_coef), got {spec!r}.")
  return fields


def _config_field(config: Any, field: str, run: str) -> Any:
  node = config
  for part in field.split("."):
    if not isinstance(node, Mapping) or part not in node:
      raise errors.ConfigError(
          f"--group_by field {field!r}: run {run!r} has no such config field"
          " (see configs/default.py for the fields).")
    node = node[part]
  return node


def _group_labels(result: Mapping[str, Any], group_by: GroupBy,
                  configs: Mapping[str, Any]) -> dict[str, str]:
  if group_by == "run":
    return {"run": str(result["run"]), "method": str(result["method"])}
  if group_by == "method":
    return {"method": str(result["method"])}
  if result["run"] not in configs:
    raise errors.ConfigError(
        f"Grouping by config fields needs the runs' configs; run {result['run']!r}"
        " has none (pass runs=..., the ptq.json 'runs' list).")
  config = configs[result["run"]]
  labels = {}
  for field in group_by:
    value = _config_field(config, field, result["run"])
    labels[field] = f"{value:g}" if isinstance(value, float) else str(value)
  return labels


class TableRow(NamedTuple):
  """One table row: its labels and, per column, the values it summarizes.

  Attributes:
    labels: ``{"run": ..., "method": ...}``; only ``method`` when grouped by
      method; ``{field: value}`` when grouped by config fields.
    cells: ``{column: [accuracy, ...]}``: one value per run in the group.
    own_grid: Columns where an STE run kept its own grid.
    kl: ``{column: [kl, ...]}``.
    runs: The runs in the group, in first-seen order.
    collapsed: The runs in the group whose float accuracy is near chance.
  """

  labels: dict[str, str]
  cells: dict[str, list[float]]
  own_grid: set[str]
  kl: dict[str, list[float]]
  runs: list[str]
  collapsed: list[str]


def column_name(w_bits: int | None, a_bits: int | None) -> str:
  """``"FP"`` for the float row, else the paper's ``"(W,A)"``."""
  return "FP" if w_bits is None else f"({w_bits},{a_bits})"


def summarize(
    results: Sequence[Mapping[str, Any]], *, group_by: str | Sequence[str] = "run",
    runs: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[str], list[TableRow]]:
  """Groups result entries into table rows, one column per bit-width.

  Args:
    results: Entries of ``ptq.json``'s ``results`` list.
    group_by: ``"run"``: one row per run (and its method); ``"method"``: one
      row per method label (:func:`method_label`), each cell holding the
      values of all its runs (seeds), shown as mean ± std; config fields
      (``"reg.kind,reg.weight_coef"`` or a sequence): one row per distinct
      value of those fields. Runs differing in a field not named are pooled
      (e.g. an STE run has ``reg.kind == "none"``), so name enough fields.
    runs: ``ptq.json``'s ``runs`` list (each with ``run`` and ``config``);
      needed only to group by config fields.

  Returns:
    ``(columns, rows)``: columns in first-seen order (FP first), rows in
    first-seen order.

  Raises:
    errors.ConfigError: an unknown keyword or config field.
  """
  group_by = parse_group_by(group_by)
  configs = {r["run"]: r.get("config") for r in runs if r.get("config") is not None}
  columns: list[str] = []
  rows: dict[tuple[str, ...], TableRow] = {}
  for r in results:
    col = column_name(r["w_bits"], r["a_bits"])
    if col not in columns:
      columns.append(col)
    labels = _group_labels(r, group_by, configs)
    key = tuple(labels.values())
    if key not in rows:
      rows[key] = TableRow(labels, collections.defaultdict(list), set(),
                           collections.defaultdict(list), [], [])
    row = rows[key]
    row.cells[col].append(float(r["accuracy"]))
    row.kl[col].append(float(r["kl"]))
    if r["run"] not in row.runs:
      row.runs.append(r["run"])
      if r.get("collapsed"):
        row.collapsed.append(r["run"])
    if r.get("ste_grid") == "own":
      row.own_grid.add(col)
  if "FP" in columns:
    columns.remove("FP")
    columns.insert(0, "FP")
  return columns, list(rows.values())


def _format_cell(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
  if not values:
    return "–"
  v = np.asarray(values, np.float64) * scale
  if len(v) == 1:
    return f"{v[0]:.{digits}f}"
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _row_label(row: TableRow, label: str, grouped: bool) -> str:
  """``label``, marked when runs of the row collapsed (float ≈ chance)."""
  if not row.collapsed:
    return label
  if not grouped or len(row.runs) == 1:
    return f"{label} ({COLLAPSE_MARK})"
  return f"{label} ({len(row.collapsed)}/{len(row.runs)} {COLLAPSE_MARK})"


def markdown_table(results: Sequence[Mapping[str, Any]], *,
                   group_by: str | Sequence[str] = "run",
                   metric: str = "accuracy",
                   runs: Sequence[Mapping[str, Any]] = ()) -> str:
  """The paper's Table 1 layout: a row per run (or group), a column per (W,A).

  Grouped cells are mean ± sample standard deviation over the group's runs
  (an ``n`` column gives the group sizes). A row holding collapsed runs (float
  accuracy near chance, :func:`is_collapsed`) is marked ``(collapsed)`` or
  ``(k/n collapsed)`` and stays in the table and in the means.

  Args:
    results: Entries of ``ptq.json``'s ``results`` list.
    group_by: See :func:`summarize`.
    metric: ``"accuracy"`` (top-1 %) or ``"kl"`` (mean KL, nats).
    runs: ``ptq.json``'s ``runs`` (needed to group by config fields).

  Returns:
    A Markdown table; cells where an STE run kept its own grid end in ``†``.
  """
  group_by = parse_group_by(group_by)
  grouped = group_by != "run"
  columns, rows = summarize(results, group_by=group_by, runs=runs)
  label_names = list(rows[0].labels) if rows else ["run", "method"]
  size_col = ["n"] if grouped else []
  lines = ["| " + " | ".join(label_names + size_col + columns) + " |",
           "|" + "---|" * len(label_names) + "---:|" * (len(size_col) + len(columns))]
  for row in rows:
    cells = []
    for col in columns:
      if metric == "accuracy":
        text = _format_cell(row.cells.get(col, []))
      else:
        text = _format_cell(row.kl.get(col, []), scale=1.0, digits=4)
      if col in row.own_grid and text != "–":
        text += OWN_GRID_MARK
      cells.append(text)
    labels = [row.labels[n] for n in label_names]
    labels[-1] = _row_label(row, labels[-1], grouped)
    size = [str(len(row.runs))] if grouped else []
    lines.append("| " + " | ".join(labels + size + cells) + " |")
  return "\n".join(lines) + "\n"


CSV_FIELDS = ("run", "method", "seed", "step", "w_bits", "a_bits", "accuracy", "kl",
              "correct", "count", "ste_grid", "collapsed")


def results_csv(results: Sequence[Mapping[str, Any]]) -> str:
  """One line per result entry (long format), the float row with empty bits."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  for r in results:
    writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
  return buf.getvalue()


def plot_results(results: Sequence[Mapping[str, Any]], path: str, *,
                 group_by: str | Sequence[str] = "run",
                 title: str = "Post-training quantization",
                 runs: Sequence[Mapping[str, Any]] = ()) -> None:
  """Accuracy vs bit-width: a line per run, or per group with a ±std band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  group_by = parse_group_by(group_by)
  grouped = group_by != "run"
  columns, rows = summarize(results, group_by=group_by, runs=runs)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(columns) + 3.5), 4.5))
  x = np.arange(len(columns))
  for row in rows:
    values = [np.asarray(row.cells.get(c, []), np.float64) * 100 for c in columns]
    means = np.array([v.mean() if v.size else np.nan for v in values])
    stds = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in values])
    label = _row_label(row, " · ".join(row.labels.values()), grouped)
    if grouped and len(row.runs) > 1:
      label += f" (n={len(row.runs)})"
    line, = ax.plot(x, means, marker="o", label=label)
    if np.any(stds):
      ax.fill_between(x, means - stds, means + stds, color=line.get_color(), alpha=0.2,
                      linewidth=0)
  ax.set_xticks(x)
  ax.set_xticklabels(columns)
  ax.set_xlabel("(weight bits, activation bits)")
  banded = grouped and any(len(row.runs) > 1 for row in rows)
  ax.set_ylabel("top-1 accuracy (%)" + (", mean ± std band" if banded else ""))
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


@dataclasses.dataclass
class Report:
  """What :func:`evaluate` computed and wrote.

  Attributes:
    settings: The evaluation settings.
    runs: Per-run metadata (``ptq.json``'s ``runs``).
    results: Per-run, per-pair entries (``ptq.json``'s ``results``).
    files: ``{"json"|"md"|"csv"|"png": path}`` written, if any.
    replaced: Paths of an earlier report's files that writing this one
      replaced (see :func:`write_report`); empty if there was none.
    kept: ``{path replaced: where the earlier file now is}`` for the earlier
      report's files moved aside (``ptq.<UTC time>.<ext>``); empty with
      ``overwrite=True`` or when the earlier report had the same results.
    prepared: The prepared runs (not serialized), e.g. for an export.
    group_by: How the tables and the plot group runs (:func:`summarize`):
      ``"run"``, ``"method"`` or a tuple of config fields.
  """

  settings: Settings
  runs: list[dict[str, Any]]
  results: list[dict[str, Any]]
  files: dict[str, str] = dataclasses.field(default_factory=dict)
  replaced: list[str] = dataclasses.field(default_factory=list)
  kept: dict[str, str] = dataclasses.field(default_factory=dict)
  prepared: list[PreparedRun] = dataclasses.field(default_factory=list, repr=False)
  group_by: GroupBy = "run"

  def __post_init__(self):
    self.group_by = parse_group_by(self.group_by)

  def to_json(self) -> dict[str, Any]:
    return {
        "format": JSON_FORMAT,
        "settings": self.settings.to_json(),
        "act_ranges": self.settings.act_ranges,
        "group_by": (self.group_by if isinstance(self.group_by, str)
                     else ",".join(self.group_by)),
        "runs": self.runs,
        "results": self.results,
    }

  def table(self, metric: str = "accuracy", group_by: GroupBy | None = None) -> str:
    """The Markdown table of ``metric``, grouped as the report (or ``group_by``)."""
    return markdown_table(self.results, metric=metric, runs=self.runs,
                          group_by=self.group_by if group_by is None else group_by)

  @property
  def markdown(self) -> str:
    """The accuracy table, a KL table, and the settings, as Markdown."""
    s = self.settings
    ranges = ("batch-norm parameters, Data-Free Quantization rule [β ± "
              f"{s.num_std:g}|γ|]" if s.act_ranges == "bn"
              else f"calibrated min/max over {s.calib_batches} training batches")
    steps = ", ".join(f"{r['run']}: step {r['step']}" for r in self.runs)
    grouped = self.group_by != "run"
    if grouped:
      by = ("of each method" if self.group_by == "method"
            else "sharing " + ", ".join(self.group_by))
      heading = (f"## Post-training quantization: top-1 accuracy (%), mean ± std"
                 f" over the runs {by}")
    else:
      heading = "## Post-training quantization: top-1 accuracy (%)"
    lines = [
        heading,
        "",
        self.table(),
        f"(W,A) = (weight bits, activation bits). Weights: symmetric, "
        f"{'per output channel' if s.per_channel else 'per tensor'}, every layer;"
        f" batch norm {'folded into the kernels' if s.fold else 'not folded (kept in float)'}."
        f" Activations: inputs of every Conv/Dense but the first; ranges from {ranges}."
        f" Checkpoints: {steps}.",
    ]
    if any(r.get("ste_grid") == "own" for r in self.results):
      lines.append(
          f"{OWN_GRID_MARK} STE run evaluated on its own training grid (better than"
          " re-quantizing at the wider grid; the paper prints – there).")
    if grouped:
      lines.append("n = runs in the group (seeds); ± is the sample standard deviation.")
    collapsed = [r for r in self.runs if r.get("collapsed")]
    if collapsed:
      chance = collapsed[0].get("chance_accuracy")
      limit = (f" ≤ {100 * COLLAPSE_FACTOR * chance:.0f} %" if chance else "")
      lines.append(
          f"**{len(collapsed)} run(s) collapsed** (float accuracy near chance{limit}:"
          " a (nearly) constant predictor, e.g. a too-large λ; kept in the means):"
          f" {', '.join(r['run'] for r in collapsed)}.")
    lines += ["", "## Mean KL(p_float ‖ p_quant) over test examples (nats)", "",
              self.table(metric="kl")]
    if grouped:
      lines += ["", "## Per run: top-1 accuracy (%)", "", self.table(group_by="run")]
    return "\n".join(lines)


REPORT_EXTENSIONS = ("json", "md", "csv", "png")


def _keep_aside(paths: Sequence[str]) -> dict[str, str]:
  """Renames ``DIR/ptq.EXT`` to ``DIR/ptq.<UTC write time>[-k].EXT``, one stamp for all."""
  written = next((p for p in paths if p.endswith(".json")), paths[0])
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(os.path.getmtime(written)))
  out_dir = os.path.dirname(paths[0])
  for k in range(1000):
    tag = stamp if k == 0 else f"{stamp}-{k}"
    targets = {p: os.path.join(out_dir, f"ptq.{tag}.{p.rsplit('.', 1)[1]}") for p in paths}
    if not any(os.path.exists(t) for t in targets.values()):
      break
  for path, target in targets.items():
    os.replace(path, target)
  return targets


def write_report(report: Report, out_dir: str, *, plot: bool = True,
                 overwrite: bool = False) -> dict[str, str]:
  """Writes ``ptq.json``, ``ptq.md``, ``ptq.csv`` and ``ptq.png`` to ``out_dir``.

  An earlier report there (any of these files) is never lost silently: its
  files are renamed ``ptq.<UTC time it was written>.<ext>`` (e.g.
  ``ptq.20250131-142501.json``) before the new ones are written, unless its
  ``ptq.json`` holds the same results (then it is simply rewritten) or
  ``overwrite`` is set. ``report.replaced`` and ``report.kept`` say what
  happened, for the caller to print.
  """
  os.makedirs(out_dir, exist_ok=True)
  files = {ext: os.path.join(out_dir, f"ptq.{ext}") for ext in REPORT_EXTENSIONS}
  text = json.dumps(report.to_json(), indent=2, ensure_ascii=False, default=_json_default) + "\n"
  existing = [files[ext] for ext in REPORT_EXTENSIONS if os.path.exists(files[ext])]
  report.replaced, report.kept = existing, {}
  if existing and not overwrite:
    try:
      with open(files["json"]) as f:
        same = f.read() == text
    except OSError:
      same = False
    if not same:
      report.kept = _keep_aside(existing)
  with open(files["json"], "w") as f:
    f.write(text)
  with open(files["md"], "w") as f:
    f.write(report.markdown)
  with open(files["csv"], "w") as f:
    f.write(results_csv(report.results))
  if plot:
    plot_results(report.results, files["png"], group_by=report.group_by, runs=report.runs)
  else:
    del files["png"]
  report.files = files
  return files


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.generic, jax.Array)):
    return np.asarray(obj).tolist()
  return str(obj)


def _run_labels(workdirs: Sequence[str]) -> list[str]:
  """Base names, or the normalised paths where base names collide."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(set(names)) == len(names):
    return names
  return [os.path.normpath(w) for w in workdirs]


def evaluate(
    workdirs: Sequence[str],
    settings: Settings = Settings(),
    *,
    out_dir: str | None = None,
    write: bool = True,
    progress: Callable[[str], None] | None = None,
    group_by: str | Sequence[str] = "run",
    overwrite: bool = False,
) -> Report:
  """Evaluates every run at every bit-width and writes the report.

  Args:
    workdirs: Training run directories (each with its checkpoint and config).
    settings: Evaluation settings.
    out_dir: Where the report goes; default the first workdir.
    write: Write the files (``ptq.json``, ``.md``, ``.csv``, ``.png``); an
      earlier report in ``out_dir`` is kept as ``ptq.<UTC time>.*`` unless
      ``overwrite`` (:func:`write_report`).
    progress: Called with a line per run (e.g. ``print``); default absl
      logging at INFO.
    group_by: How the tables and the plot group runs: ``"run"``,
      ``"method"`` (mean ± std over the runs of a method, e.g. seeds) or
      config fields such as ``"reg.kind,reg.weight_coef"`` (see
      :func:`summarize`).
    overwrite: Replace an earlier report instead of keeping it aside.

  Returns:
    The report.

  Raises:
    errors.UserError: Bad input (see :func:`prepare_run`).
  """
  from l1grad import data  # pylint: disable=g-import-not-at-top

  say = progress or (lambda line: logging.info("%s", line))
  if not workdirs:
    raise errors.ConfigError("No workdir given; pass --workdir DIR (repeatable).")
  report = Report(settings, [], [], group_by=group_by)
  for i, (workdir, label) in enumerate(zip(workdirs, _run_labels(workdirs))):
    prepared = prepare_run(workdir, settings, label=label)
    config = prepared.config
    if not isinstance(report.group_by, str):  # Fail before the sweep, not after.
      for field in report.group_by:
        _config_field(config_json(config), field, label)
    batches = data.eval_batches(
        config.dataset, "test", global_batch_size=eval_batch_size(config, settings),
        data_dir=_data_dir(config), max_examples=settings.max_examples)
    result = evaluate_prepared(prepared, settings, batches)
    counter = f"[{i + 1}/{len(workdirs)}] " if len(workdirs) > 1 else ""
    say(f"{counter}{prepared.label} (step {prepared.step}, {result.info['method']}):"
        f" float accuracy {100 * result.info['float_accuracy']:.2f} % on"
        f" {result.info['num_examples']} test"
        f" example{'' if result.info['num_examples'] == 1 else 's'}, {len(settings.bits)}"
        f" bit-width{'' if len(settings.bits) == 1 else 's'},"
        f" activation ranges: {settings.act_ranges}"
        + (" — COLLAPSED (float accuracy near chance)" if result.info["collapsed"] else ""))
    report.runs.append(result.info)
    report.results.extend(result.results)
    report.prepared.append(prepared)
  if write:
    write_report(report, out_dir or workdirs[0], overwrite=overwrite)
  return report
