r"""The paper's theory measured against real quantization noise.

The paper (§2, §2.3, Appendix B) models post-training quantization as an
additive perturbation δ of z = (W, A), bounded by ‖δ‖∞ ≤ Δ/2, and expands the
loss around the float model:

  L(z + δ) − L(z) = ⟨δ, ∇L⟩ + ½·δᵀHδ + O(‖δ‖³),
  max over ‖δ‖∞ ≤ Δ/2 of ⟨δ, ∇L⟩ = Σ (Δ/2)·|∇L|   (Δ per tensor),

and regularizes the ℓ1 norm of the gradient because it bounds the first-order
term for every bit-width at once. This module measures each term for the
*actual* quantization noise of a trained model, so the theory can be checked
(and forks can study the higher-order terms the paper leaves open).

Building blocks (pure, jit-able, usable on any Flax linen model built from
``nn.Conv``/``nn.Dense``):

* the expansion point ``z = {"weights": {layer: kernel}, "acts": {point: 0}}``
  (:func:`expansion_point`), and the model as a function of it
  (:func:`apply_at`, :func:`loss_at`); activation points are those of
  :mod:`l1grad.perturb` (inputs of every Conv/Dense but the first);
* :func:`hvp`: a Hessian-vector product over (weights, activation points),
  forward-over-reverse (``jax.jvp`` of ``jax.grad``);
* :func:`quantization_noise`: the noise tree δ and bin widths Δ of the model
  quantized at (W, A) bits, weights-only, activations-only or both;
* :func:`expansion_terms`: induced loss, first-order term, worst-case ℓ1
  bound, second-order prediction; :func:`gradient_norms`,
  :func:`kl_divergence`, :func:`noise_histogram`, :func:`pearson`,
  :func:`spearman`.

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
* the activation noise at a point is recorded *in the quantized network*:
  δ_A = Q(x') − x' where x' is what arrives at the point when everything
  upstream is already quantized. Added to the float network as fixed
  perturbations, (δ_W, δ_A) reproduce the quantized network exactly, so
  L(z + δ) − L(z) is the real PTQ loss change (checked per batch and
  reported as ``reconstruction_error``).

Command (writes ``analysis.json``, ``analysis.md`` and PNG figures)::

  python -m l1grad.analysis --workdir runs/digits --workdir runs/digits_l1 \
      [--bits 8:8,4:4,3:3,4:2] [--num_batches N] [--batch_size B] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from l1grad import bits as bits_lib
from l1grad import errors
from l1grad import penalty
from l1grad import perturb
from l1grad import ptq
from l1grad import quant

__all__ = [
    "ACT_RANGE_METHODS",
    "DEFAULT_BITS",
    "KINDS",
    "QuantNoise",
    "Settings",
    "activation_step",
    "analyze",
    "analyze_run",
    "apply_at",
    "cross_entropy",
    "expansion_point",
    "expansion_terms",
    "gradient_norms",
    "hvp",
    "inner",
    "kl_divergence",
    "loss_at",
    "main",
    "markdown",
    "noise_histogram",
    "pearson",
    "plot_all",
    "quantization_noise",
    "spearman",
    "split_weights",
    "training_log",
    "weight_noise",
    "worst_case_bound",
    "worst_case_perturbation",
    "write_outputs",
]

PyTree = Any
Pair = tuple[int, int]
Batch = Mapping[str, ArrayLike]

# Where the digits gaps open (DESIGN.md §1): 8:8 as the near-lossless
# reference, 4:4, 3:3, and 4-bit weights with 2-bit activations.
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
# Histograms of δ/Δ: bins of width 1/21 placed so that ±½ (the rounding
# bound) are bin edges and 0 is a bin centre (exact zeros, e.g. ReLU zeros,
# form one visible spike); 43 bins span ±43/42 ≈ ±1.02, and clipped values
# (outside a fixed activation range) pile up in the edge bins.
NUM_BINS = 43
HIST_LIMIT = NUM_BINS / 42
# |δ|/Δ above ½ by more than float rounding counts as clipped.
CLIP_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------
# The expansion point z = (weights, activation perturbations).
# ---------------------------------------------------------------------------


def _layer_name(path: tuple[Any, ...]) -> str:
  # "Block_0/Conv_1" for ('Block_0', 'Conv_1', 'kernel'): the same spelling
  # as the activation point keys of l1grad.perturb (the reading layer's path).
  return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path[:-1])


def split_weights(
    params: PyTree,
) -> tuple[dict[str, jax.Array], Callable[[Mapping[str, jax.Array]], PyTree]]:
  """The Conv/Dense kernels of ``params`` by layer path, and a merge function.

  Args:
    params: A params tree (plain, or :class:`l1grad.quant.FoldedVariables`'s
      ``params``).

  Returns:
    ``(weights, merge)``: ``weights`` maps a layer path (``"Conv_0"``,
    ``"Block_0/Conv_1"``) to its kernel; ``merge(new_weights)`` rebuilds the
    full params tree with those kernels and every other leaf unchanged.
  """
  kernels, merge = penalty.split_kernels(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  names = {i: _layer_name(flat[i][0]) for i in kernels}
  index = {name: i for i, name in names.items()}
  weights = {names[i]: k for i, k in kernels.items()}

  def merge_named(new: Mapping[str, jax.Array]) -> PyTree:
    return merge({index[name]: k for name, k in new.items()})

  return weights, merge_named


def _params(variables: Any) -> PyTree:
  if isinstance(variables, quant.FoldedVariables):
    return variables.params
  return variables["params"]


def _with_params(variables: Any, params: PyTree) -> Any:
  if isinstance(variables, quant.FoldedVariables):
    return variables.replace(params=params)
  return {**variables, "params": params}


def expansion_point(
    model: nn.Module,
    variables: Any,
    images: ArrayLike,
    *,
    apply_kwargs: Mapping[str, Any] = ptq.EVAL_KWARGS,
) -> dict[str, dict[str, jax.Array]]:
  """The float model as a point ``z = {"weights": ..., "acts": ...}``.

  Args:
    model: A linen model.
    variables: Its variables as evaluated: folded
      (:class:`l1grad.quant.FoldedVariables`) or a plain variables dict.
    images: A batch (its shape fixes the activation points' shapes).
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    ``{"weights": {layer: kernel}, "acts": {point: zeros}}``: the kernels and
    a zero perturbation per activation point, shaped like the batch's
    activations.
  """
  weights, _ = split_weights(_params(variables))
  shapes = perturb.activation_shapes(
      lambda v, x: ptq.apply_model(model, v, x, apply_kwargs), variables,
      jnp.asarray(images))
  return {"weights": dict(weights), "acts": perturb.zero_perturbations(shapes)}


def apply_at(
    model: nn.Module,
    variables: Any,
    z: Mapping[str, Mapping[str, ArrayLike]],
    images: ArrayLike,
    *,
    apply_kwargs: Mapping[str, Any] = ptq.EVAL_KWARGS,
) -> jax.Array:
  """Logits of the model at ``z``: kernels ``z["weights"]``, ``z["acts"]`` added.

  Args:
    model: A linen model.
    variables: Its variables (folded or plain); every leaf but the kernels is
      taken from here (biases, folded biases, batch statistics).
    z: ``{"weights": {layer: kernel}, "acts": {point: perturbation}}`` as
      from :func:`expansion_point` (possibly moved).
    images: The input batch.
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    The logits.
  """
  _, merge = split_weights(_params(variables))
  moved = _with_params(variables, merge(z["weights"]))
  with perturb.perturbed(z["acts"]):
    return ptq.apply_model(model, moved, images, apply_kwargs)


def cross_entropy(
    logits: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None
) -> jax.Array:
  """Mean cross-entropy over the unmasked examples (the L of the paper).

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer labels.
    mask: ``[B]``, False on padding; None for all examples.

  Returns:
    A scalar, in float32 or wider.
  """
  logits = jnp.asarray(logits)
  logits = logits.astype(jnp.result_type(logits.dtype, jnp.float32))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels))
  if mask is None:
    return jnp.mean(ce)
  m = jnp.asarray(mask).astype(ce.dtype)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def loss_at(
    model: nn.Module,
    variables: Any,
    z: Mapping[str, Mapping[str, ArrayLike]],
    batch: Batch,
    *,
    apply_kwargs: Mapping[str, Any] = ptq.EVAL_KWARGS,
) -> jax.Array:
  """L(z): the masked mean cross-entropy of :func:`apply_at` on ``batch``.

  ``functools.partial(loss_at, model, variables)`` is a ``(z, batch) -> L``
  function for :func:`hvp` and :func:`expansion_terms`.

  Args:
    model: A linen model.
    variables: Its variables (folded or plain).
    z: The point (see :func:`apply_at`).
    batch: ``{"image", "label"}`` and optionally ``"mask"``.
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    The scalar loss.
  """
  logits = apply_at(model, variables, z, batch["image"], apply_kwargs=apply_kwargs)
  return cross_entropy(logits, batch["label"], batch.get("mask"))


# ---------------------------------------------------------------------------
# Tree algebra, Hessian-vector product, expansion terms.
# ---------------------------------------------------------------------------


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
  # jax.jvp needs tangents of the primals' dtypes.
  return jax.tree.map(lambda t, p: jnp.asarray(t, jnp.asarray(p).dtype), tree, like)


def _tree_sum(values: Iterable[jax.Array]) -> jax.Array:
  values = list(values)
  if not values:
    return jnp.zeros((), jnp.float32)
  return functools.reduce(jnp.add, values)


def inner(a: PyTree, b: PyTree) -> jax.Array:
  """⟨a, b⟩ summed over every leaf of two trees of the same structure."""

  def dot(x, y):
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = jnp.result_type(x.dtype, y.dtype, jnp.float32)
    return jnp.sum(x.astype(dtype) * y.astype(dtype))

  return _tree_sum(jax.tree.leaves(jax.tree.map(dot, a, b)))


def hvp(
    loss_fn: Callable[..., jax.Array], z: PyTree, v: PyTree, *args: Any
) -> tuple[PyTree, PyTree]:
  """Gradient and Hessian-vector product of ``loss_fn`` at ``z`` along ``v``.

  Forward-over-reverse, ``jax.jvp(jax.grad(loss_fn), (z,), (v,))``: the JAX
  autodiff cookbook's HVP, about the cost of two gradients, no Hessian is
  formed. With ``z`` from :func:`expansion_point` this is the Hessian over
  (weights, activation points) jointly, cross terms included.

  Args:
    loss_fn: ``(z, *args) -> scalar``.
    z: The point.
    v: The direction, shaped like ``z`` (cast to its dtypes).
    *args: Further arguments of ``loss_fn`` (e.g. the batch); not
      differentiated.

  Returns:
    ``(∇L(z), H(z)·v)``, both shaped like ``z``.
  """
  grad_fn = lambda z_: jax.grad(loss_fn)(z_, *args)
  return jax.jvp(grad_fn, (z,), (_cast_like(v, z),))


def worst_case_bound(grad: PyTree, step: PyTree) -> jax.Array:
  """Σ (Δ/2)·|∇L|: the largest first-order term over |δ| ≤ Δ/2 (paper eq. 2).

  Args:
    grad: ∇L, e.g. ``{"weights": ..., "acts": ...}``.
    step: Bin widths Δ with the structure of ``grad``, each leaf
      broadcastable to its gradient leaf (a scalar per tensor, or per
      channel). A zero Δ excludes that tensor (it is not quantized).

  Returns:
    The bound, a scalar.
  """

  def term(g, s):
    g = jnp.asarray(g)
    dtype = jnp.result_type(g.dtype, jnp.float32)
    return jnp.sum(0.5 * jnp.asarray(s, dtype) * jnp.abs(g.astype(dtype)))

  return _tree_sum(jax.tree.leaves(jax.tree.map(term, grad, step)))


def worst_case_perturbation(grad: PyTree, step: PyTree) -> PyTree:
  """δ* = (Δ/2)·sign(∇L): the perturbation that attains :func:`worst_case_bound`."""
  return jax.tree.map(
      lambda g, s: (0.5 * jnp.asarray(s, jnp.asarray(g).dtype)) * jnp.sign(g),
      grad, step)


def expansion_terms(
    loss_fn: Callable[..., jax.Array],
    z: PyTree,
    delta: PyTree,
    step: PyTree,
    *args: Any,
) -> dict[str, jax.Array]:
  """Every term of the loss expansion for the perturbation ``delta``.

  One loss at ``z``, one at ``z + delta``, one HVP (which also gives ∇L).

  Args:
    loss_fn: ``(z, *args) -> scalar``.
    z: The point (float model).
    delta: The perturbation δ, shaped like ``z``.
    step: Bin widths Δ (see :func:`worst_case_bound`), for the bound.
    *args: Further arguments of ``loss_fn`` (e.g. the batch).

  Returns:
    Scalars ``loss`` L(z), ``perturbed_loss`` L(z+δ), ``induced`` their
    difference, ``first_order`` ⟨δ, ∇L⟩, ``curvature`` ½·δᵀHδ,
    ``second_order`` their sum, ``bound`` Σ (Δ/2)·|∇L|.
  """
  delta = _cast_like(delta, z)
  loss = loss_fn(z, *args)
  grad, h_delta = hvp(loss_fn, z, delta, *args)
  moved = jax.tree.map(jnp.add, z, delta)
  perturbed_loss = loss_fn(moved, *args)
  first = inner(delta, grad)
  curvature = 0.5 * inner(delta, h_delta)
  return {
      "loss": loss,
      "perturbed_loss": perturbed_loss,
      "induced": perturbed_loss - loss,
      "first_order": first,
      "curvature": curvature,
      "second_order": first + curvature,
      "bound": worst_case_bound(grad, step),
  }


def gradient_norms(grad: Mapping[str, PyTree]) -> dict[str, jax.Array]:
  """‖∇_W L‖₁, ‖∇_W L‖₂, ‖∇_A L‖₁, ‖∇_A L‖₂ of a ``{"weights", "acts"}`` tree.

  The names are those of the training log (``weight_grad_l1``, …); with a
  mean loss, ‖∇_A L‖₁ is the mean over examples of per-example norms.
  """
  return penalty.gradient_norms(grad["weights"], grad["acts"])


def kl_divergence(
    float_logits: ArrayLike, quant_logits: ArrayLike, mask: ArrayLike | None = None
) -> jax.Array:
  """Mean over unmasked examples of KL(p_float ‖ p_quant), in nats (paper Fig. 2)."""
  kl = ptq.kl_per_example(float_logits, quant_logits)
  if mask is None:
    return jnp.mean(kl)
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


# ---------------------------------------------------------------------------
# Quantization noise.
# ---------------------------------------------------------------------------


class QuantNoise(NamedTuple):
  """The quantization noise of a model at given bit-widths.

  Attributes:
    delta: δ, shaped like :func:`expansion_point`'s ``z``: Q(W) − W per
      kernel, Q(x') − x' per activation point (zeros where not quantized).
    step: Bin widths Δ with the structure of ``delta``: per kernel a scalar
      (per tensor) or ``(1, …, C)`` (per channel), per activation point a
      scalar; 0 where not quantized.
    logits: The logits of the quantized network the noise was recorded in.
  """

  delta: dict[str, dict[str, jax.Array]]
  step: dict[str, dict[str, jax.Array]]
  logits: jax.Array


def weight_noise(
    weights: Mapping[str, ArrayLike], bits: ArrayLike, *, per_channel: bool = False
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array]]:
  """Quantizes kernels exactly as :func:`l1grad.ptq.quantize_params` does.

  Args:
    weights: ``{layer: kernel}``.
    bits: Weight bit-width (may be traced).
    per_channel: One scale per output channel (last axis).

  Returns:
    ``(quantized, delta, step)``: Q(W), Q(W) − W and Δ per kernel.
  """
  quantized, delta, step = {}, {}, {}
  for name, w in weights.items():
    w = jnp.asarray(w)
    scale = ptq.kernel_scale(w, bits, per_channel=per_channel)
    q = quant.fake_quant(w, bits, scale, signed=True)
    quantized[name] = q
    delta[name] = q - w
    step[name] = scale.astype(w.dtype)
  return quantized, delta, step


# Bin width Δ of an activation for a range (the quantizer's own formula).
activation_step = perturb.activation_scale


def quantization_noise(
    model: nn.Module,
    variables: Any,
    images: ArrayLike,
    w_bits: ArrayLike,
    a_bits: ArrayLike,
    ranges: Mapping[str, tuple[ArrayLike, ArrayLike]] | None,
    *,
    weights: ArrayLike = True,
    activations: ArrayLike = True,
    per_channel: bool = False,
    apply_kwargs: Mapping[str, Any] = ptq.EVAL_KWARGS,
) -> QuantNoise:
  """The noise tree of the model quantized at (``w_bits``, ``a_bits``).

  Runs the quantized network once, as post-training quantization does
  (kernels by :func:`weight_noise`, activations by
  :func:`l1grad.perturb.quantize_activation` at every perturbation point) and
  records δ = Q(x') − x' at each point, x' being what arrives there in the
  quantized network. The float network with ``z + delta`` therefore computes
  the quantized network's logits (up to float rounding).

  Args:
    model: A linen model.
    variables: Float variables as evaluated (folded or plain).
    images: The input batch.
    w_bits: Weight bit-width (may be traced).
    a_bits: Activation bit-width (may be traced).
    ranges: ``{point: (low, high)}`` fixed activation ranges (from
      :func:`l1grad.ptq.bn_activation_ranges` or calibration), or None for
      each batch's own min/max.
    weights: Quantize the weights (a bool; may be traced, so that one
      compile serves weights-only, activations-only and both).
    activations: Quantize the activations (likewise).
    per_channel: Per-output-channel weight scales.
    apply_kwargs: Evaluation-mode arguments of ``model.apply``.

  Returns:
    The noise, the bin widths and the quantized logits.
  """
  w_on = jnp.asarray(weights, bool)
  a_on = jnp.asarray(activations, bool)
  kernels, merge = split_weights(_params(variables))
  q_w, _, s_w = weight_noise(kernels, w_bits, per_channel=per_channel)
  # The quantized network uses Q(W) itself (not W + δ), as PTQ does.
  used = {k: jnp.where(w_on, q_w[k], kernels[k]) for k in kernels}
  d_w = {k: used[k] - kernels[k] for k in kernels}
  s_w = {k: jnp.where(w_on, s, jnp.zeros_like(s)) for k, s in s_w.items()}

  d_a: dict[str, jax.Array] = {}
  s_a: dict[str, jax.Array] = {}

  def quantize(key: str, x: jax.Array) -> jax.Array:
    if ranges is None:
      low, high = perturb.dynamic_range(x)
    else:
      low, high = ranges[key]
    q = jnp.where(a_on, perturb.quantize_activation(x, a_bits, low, high), x)
    d_a[key] = q - x
    step = activation_step(a_bits, low, high)
    s_a[key] = jnp.where(a_on, step, jnp.zeros_like(step)).astype(x.dtype)
    return q

  with perturb.transform_layer_inputs(quantize):
    logits = ptq.apply_model(model, _with_params(variables, merge(used)),
                             jnp.asarray(images), apply_kwargs)
  return QuantNoise({"weights": d_w, "acts": d_a}, {"weights": s_w, "acts": s_a},
                    logits)


def noise_histogram(
    delta: ArrayLike,
    step: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    num_bins: int = NUM_BINS,
    limit: float = HIST_LIMIT,
) -> dict[str, jax.Array]:
  """Histogram and moments of the normalised noise δ/Δ of one tensor (Fig. 6).

  Rounding noise lies in [−½, ½] (uniform for the paper's model); values
  clipped by a fixed range fall outside and are counted in ``clipped`` (and
  pile up in the edge bins, the histogram spanning [−limit, limit]).

  Args:
    delta: δ of one tensor.
    step: Its Δ, broadcastable to ``delta``; where Δ = 0, δ/Δ is taken as 0.
    mask: ``[B]`` example mask for an activation (batch axis first).
    num_bins: Number of bins.
    limit: The histogram spans [−limit, limit]; values beyond go to the edges.

  Returns:
    ``counts`` (``[num_bins]``), ``n`` (elements counted), ``zeros`` (δ
    exactly 0, e.g. ReLU zeros that stay 0), ``clipped`` (|δ/Δ| > ½),
    ``sum`` and ``sum_sq`` of δ/Δ, ``max_abs`` of δ/Δ.
  """
  delta = jnp.asarray(delta, jnp.float32)
  step = jnp.broadcast_to(jnp.asarray(step, jnp.float32), delta.shape)
  r = jnp.where(step > 0, delta / jnp.where(step > 0, step, 1.0), 0.0)
  if mask is None:
    w = jnp.ones_like(r)
  else:
    m = jnp.asarray(mask, jnp.float32)
    w = jnp.broadcast_to(m.reshape(m.shape + (1,) * (r.ndim - 1)), r.shape)
  counts, _ = jnp.histogram(jnp.clip(r, -limit, limit), bins=num_bins,
                            range=(-limit, limit), weights=w)
  return {
      "counts": counts,
      "n": jnp.sum(w),
      "zeros": jnp.sum(w * (delta == 0)),
      "clipped": jnp.sum(w * (jnp.abs(r) > 0.5 + CLIP_TOLERANCE)),
      "sum": jnp.sum(w * r),
      "sum_sq": jnp.sum(w * r * r),
      "max_abs": jnp.max(jnp.where(w > 0, jnp.abs(r), 0.0)),
  }


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
  """Pearson correlation; NaN with fewer than 2 points or a constant series."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if x.size < 2:
    return float("nan")
  x, y = x - x.mean(), y - y.mean()
  denom = math.sqrt(float(np.sum(x * x)) * float(np.sum(y * y)))
  return float(np.sum(x * y) / denom) if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman rank correlation (Pearson of average ranks).

  Robust to the few batches whose induced loss dominates a Pearson
  correlation (a batch holding one low-margin example).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  return pearson(_ranks(x[ok]), _ranks(y[ok]))


def _ranks(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="stable")
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.arange(x.size, dtype=np.float64)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  # Tied values share their average rank.
  return (np.bincount(inverse, weights=ranks) / counts)[inverse]


# ---------------------------------------------------------------------------
# Compiled per-batch functions.
# ---------------------------------------------------------------------------


class _Functions(NamedTuple):
  float_pass: Callable[..., Any]
  terms: Callable[..., Any]
  weight_hist: Callable[..., Any]


@functools.lru_cache(maxsize=8)
def _functions(model: nn.Module, per_channel: bool, dynamic: bool) -> _Functions:
  """Jitted per-batch functions; bit-widths and kinds are traced arguments.

  Cached per architecture (linen modules hash by their fields), so two runs
  of one model compile once.
  """
  kwargs = dict(ptq.EVAL_KWARGS)

  def float_pass(variables, batch):
    z = expansion_point(model, variables, batch["image"], apply_kwargs=kwargs)

    def loss_and_logits(z_):
      logits = apply_at(model, variables, z_, batch["image"], apply_kwargs=kwargs)
      return cross_entropy(logits, batch["label"], batch["mask"]), logits

    (loss, logits), grad = jax.value_and_grad(loss_and_logits, has_aux=True)(z)
    mask = batch["mask"].astype(jnp.float32)
    out = {
        "loss": loss,
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
        **gradient_norms(grad),
    }
    return out, logits

  def terms(variables, ranges, batch, float_logits, w_bits, a_bits, use_w, use_a):
    z = expansion_point(model, variables, batch["image"], apply_kwargs=kwargs)
    noise = quantization_noise(
        model, variables, batch["image"], w_bits, a_bits,
        None if dynamic else ranges, weights=use_w, activations=use_a,
        per_channel=per_channel, apply_kwargs=kwargs)
    loss_fn = functools.partial(loss_at, model, variables, apply_kwargs=kwargs)
    out = expansion_terms(loss_fn, z, noise.delta, noise.step, batch)
    mask = batch["mask"]
    out["kl"] = kl_divergence(float_logits, noise.logits, mask)
    out["correct"] = jnp.sum(
        (jnp.argmax(noise.logits, -1) == batch["label"]) * mask.astype(jnp.float32))
    # The directly quantized network's loss; equals perturbed_loss when the
    # noise tree reproduces PTQ (the reconstruction check).
    out["quantized_loss"] = cross_entropy(noise.logits, batch["label"], mask)
    hists = {k: noise_histogram(noise.delta["acts"][k], noise.step["acts"][k], mask=mask)
             for k in noise.delta["acts"]}
    return out, hists

  def weight_hist(variables, w_bits):
    kernels, _ = split_weights(_params(variables))
    _, delta, step = weight_noise(kernels, w_bits, per_channel=per_channel)
    return {k: noise_histogram(delta[k], step[k]) for k in kernels}

  return _Functions(jax.jit(float_pass), jax.jit(terms), jax.jit(weight_hist))


# ---------------------------------------------------------------------------
# Settings, one run, several runs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to analyse (the command's flags).

  Attributes:
    bits: (weight bits, activation bits) pairs.
    num_batches: Analyse only the first N batches of the split (None: all).
    batch_size: Batch size (None: the run's evaluation batch size). The
      correlations are over batches: smaller batches give more points.
    split: ``"test"`` or ``"train"``.
    act_ranges: ``"bn"`` (Data-Free Quantization rule, PTQ's default),
      ``"calibrate"`` (min/max over training batches) or ``"dynamic"`` (each
      batch's own min/max, as STE training does).
    calib_batches: Training batches for ``"calibrate"``.
    per_channel: Per-output-channel weight scales.
    fold: Fold batch norm into the kernels first (as PTQ does).
    step: Checkpoint step (None: the latest).
  """

  bits: tuple[Pair, ...] = tuple(bits_lib.parse_pairs(DEFAULT_BITS))
  num_batches: int | None = None
  batch_size: int | None = None
  split: str = "test"
  act_ranges: str = "bn"
  calib_batches: int = 8
  per_channel: bool = False
  fold: bool = True
  step: int | None = None

  def __post_init__(self):
    pairs = tuple(dict.fromkeys(tuple(int(b) for b in p) for p in self.bits))
    object.__setattr__(self, "bits", pairs)
    if not pairs:
      raise errors.ConfigError("No bit-width pairs given; use e.g. --bits 8:8,4:4.")
    for w, a in pairs:
      bits_lib.check_bits(w, "weight bits")
      bits_lib.check_bits(a, "activation bits")
    if self.num_batches is not None and self.num_batches < 1:
      raise errors.ConfigError(f"--num_batches must be >= 1, got {self.num_batches}.")
    if self.batch_size is not None and self.batch_size < 1:
      raise errors.ConfigError(f"--batch_size must be >= 1, got {self.batch_size}.")
    if self.calib_batches < 1:
      raise errors.ConfigError(f"--calib_batches must be >= 1, got {self.calib_batches}.")
    if self.split not in SPLITS:
      raise errors.ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}.")
    if self.act_ranges not in ACT_RANGE_METHODS:
      raise errors.ConfigError(
          f"--act_ranges must be one of {', '.join(ACT_RANGE_METHODS)}, got"
          f" {self.act_ranges!r}.")

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
        step=self.step,
    )

  def describe_ranges(self) -> str:
    return {
        "bn": "from batch-norm parameters, Data-Free Quantization rule [β ± 6|γ|]"
              " (no data)",
        "calibrate": f"min/max of the float model over {self.calib_batches} training"
                     " batches",
        "dynamic": "each batch's own min/max (per batch, padding included)",
    }[self.act_ranges]

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["bits"] = [bits_lib.format_pair(p) for p in self.bits]
    return d


def _cfg(config: Any, name: str, default: Any) -> Any:
  """A config field, from a ConfigDict or mapping (None: the default)."""
  if config is None:
    return default
  if isinstance(config, Mapping) or hasattr(config, "get"):
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  return default if value is None else value


def _json_float(x: Any) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def _summarize_kind(rows: Mapping[str, list[float]], counts: Sequence[float]
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
  for name in ("induced", "first_order", "second_order", "curvature", "bound", "kl"):
    out[f"{name}_mean"] = _json_float(mean(rows[name]))
  for name in ("first_order", "second_order", "bound"):
    out[f"r_{name}"] = _json_float(pearson(induced, rows[name]))
    out[f"rho_{name}"] = _json_float(spearman(induced, rows[name]))
  for name in ("first_order", "second_order"):
    err = mean(np.abs(np.asarray(rows[name]) - induced))
    # Mean absolute error relative to the mean |induced loss|: 0 is exact,
    # 1 is as bad as predicting 0.
    out[f"rel_err_{name}"] = _json_float(err / mean_abs) if mean_abs > 0 else None
  out["bound_over_induced"] = (_json_float(mean(rows["bound"]) / mean_abs)
                               if mean_abs > 0 else None)
  out["accuracy"] = _json_float(np.sum(rows["correct"]) / max(float(np.sum(counts)), 1.0))
  out["reconstruction_error"] = _json_float(np.max(np.abs(
      np.asarray(rows["quantized_loss"]) - np.asarray(rows["perturbed_loss"]))))
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


def _accumulate(total: dict[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
  new = {k: np.asarray(v, np.float64) for k, v in new.items()}
  if total is None:
    return new
  out = {k: total[k] + new[k] for k in total if k != "max_abs"}
  out["max_abs"] = np.maximum(total["max_abs"], new["max_abs"])
  return out


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
    ``"sources"`` (the files read); None if there is no log.
  """
  def read(path: str) -> list[dict[str, Any]]:
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

  own_path = os.path.join(workdir, "metrics.jsonl")
  own = read(own_path)
  if not own:
    return None
  # (rows, step offset, phase): phase 0 is the source run of a fine-tune.
  parts: list[tuple[list[dict[str, Any]], int, int]] = []
  init_from = _cfg(config, "init_from", "")
  offset = 0
  if init_from:
    parent_path = os.path.join(init_from, "metrics.jsonl")
    parent = read(parent_path)
    if parent:
      parts.append((parent, 0, 0))
      offset = max(int(r.get("step", 0)) for r in parent)
  parts.append((own, offset, 1))
  keys = ("cross_entropy", "penalty", "weight_grad_l1", "act_grad_l1",
          "weight_grad_l2", "act_grad_l2", "regularized", "test_accuracy")
  log: dict[str, Any] = {"step": [], "phase": [], **{k: [] for k in keys}}
  for rows, shift, phase in parts:
    for r in rows:
      log["step"].append(int(r.get("step", 0)) + shift)
      log["phase"].append(phase)
      for k in keys:
        v = r.get(k)
        log[k].append(_json_float(v) if isinstance(v, (int, float)) else None)
  sources = [os.path.join(init_from, "metrics.jsonl")] if len(parts) == 2 else []
  log["sources"] = [os.path.abspath(x) for x in sources + [own_path]]
  log["sources"] = sources
  return log


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
    summary, per-layer noise statistics and the training log.

  Raises:
    errors.UserError: No or unreadable checkpoint, unprepared data, BN
      ranges impossible for this model, empty data.
  """
  from l1grad import data  # pylint: disable=g-import-not-at-top

  say = progress or (lambda line: None)
  prepared = ptq.prepare_run(workdir, settings.ptq_settings(), label=label)
  config = prepared.config
  dynamic = settings.act_ranges == "dynamic"
  fns = _functions(prepared.model, settings.per_channel, dynamic)
  batch_size = ptq.eval_batch_size(config, settings.ptq_settings())
  max_examples = None if settings.num_batches is None else settings.num_batches * batch_size
  batches = data.eval_batches(
      config.dataset, settings.split, global_batch_size=batch_size,
      data_dir=_cfg(config, "data_dir", "") or None, max_examples=max_examples)
  variables = prepared.eval_variables
  ranges = None if dynamic else ptq.range_tree(prepared.ranges)
  kind_args = {k: (jnp.asarray(w), jnp.asarray(a)) for k, (w, a) in KINDS.items()}

  # Weights-only results depend on the weight bits alone, activations-only
  # on the activation bits alone: each distinct case is computed once.
  def case(pair: Pair, kind: str) -> tuple[str, int | None, int | None]:
    use_w, use_a = KINDS[kind]
    return kind, pair[0] if use_w else None, pair[1] if use_a else None

  cases = list(dict.fromkeys(case(p, k) for p in settings.bits for k in KINDS))
  per_batch: dict[str, list[float]] = {}
  rows: dict[tuple[str, int | None, int | None], dict[str, list[float]]] = {
      c: {} for c in cases}
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
      out, hists = fns.terms(variables, ranges, batch, float_logits, w_bits,
                             a_bits, *kind_args[kind])
      for k, v in jax.device_get(out).items():
        rows[c].setdefault(k, []).append(float(v))
      if kind == "both":  # the deployed network's activation noise
        for key, h in jax.device_get(hists).items():
          act_hists[(w, a)][key] = _accumulate(act_hists[(w, a)].get(key), h)
  if not per_batch:
    raise errors.UserError(
        f"No {settings.split} data to analyse for {workdir}; check the dataset"
        " and --num_batches.")
  count = float(np.sum(per_batch["count"]))

  pairs_out = []
  for pair in settings.bits:
    w_hist = jax.device_get(fns.weight_hist(variables, jnp.asarray(pair[0], jnp.int32)))
    kinds = {}
    for kind in KINDS:
      r = rows[case(pair, kind)]
      kinds[kind] = {
          "summary": _summarize_kind(r, per_batch["count"]),
          "per_batch": {k: [_json_float(v) for v in vs] for k, vs in r.items()},
      }
    both = kinds["both"]["summary"]
    say(f"  (W,A)=({pair[0]},{pair[1]}) accuracy {100 * both['accuracy']:.2f} %,"
        f" induced loss {both['induced_mean']:.4g}, 1st order {both['first_order_mean']:.4g}"
        f" (r={_fmt(both['r_first_order'])}), 2nd order {both['second_order_mean']:.4g}"
        f" (r={_fmt(both['r_second_order'])}), bound {both['bound_mean']:.4g}")
    pairs_out.append({
        "w_bits": pair[0],
        "a_bits": pair[1],
        "kinds": kinds,
        "noise": {
            "weights": {k: _noise_summary(h) for k, h in w_hist.items()},
            "acts": {k: _noise_summary(h) for k, h in act_hists[pair].items()},
        },
    })

  shapes = jax.eval_shape(
      lambda v, x: expansion_point(prepared.model, v, x), variables,
      jax.ShapeDtypeStruct((1, *prepared.sample.shape[1:]), jnp.float32))
  folded = (["/".join(p) for p in variables.pairs]
            if isinstance(variables, quant.FoldedVariables) else [])
  return {
      "run": prepared.label,
      "workdir": os.path.abspath(workdir),
      "step": prepared.step,
      "method": ptq.method_label(config),
      "dataset": _cfg(config, "dataset", None),
      "model": _cfg(config, "model", type(prepared.model).__name__),
      "split": settings.split,
      "batch_size": batch_size,
      "num_batches": len(per_batch["count"]),
      "num_examples": int(count),
      "float_accuracy": float(np.sum(per_batch["correct"])) / max(count, 1.0),
      "folded_layers": folded,
      "act_ranges": settings.act_ranges,
      "activation_ranges": (None if dynamic else
                            {k: [lo, hi] for k, (lo, hi) in prepared.ranges.items()}),
      # Dimensions: ‖g‖₁ ≤ √n·‖g‖₂, the gap the paper's §2.3 is about.
      "num_weights": int(sum(math.prod(s.shape) for s in shapes["weights"].values())),
      "num_acts_per_example": int(sum(math.prod(s.shape) for s in shapes["acts"].values())),
      "per_batch": {k: [_json_float(v) for v in vs] for k, vs in per_batch.items()},
      "pairs": pairs_out,
      "training_log": training_log(workdir, config),
  }


def _fmt(x: float | None, spec: str = ".3f") -> str:
  return "–" if x is None else format(x, spec)


def _run_labels(workdirs: Sequence[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(set(names)) == len(names):
    return names
  return [os.path.normpath(w) for w in workdirs]


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
    raise errors.ConfigError("Pass at least one --workdir (a directory train.py wrote).")
  say = progress or (lambda line: None)
  runs = []
  for workdir, label in zip(workdirs, _run_labels(workdirs)):
    say(f"{label}: analysing {settings.split} batches at"
        f" {', '.join(bits_lib.format_pair(p) for p in settings.bits)}")
    run = analyze_run(workdir, settings, label=label, progress=say)
    say(f"  {run['num_batches']} batches, {run['num_examples']} examples, float"
        f" accuracy {100 * run['float_accuracy']:.2f} %")
    runs.append(run)
  report = {
      "format": JSON_FORMAT,
      "settings": settings.to_json(),
      "conventions": {
          "batch_norm": ("folded into the preceding kernels (W are the folded kernels,"
                         " as PTQ quantizes them)" if settings.fold else
                         "not folded: unfolded kernels quantized, batch norm in float"),
          "weights": ("symmetric, per output channel" if settings.per_channel
                      else "symmetric, per tensor") + ", every Conv/Dense kernel",
          "activation_ranges": settings.describe_ranges(),
          "activation_noise": ("δ_A = Q(x') − x' recorded in the quantized network"
                               " (upstream points already quantized), so L(z+δ) is"
                               " the quantized network's loss"),
          "loss": "mean cross-entropy over a batch's unpadded examples, eval mode",
          "hist_range": [-HIST_LIMIT, HIST_LIMIT],
          "hist_bins": NUM_BINS,
          "kinds": {k: {"weights": w, "activations": a} for k, (w, a) in KINDS.items()},
      },
      "runs": runs,
  }
  files: dict[str, str] = {}
  if write:
    files = write_outputs(report, out_dir or workdirs[0], plot=plot)
  return report, files


# ---------------------------------------------------------------------------
# Outputs: JSON, Markdown, figures.
# ---------------------------------------------------------------------------


def markdown(report: Mapping[str, Any]) -> str:
  """The summary tables of a report, one per run."""
  conv = report["conventions"]
  lines = ["# Loss expansion vs real quantization noise", "",
           f"Batch norm {conv['batch_norm']}; weights {conv['weights']};"
           f" activation ranges {conv['activation_ranges']}.", "",
           "Per batch: induced = L(quantized) − L(float); 1st = ⟨δ, ∇L⟩;"
           " 2nd = 1st + ½δᵀHδ; bound = Σ(Δ/2)|∇L|. Columns are means over"
           " batches weighted by their example counts; r = Pearson correlation"
           " with the induced loss over batches,"
           " ρ = Spearman (rank) correlation; err = mean |prediction − induced| /"
           " mean |induced| (1 is no better than predicting 0).", ""]
  for run in report["runs"]:
    pb = run["per_batch"]
    lines += [
        f"## {run['run']} ({run['method']}, step {run['step']})", "",
        f"{run['num_examples']} {run['split']} examples in {run['num_batches']} batches"
        f" of {run['batch_size']}; float accuracy {100 * run['float_accuracy']:.2f} %;"
        f" mean loss {np.average(pb['loss'], weights=pb['count']):.4g}.",
        f"Gradient norms (mean over batches): ‖∇W‖₁ {np.mean(pb['weight_grad_l1']):.4g},"
        f" ‖∇W‖₂ {np.mean(pb['weight_grad_l2']):.4g} ({run['num_weights']} weights),"
        f" ‖∇A‖₁ {np.mean(pb['act_grad_l1']):.4g},"
        f" ‖∇A‖₂ {np.mean(pb['act_grad_l2']):.4g}.",
        "",
        "| (W,A) | kind | acc % | KL | induced | 1st | 2nd | bound | r 1st | r 2nd |"
        " r bound | ρ 1st | ρ 2nd | err 1st | err 2nd |",
        "|---|---|" + "---:|" * 13,
    ]
    for entry in run["pairs"]:
      for kind, k in entry["kinds"].items():
        s = k["summary"]
        lines.append(
            f"| ({entry['w_bits']},{entry['a_bits']}) | {kind} |"
            f" {_fmt(None if s['accuracy'] is None else 100 * s['accuracy'], '.2f')} |"
            f" {_fmt(s['kl_mean'], '.3g')} | {_fmt(s['induced_mean'], '.3g')} |"
            f" {_fmt(s['first_order_mean'], '.3g')} | {_fmt(s['second_order_mean'], '.3g')} |"
            f" {_fmt(s['bound_mean'], '.3g')} | {_fmt(s['r_first_order'], '.2f')} |"
            f" {_fmt(s['r_second_order'], '.2f')} | {_fmt(s['r_bound'], '.2f')} |"
            f" {_fmt(s['rho_first_order'], '.2f')} | {_fmt(s['rho_second_order'], '.2f')} |"
            f" {_fmt(s['rel_err_first_order'], '.2f')} |"
            f" {_fmt(s['rel_err_second_order'], '.2f')} |")
    lines += ["", "Noise δ/Δ per tensor, first pair (std of a uniform [−½,½]: 0.289):", "",
              "| tensor | std | zero fraction | clipped fraction |", "|---|---:|---:|---:|"]
    for entry in run["pairs"][:1]:
      for group, tag in (("weights", "W"), ("acts", "A")):
        for name, n in entry["noise"][group].items():
          lines.append(f"| {tag} {name} @ {entry['w_bits'] if tag == 'W' else entry['a_bits']}"
                       f" bits | {n['std']:.3f} | {n['zero_fraction']:.3f} |"
                       f" {n['clipped_fraction']:.4f} |")
    lines.append("")
  return "\n".join(lines)


def write_outputs(report: Mapping[str, Any], out_dir: str, *, plot: bool = True
                  ) -> dict[str, str]:
  """Writes ``analysis.json``, ``analysis.md`` and (``plot``) the PNG figures.

  Returns:
    ``{name: path}`` of the files written.
  """
  os.makedirs(out_dir, exist_ok=True)
  files = {"json": os.path.join(out_dir, "analysis.json"),
           "md": os.path.join(out_dir, "analysis.md")}
  with open(files["json"], "w") as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
    f.write("\n")
  with open(files["md"], "w") as f:
    f.write(markdown(report))
  if plot:
    files.update(plot_all(report, out_dir))
  return files


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _safe_name(label: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _finite(values: Iterable[Any]) -> np.ndarray:
  arr = np.asarray([np.nan if v is None else v for v in values], np.float64)
  return arr


def plot_all(report: Mapping[str, Any], out_dir: str) -> dict[str, str]:
  """Writes the four figures; returns ``{name: path}``."""
  files = {
      "fig2": os.path.join(out_dir, "analysis_grad_norms_kl.png"),
      "fig3": os.path.join(out_dir, "analysis_expansion.png"),
  }
  plot_norms_and_kl(report, files["fig2"])
  plot_expansion(report, files["fig3"])
  for run in report["runs"]:
    path = os.path.join(out_dir, f"analysis_noise_{_safe_name(run['run'])}.png")
    plot_noise(run, report["conventions"], path)
    files[f"fig6_{run['run']}"] = path
  if any(run.get("training_log") for run in report["runs"]):
    files["fig7"] = os.path.join(out_dir, "analysis_penalty.png")
    plot_training_log(report, files["fig7"])
  return files


def plot_norms_and_kl(report: Mapping[str, Any], path: str) -> None:
  """Fig. 2: per-batch ℓ1 vs ℓ2 gradient norms; KL per bit-width, per run."""
  plt = _pyplot()
  runs = report["runs"]
  fig, (ax_n, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
  names = [("weight_grad_l1", "‖∇W L‖₁"), ("weight_grad_l2", "‖∇W L‖₂"),
           ("act_grad_l1", "‖∇A L‖₁"), ("act_grad_l2", "‖∇A L‖₂")]
  width = 0.8 / max(len(runs), 1)
  for i, run in enumerate(runs):
    color = f"C{i}"
    for j, (key, _) in enumerate(names):
      y = _finite(run["per_batch"][key])
      x = j + (i - (len(runs) - 1) / 2) * width + np.linspace(-0.3, 0.3, len(y)) * width
      ax_n.scatter(x, y, s=12, color=color, alpha=0.7,
                   label=f"{run['run']} ({run['method']})" if j == 0 else None)
  ax_n.set_xticks(range(len(names)))
  ax_n.set_xticklabels([n for _, n in names])
  ax_n.set_yscale("log")
  ax_n.set_ylabel("per test batch")
  ax_n.set_title("Gradient norms: ℓ1 vs ℓ2 (paper Fig. 2, left)")
  ax_n.grid(alpha=0.3, which="both", axis="y")
  ax_n.legend(fontsize="small")

  pairs = [(e["w_bits"], e["a_bits"]) for e in runs[0]["pairs"]] if runs else []
  for i, run in enumerate(runs):
    data = []
    for e in run["pairs"]:
      kl = _finite(e["kinds"]["both"]["per_batch"]["kl"])
      data.append(np.maximum(kl[np.isfinite(kl)], 1e-12))
    pos = np.arange(len(data)) + (i - (len(runs) - 1) / 2) * width
    bp = ax_k.boxplot(data, positions=pos, widths=width * 0.8, patch_artist=True,
                      showfliers=True)
    for patch in bp["boxes"]:
      patch.set_facecolor(f"C{i}")
      patch.set_alpha(0.5)
    ax_k.plot([], [], color=f"C{i}", lw=6, alpha=0.5, label=run["run"])
  ax_k.set_xticks(range(len(pairs)))
  ax_k.set_xticklabels([f"({w},{a})" for w, a in pairs])
  ax_k.set_yscale("log")
  ax_k.set_xlabel("(weight bits, activation bits)")
  ax_k.set_ylabel("KL(p_float ‖ p_quant) per batch (nats)")
  ax_k.set_title("Predictive shift under quantization (Fig. 2, right)")
  ax_k.grid(alpha=0.3, which="both", axis="y")
  ax_k.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_expansion(report: Mapping[str, Any], path: str) -> None:
  """Fig. 3: induced loss vs first- and second-order predictions, per batch."""
  plt = _pyplot()
  runs = report["runs"]
  pairs = [(e["w_bits"], e["a_bits"]) for e in runs[0]["pairs"]]
  kinds = list(KINDS)
  fig, axes = plt.subplots(len(kinds), len(pairs), figsize=(3.4 * len(pairs), 3.1 * len(kinds)),
                           squeeze=False)
  for col, pair in enumerate(pairs):
    for row, kind in enumerate(kinds):
      ax = axes[row][col]
      lo, hi = np.inf, -np.inf
      for i, run in enumerate(runs):
        entry = next(e for e in run["pairs"] if (e["w_bits"], e["a_bits"]) == pair)
        k = entry["kinds"][kind]
        x = _finite(k["per_batch"]["induced"])
        s = k["summary"]
        for key, marker, name in (("first_order", "o", "1st"), ("second_order", "x", "2nd")):
          y = _finite(k["per_batch"][key])
          ax.scatter(x, y, s=14, marker=marker, color=f"C{i}", alpha=0.75,
                     label=f"{run['run']} {name} r={_fmt(s[f'r_{key}'], '.2f')}"
                           f" ρ={_fmt(s[f'rho_{key}'], '.2f')}")
          both = np.concatenate([x, y])
          both = both[np.isfinite(both)]
          if both.size:
            lo, hi = min(lo, both.min()), max(hi, both.max())
      if np.isfinite(lo):
        pad = 0.05 * (hi - lo if hi > lo else abs(hi) + 1e-12)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
      ax.set_title(f"({pair[0]},{pair[1]}) {kind}", fontsize="medium")
      ax.ticklabel_format(style="sci", scilimits=(-2, 3), axis="both")
      ax.grid(alpha=0.3)
      ax.legend(fontsize="x-small")
      if row == len(kinds) - 1:
        ax.set_xlabel("induced loss L(z+δ) − L(z)")
      if col == 0:
        ax.set_ylabel("prediction")
  fig.suptitle("Loss expansion vs real quantization noise, one point per batch"
               " (paper Fig. 3); dashed: y = x")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_noise(run: Mapping[str, Any], conventions: Mapping[str, Any], path: str) -> None:
  """Fig. 6: histograms of δ/Δ per tensor, one line per bit-width."""
  plt = _pyplot()
  limit = float(conventions["hist_range"][1])
  nbins = int(conventions["hist_bins"])
  edges = np.linspace(-limit, limit, nbins + 1)
  centers = 0.5 * (edges[1:] + edges[:-1])
  width = edges[1] - edges[0]
  tensors = ([("weights", n, "W") for n in run["pairs"][0]["noise"]["weights"]] +
             [("acts", n, "A") for n in run["pairs"][0]["noise"]["acts"]])
  ncols = min(4, max(len(tensors), 1))
  nrows = max(1, math.ceil(len(tensors) / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), squeeze=False)
  for idx, (group, name, tag) in enumerate(tensors):
    ax = axes[idx // ncols][idx % ncols]
    seen = set()
    for entry in run["pairs"]:
      b = entry["w_bits"] if tag == "W" else entry["a_bits"]
      if b in seen or name not in entry["noise"][group]:
        continue
      seen.add(b)
      n = entry["noise"][group][name]
      counts = np.asarray(n["counts"], np.float64)
      density = counts / max(counts.sum(), 1.0) / width
      ax.step(centers, density, where="mid",
              label=f"{b} bit (zeros {100 * n['zero_fraction']:.0f} %,"
                    f" clipped {100 * n['clipped_fraction']:.1f} %)")
    ax.plot([-0.5, -0.5, 0.5, 0.5], [0, 1, 1, 0], "k:", lw=0.8)
    if tag == "A":
      # Exact zeros (ReLU outputs that stay 0) make a spike far above the rest.
      ax.set_yscale("log")
    else:
      ax.set_ylim(0, max(1.6, ax.get_ylim()[1]))
    ax.set_title(f"{tag} {name}", fontsize="medium")
    ax.set_xlabel("δ / Δ")
    ax.legend(fontsize="xx-small")
    ax.grid(alpha=0.3)
  for idx in range(len(tensors), nrows * ncols):
    axes[idx // ncols][idx % ncols].axis("off")
  fig.suptitle(f"{run['run']}: quantization noise per tensor (paper Fig. 6);"
               " dotted: uniform on [−½, ½]")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_training_log(report: Mapping[str, Any], path: str) -> None:
  """Fig. 7: cross-entropy, penalty and gradient ℓ1 norms over training."""
  plt = _pyplot()
  runs = [r for r in report["runs"] if r.get("training_log")]
  fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
  for ax, run in zip(axes[0], runs):
    log = run["training_log"]
    steps = np.asarray(log["step"], np.float64)
    curves = (("cross_entropy", "cross-entropy"), ("penalty", "penalty λ‖∇L‖"),
              ("weight_grad_l1", "‖∇W L‖₁ (train batch)"),
              ("act_grad_l1", "‖∇A L‖₁ (train batch)"))
    for i, (key, name) in enumerate(curves):
      y = _finite(log[key])
      if not np.any(np.isfinite(y) & (y > 0)):
        continue  # e.g. no penalty in an unregularized run
      ax.plot(steps, np.where(y > 0, y, np.nan), label=name, lw=1.2, color=f"C{i}")
    reg = _finite(log["regularized"])
    if np.any(reg > 0):
      on = steps[reg > 0]
      ax.axvspan(on.min(), on.max(), color="0.5", alpha=0.12, label="penalty on")
    phases = np.asarray(log["phase"])
    if np.any(phases == 0):
      ax.axvline(steps[phases == 1].min(), color="k", ls=":", lw=0.8,
                 label="fine-tune starts")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{run['run']} ({run['method']})", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
  fig.suptitle("Training log (paper Fig. 7)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m l1grad.analysis",
      description="Measure the paper's first/second-order loss expansion against"
                  " the real quantization noise of trained runs; writes"
                  " analysis.json, analysis.md and PNG figures.")
  p.add_argument("--workdir", action="append", required=True,
                 help="A training run's directory (repeat to compare runs).")
  p.add_argument("--bits", default=DEFAULT_BITS,
                 help="Comma-separated W:A pairs, each in 2..16 (default %(default)s).")
  p.add_argument("--num_batches", type=int, default=None,
                 help="Analyse only the first N batches (default: the whole split).")
  p.add_argument("--batch_size", type=int, default=None,
                 help="Batch size (default: the run's eval batch size); correlations"
                      " are over batches, so smaller batches give more points.")
  p.add_argument("--out", default=None, help="Output directory (default: the first --workdir).")
  p.add_argument("--split", default="test", choices=SPLITS)
  p.add_argument("--act_ranges", default="bn", choices=ACT_RANGE_METHODS,
                 help="Activation ranges: bn (DFQ rule, PTQ's default), calibrate, dynamic.")
  p.add_argument("--calib_batches", type=int, default=8)
  p.add_argument("--per_channel", action="store_true", help="Per-channel weight scales.")
  p.add_argument("--nofold", dest="fold", action="store_false",
                 help="Do not fold batch norm (quantize the unfolded kernels).")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: latest).")
  p.add_argument("--noplot", dest="plot", action="store_false", help="Skip the figures.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; returns the exit code (2 for bad input, no traceback)."""
  args = _parser().parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  # Orbax logs every read-only checkpoint open at WARNING level.
  logging.set_verbosity(logging.ERROR)
  say = lambda line: print(line, flush=True)
  try:
    settings = Settings(
        bits=tuple(bits_lib.parse_pairs(args.bits)),
        num_batches=args.num_batches,
        batch_size=args.batch_size,
        split=args.split,
        act_ranges=args.act_ranges,
        calib_batches=args.calib_batches,
        per_channel=args.per_channel,
        fold=args.fold,
        step=args.step,
    )
    report, files = analyze(args.workdir, settings, out_dir=args.out, plot=args.plot,
                            progress=say)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print()
  print(markdown(report))
  print("Wrote " + ", ".join(files[k] for k in sorted(files)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
