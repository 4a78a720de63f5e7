"""Post-training quantization: one float checkpoint, every bit-width.

The paper's promise is "train once, quantize on the fly". This module is the
"on the fly" half: it takes trained float variables and evaluates them with
weights and activations fake-quantized at any (W, A) pair, the way a deployed
integer model would compute (docs/method.md §2):

* batch norm folded into the preceding Conv/Dense kernel and bias
  (:func:`l1grad.runs.prepare_variables`); folded biases stay in float, like
  the int32 accumulators of an integer kernel;
* every kernel, first and last layer included, quantized symmetrically per
  tensor (or per output channel) by :func:`quantize_params`; or, with
  ``first_last_bits`` (``--first_last_bits 8``), the first and last
  Conv/Dense in call order and the last one's input kept at 8 bits while the
  rest follow (W, A) (:func:`first_last_layers`, :func:`layer_bits`);
* activations fake-quantized at exactly the perturbation points of the
  penalty (inputs of every Conv/Dense but the first), through
  :func:`l1grad.quant.quantized_activations`: the interception of
  :mod:`l1grad.perturb` and the same :func:`l1grad.quant.fake_quant`, so the
  regularizer and the quantizer see the same tensors;
* activation ranges from :mod:`l1grad.ranges` (batch norm or calibration).

The module is long but holds one kind of thing, quantized evaluation: the
quantized forward pass and its per-layer bit-widths, the jitted evaluator and
sweep, and the per-run evaluation behind ``eval_ptq.py``; its last ~40 lines
only keep names that moved to :mod:`l1grad.ranges`, :mod:`l1grad.runs` and
:mod:`l1grad.report` importable from here.

Bit-widths are traced values: :class:`Evaluator` compiles one function that
serves a whole sweep. :func:`evaluate` is what ``eval_ptq.py`` calls: it
loads each run (:func:`l1grad.runs.prepare_run`), sweeps the bit-widths, and
writes the report (:func:`l1grad.report.write_report`).

Example::

  settings = ptq.Settings(bits=bits.parse_pairs("8:4,4:4"))
  report = ptq.evaluate(["runs/l1_seed0", "runs/none_seed0"], settings)
  print(report.markdown)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import functools
import os
from typing import Any, ClassVar, NamedTuple

from absl import logging
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from l1grad import bits as bits_lib
from l1grad import errors
from l1grad import fold
from l1grad import params as params_lib
from l1grad import perturb
from l1grad import quant
from l1grad import ranges as ranges_lib
from l1grad import report as report_lib
from l1grad import runs

__all__ = [
  "DEFAULT_BITS",
  "Evaluator",
  "FirstLast",
  "PairStats",
  "RunResult",
  "Settings",
  "cached_evaluator",
  "evaluate",
  "evaluate_prepared",
  "first_last_layers",
  "kernel_scale",
  "kl_per_example",
  "layer_bits",
  "quantize_params",
  "quantize_variables",
  "quantized_apply",
  "sweep",
]

Pair = tuple[int, int]
EvalVariables = ranges_lib.EvalVariables

# The paper's columns ((8,4), (6,4), (4,4) on CIFAR-10; (8,8), (6,6), (4,4) on
# ImageNet), 16:16 as a check that quantization itself is lossless, and 3:3 and
# 8:2 where the gaps open on digits.
DEFAULT_BITS = "16:16,8:8,8:4,6:6,6:4,4:4,3:3,8:2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(runs.Settings):
  """How to quantize and evaluate (the flags of ``eval_ptq.py``).

  The fields of :class:`l1grad.runs.Settings` (bits, act_ranges, per_channel,
  fold, first_last_bits, calib_batches, batch_size, num_std, step), with the
  paper's columns as the default bits, and:

  Attributes:
    max_examples: Evaluate on the first examples of the test split only.
    act_points: Where activations are quantized
      (:data:`l1grad.perturb.POINTS`): ``"layer_inputs"`` (where the
      Conv/Dense layers read them; a ResNet identity shortcut reads the float
      tensor) or ``"tensors"`` (once for every reader, the residual add
      included, as an integer deployment stores the tensor once).
  """

  JSON_FIELDS: ClassVar[tuple[str, ...]] = (
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
  )

  bits: tuple[Pair, ...] = tuple(bits_lib.parse_pairs(DEFAULT_BITS))
  max_examples: int | None = None
  act_points: str = "layer_inputs"

  def __post_init__(self):
    super().__post_init__()
    if self.max_examples is not None and self.max_examples < 1:
      raise errors.ConfigError(
        f"--max_examples must be >= 1, got {self.max_examples}."
      )
    if self.act_points not in perturb.POINTS:
      raise errors.ConfigError(
        f"--act_points must be one of {', '.join(perturb.POINTS)}, got"
        f" {self.act_points!r}."
      )


# ---------------------------------------------------------------------------
# Quantized forward pass.
# ---------------------------------------------------------------------------


# The weight quantizer lives in l1grad.quant (training's STE uses it too).
quantize_params = quant.quantize_kernels
kernel_scale = quant.kernel_scale


def _quantize_layers(
  params: Any,
  bits: ArrayLike,
  per_channel: bool,
  layer_bits: Mapping[str, ArrayLike] | None,
) -> Any:
  if not layer_bits:
    return quantize_params(params, bits, per_channel=per_channel)
  kernels, merge = params_lib.split_kernels(params)
  unknown = sorted(set(layer_bits) - set(kernels))
  if unknown:
    raise KeyError(
      f"No kernels named {unknown}; the kernels are {list(kernels)}."
    )
  # Each kernel through the one weight quantizer, at its own bit-width.
  return merge(
    {
      name: quantize_params(
        {"kernel": k}, layer_bits.get(name, bits), per_channel=per_channel
      )["kernel"]
      for name, k in kernels.items()
    }
  )


def quantize_variables(
  variables: EvalVariables,
  bits: ArrayLike,
  *,
  per_channel: bool = False,
  layer_bits: Mapping[str, ArrayLike] | None = None,
) -> EvalVariables:
  """:func:`quantize_params` applied to folded or plain variables.

  Args:
    variables: Folded (:class:`l1grad.fold.FoldedVariables`) or plain.
    bits: Weight bit-width (may be traced).
    per_channel: Per-output-channel scales.
    layer_bits: ``{layer name: bits}`` for the kernels quantized at another
      bit-width than ``bits`` (:func:`layer_bits`); may be traced.

  Returns:
    The variables with quantized kernels.
  """
  if isinstance(variables, fold.FoldedVariables):
    return variables.replace(
      params=_quantize_layers(variables.params, bits, per_channel, layer_bits)
    )
  return {
    **variables,
    "params": _quantize_layers(
      variables["params"], bits, per_channel, layer_bits
    ),
  }


class FirstLast(NamedTuple):
  """The network's first and last Conv/Dense layers, in call order.

  Attributes:
    first: The first layer called (it reads the network input).
    last: The last layer called (the classifier head).
    last_input: The activation point the last layer reads (None if it reads
      the network input, a one-layer model).
  """

  first: str
  last: str
  last_input: str | None


def first_last_layers(
  model: nn.Module,
  variables: EvalVariables,
  images: ArrayLike,
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
) -> FirstLast:
  """The first and last Conv/Dense of ``model`` in call order (not dict order).

  Found by :func:`l1grad.perturb.layer_inputs` (traced, nothing computed), so
  the first layer is the one that reads the image and the last the one that
  writes the logits, whatever their names.

  Raises:
    ValueError: The model calls no Conv/Dense layer.
  """
  calls = perturb.layer_inputs(
    lambda v, x: ranges_lib.apply_model(model, v, x, apply_kwargs),
    variables,
    images,
  )
  if not calls:
    raise ValueError(f"{type(model).__name__} calls no Conv/Dense layer.")
  return FirstLast(calls[0].layer, calls[-1].layer, calls[-1].point)


def _at_least(bits: ArrayLike, floor: int) -> ArrayLike:
  if isinstance(bits, int):
    return max(bits, floor)
  return jnp.maximum(bits, jnp.asarray(floor, jnp.asarray(bits).dtype))


def layer_bits(
  layers: FirstLast,
  w_bits: ArrayLike,
  a_bits: ArrayLike,
  first_last_bits: int | None,
) -> tuple[dict[str, ArrayLike], dict[str, ArrayLike]]:
  """The bit-widths that differ from (W, A) under ``first_last_bits``.

  The first and last layers' kernels and the last layer's input activation
  get ``max(first_last_bits, W)`` (``max(first_last_bits, A)``): at least
  ``first_last_bits``, never fewer than the other layers (so (16,16) stays
  lossless). The network's input (the image) is not quantized either way.

  Args:
    layers: From :func:`first_last_layers`.
    w_bits: Weight bits of the other layers (an int, or traced).
    a_bits: Activation bits of the other points (an int, or traced).
    first_last_bits: The bits to keep them at; None or 0: no override.

  Returns:
    ``({layer: weight bits}, {point: activation bits})``, for
    :func:`quantize_variables`'s ``layer_bits`` and
    :func:`quantized_apply`'s ``point_bits``; both empty when off.
  """
  if not first_last_bits:
    return {}, {}
  w = _at_least(w_bits, first_last_bits)
  weights = {layers.first: w, layers.last: w}
  acts = {}
  if layers.last_input is not None:
    acts[layers.last_input] = _at_least(a_bits, first_last_bits)
  return weights, acts


def quantized_apply(
  model: nn.Module,
  variables: EvalVariables,
  ranges: Mapping[str, tuple[ArrayLike, ArrayLike]],
  a_bits: ArrayLike,
  images: ArrayLike,
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
  *,
  point_bits: Mapping[str, ArrayLike] | None = None,
  points: str = "layer_inputs",
) -> jax.Array:
  """Runs ``model`` with its activations fake-quantized at ``a_bits``.

  The weights are used as given: quantize them first with
  :func:`quantize_variables` (the sweep does, inside its jitted function), or
  pass dequantized integer weights (the exported model does). Both paths call
  this one function, which is why the export reproduces the sweep's logits.

  Args:
    model: The linen model.
    variables: Folded (:class:`l1grad.fold.FoldedVariables`) or plain.
    ranges: ``{point key: (low, high)}`` for every perturbation point.
    a_bits: Activation bit-width (may be traced).
    images: A batch of inputs.
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.
    point_bits: ``{point: bits}`` for points quantized at another bit-width
      than ``a_bits`` (:func:`layer_bits`).
    points: Where activations are quantized, ``"layer_inputs"`` or
      ``"tensors"`` (:attr:`Settings.act_points`).

  Returns:
    The logits.
  """
  sites = perturb.point_sites(
    points,
    lambda v, x: ranges_lib.apply_model(model, v, x, apply_kwargs),
    variables,
    images,
  )
  with quant.quantized_activations(
    a_bits, ranges, point_bits=point_bits, sites=sites
  ):
    return ranges_lib.apply_model(model, variables, images, apply_kwargs)


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
  logits: jax.Array,
  float_logits: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
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
    first_last_bits: The first and last layers' bits (:func:`layer_bits`),
      or None: every layer at (W, A).
    points: Where activations are quantized (:attr:`Settings.act_points`).
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
    first_last_bits: int | None = None,
    apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
    max_traces: int | None = None,
    points: str = "layer_inputs",
  ):
    """Builds the jitted functions.

    Args:
      model: The linen model.
      per_channel: Per-output-channel weight scales.
      first_last_bits: Keep the first and last layers at this many bits
        (at least; :func:`layer_bits`); None or 0: every layer at (W, A).
        The layers are found when the function is traced; the bits stay
        traced, so a sweep still compiles once.
      apply_kwargs: Evaluation-mode arguments of ``model.apply``.
      max_traces: If set, :attr:`quantized_stats` raises when traced more
        often (``chex.assert_max_traces``): a guard against a sweep that
        recompiles per bit-width.
      points: ``"layer_inputs"`` or ``"tensors"``
        (:attr:`Settings.act_points`).
    """
    if points not in perturb.POINTS:
      raise ValueError(
        f"points must be one of {perturb.POINTS}, got {points!r}."
      )
    self.model = model
    self.points = points
    self.per_channel = per_channel
    self.first_last_bits = first_last_bits or None
    apply_kwargs = dict(apply_kwargs)

    def logits_fn(variables, ranges, w_bits, a_bits, images):
      w_layers, a_points = {}, {}
      if self.first_last_bits:
        layers = first_last_layers(model, variables, images, apply_kwargs)
        w_layers, a_points = layer_bits(
          layers, w_bits, a_bits, self.first_last_bits
        )
      qvars = quantize_variables(
        variables, w_bits, per_channel=per_channel, layer_bits=w_layers
      )
      return quantized_apply(
        model,
        qvars,
        ranges,
        a_bits,
        images,
        apply_kwargs,
        point_bits=a_points,
        points=points,
      )

    def quantized_stats(
      variables, ranges, w_bits, a_bits, images, labels, mask, float_logits
    ):
      logits = logits_fn(variables, ranges, w_bits, a_bits, images)
      return _masked_stats(logits, float_logits, labels, mask)

    def float_stats(variables, images, labels, mask):
      logits = ranges_lib.apply_model(model, variables, images, apply_kwargs)
      correct, _ = _masked_stats(logits, logits, labels, mask)
      return logits, correct

    if max_traces is not None:
      quantized_stats = chex.assert_max_traces(quantized_stats, n=max_traces)
    self.quantized_stats = jax.jit(quantized_stats)
    self.quantized_logits = jax.jit(logits_fn)
    self.float_stats = jax.jit(float_stats)


@functools.lru_cache(maxsize=8)
def cached_evaluator(
  model: nn.Module,
  per_channel: bool,
  first_last_bits: int | None = None,
  points: str = "layer_inputs",
) -> Evaluator:
  """The :class:`Evaluator` of an architecture, shared by every caller."""
  # Linen modules hash by their fields: runs of one architecture share the
  # compiled functions (two workdirs of one sweep compile once).
  return Evaluator(
    model,
    per_channel=per_channel,
    first_last_bits=first_last_bits,
    points=points,
  )


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
  ranges_arg = ranges_lib.range_tree(ranges)
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
      c, k = evaluator.quantized_stats(
        variables, ranges_arg, w, a, images, labels, mask, float_logits
      )
      correct[p] = correct[p] + c
      kl[p] = kl[p] + k
  if count == 0:
    raise errors.UserError(
      "The evaluation data is empty; check the dataset and --max_examples."
    )

  def stats(c: jax.Array, k: jax.Array) -> PairStats:
    c = int(round(float(c)))
    return PairStats(c / count, max(float(k), 0.0) / count, c, count)

  return (
    stats(float_correct, jnp.float32(0)),
    {p: stats(correct[p], kl[p]) for p in pairs},
  )


# ---------------------------------------------------------------------------
# One run, several runs.
# ---------------------------------------------------------------------------


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
  """The STE run's own grid at a wider pair: its training width per part."""
  if trained is None:
    return None
  own = (min(pair[0], trained[0]), min(pair[1], trained[1]))
  return None if own == tuple(pair) else own


