"""Gradient-norm penalties: L + λ_w·‖∇_W L‖ + λ_a·‖∇_A L‖, exact and fast.

W are the kernels of every ``nn.Conv`` / ``nn.Dense`` (leaves named
``kernel``, :func:`l1grad.params.split_kernels`), A the activation
perturbation points of :mod:`l1grad.perturb`.
The activation term is the norm of ∇_A L, the gradient of the batch-mean loss
L = (1/B)·Σⱼ ℓⱼ with respect to the whole batch's activations
(docs/method.md §1):

* batch norm in eval mode, or none: example i's activations aᵢ reach ℓᵢ
  only, so ∇_{aᵢ} L = (1/B)·∂ℓᵢ/∂aᵢ and ‖∇_A L‖₁ is the mean over examples of
  the per-example norms ‖∂ℓᵢ/∂aᵢ‖₁: it does not depend on the batch size;
* batch norm in train mode: aᵢ also moves the batch statistics that normalize
  every example, so ∇_{aᵢ} L = (1/B)·Σⱼ ∂ℓⱼ/∂aᵢ carries the other examples'
  terms too, and ‖∇_A L‖₁ differs from the mean of the per-example norms
  (16 % above it on the trained digits CNN). It is still exactly the
  paper's objective, the norm of the gradient of the batch loss;
* either way, a batch duplicated k times gives each copy 1/k of the
  gradient: the ℓ1 term is unchanged, the ℓ2 term ‖∇_A L‖₂ shrinks as
  1/√k, so an ℓ2 λ_a does not carry over between batch sizes.
  ``act_norm="batch_mean"`` makes the ℓ2 term √B·‖∇_A L‖₂ (in eval mode the
  root mean square over examples of ‖∂ℓᵢ/∂aᵢ‖₂), which duplication leaves
  unchanged. The weight term, the norm of the mean loss's gradient, is
  unchanged by duplication in either norm.

The gradient of the penalty is one Hessian-vector product: with z = (W, A),
∇_θ λ‖∇_z L‖₁ = H_θz · (λ·sign(∇_z L)) (sign has zero derivative almost
everywhere), and for ‖·‖₂ the tangent is λ·∇_z L / ‖∇_z L‖₂. Three ways to
compute it:

* ``"hvp"`` (default): forward-over-reverse. ``jax.linearize`` of the
  gradient function returns the gradient (∇_θ L, and ∇_W L, ∇_A L for the
  norms) and the linear map v ↦ H·v from one pass; the tangent is computed
  from that gradient on device and the map applied to it, so the primal
  gradient is computed once: ~3× a plain step's flops (XLA's count), ~2.4×
  its time on CPU (``benchmarks/RESULTS.md``). Needs about twice to 2.6×
  the plain step's memory. ``hvp_impl="jvp"`` computes the same product with
  ``jax.jvp`` of the gradient function instead, which recomputes the primal
  gradient (kept to measure the difference).
* ``"reverse"``: ``jax.grad`` of a loss that calls ``jax.grad``; simplest,
  slowest (6–8× a plain step on CPU), a cross-check for the others.
* ``"finite_difference"``: H·t ≈ (∇L(z + r·t) − ∇L(z)) / r, two gradients
  (2× the flops, ~1.8× the time, 1.1–1.5× the memory of a plain step).
  An approximation (to first order an ℓ∞ sharpness-aware step). Step rule:
  r = ``fd_step`` · (1 + ‖W‖₂) / ‖t‖₂, i.e. the probe point moves by a
  fraction ``fd_step`` of the kernels' norm, whatever λ is.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import math
from typing import Any

import jax
import jax.numpy as jnp

from l1grad import params as params_lib
from l1grad import perturb

__all__ = [
  "ACT_NORMS",
  "HVP_IMPLS",
  "METHODS",
  "gradient_norms",
  "value_and_grad",
]

METHODS = ("hvp", "reverse", "finite_difference")
# How the activation term is normalized (see the module docstring).
ACT_NORMS = ("none", "batch_mean")
# How method "hvp" is computed (see the module docstring).
HVP_IMPLS = ("linearize", "jvp")

PyTree = Any


# Its old home; the kernels are now keyed by layer name, like every tensor a
# user sees (it keyed them by leaf index before).
split_kernels = params_lib.split_kernels
is_kernel_path = params_lib.is_kernel_path


def _kernel_list(params: PyTree) -> list[jax.Array]:
  """The kernels of ``params`` in the tree's leaf order.

  Every sum over kernels runs in this order (a list, not a dict keyed by
  name, whose flattening order is the names' sort order): it is the order
  the penalty has always summed in, so its values round the same way.
  """
  return list(params_lib.split_kernels(params)[0].values())


def _is_static_zero(coef: Any) -> bool:
  return isinstance(coef, (int, float)) and coef == 0


def _l1(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return sum(
    (jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves),
    jnp.zeros((), jnp.float32),
  )


def _l2(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  sq = sum(
    (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
    jnp.zeros((), jnp.float32),
  )
  # The guarded sqrt keeps reverse-over-reverse finite at a zero gradient.
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def gradient_norms(grad_w: PyTree, grad_a: PyTree) -> dict[str, jax.Array]:
  """ℓ1 and ℓ2 norms of the weight and activation gradients."""
  return {
    "weight_grad_l1": _l1(grad_w),
    "weight_grad_l2": _l2(grad_w),
    "act_grad_l1": _l1(grad_a),
    "act_grad_l2": _l2(grad_a),
  }


def _penalty_and_tangent(
  grad: PyTree, norms_l1: jax.Array, norms_l2: jax.Array, coef: Any, ord: int
) -> tuple[jax.Array, PyTree]:
  """λ·‖g‖ and its HVP tangent λ·∂‖g‖/∂g, with no gradient through g."""
  grad = jax.lax.stop_gradient(grad)
  coef = jnp.asarray(coef, jnp.float32)
  if ord == 1:
    tangent = jax.tree.map(lambda g: (coef * jnp.sign(g)).astype(g.dtype), grad)
    return coef * norms_l1, tangent
  inv = jnp.where(
    norms_l2 > 0, 1.0 / jnp.where(norms_l2 > 0, norms_l2, 1.0), 0.0
  )
  tangent = jax.tree.map(lambda g: (coef * inv * g).astype(g.dtype), grad)
  return coef * norms_l2, tangent


def _norm(tree: PyTree, ord: int) -> jax.Array:
  return _l1(tree) if ord == 1 else _l2(tree)


def _batch_size(shapes: dict[str, jax.ShapeDtypeStruct]) -> int:
  """B, the leading axis every activation point shares."""
  sizes = {s.shape[0] if s.shape else None for s in shapes.values()}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      'act_norm="batch_mean" needs activation points that all lead with the'
      f" batch axis; their leading sizes are {sorted(map(str, sizes))}."
    )
  return sizes.pop()


def value_and_grad(
  loss_fn: Callable[..., Any],
  *,
  ord: int = 1,
  weight_coef: Any = 0.0,
  act_coef: Any = 0.0,
  method: str = "hvp",
  has_aux: bool = False,
  fd_step: float = 1e-3,
  track_activations: bool = True,
  hvp_impl: str = "linearize",
  points: str = "layer_inputs",
  act_norm: str = "none",
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad(loss_fn)``, for the loss plus gradient-norm penalty.

  Args:
    loss_fn: ``(params, *args) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``), applying any Flax linen model, e.g. a BatchNorm model in
      train mode that returns its new ``batch_stats`` through ``aux``, or one
      with dropout (pass the rng in ``args``: both passes reuse it).
      ``params`` holds the kernels to regularize as leaves named ``kernel``.
    ord: 1 (the paper's penalty) or 2 (each group's gradients taken as one
      vector, ‖·‖₂).
    weight_coef: λ_w (a Python number or a traced scalar; a literal 0 drops
      the term and its cost).
    act_coef: λ_a, likewise.
    method: ``"hvp"``, ``"reverse"`` or ``"finite_difference"``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    fd_step: relative probe distance of ``"finite_difference"``.
    track_activations: also compute ‖∇_A L‖ for logging when ``act_coef`` is
      0 (adds the perturbation points to the forward pass).
    hvp_impl: how ``"hvp"`` computes the Hessian-vector product:
      ``"linearize"`` (one forward-over-reverse pass gives the gradient and
      the product) or ``"jvp"`` (the gradient, then ``jax.jvp`` of the
      gradient function, which recomputes it). The same step either way, up
      to float rounding; the second is there to measure the difference.
    points: where A is read (:data:`l1grad.perturb.POINTS`):
      ``"layer_inputs"`` (the Conv/Dense inputs, where those layers read
      them) or ``"tensors"`` (the same tensors, perturbed once for every
      reader: ∇_A L then includes the share of a ResNet block's identity
      shortcut). Same points, keys and loss; only ∇_A L differs, on models
      with such shortcuts.
    act_norm: ``"none"`` (default): the activation term is λ_a·‖∇_A L‖ of
      the batch-mean loss as it is. ``"batch_mean"``: a mean over the
      batch's examples, whatever the batch size: for ``ord=2`` the term
      becomes λ_a·√B·‖∇_A L‖₂ (B the activations' leading axis; the root
      mean square of the per-example norms with batch norm in eval mode),
      unchanged when the batch is duplicated, so an ℓ2 λ_a carries over
      between batch sizes; for ``ord=1`` nothing changes (‖∇_A L‖₁ already
      is such a mean). The logged ``act_grad_l2`` stays ‖∇_A L‖₂.

  Returns:
    ``(params, *args) -> (total, grads)``, or with ``has_aux``
    ``(params, *args) -> ((total, info), grads)`` where ``info`` is a dict:
    ``aux`` (the loss's aux, from the unperturbed pass), ``loss`` (L),
    ``penalty``, ``weight_penalty``, ``act_penalty`` and the gradient norms
    ``weight_grad_l1``, ``weight_grad_l2``, ``act_grad_l1``, ``act_grad_l2``
    (of L, on this batch).
  """
  if ord not in (1, 2):
    raise ValueError(f"ord must be 1 or 2, got {ord!r}.")
  if act_norm not in ACT_NORMS:
    raise ValueError(f"act_norm must be one of {ACT_NORMS}, got {act_norm!r}.")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if hvp_impl not in HVP_IMPLS:
    raise ValueError(f"hvp_impl must be one of {HVP_IMPLS}, got {hvp_impl!r}.")
  if points not in perturb.POINTS:
    raise ValueError(f"points must be one of {perturb.POINTS}, got {points!r}.")
  use_w = not _is_static_zero(weight_coef)
  use_a = not _is_static_zero(act_coef)
  with_points = use_a or track_activations

  def wrapped(params: PyTree, *args: Any):
    eps, sites = {}, None
    if with_points:
      shapes = perturb.activation_shapes(lambda p: loss_fn(p, *args), params)
      eps = perturb.zero_perturbations(shapes)
      sites = perturb.point_sites(points, lambda p: loss_fn(p, *args), params)

    def loss_params_eps(p, e):
      with (
        perturb.perturbed(e, sites=sites)
        if with_points
        else contextlib.nullcontext()
      ):
        out = loss_fn(p, *args)
      return out if has_aux else (out, None)

    a_coef = act_coef
    if use_a and ord == 2 and act_norm == "batch_mean":
      a_coef = jnp.asarray(act_coef, jnp.float32) * math.sqrt(
        _batch_size(shapes)
      )

    named, merge = params_lib.split_kernels(params)
    names = list(named)
    kernels = list(named.values())  # in leaf order, like every list below
    # The penalty differentiates along the kernels (λ_w) and the activation
    # perturbations (λ_a) only: the other parameters (biases, batch-norm
    # scales) carry no tangent, so the HVP does no tangent work for them.
    lin_k = kernels if use_w else []
    lin_e = eps if use_a else {}

    def grads_at(k, e):
      """(∇_θ L, ∇_A L) with kernels ``k`` (all, or none) and ``e`` put in."""
      p = merge(dict(zip(names, k))) if k else params
      (loss, aux), (g_p, g_e) = jax.value_and_grad(
        loss_params_eps, argnums=(0, 1), has_aux=True
      )(p, {**eps, **e})
      return (g_p, g_e), (loss, aux)

    # One pass gives ∇_θ L for the update, ∇_W L (its kernel leaves) and
    # ∇_A L (w.r.t. the zero perturbations). For "hvp" that pass is
    # jax.linearize's primal: the same forward-over-reverse pass then gives
    # the HVP along any tangent, without recomputing the primal gradient (the
    # tangent, sign(∇L), is only known after the gradient).
    linear_hvp = None
    if method == "hvp" and (use_w or use_a) and hvp_impl == "linearize":
      (g_params, g_eps), linear_hvp, (loss, aux) = jax.linearize(
        grads_at, lin_k, lin_e, has_aux=True
      )
    else:
      (g_params, g_eps), (loss, aux) = grads_at([], {})
    g_kernels = _kernel_list(g_params)
    norms = gradient_norms(g_kernels, g_eps)

    zero = jnp.zeros((), jnp.float32)
    w_pen, t_w = zero, []
    a_pen, t_a = zero, {}
    if use_w:
      w_pen, t_w = _penalty_and_tangent(
        g_kernels,
        norms["weight_grad_l1"],
        norms["weight_grad_l2"],
        weight_coef,
        ord,
      )
    if use_a:
      a_pen, t_a = _penalty_and_tangent(
        g_eps, norms["act_grad_l1"], norms["act_grad_l2"], a_coef, ord
      )
    penalty = w_pen + a_pen

    grads = g_params
    if linear_hvp is not None:
      hv, _ = linear_hvp(t_w, t_a)
      grads = jax.tree.map(jnp.add, g_params, hv)
    elif method == "reverse" and (use_w or use_a):
      grads = _reverse_grad(
        loss_params_eps, params, eps, weight_coef, a_coef, use_w, use_a, ord
      )
    elif use_w or use_a:
      hv = _penalty_grad(
        grads_at, kernels, lin_k, lin_e, g_params, t_w, t_a, method, fd_step
      )
      grads = jax.tree.map(jnp.add, g_params, hv)

    total = loss + penalty
    if not has_aux:
      return total, grads
    info = {
      "aux": aux,
      "loss": loss,
      "penalty": penalty,
      "weight_penalty": w_pen,
      "act_penalty": a_pen,
      **norms,
    }
    return (total, info), grads

  return wrapped


def _penalty_grad(
  grads_at, kernels, lin_k, lin_e, g_params, t_w, t_a, method, fd_step
):
  """∇_θ of the penalty, H_{θ,z}·t, by a second pass: jvp or FD."""
  params_grad = lambda k, e: grads_at(k, e)[0][0]
  if method == "hvp":
    # Forward-over-reverse that recomputes the primal gradient (XLA merges
    # only part of it with the first pass); kept to compare with linearize.
    _, hv = jax.jvp(params_grad, (lin_k, lin_e), (t_w, t_a))
    return hv

  # Finite difference: the probe moves by fd_step·(1 + ‖W‖₂) along t.
  t_norm = jnp.sqrt(_l2(t_w) ** 2 + _l2(t_a) ** 2)
  r = fd_step * (1.0 + _l2(kernels)) / jnp.where(t_norm > 0, t_norm, 1.0)
  shift = lambda p, t: p + (r * t).astype(p.dtype)
  g_probe = params_grad(
    jax.tree.map(shift, lin_k, t_w), jax.tree.map(shift, lin_e, t_a)
  )
  return jax.tree.map(
    lambda g1, g0: ((g1 - g0) / r).astype(g0.dtype), g_probe, g_params
  )


def _reverse_grad(
  loss_params_eps, params, eps, weight_coef, act_coef, use_w, use_a, ord
):
  """∇_params (L + penalty) by reverse-over-reverse differentiation."""

  def total(p):
    (loss, _), (g_p, g_e) = jax.value_and_grad(
      loss_params_eps, argnums=(0, 1), has_aux=True
    )(p, eps)
    value = loss
    if use_w:
      g_k = _kernel_list(g_p)
      value = value + jnp.asarray(weight_coef, jnp.float32) * _norm(g_k, ord)
    if use_a:
      value = value + jnp.asarray(act_coef, jnp.float32) * _norm(g_e, ord)
    return value

  return jax.grad(total)(params)
