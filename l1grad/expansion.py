r"""The loss expansion around the float model, against real quantization noise.

The paper (§2, §2.3, Appendix B; docs/method.md §1) models post-training
quantization as an additive perturbation δ of z = (W, A), bounded by
‖δ‖∞ ≤ Δ/2, and expands the loss around the float model:

  L(z + δ) − L(z) = ⟨δ, ∇L⟩ + ½·δᵀHδ + O(‖δ‖³),
  max over ‖δ‖∞ ≤ Δ/2 of ⟨δ, ∇L⟩ = Σ (Δ/2)·|∇L|   (Δ per tensor),

and regularizes the ℓ1 norm of the gradient because it bounds the first-order
term for every bit-width at once. This module holds the maths to measure each
term for the *actual* quantization noise of a trained model; the per-run
measurement and the command are :mod:`l1grad.analysis`.

Building blocks (pure, jit-able, usable on any Flax linen model built from
``nn.Conv``/``nn.Dense``):

* the expansion point ``z = {"weights": {layer: kernel}, "acts": {point: 0}}``
  (:func:`expansion_point`), and the model as a function of it
  (:func:`apply_at`, :func:`loss_at`); layers and activation points are keyed
  by module path (docs/method.md §3), the points being those of
  :mod:`l1grad.perturb` (inputs of every Conv/Dense but the first). Batch
  norm in train mode: ``apply_kwargs=TRAIN_KWARGS, mutable=TRAIN_MUTABLE``
  (the loss then comes with the updated batch statistics as aux);
  :func:`point_loss` builds the same ``z`` for any user loss
  ``(params, *args) -> loss`` or ``(loss, aux)``, the way
  :func:`l1grad.penalty.value_and_grad` does;
* :func:`hvp`: a Hessian-vector product over (weights, activation points),
  forward-over-reverse (``jax.jvp`` of ``jax.grad``);
* :func:`quantization_noise`: the noise tree δ and bin widths Δ of the model
  quantized at (W, A) bits, weights-only, activations-only or both;
* :func:`expansion_terms`: induced loss, first-order term, worst-case ℓ1
  bound, second-order prediction; :func:`gradient_norms`,
  :func:`kl_divergence`, :func:`noise_histogram`;
* the expected second-order loss of uniform quantization noise
  δ ~ U[−Δ/2, Δ/2] (docs/method.md §6): :func:`uniform_noise` samples δ,
  :func:`hutchinson_curvature` estimates E[½·δᵀHδ] = Σᵢ (Δᵢ²/24)·Hᵢᵢ with one
  HVP per sample, :func:`antithetic_gap` measures
  ½[L(z+δ) + L(z−δ)] − L(z) (the even part of the loss change, kinks
  included); :func:`hutchinson_from_hvp` and :func:`linearization_point`
  run the estimate on the Hessian map :func:`l1grad.penalty.value_and_grad`
  hands to its ``extra`` terms; :func:`second_order_draw` draws all of them
  at once, to check them by brute force. All are differentiable: a training
  step can add them to the penalty (``examples/second_order.py``).

The activation noise at a point is recorded *in the quantized network*:
δ_A = Q(x') − x' where x' is what arrives at the point when everything
upstream is already quantized. Added to the float network as fixed
perturbations, (δ_W, δ_A) reproduce the quantized network exactly, so
L(z + δ) − L(z) is the real PTQ loss change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from l1grad import fold
from l1grad import params as params_lib
from l1grad import penalty
from l1grad import perturb
from l1grad import ptq
from l1grad import quant
from l1grad import ranges as ranges_lib

__all__ = [
  "TRAIN_KWARGS",
  "TRAIN_MUTABLE",
  "QuantNoise",
  "activation_step",
  "antithetic_gap",
  "apply_at",
  "cross_entropy",
  "expansion_point",
  "expansion_terms",
  "gradient_norms",
  "hutchinson_curvature",
  "hutchinson_from_hvp",
  "hutchinson_term",
  "hvp",
  "inner",
  "kl_divergence",
  "linearization_point",
  "loss_at",
  "noise_histogram",
  "point_loss",
  "quantization_noise",
  "second_order_draw",
  "second_order_estimates",
  "split_weights",
  "uniform_noise",
  "weight_noise",
  "weights_of",
  "worst_case_bound",
  "worst_case_perturbation",
]

PyTree = Any
Batch = Mapping[str, ArrayLike]
# Which collections ``model.apply`` returns updated (Flax's ``mutable``):
# False for none (then it returns the output alone).
Mutable = bool | str | Sequence[str]

# Batch norm in train mode (batch statistics, updated running averages): pass
# ``apply_kwargs=TRAIN_KWARGS, mutable=TRAIN_MUTABLE`` to the functions below.
TRAIN_KWARGS: Mapping[str, Any] = {"train": True}
TRAIN_MUTABLE: tuple[str, ...] = ("batch_stats",)

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


# The kernels of a params tree by layer (module path), and a merge function:
# l1grad.params.split_kernels, under its earlier name.
split_weights = params_lib.split_kernels


def _params(variables: Any) -> PyTree:
  if isinstance(variables, fold.FoldedVariables):
    return variables.params
  return variables["params"]


def weights_of(variables: Any) -> dict[str, jax.Array]:
  """The Conv/Dense kernels of folded or plain variables, by layer path."""
  weights, _ = params_lib.split_kernels(_params(variables))
  return weights


def _with_params(variables: Any, params: PyTree) -> Any:
  if isinstance(variables, fold.FoldedVariables):
    return variables.replace(params=params)
  return {**variables, "params": params}


def _apply_options(
  apply_kwargs: Mapping[str, Any], mutable: Mutable
) -> tuple[dict[str, Any], Mutable]:
  """``apply_kwargs`` without ``mutable``, and the collections to update.

  ``mutable`` may come as the argument or inside ``apply_kwargs`` (the
  keywords of a train-mode ``model.apply``); either way the functions below
  know that ``model.apply`` returns ``(output, updates)``.
  """
  kwargs = dict(apply_kwargs)
  given = kwargs.pop("mutable", False)
  return kwargs, mutable if mutable is not False else given


def _apply(
  model: nn.Module,
  variables: Any,
  images: ArrayLike,
  kwargs: Mapping[str, Any],
  mutable: Mutable,
) -> Any:
  if mutable is False:
    # The eval-mode call exactly as before (same program, same numbers).
    return ranges_lib.apply_model(model, variables, images, kwargs)
  if isinstance(mutable, Sequence) and not isinstance(mutable, str):
    mutable = list(mutable)
  return ranges_lib.apply_model(
    model, variables, images, {**kwargs, "mutable": mutable}
  )


def expansion_point(
  model: nn.Module,
  variables: Any,
  images: ArrayLike,
  *,
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
  mutable: Mutable = False,
) -> dict[str, dict[str, jax.Array]]:
  """The float model as a point ``z = {"weights": ..., "acts": ...}``.

  Args:
    model: A linen model.
    variables: Its variables as evaluated: folded
      (:class:`l1grad.fold.FoldedVariables`) or a plain variables dict.
    images: A batch (its shape fixes the activation points' shapes).
    apply_kwargs: Arguments of ``model.apply``: evaluation mode by default,
      :data:`TRAIN_KWARGS` for batch norm in train mode.
    mutable: Collections ``model.apply`` updates (:data:`TRAIN_MUTABLE` in
      train mode), or False.

  Returns:
    ``{"weights": {layer: kernel}, "acts": {point: zeros}}``: the kernels and
    a zero perturbation per activation point, shaped like the batch's
    activations.
  """
  kwargs, mutable = _apply_options(apply_kwargs, mutable)
  weights, _ = params_lib.split_kernels(_params(variables))
  shapes = perturb.activation_shapes(
    lambda v, x: _apply(model, v, x, kwargs, mutable),
    variables,
    jnp.asarray(images),
  )
  return {"weights": dict(weights), "acts": perturb.zero_perturbations(shapes)}


def apply_at(
  model: nn.Module,
  variables: Any,
  z: Mapping[str, Mapping[str, ArrayLike]],
  images: ArrayLike,
  *,
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
  mutable: Mutable = False,
) -> Any:
  """Logits at ``z``: kernels ``z["weights"]``, perturbations ``z["acts"]``.

  Args:
    model: A linen model.
    variables: Its variables (folded or plain); every leaf but the kernels is
      taken from here (biases, folded biases, batch statistics).
    z: ``{"weights": {layer: kernel}, "acts": {point: perturbation}}`` as
      from :func:`expansion_point` (possibly moved).
    images: The input batch.
    apply_kwargs: Arguments of ``model.apply``: evaluation mode by default,
      :data:`TRAIN_KWARGS` for batch norm in train mode. A ``"mutable"``
      entry counts as the argument ``mutable``.
    mutable: Collections ``model.apply`` returns updated
      (:data:`TRAIN_MUTABLE` in train mode), or False.

  Returns:
    The logits; with ``mutable``, ``(logits, updates)`` as ``model.apply``
    returns them (``updates["batch_stats"]``: the new running averages).
  """
  kwargs, mutable = _apply_options(apply_kwargs, mutable)
  _, merge = params_lib.split_kernels(_params(variables))
  moved = _with_params(variables, merge(z["weights"]))
  with perturb.perturbed(z["acts"]):
    return _apply(model, moved, images, kwargs, mutable)


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
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits, jnp.asarray(labels)
  )
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
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
  mutable: Mutable = False,
) -> Any:
  """L(z): the masked mean cross-entropy of :func:`apply_at` on ``batch``.

  ``functools.partial(loss_at, model, variables)`` is a ``(z, batch) -> L``
  function for :func:`hvp` and :func:`expansion_terms`. In train mode
  (``mutable``) it returns ``(L, updates)``, for ``jax.grad(...,
  has_aux=True)``; the scalar-loss building blocks take
  ``lambda z, b: loss_at(..., mutable=...)[0]``. With batch norm in train
  mode the batch statistics are functions of ``z`` too, so derivatives
  include their share (as in training).

  Args:
    model: A linen model.
    variables: Its variables (folded or plain).
    z: The point (see :func:`apply_at`).
    batch: ``{"image", "label"}`` and optionally ``"mask"``.
    apply_kwargs: Arguments of ``model.apply`` (see :func:`apply_at`).
    mutable: Collections ``model.apply`` returns updated, or False.

  Returns:
    The scalar loss; with ``mutable``, ``(loss, updates)``.
  """
  kwargs, mutable = _apply_options(apply_kwargs, mutable)
  out = apply_at(
    model, variables, z, batch["image"], apply_kwargs=kwargs, mutable=mutable
  )
  logits, updates = (out, None) if mutable is False else out
  loss = cross_entropy(logits, batch["label"], batch.get("mask"))
  return loss if mutable is False else (loss, updates)


def point_loss(
  loss_fn: Callable[..., Any],
  params: PyTree,
  *args: Any,
  points: str = "layer_inputs",
) -> tuple[dict[str, dict[str, jax.Array]], Callable[..., Any]]:
  """Any user loss as a function of ``z = {"weights", "acts"}``.

  The parametrization :func:`l1grad.penalty.value_and_grad` differentiates:
  the kernels of ``params`` (leaves named ``kernel``, keyed by layer) and a
  zero perturbation at every activation point of :mod:`l1grad.perturb`,
  found by tracing ``loss_fn(params, *args)`` (no computation runs).
  ``loss_fn`` may apply any linen model in any mode: a train-mode loss that
  returns ``(loss, aux)`` with the new batch statistics works as it is.

  Args:
    loss_fn: ``(params, *args) -> loss`` or ``(loss, aux)``.
    params: Its parameters; leaves named ``kernel`` are W.
    *args: The rest of its arguments (a batch, batch statistics, an rng),
      bound into the returned function.
    points: Where A is read (:data:`l1grad.perturb.POINTS`).

  Returns:
    ``(z, fn)``: the point (kernels of ``params``, zero perturbations), and
    ``fn(z)``, whatever ``loss_fn`` returns with the kernels ``z["weights"]``
    (the other leaves from ``params``) and ``z["acts"]`` added at the
    points. ``fn(z)`` at the returned ``z`` equals ``loss_fn(params,
    *args)``.
  """
  call = lambda p: loss_fn(p, *args)
  shapes = perturb.activation_shapes(call, params)
  sites = perturb.point_sites(points, call, params)
  kernels, merge = params_lib.split_kernels(params)
  z = {"weights": dict(kernels), "acts": perturb.zero_perturbations(shapes)}

  def fn(z_: Mapping[str, Mapping[str, ArrayLike]]) -> Any:
    with perturb.perturbed(z_["acts"], sites=sites):
      return call(merge(z_["weights"]))

  return z, fn


# ---------------------------------------------------------------------------
# Tree algebra, Hessian-vector product, expansion terms.
# ---------------------------------------------------------------------------


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
  # jax.jvp needs tangents of the primals' dtypes.
  return jax.tree.map(
    lambda t, p: jnp.asarray(t, jnp.asarray(p).dtype), tree, like
  )


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
  """δ* = (Δ/2)·sign(∇L), the perturbation attaining :func:`worst_case_bound`."""
  return jax.tree.map(
    lambda g, s: (0.5 * jnp.asarray(s, jnp.asarray(g).dtype)) * jnp.sign(g),
    grad,
    step,
  )


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
  mean loss and batch norm in eval mode (as here), ‖∇_A L‖₁ is the mean over
  examples of per-example norms (in train mode it is not: docs/method.md §1).
  """
  return penalty.gradient_norms(grad["weights"], grad["acts"])


def kl_divergence(
  float_logits: ArrayLike,
  quant_logits: ArrayLike,
  mask: ArrayLike | None = None,
) -> jax.Array:
  """Mean KL(p_float ‖ p_quant) over unmasked examples, nats (paper Fig. 2)."""
  kl = ptq.kl_per_example(float_logits, quant_logits)
  if mask is None:
    return jnp.mean(kl)
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


# ---------------------------------------------------------------------------
# The expected second-order loss of uniform noise.
# ---------------------------------------------------------------------------


def _leaves_and_steps(
  z: PyTree, step: PyTree
) -> tuple[list[jax.Array], list[jax.Array], Any]:
  """The leaves of ``z``, its bin widths in the same order, the treedef.

  ``step`` may be a prefix of ``z``'s structure: a leaf of it is the bin
  width of every tensor below (one number for all the activation points).
  """
  leaves, treedef = jax.tree.flatten(z)
  full = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), step, z)
  steps = treedef.flatten_up_to(full)
  leaves = [jnp.asarray(x) for x in leaves]
  steps = [jnp.asarray(s, x.dtype) for s, x in zip(steps, leaves)]
  return leaves, steps, treedef


