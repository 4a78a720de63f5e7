"""Activation ranges for post-training quantization, and the float forward pass.

Every quantized activation (an input of a Conv/Dense but the first, keyed by
the reading layer's module path, docs/method.md §3) needs a range
``(low, high)``. Two ways to get one:

* :func:`bn_activation_ranges`: from the batch-norm parameters, by the
  Data-Free Quantization rule (docs/method.md §2), no data; its numbers come
  from :func:`dfq_activation_ranges`, the traced form that folded STE
  training evaluates at every step (l1grad/qat.py);
* :func:`calibrated_activation_ranges`: the min/max of the float model over
  some (training) batches.

:func:`apply_model` is the evaluation-mode forward pass on folded or plain
variables; it lives here, the lowest module that needs it (calibration runs
it; the quantized evaluation of :mod:`l1grad.ptq` and the analysis build on
it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from l1grad import errors
from l1grad import fold
from l1grad import perturb

__all__ = [
  "ACT_RANGE_METHODS",
  "DFQ_NUM_STD",
  "EVAL_KWARGS",
  "apply_model",
  "bn_activation_ranges",
  "calibrated_activation_ranges",
  "dfq_activation_ranges",
  "range_tree",
]

PyTree = Any
Ranges = dict[str, tuple[float, float]]
# Variables as evaluated: folded (fold.FoldedVariables) or a plain dict.
EvalVariables = Any

ACT_RANGE_METHODS = ("bn", "calibrate")
# Data-Free Quantization: a BN output channel lies in β ± 6|γ|.
DFQ_NUM_STD = 6.0
# Evaluation-mode arguments of every l1grad model's apply.
EVAL_KWARGS: Mapping[str, Any] = {"train": False}


def apply_model(
  model: nn.Module,
  variables: EvalVariables,
  images: ArrayLike,
  apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> jax.Array:
  """Runs ``model`` in evaluation mode on folded or plain variables."""
  if isinstance(variables, fold.FoldedVariables):
    return fold.folded_apply(model, variables, images, **apply_kwargs)
  return model.apply(variables, images, **apply_kwargs)


def range_tree(
  ranges: Mapping[str, tuple[float, float]],
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Activation ranges as the float32 pytree the jitted functions take."""
  # float32 arrays: a stable pytree of fixed dtype, so new range values never
  # retrace, and the same float32 values whichever caller converts them.
  return {
    k: (jnp.float32(lo), jnp.float32(hi)) for k, (lo, hi) in ranges.items()
  }


# ---------------------------------------------------------------------------
# From batch norm (Data-Free Quantization).
# ---------------------------------------------------------------------------


def _feature_shape(module: nn.BatchNorm, ndim: int) -> tuple[int, ...]:
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  return tuple(sorted(a % ndim for a in axes))


def _bn_bound_interceptor(
  sign: jax.Array, num_std: float
) -> Callable[..., Any]:
  """Replaces every BatchNorm output by β + sign·num_std·|γ| per channel."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(
      module, nn.BatchNorm
    ):
      return next_fun(*args, **kwargs)
    # Run the BN anyway: its variables are read and its output shape and dtype
    # are the real ones; only the values are replaced.
    y = next_fun(*args, **kwargs)
    params = module.variables.get("params", {})
    axes = _feature_shape(module, y.ndim)
    feature_shape = tuple(y.shape[a] for a in axes)
    gamma = jnp.abs(
      jnp.asarray(params.get("scale", jnp.ones(feature_shape)), jnp.float32)
    )
    beta = jnp.asarray(
      params.get("bias", jnp.zeros(feature_shape)), jnp.float32
    )
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
    if context.method_name == "__call__" and isinstance(
      context.module, perturb.LAYER_TYPES
    ):
      return jnp.full_like(y, poison)
    return y

  return interceptor


def _bound_points(
  model: nn.Module,
  variables: PyTree,
  image: jax.Array,
  sign: jax.Array,
  num_std: float,
  apply_kwargs: Mapping[str, Any],
  poison: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Every perturbation point, with each BN output at its bound (traceable).

  ``sign`` = +1 gives the upper bounds, -1 the lower ones. With ``poison``,
  every Conv/Dense output is replaced by it too (the derivation check).
  """
  points: dict[str, jax.Array] = {}

  def record(key: str, x: jax.Array) -> jax.Array:
    points[key] = x
    return x

  with contextlib.ExitStack() as stack:
    stack.enter_context(
      nn.intercept_methods(_bn_bound_interceptor(sign, num_std))
    )
    if poison is not None:
      stack.enter_context(nn.intercept_methods(_poison_layer_outputs(poison)))
    stack.enter_context(perturb.transform_layer_inputs(record))
    model.apply(variables, image, **apply_kwargs)
  return points


def _bound_pass_fn(
  model: nn.Module,
  example_shape: tuple[int, ...],
  dtype: Any,
  apply_kwargs: Mapping[str, Any],
  num_std: float,
) -> Callable[[PyTree, jax.Array, jax.Array], dict[str, jax.Array]]:
  """One forward pass, BN outputs at a bound and everything else poisoned."""
  apply_kwargs = dict(apply_kwargs)

  def run(variables, poison, sign):
    image = jnp.full((1, *example_shape), poison, dtype)
    return _bound_points(
      model, variables, image, sign, num_std, apply_kwargs, poison
    )

  return jax.jit(run)