def _result(
  run: str,
  method: str,
  seed: Any,
  step: int,
  pair: Pair | None,
  stats: PairStats,
) -> dict[str, Any]:
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


def evaluate_prepared(
  prepared: runs.PreparedRun,
  settings: runs.Settings,
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
    prepared: From :func:`l1grad.runs.prepare_run` (or built directly).
    settings: Evaluation settings.
    batches: Test batches.
    evaluator: Compiled functions; default one cached per architecture.

  Returns:
    The run's metadata and results.
  """
  evaluator = evaluator or cached_evaluator(
    prepared.model,
    settings.per_channel,
    settings.first_last_bits,
    getattr(settings, "act_points", "layer_inputs"),
  )
  config = prepared.config
  trained = runs.qat_bits(config)
  requested = list(settings.bits)
  own = {p: _own_grid(p, trained) for p in requested}
  to_eval = requested + [o for o in own.values() if o is not None]
  float_stats, stats = sweep(
    evaluator, prepared.eval_variables, prepared.ranges, to_eval, batches
  )
  method = runs.method_label(config)
  seed = runs.config_value(config, "seed", None)
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
          "own": {
            "w_bits": own_pair[0],
            "a_bits": own_pair[1],
            "accuracy": own_s.accuracy,
            "kl": own_s.kl,
          },
          "requantized": {
            "w_bits": pair[0],
            "a_bits": pair[1],
            "accuracy": req_s.accuracy,
            "kl": req_s.kl,
          },
        }
    results.append(entry)
  num_classes = runs.config_value(prepared.model, "num_classes", None)
  chance = 1.0 / num_classes if num_classes else None
  collapsed = report_lib.is_collapsed(float_stats.accuracy, num_classes)
  for entry in results:
    entry["collapsed"] = collapsed
  folded = isinstance(prepared.eval_variables, fold.FoldedVariables)
  ends = first_last_layers(
    prepared.model, prepared.eval_variables, prepared.sample
  )
  info = {
    "run": prepared.label,
    "workdir": os.path.abspath(prepared.workdir),
    "step": prepared.step,
    "seed": seed,
    "method": method,
    "qat_bits": None if trained is None else bits_lib.format_pair(trained),
    "qat_scheme": runs.qat_scheme(config),
    "model": runs.config_value(config, "model", type(prepared.model).__name__),
    "dataset": runs.config_value(config, "dataset", None),
    "num_examples": float_stats.count,
    "float_accuracy": float_stats.accuracy,
    "chance_accuracy": chance,
    "collapsed": collapsed,
    "act_ranges": prepared.act_ranges,
    "activation_ranges": {
      k: [lo, hi] for k, (lo, hi) in prepared.ranges.items()
    },
    "folded_layers": (
      [params_lib.layer_name(p) for p in prepared.eval_variables.pairs]
      if folded
      else []
    ),
    # Which layers --first_last_bits keeps wider (bits None: it is off).
    "first_last_layers": {
      "first": ends.first,
      "last": ends.last,
      "last_input": ends.last_input,
      "bits": settings.first_last_bits,
    },
    "config": runs.config_json(config),
  }
  return RunResult(info, results)


def evaluate(
  workdirs: Sequence[str],
  settings: Settings = Settings(),
  *,
  out_dir: str | None = None,
  write: bool = True,
  progress: Callable[[str], None] | None = None,
  group_by: str | Sequence[str] = "run",
  overwrite: bool = False,
) -> report_lib.Report:
  """Evaluates every run at every bit-width and writes the report.

  Args:
    workdirs: Training run directories (each with its checkpoint and config).
    settings: Evaluation settings.
    out_dir: Where the report goes; default the first workdir.
    write: Write the files (``ptq.json``, ``.md``, ``.csv``, ``.png``); an
      earlier report in ``out_dir`` is kept as ``ptq.<UTC time>.*`` unless
      ``overwrite`` (:func:`l1grad.report.write_report`).
    progress: Called with a line per run (e.g. ``print``); default absl
      logging at INFO.
    group_by: How the tables and the plot group runs: ``"run"``,
      ``"method"`` (mean ± std over the runs of a method, e.g. seeds) or
      config fields such as ``"reg.kind,reg.weight_coef"`` (see
      :func:`l1grad.report.summarize`).
    overwrite: Replace an earlier report instead of keeping it aside.

  Returns:
    The report.

  Raises:
    errors.UserError: Bad input (see :func:`l1grad.runs.prepare_run`).
  """
  from l1grad import data  # pylint: disable=g-import-not-at-top

  say = progress or (lambda line: logging.info("%s", line))
  if not workdirs:
    raise errors.ConfigError(
      "No workdir given; pass --workdir DIR (repeatable)."
    )
  report = report_lib.Report(settings, [], [], group_by=group_by)
  labels = runs.run_labels(workdirs)
  for i, (workdir, label) in enumerate(zip(workdirs, labels)):
    prepared = runs.prepare_run(workdir, settings, label=label)
    config = prepared.config
    if not isinstance(report.group_by, str):  # Fail before the sweep.
      for field in report.group_by:
        report_lib.config_field(runs.config_json(config), field, label)
    batches = data.eval_batches(
      config.dataset,
      "test",
      global_batch_size=runs.eval_batch_size(config, settings),
      data_dir=runs.data_dir(config),
      max_examples=settings.max_examples,
    )
    result = evaluate_prepared(prepared, settings, batches)
    info = result.info
    n = info["num_examples"]
    counter = f"[{i + 1}/{len(workdirs)}] " if len(workdirs) > 1 else ""
    say(
      f"{counter}{prepared.label} (step {prepared.step}, {info['method']}):"
      f" float accuracy {100 * info['float_accuracy']:.2f} % on {n} test"
      f" example{'' if n == 1 else 's'}, {len(settings.bits)}"
      f" bit-width{'' if len(settings.bits) == 1 else 's'},"
      f" activation ranges: {settings.act_ranges}"
      + (
        " — COLLAPSED (float accuracy near chance)" if info["collapsed"] else ""
      )
    )
    report.runs.append(info)
    report.results.extend(result.results)
    report.prepared.append(prepared)
  if write:
    report_lib.write_report(report, out_dir or workdirs[0], overwrite=overwrite)
  return report


# ---------------------------------------------------------------------------
# Names that moved, still importable from here.
# ---------------------------------------------------------------------------

# l1grad.ranges
ACT_RANGE_METHODS = ranges_lib.ACT_RANGE_METHODS
DFQ_NUM_STD = ranges_lib.DFQ_NUM_STD
EVAL_KWARGS = ranges_lib.EVAL_KWARGS
apply_model = ranges_lib.apply_model
bn_activation_ranges = ranges_lib.bn_activation_ranges
calibrated_activation_ranges = ranges_lib.calibrated_activation_ranges
range_tree = ranges_lib.range_tree
# l1grad.runs
PreparedRun = runs.PreparedRun
check_variables_match = runs.check_variables_match
config_json = runs.config_json
eval_batch_size = runs.eval_batch_size
method_label = runs.method_label
prepare_run = runs.prepare_run
prepare_variables = runs.prepare_variables
# l1grad.report
COLLAPSE_FACTOR = report_lib.COLLAPSE_FACTOR
COLLAPSE_MARK = report_lib.COLLAPSE_MARK
CSV_FIELDS = report_lib.CSV_FIELDS
GROUP_BY = report_lib.GROUP_BY
GroupBy = report_lib.GroupBy
JSON_FORMAT = report_lib.JSON_FORMAT
OWN_GRID_MARK = report_lib.OWN_GRID_MARK
REPORT_EXTENSIONS = report_lib.REPORT_EXTENSIONS
Report = report_lib.Report
TableRow = report_lib.TableRow
column_name = report_lib.column_name
is_collapsed = report_lib.is_collapsed
markdown_table = report_lib.markdown_table
parse_group_by = report_lib.parse_group_by
plot_results = report_lib.plot_results
results_csv = report_lib.results_csv
summarize = report_lib.summarize
write_report = report_lib.write_report