def uniform_noise(key: jax.Array, z: PyTree, step: PyTree) -> PyTree:
  """δ ~ U[−Δ/2, Δ/2], independent per element: the paper's model of rounding.

  Pure and jittable; one key per leaf (split from ``key``), so a leaf's
  noise does not depend on the other leaves' shapes.

  Args:
    key: A PRNG key.
    z: The point, e.g. ``{"weights": ..., "acts": ...}``; δ takes its
      leaves' shapes and dtypes.
    step: Bin widths Δ, structured like ``z`` (or a prefix of it: one Δ for
      a whole subtree), each leaf broadcastable to its ``z`` leaf (a scalar
      per tensor, or per channel); 0 where a tensor is not quantized (its δ
      is 0).

  Returns:
    δ, structured like ``z``.
  """
  leaves, steps, treedef = _leaves_and_steps(z, step)
  keys = jax.random.split(key, max(len(leaves), 1))
  noise = [
    s * jax.random.uniform(k, x.shape, x.dtype, -0.5, 0.5)
    for k, x, s in zip(keys, leaves, steps)
  ]
  return jax.tree.unflatten(treedef, noise)


def _rademacher_probe(key: jax.Array, z: PyTree, step: PyTree) -> PyTree:
  """v = r·Δ/√12, r = ±1: E[v vᵀ] = E[δ δᵀ] = diag(Δ²/12) of uniform δ."""
  leaves, steps, treedef = _leaves_and_steps(z, step)
  keys = jax.random.split(key, max(len(leaves), 1))
  probe = [
    jax.random.rademacher(k, x.shape, x.dtype) * (s / jnp.sqrt(12.0))
    for k, x, s in zip(keys, leaves, steps)
  ]
  return jax.tree.unflatten(treedef, probe)