def dfq_activation_ranges(
  model: nn.Module,
  variables: Mapping[str, Any],
  example_shape: tuple[int, ...],
  dtype: Any = jnp.float32,
  *,
  num_std: float = DFQ_NUM_STD,
  apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """The Data-Free Quantization ranges as traced values (jit/grad-safe).

  The numbers of :func:`bn_activation_ranges` (which calls this function for
  them), computed inside a traced function: STE training with
  ``qat.scheme="folded"`` takes its activation ranges from the current BN
  parameters at every step with it, so it trains on the grid post-training
  quantization evaluates. Two forward passes of one all-zero example, every
  BatchNorm output replaced by ``β ± num_std·|γ|`` per channel; the range of
  a point is the min of its lower and the max of its upper bounds.

  This function does not check that every point is computed from BN outputs
  only (a point that is not gets a meaningless range);
  :func:`bn_activation_ranges` does, once, on concrete variables.

  Args:
    model: The linen model.
    variables: Its unfolded variables (``params`` with BN ``scale``/``bias``;
      may be tracers).
    example_shape: The shape of one input example (no batch axis).
    dtype: The input dtype.
    num_std: The 6 of the rule.
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    ``{point key: (low, high)}``, float32 scalars (no gradient flows to the
    BN parameters: a fixed grid for the straight-through estimator).
  """
  apply_kwargs = dict(apply_kwargs)
  image = jnp.zeros((1, *example_shape), dtype)
  bounds = {
    s: _bound_points(
      model, variables, image, jnp.float32(s), float(num_std), apply_kwargs
    )
    for s in (1, -1)
  }
  return {
    key: (
      jax.lax.stop_gradient(jnp.min(bounds[-1][key]).astype(jnp.float32)),
      jax.lax.stop_gradient(jnp.max(bounds[1][key]).astype(jnp.float32)),
    )
    for key in bounds[1]
  }


def bn_activation_ranges(
  model: nn.Module,
  variables: Mapping[str, Any],
  sample: ArrayLike,
  *,
  num_std: float = DFQ_NUM_STD,
  apply_kwargs: Mapping[str, Any] = EVAL_KWARGS,
) -> Ranges:
  """Activation ranges from batch-norm parameters (Data-Free Quantization).

  The rule (Nagel et al., 2019; docs/method.md §2): a BN output channel lies
  in ``[β - 6|γ|, β + 6|γ|]``; after a ReLU the lower bound is clamped at 0;
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
  run = _bound_pass_fn(
    model, tuple(sample.shape[1:]), sample.dtype, apply_kwargs, float(num_std)
  )
  inf = jnp.float32(np.inf)
  upper = [
    jax.device_get(run(variables, p, jnp.float32(1))) for p in (inf, -inf)
  ]
  lower = [
    jax.device_get(run(variables, p, jnp.float32(-1))) for p in (inf, -inf)
  ]
  ranges: Ranges = {}
  bad = []
  for key in upper[0]:
    hi_a, hi_b = (np.asarray(u[key], np.float32) for u in upper)
    lo_a, lo_b = (np.asarray(bound[key], np.float32) for bound in lower)
    derived = (
      np.array_equal(hi_a, hi_b)
      and np.array_equal(lo_a, lo_b)
      and np.all(np.isfinite(hi_a))
      and np.all(np.isfinite(lo_a))
    )
    if not derived:
      bad.append(key)
      continue
    ranges[key] = None  # filled in below, once every point is checked
  if bad:
    raise errors.UserError(
      "Activation ranges from batch norm (--act_ranges bn, the Data-Free"
      " Quantization rule) need every quantized activation to be computed"
      " from batch-norm outputs through ReLU, sums, pooling or reshapes only;"
      f" the input of {', '.join(repr(k) for k in bad)} is not (it depends on"
      " the image or on a Conv/Dense without a batch norm after it). Use"
      " --act_ranges calibrate, which measures the ranges on training"
      " batches."
    )
  # The numbers come from the traced function STE training uses, so both
  # quantize on the same grid.
  shape, dtype = tuple(sample.shape[1:]), sample.dtype
  values = jax.device_get(
    jax.jit(
      lambda v: dfq_activation_ranges(
        model, v, shape, dtype, num_std=num_std, apply_kwargs=apply_kwargs
      )
    )(variables)
  )
  return {key: (float(values[key][0]), float(values[key][1])) for key in ranges}


# ---------------------------------------------------------------------------
# Calibrated on data.
# ---------------------------------------------------------------------------


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
        out[key] = (
          jnp.min(jnp.where(m, xf, jnp.inf)),
          jnp.max(jnp.where(m, xf, -jnp.inf)),
        )
      else:
        out[key] = (jnp.min(xf), jnp.max(xf))
      return x

    with perturb.transform_layer_inputs(record):
      apply_model(model, variables, images, apply_kwargs)
    return out

  low: dict[str, float] = {}
  high: dict[str, float] = {}
  for batch in batches:
    found = jax.device_get(
      minmax(variables, jnp.asarray(batch["image"]), jnp.asarray(batch["mask"]))
    )
    for key, (lo, hi) in found.items():
      low[key] = min(low.get(key, np.inf), float(lo))
      high[key] = max(high.get(key, -np.inf), float(hi))
  if not low:
    raise errors.UserError(
      "No calibration batches; use --calib_batches of at least 1."
    )
  return {k: (low[k], high[k]) for k in low}