def hutchinson_from_hvp(
  hvp_fn: Callable[[PyTree], PyTree],
  z: PyTree,
  step: PyTree,
  key: jax.Array,
  *,
  num_samples: int = 1,
) -> jax.Array:
  """:func:`hutchinson_curvature` given the Hessian map ``v ↦ H·v`` itself.

  For a map that already exists, e.g. the linearization the penalty builds
  (:func:`linearization_point`), so the estimate costs one forward-mode pass
  through it per sample and no new gradient.

  Args:
    hvp_fn: ``v -> H·v``, both structured like ``z``.
    z: The point (only its structure, shapes and dtypes are used).
    step: Bin widths Δ structured like ``z`` (see :func:`uniform_noise`).
    key: PRNG key of the probes.
    num_samples: Probes averaged (see :func:`hutchinson_curvature`).

  Returns:
    The estimate of Σᵢ (Δᵢ²/24)·Hᵢᵢ, a scalar.
  """
  quadratic = lambda v: 0.5 * inner(v, hvp_fn(v))
  return _hutchinson(quadratic, z, step, key, num_samples)


def _hutchinson(
  quadratic: Callable[[PyTree], jax.Array],
  z: PyTree,
  step: PyTree,
  key: jax.Array,
  num_samples: int,
) -> jax.Array:
  """The mean of ``quadratic(v)`` = ½·vᵀHv over Rademacher probes v·Δ/√12."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  # One sample uses the key itself: n calls with the keys of
  # jax.random.split(key, n) average to the n-sample estimate.
  keys = [key] if num_samples == 1 else jax.random.split(key, num_samples)
  total = None
  for k in keys:
    value = quadratic(_rademacher_probe(k, z, step))
    total = value if total is None else total + value
  return total / num_samples


def hutchinson_term(
  lin: penalty.Linearization,
  step: PyTree,
  key: jax.Array,
  *,
  num_samples: int = 1,
) -> jax.Array:
  """:func:`hutchinson_from_hvp` on the penalty's linearization, to train on.

  The same estimate of Σᵢ (Δᵢ²/24)·Hᵢᵢ as ``hutchinson_from_hvp(hvp_fn, z,
  step, key)`` with ``z, hvp_fn = linearization_point(lin)``, and the same
  gradient, but through :meth:`l1grad.penalty.Linearization.quadratic_form`:
  the third-order gradient by forward mode, about half the cost of reverse
  mode through the Hessian map. For ``penalty.value_and_grad(...,
  extra=...)``.

  Args:
    lin: What ``extra`` receives.
    step: Bin widths Δ structured like :func:`linearization_point`'s ``z``
      (held fixed: wrap them in ``jax.lax.stop_gradient``).
    key: PRNG key of the probes.
    num_samples: Probes averaged.

  Returns:
    The estimate, a scalar.
  """
  z, _ = linearization_point(lin)
  quadratic = lambda v: lin.quadratic_form(v["weights"], v["acts"])
  return _hutchinson(quadratic, z, step, key, num_samples)


def hutchinson_curvature(
  loss_fn: Callable[..., jax.Array],
  z: PyTree,
  step: PyTree,
  key: jax.Array,
  *args: Any,
  num_samples: int = 1,
) -> jax.Array:
  """Hutchinson estimate of E_δ[½·δᵀHδ] = Σᵢ (Δᵢ²/24)·Hᵢᵢ, δ ~ U[−Δ/2, Δ/2].

  The expected second-order loss change of uniform quantization noise
  (the first-order term has mean 0). Unbiased: with v = r·Δ/√12, r
  Rademacher, E[v vᵀ] = diag(Δ²/12) = E[δ δᵀ], so E[½·vᵀHv] is the same
  expectation; Rademacher probes give the smallest variance of such
  estimators. One Hessian-vector product (:func:`hvp`, forward-over-reverse)
  per sample. Differentiable: its gradient (third-order autodiff) trains
  the term.

  Args:
    loss_fn: ``(z, *args) -> scalar`` (for a train-mode loss with aux, wrap
      it: ``lambda z, *a: f(z, *a)[0]``).
    z: The point, e.g. from :func:`expansion_point` or :func:`point_loss`.
    step: Bin widths Δ structured like ``z`` (see :func:`uniform_noise`).
    key: PRNG key of the probes.
    *args: Further arguments of ``loss_fn`` (e.g. the batch).
    num_samples: Probes averaged. The loop is unrolled into the trace (each
      sample its own HVP in the program): for many samples, jit one sample
      and loop over keys (on CPU an HVP inside ``lax.map``/``vmap`` ran
      15–25× slower than a Python loop of jitted calls, issue 15).

  Returns:
    The estimate, a scalar (the mean over the samples).
  """
  hvp_fn = lambda v: hvp(loss_fn, z, v, *args)[1]
  return hutchinson_from_hvp(hvp_fn, z, step, key, num_samples=num_samples)


def linearization_point(
  lin: penalty.Linearization,
) -> tuple[dict[str, dict[str, jax.Array]], Callable[[PyTree], PyTree]]:
  """``z`` and its Hessian map from the penalty's :class:`~l1grad.penalty.Linearization`.

  For a term of :func:`l1grad.penalty.value_and_grad` (``extra``): the same
  point as :func:`point_loss` (the kernels, zero perturbations at the
  activation points) and ``v ↦ H·v`` through the linearization the penalty
  already built: ``z, hvp_fn = linearization_point(lin)``, then
  ``hutchinson_from_hvp(hvp_fn, z, step, key)`` costs one extra
  forward-mode pass and is trained to third order.

  Args:
    lin: What ``extra`` receives.

  Returns:
    ``(z, hvp_fn)``: ``{"weights": {layer: W}, "acts": {point: 0}}`` and a
    function from a tangent structured like ``z`` to H·v structured alike.
  """
  z = {
    "weights": dict(lin.kernels),
    "acts": {k: jnp.zeros_like(g) for k, g in lin.grad_a.items()},
  }

  def hvp_fn(v: PyTree) -> PyTree:
    h_w, h_a = lin.hvp(v["weights"], v["acts"])
    return {"weights": h_w, "acts": h_a}

  return z, hvp_fn


def antithetic_gap(
  loss_fn: Callable[..., jax.Array],
  z: PyTree,
  delta: PyTree,
  *args: Any,
  loss: ArrayLike | None = None,
) -> jax.Array:
  """½[L(z+δ) + L(z−δ)] − L(z): the even part of the loss change along δ.

  Equal to ½·δᵀHδ + O(‖δ‖⁴) (the odd terms cancel), exactly ½·δᵀHδ for a
  quadratic loss. Unlike the Hessian it sees the ReLU and max-pool kinks
  that δ crosses, and it needs no third-order autodiff to be trained: two
  extra forward passes (and their backward passes in training). With δ from
  :func:`uniform_noise`, its mean over δ is the expected even part of the
  loss change of uniform noise.

  Args:
    loss_fn: ``(z, *args) -> scalar``.
    z: The point.
    delta: δ, structured like ``z`` (cast to its dtypes).
    *args: Further arguments of ``loss_fn``.
    loss: L(z) if already computed (saves a forward pass); else computed.

  Returns:
    The gap, a scalar.
  """
  delta = _cast_like(delta, z)
  plus = loss_fn(jax.tree.map(jnp.add, z, delta), *args)
  minus = loss_fn(jax.tree.map(jnp.subtract, z, delta), *args)
  base = loss_fn(z, *args) if loss is None else jnp.asarray(loss)
  return 0.5 * (plus + minus) - base


def second_order_draw(
  loss_fn: Callable[..., jax.Array],
  z: PyTree,
  step: PyTree,
  key: jax.Array,
  *args: Any,
) -> dict[str, jax.Array]:
  """One draw of each second-order quantity, to check them by brute force.

  Averaged over draws (a Python loop over keys of a jitted call is fastest
  on CPU), ``hutchinson`` and ``curvature`` estimate the same
  Σᵢ (Δᵢ²/24)·Hᵢᵢ, and ``induced`` and ``antithetic`` the same mean induced
  loss E[L(z+δ)] − L(z) (δ is symmetric), ``antithetic`` without the
  first-order term's variance. Their gap, ``antithetic`` − ``curvature``, is
  what the Hessian misses: third and higher orders, the ReLU and max-pool
  kinks the noise crosses. Two HVPs and three losses per draw.

  Args:
    loss_fn: ``(z, *args) -> scalar``.
    z: The point.
    step: Bin widths Δ structured like ``z`` (see :func:`uniform_noise`).
    key: PRNG key of this draw.
    *args: Further arguments of ``loss_fn``.

  Returns:
    Scalars ``hutchinson`` (:func:`hutchinson_curvature`, one probe),
    ``curvature`` (½·δᵀHδ of uniform δ from :func:`uniform_noise`),
    ``first_order`` (⟨δ, ∇L⟩), ``induced`` (L(z+δ) − L(z)) and
    ``antithetic`` (:func:`antithetic_gap` of the same δ).
  """
  k_probe, k_noise = jax.random.split(key)
  delta = uniform_noise(k_noise, z, step)
  loss = loss_fn(z, *args)
  grad, h_delta = hvp(loss_fn, z, delta, *args)
  plus = loss_fn(jax.tree.map(jnp.add, z, delta), *args)
  return {
    "hutchinson": hutchinson_curvature(loss_fn, z, step, k_probe, *args),
    "curvature": 0.5 * inner(delta, h_delta),
    "first_order": inner(delta, grad),
    "induced": plus - loss,
    "antithetic": antithetic_gap(loss_fn, z, delta, *args, loss=loss),
  }


def second_order_estimates(
  loss_fn: Callable[..., jax.Array],
  z: PyTree,
  step: PyTree,
  key: jax.Array,
  *args: Any,
  num_draws: int = 100,
) -> dict[str, tuple[float, float]]:
  """:func:`second_order_draw` averaged: ``{name: (mean, standard error)}``.

  ``num_draws`` draws, each from its own key split from ``key``, by a Python
  loop over one jitted draw (on CPU 15–25× faster than the same HVPs
  inside ``lax.map`` or ``vmap``). Pairs that estimate the same expectation
  (``hutchinson``/``curvature``, ``induced``/``antithetic``) should agree
  within a few standard errors.

  Args:
    loss_fn: ``(z, *args) -> scalar``.
    z: The point.
    step: Bin widths Δ structured like ``z``.
    key: PRNG key.
    *args: Further arguments of ``loss_fn``.
    num_draws: How many draws (≥ 2).

  Returns:
    For each quantity of :func:`second_order_draw`, its mean over the draws
    and the standard error of that mean.
  """
  if num_draws < 2:
    raise ValueError(f"num_draws must be >= 2, got {num_draws}.")
  draw = jax.jit(lambda k: second_order_draw(loss_fn, z, step, k, *args))
  draws = [jax.device_get(draw(k)) for k in jax.random.split(key, num_draws)]
  out = {}
  for name in draws[0]:
    x = np.array([d[name] for d in draws], np.float64)
    out[name] = (float(x.mean()), float(x.std(ddof=1) / np.sqrt(num_draws)))
  return out


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
  weights: Mapping[str, ArrayLike],
  bits: ArrayLike,
  *,
  per_channel: bool = False,
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
    scale = quant.kernel_scale(w, bits, per_channel=per_channel)
    q = quant.fake_quant(w, bits, scale, signed=True)
    quantized[name] = q
    delta[name] = q - w
    step[name] = scale.astype(w.dtype)
  return quantized, delta, step


# Bin width Δ of an activation for a range (the quantizer's own formula).
activation_step = quant.activation_scale


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
  apply_kwargs: Mapping[str, Any] = ranges_lib.EVAL_KWARGS,
) -> QuantNoise:
  """The noise tree of the model quantized at (``w_bits``, ``a_bits``).

  Runs the quantized network once, as post-training quantization does
  (kernels by :func:`weight_noise`, activations by
  :func:`l1grad.quant.quantize_activation` at every perturbation point) and
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
      :func:`l1grad.ranges.bn_activation_ranges` or calibration), or None for
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
  kernels, merge = params_lib.split_kernels(_params(variables))
  q_w, _, s_w = weight_noise(kernels, w_bits, per_channel=per_channel)
  # The quantized network uses Q(W) itself (not W + δ), as PTQ does.
  used = {k: jnp.where(w_on, q_w[k], kernels[k]) for k in kernels}
  d_w = {k: used[k] - kernels[k] for k in kernels}
  s_w = {k: jnp.where(w_on, s, jnp.zeros_like(s)) for k, s in s_w.items()}

  d_a: dict[str, jax.Array] = {}
  s_a: dict[str, jax.Array] = {}

  def quantize(key: str, x: jax.Array) -> jax.Array:
    if ranges is None:
      low, high = quant.dynamic_range(x)
    else:
      low, high = ranges[key]
    q = jnp.where(a_on, quant.quantize_activation(x, a_bits, low, high), x)
    d_a[key] = q - x
    step = activation_step(a_bits, low, high)
    s_a[key] = jnp.where(a_on, step, jnp.zeros_like(step)).astype(x.dtype)
    return q

  with perturb.transform_layer_inputs(quantize):
    logits = ranges_lib.apply_model(
      model,
      _with_params(variables, merge(used)),
      jnp.asarray(images),
      apply_kwargs,
    )
  return QuantNoise(
    {"weights": d_w, "acts": d_a}, {"weights": s_w, "acts": s_a}, logits
  )


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
  counts, _ = jnp.histogram(
    jnp.clip(r, -limit, limit), bins=num_bins, range=(-limit, limit), weights=w
  )
  return {
    "counts": counts,
    "n": jnp.sum(w),
    "zeros": jnp.sum(w * (delta == 0)),
    "clipped": jnp.sum(w * (jnp.abs(r) > 0.5 + CLIP_TOLERANCE)),
    "sum": jnp.sum(w * r),
    "sum_sq": jnp.sum(w * r * r),
    "max_abs": jnp.max(jnp.where(w > 0, jnp.abs(r), 0.0)),
  }
