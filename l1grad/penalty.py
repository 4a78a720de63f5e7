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
* ``"central_difference"``: H·t ≈ (∇L(z + r·t) − ∇L(z − r·t)) / 2r, three
  gradients (the unperturbed one is still the loss's own): its error is
  O(r²) where the gradient is smooth instead of O(r), but it crosses the
  same ReLU kinks, on both sides.

For research (docs/method.md §1.1):

* coefficients per tensor: ``weight_coef``/``act_coef`` as tables keyed by
  module path, Σₜ cₜ·‖∇ₜL‖₁ in one call (ℓ1), e.g. cₜ = λ·Δₜ/2 from
  :func:`l1grad.quant.bin_widths`, the paper's first-order bound;
* :func:`linearize`: the expansion point z = (W, A), the loss and aux there,
  the gradient trees and the Hessian map, from one pass
  (:class:`Linearization`; :func:`value_and_grad` is built on it);
* ``value_and_grad(..., extra=S)``: a user term S(linearization), added with
  its exact gradient (third order through the Hessian map where S uses it),
  sharing the passes with the penalty; ``return_grads=True`` returns ∇_W L,
  ∇_A L and the activations A keyed by module path.

A Hutchinson estimate of E[½·δᵀHδ] for uniform noise of bin widths Δ::

  def curvature(lin):  # v = r·Δ/√12, r Rademacher: E[v vᵀ] = E[δ δᵀ]
    v_w = {n: rademacher(key_w[n], w.shape) * d_w[n] / 12**0.5
           for n, w in lin.kernels.items()}
    v_a = {k: rademacher(key_a[k], g.shape) * d_a[k] / 12**0.5
           for k, g in lin.grad_a.items()}
    h_w, h_a = lin.hvp(v_w, v_a)
    return 0.5 * lam2 * (dot(v_w, h_w) + dot(v_a, h_a))

  value_and_grad(loss_fn, weight_coef=lam, act_coef=lam, has_aux=True,
                 extra=curvature)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from l1grad import params as params_lib
from l1grad import perturb

__all__ = [
  "ACT_NORMS",
  "HVP_IMPLS",
  "FD_METHODS",
  "METHODS",
  "Linearization",
  "PenaltyGradientCosine",
  "gradient_norms",
  "linearize",
  "penalty_gradient_cosine",
  "value_and_grad",
]

METHODS = ("hvp", "reverse", "finite_difference", "central_difference")
# The methods that approximate H·t by probing the gradient at z ± r·t.
FD_METHODS = ("finite_difference", "central_difference")
# How the activation term is normalized (see the module docstring).
ACT_NORMS = ("none", "batch_mean")
# How method "hvp" is computed (see the module docstring).
HVP_IMPLS = ("linearize", "jvp", "two_pass")

PyTree = Any
# A coefficient: one scalar for every tensor of the group, or a table of them.
Coef = Any


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


def _acc_dtype(dtype: Any) -> jnp.dtype:
  # Norms are summed in float32 at least, and in float64 for float64
  # gradients (third-order checks under jax_enable_x64).
  return jnp.promote_types(dtype, jnp.float32)


def _l1(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return sum(
    (jnp.sum(jnp.abs(x.astype(_acc_dtype(x.dtype)))) for x in leaves),
    jnp.zeros((), jnp.float32),
  )


def _l2(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  sq = sum(
    (jnp.sum(jnp.square(x.astype(_acc_dtype(x.dtype)))) for x in leaves),
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
  coef = jnp.asarray(coef, norms_l1.dtype)
  if ord == 1:
    tangent = jax.tree.map(lambda g: (coef * jnp.sign(g)).astype(g.dtype), grad)
    return coef * norms_l1, tangent
  inv = jnp.where(
    norms_l2 > 0, 1.0 / jnp.where(norms_l2 > 0, norms_l2, 1.0), 0.0
  )
  tangent = jax.tree.map(lambda g: (coef * inv * g).astype(g.dtype), grad)
  return coef * norms_l2, tangent


def _check_table(table: Mapping[str, Any], keys: Sequence[str], what: str):
  """A per-tensor coefficient table must name every tensor, and only those."""
  unknown = [k for k in table if k not in keys]
  missing = [k for k in keys if k not in table]
  if unknown or missing:
    problems = []
    if unknown:
      problems.append(f"unknown keys {unknown}")
    if missing:
      problems.append(f"no coefficient for {missing}")
    raise ValueError(
      f"{what} as a table: {'; '.join(problems)}. Give one coefficient (a"
      " scalar, or an array that broadcasts against the tensor; 0 to leave"
      f" it out) for each of {list(keys)}."
    )


def _table_coef(table: Mapping[str, Any], key: str, g: jax.Array) -> jax.Array:
  """``table[key]`` as an array of ``g``'s accumulation dtype, no gradient."""
  c = jax.lax.stop_gradient(jnp.asarray(table[key]))
  c = c.astype(_acc_dtype(jnp.result_type(c, g.dtype)))
  try:
    fits = (
      c.ndim <= g.ndim and jnp.broadcast_shapes(c.shape, g.shape) == g.shape
    )
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(
      f"The coefficient of {key!r} has shape {c.shape}, which does not"
      f" broadcast against its tensor's shape {g.shape}."
    )
  return c


def _table_penalty_and_tangent(
  grads: Sequence[jax.Array], keys: Sequence[str], table: Mapping[str, Any]
) -> tuple[jax.Array, list[jax.Array]]:
  """Σₜ Σ cₜ·|gₜ| and its HVP tangent cₜ·sign(gₜ), in ``keys``' order."""
  grads = jax.lax.stop_gradient(list(grads))
  value = jnp.zeros((), jnp.float32)
  tangent = []
  for key, g in zip(keys, grads):
    c = _table_coef(table, key, g)
    a = jnp.abs(g.astype(c.dtype))
    value = value + (c * jnp.sum(a) if c.ndim == 0 else jnp.sum(c * a))
    tangent.append((c * jnp.sign(g.astype(c.dtype))).astype(g.dtype))
  return value, tangent


def _table_norm(
  grads: Sequence[jax.Array], keys: Sequence[str], table: Mapping[str, Any]
) -> jax.Array:
  """Σₜ Σ cₜ·|gₜ|, differentiable in ``grads`` (reverse-over-reverse)."""
  value = jnp.zeros((), jnp.float32)
  for key, g in zip(keys, grads):
    c = _table_coef(table, key, g)
    value = value + jnp.sum(c * jnp.abs(g.astype(c.dtype)))
  return value


def _term(
  grads: Sequence[jax.Array] | Mapping[str, jax.Array],
  keys: Sequence[str],
  norms: Mapping[str, jax.Array],
  prefix: str,
  coef: Coef,
  ord: int,
) -> tuple[jax.Array, Any]:
  """One group's penalty and tangent (the tangent shaped like ``grads``)."""
  if not isinstance(coef, Mapping):
    return _penalty_and_tangent(
      grads, norms[f"{prefix}_grad_l1"], norms[f"{prefix}_grad_l2"], coef, ord
    )
  if isinstance(grads, Mapping):
    value, tangent = _table_penalty_and_tangent(
      [grads[k] for k in keys], keys, coef
    )
    return value, dict(zip(keys, tangent))
  return _table_penalty_and_tangent(grads, keys, coef)


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


# ---------------------------------------------------------------------------
# The expansion point z = (W, A) and the linearized gradient there.
# ---------------------------------------------------------------------------


class _Setup(NamedTuple):
  """What every pass at one ``(params, *args)`` shares (built once per call).

  Attributes:
    loss_params_eps: ``(params, eps) -> (loss, aux)`` with the perturbations
      added at the points; with ``record``, ``aux`` is ``(aux, activations)``.
    eps: The zero perturbations, ``{point: zeros}`` in execution order.
    shapes: The points' shapes.
    record: Whether the points' values are recorded.
  """

  loss_params_eps: Callable[..., Any]
  eps: dict[str, jax.Array]
  shapes: dict[str, jax.ShapeDtypeStruct]
  record: bool


def _setup(
  loss_fn: Callable[..., Any],
  params: PyTree,
  args: tuple[Any, ...],
  *,
  has_aux: bool,
  with_points: bool,
  points: str,
  record: bool = False,
) -> _Setup:
  eps, sites, shapes = {}, None, {}
  if with_points:
    shapes = perturb.activation_shapes(lambda p: loss_fn(p, *args), params)
    eps = perturb.zero_perturbations(shapes)
    sites = perturb.point_sites(points, lambda p: loss_fn(p, *args), params)

  if not record:

    def loss_params_eps(p, e):
      with (
        perturb.perturbed(e, sites=sites)
        if with_points
        else contextlib.nullcontext()
      ):
        out = loss_fn(p, *args)
      return out if has_aux else (out, None)

  else:

    def loss_params_eps(p, e):
      # perturb.perturbed's addition, also keeping each point's value A.
      values = {}

      def add(key: str, x: jax.Array) -> jax.Array:
        y = x + jnp.asarray(
          perturb.lookup_point(e, key, "perturbation"), x.dtype
        )
        values[key] = y
        return y

      with (
        perturb.transform_layer_inputs(add, sites=sites)
        if with_points
        else contextlib.nullcontext()
      ):
        out = loss_fn(p, *args)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, values)

  return _Setup(loss_params_eps, eps, shapes, record)


def _as_tangents(
  tangents: Mapping[str, Any] | None,
  primals: Mapping[str, jax.Array],
  what: str,
) -> dict[str, jax.Array]:
  """A tangent for every primal (zeros where none is given), checked."""
  tangents = dict(tangents or {})
  unknown = [k for k in tangents if k not in primals]
  if unknown:
    raise ValueError(
      f"{what}: no such tensors {unknown}; the keys are {list(primals)}."
    )
  out = {}
  for key, x in primals.items():
    t = tangents.get(key)
    if t is None:
      out[key] = jnp.zeros_like(x)
      continue
    t = jnp.asarray(t)
    if t.shape != x.shape:
      raise ValueError(
        f"{what}[{key!r}] has shape {t.shape}; the tensor's is {x.shape}."
      )
    out[key] = t.astype(x.dtype)
  return out


@dataclasses.dataclass(frozen=True)
class Linearization:
  """The loss at z = (W, A), its gradients, and the Hessian map there.

  W are the kernels (leaves named ``kernel``, by layer module path), A the
  activation perturbation points (by their reading layer's module path,
  docs/method.md §3): the names every tensor in l1grad goes by. Built by
  :func:`linearize`; :func:`value_and_grad` hands one to ``extra``.

  Everything here is a traced function of ``params``: a term computed from
  it (by ``extra``) is differentiated through all of it, the Hessian map
  included (third-order autodiff where the term uses the map).

  Attributes:
    params: The params the expansion is at.
    kernels: ``{layer: W}``, in the params' leaf order.
    activations: ``{point: A}``, the values at the points in the pass, in
      execution order (empty where the points were not tracked).
    loss: L at z (the loss function's own mode: train-mode batch norm if
      it applies the model that way).
    aux: The loss function's aux (None without ``has_aux``), e.g. the new
      batch statistics.
    grads: ∇_θ L, a tree like ``params``.
    grad_w: ``{layer: ∇_W L}``.
    grad_a: ``{point: ∇_A L}`` (the gradient w.r.t. an additive
      perturbation of the point, docs/method.md §1).
  """

  params: PyTree
  kernels: dict[str, jax.Array]
  activations: dict[str, jax.Array]
  loss: jax.Array
  aux: Any
  grads: PyTree
  grad_w: dict[str, jax.Array]
  grad_a: dict[str, jax.Array]
  _linear: Callable[..., Any] | None = dataclasses.field(repr=False)
  _wrt_w: tuple[str, ...] = ()
  _wrt_a: tuple[str, ...] = ()
  # (params, perturbations) -> (loss, aux): the loss the expansion is of.
  _loss_at: Callable[..., Any] | None = dataclasses.field(
    default=None, repr=False
  )
  _eps: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  def hvp_params(
    self,
    t_w: Mapping[str, Any] | None = None,
    t_a: Mapping[str, Any] | None = None,
  ) -> tuple[PyTree, dict[str, jax.Array]]:
    """(H_θz·t, H_Az·t): the change of (∇_θ L, ∇_A L) along t = (t_w, t_a).

    One forward-mode pass through the linearization (the primal gradient is
    not recomputed). ``H_θz·t`` is a tree like ``params`` (every parameter,
    batch-norm scales included): what the gradient of a first-order term
    ⟨t, ∇_z L⟩ with t held fixed is.

    Args:
      t_w: ``{layer: tangent}`` for the kernels; missing layers are 0.
      t_a: ``{point: tangent}`` for the activation points; missing are 0.

    Returns:
      ``(tree like params, {point: array})``.

    Raises:
      ValueError: An unknown key or a tangent of the wrong shape.
    """
    if self._linear is None:
      raise ValueError("This Linearization has no Hessian map.")
    kernels = {k: self.kernels[k] for k in self._wrt_w}
    points = {k: self.grad_a[k] for k in self._wrt_a}
    t_w = _as_tangents(t_w, kernels, "t_w")
    t_a = _as_tangents(t_a, points, "t_a")
    return self._linear(list(t_w.values()), t_a)

  def hvp(
    self,
    t_w: Mapping[str, Any] | None = None,
    t_a: Mapping[str, Any] | None = None,
  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(H_Wz·t, H_Az·t): the Hessian of L in z times t = (t_w, t_a).

    Keyed like :attr:`kernels` and :attr:`activations`; e.g. a Hutchinson
    estimate of Σᵢ Hᵢᵢ·σᵢ² is ⟨v, H·v⟩ for v Rademacher times σ.

    Args:
      t_w: ``{layer: tangent}``; missing layers are 0.
      t_a: ``{point: tangent}``; missing points are 0.

    Returns:
      ``({layer: array}, {point: array})``.
    """
    h_params, h_a = self.hvp_params(t_w, t_a)
    h_w, _ = params_lib.split_kernels(h_params)
    return h_w, h_a

  def quadratic_form(
    self,
    t_w: Mapping[str, Any] | None = None,
    t_a: Mapping[str, Any] | None = None,
  ) -> jax.Array:
    """½·tᵀHt, t = (t_w, t_a): the second-order term of L along t.

    The value is one forward-mode pass through the Hessian map (as
    :meth:`hvp`). Its gradient is what differentiating ½·⟨t, :meth:`hvp`⟩
    gives, exactly, but computed by forward mode only: w.r.t. the params
    (and the points) ½·∇³L[t, t], the second directional derivative of
    ∇L along t (a forward-over-forward-over-reverse pass), and w.r.t. t,
    H·t. Reverse mode through the Hessian map (reverse-over-forward-over-
    reverse) costs about twice as much on the CPU (a Hutchinson term in
    training: ``examples/second_order.py``).

    Args:
      t_w: ``{layer: tangent}``; missing layers are 0.
      t_a: ``{point: tangent}``; missing points are 0.

    Returns:
      A scalar.
    """
    if self._loss_at is None or set(self._wrt_w) != set(self.kernels):
      raise ValueError("quadratic_form needs the map over all of z.")
    kernels = dict(self.kernels)
    points = {k: self.grad_a[k] for k in self._wrt_a}
    t_w = _as_tangents(t_w, kernels, "t_w")
    t_a = _as_tangents(t_a, points, "t_a")
    h_w, h_a = jax.lax.stop_gradient(self.hvp(t_w, t_a))
    pairs = zip(jax.tree.leaves((t_w, t_a)), jax.tree.leaves((h_w, h_a)))
    value = 0.5 * sum(jnp.vdot(t, h) for t, h in pairs)
    # The value carries no gradient; a zero-valued term carries all of it.
    surrogate = _third_order_gradient(
      self._loss_at, self.params, self._eps, t_w, t_a, h_w, h_a
    )
    return jax.lax.stop_gradient(value) + surrogate


def _embed_kernels(params: PyTree, kernels: Mapping[str, Any]) -> PyTree:
  """A tree like ``params``: ``kernels`` at the kernel leaves, 0 elsewhere."""
  _, merge = params_lib.split_kernels(jax.tree.map(jnp.zeros_like, params))
  return merge(dict(kernels))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _third_order_gradient(loss_at, params, eps, t_w, t_a, h_w, h_a):
  """0, with the gradient of ½·tᵀH(params, eps)t (see ``quadratic_form``)."""
  del loss_at, params, eps, h_w, h_a
  return jnp.zeros((), jnp.result_type(*jax.tree.leaves((t_w, t_a))))


def _third_order_fwd(loss_at, params, eps, t_w, t_a, h_w, h_a):
  value = _third_order_gradient(loss_at, params, eps, t_w, t_a, h_w, h_a)
  return value, (params, eps, t_w, t_a, h_w, h_a)


def _third_order_bwd(loss_at, res, ct):
  params, eps, t_w, t_a, h_w, h_a = res
  grad = jax.grad(lambda p, e: loss_at(p, e)[0], argnums=(0, 1))
  tangent = (_embed_kernels(params, t_w), t_a)
  along = lambda p, e: jax.jvp(grad, (p, e), tangent)[1]
  _, (d2_p, d2_e) = jax.jvp(along, (params, eps), tangent)
  half = lambda x: (0.5 * ct * x).astype(x.dtype)
  full = lambda x: (ct * x).astype(x.dtype)
  return (
    jax.tree.map(half, d2_p),
    jax.tree.map(half, d2_e),
    jax.tree.map(full, h_w),
    jax.tree.map(full, h_a),
    jax.tree.map(jnp.zeros_like, h_w),
    jax.tree.map(jnp.zeros_like, h_a),
  )


_third_order_gradient.defvjp(_third_order_fwd, _third_order_bwd)


def _grads_at_fn(
  setup: _Setup, params: PyTree
) -> tuple[Callable[..., Any], list[str], list[jax.Array]]:
  """``grads_at(k, e) -> ((∇_θ L, ∇_A L), (loss, aux))``, names, kernels.

  ``k`` are the kernels (all, in leaf order, or none: those of ``params``),
  ``e`` perturbations put in place of the zero ones (some or none).
  """
  named, merge = params_lib.split_kernels(params)
  names = list(named)
  kernels = list(named.values())  # in leaf order, like every list below
  eps = setup.eps

  def grads_at(k, e):
    """(∇_θ L, ∇_A L) with kernels ``k`` (all, or none) and ``e`` put in."""
    p = merge(dict(zip(names, k))) if k else params
    (loss, aux), (g_p, g_e) = jax.value_and_grad(
      setup.loss_params_eps, argnums=(0, 1), has_aux=True
    )(p, {**eps, **e})
    return (g_p, g_e), (loss, aux)

  return grads_at, names, kernels


def _linearization(
  setup: _Setup,
  params: PyTree,
  *,
  wrt_w: bool,
  wrt_a: bool,
  linear: bool = True,
) -> Linearization:
  """The one pass: loss, gradients and (``linear``) the Hessian map.

  ``wrt_w``/``wrt_a`` choose the tangent space of the map (the kernels, the
  points, or both): the penalty differentiates along its terms only, so the
  HVP does no tangent work for what has no coefficient.
  """
  grads_at, names, kernels = _grads_at_fn(setup, params)
  eps = setup.eps
  lin_k = kernels if wrt_w else []
  lin_e = eps if wrt_a else {}

  # One pass gives ∇_θ L for the update, ∇_W L (its kernel leaves) and
  # ∇_A L (w.r.t. the zero perturbations). With ``linear`` that pass is
  # jax.linearize's primal: the same forward-over-reverse pass then gives
  # the HVP along any tangent, without recomputing the primal gradient (the
  # tangent, sign(∇L), is only known after the gradient).
  linear_fn = None
  if linear:
    (g_params, g_eps), linear_fn, (loss, aux) = jax.linearize(
      grads_at, lin_k, lin_e, has_aux=True
    )
  else:
    (g_params, g_eps), (loss, aux) = grads_at([], {})
  activations = {}
  if setup.record:
    aux, activations = aux
  return Linearization(
    params=params,
    kernels=dict(zip(names, kernels)),
    activations=activations,
    loss=loss,
    aux=aux,
    grads=g_params,
    grad_w=params_lib.split_kernels(g_params)[0],
    grad_a=g_eps,
    _linear=linear_fn,
    _wrt_w=tuple(names) if wrt_w else (),
    _wrt_a=tuple(eps) if wrt_a else (),
    _loss_at=setup.loss_params_eps,
    _eps=eps,
  )


def linearize(
  loss_fn: Callable[..., Any],
  params: PyTree,
  *args: Any,
  has_aux: bool = False,
  points: str = "layer_inputs",
) -> Linearization:
  """The loss, its gradients and its Hessian map at z = (W, A), in one pass.

  The building block of :func:`value_and_grad` (its ``"hvp"`` method and its
  ``extra`` terms), public for research code that needs the same
  parametrization: z = (every kernel, every activation perturbation point),
  keyed by module path; the loss evaluated as ``loss_fn`` evaluates it (batch
  norm in train mode with its new statistics in ``aux``, dropout with the
  rng in ``args``). Pure and jittable; everything it returns is
  differentiable w.r.t. ``params`` (through the Hessian map too).

  Args:
    loss_fn: ``(params, *args) -> loss`` or ``(loss, aux)``, as for
      :func:`value_and_grad`.
    params: Where to expand; leaves named ``kernel`` are W.
    *args: The rest of ``loss_fn``'s arguments.
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    points: Where A is read (:data:`l1grad.perturb.POINTS`).

  Returns:
    A :class:`Linearization` whose Hessian map spans all of z.
  """
  if points not in perturb.POINTS:
    raise ValueError(f"points must be one of {perturb.POINTS}, got {points!r}.")
  setup = _setup(
    loss_fn,
    params,
    args,
    has_aux=has_aux,
    with_points=True,
    points=points,
    record=True,
  )
  return _linearization(setup, params, wrt_w=True, wrt_a=True)


def value_and_grad(
  loss_fn: Callable[..., Any],
  *,
  ord: int = 1,
  weight_coef: Coef = 0.0,
  act_coef: Coef = 0.0,
  method: str = "hvp",
  has_aux: bool = False,
  fd_step: float = 1e-3,
  track_activations: bool = True,
  hvp_impl: str = "linearize",
  points: str = "layer_inputs",
  act_norm: str = "none",
  extra: Callable[[Linearization], Any] | None = None,
  return_grads: bool = False,
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad(loss_fn)``, for the loss plus gradient-norm penalty.

  The total is L + λ_w·‖∇_W L‖ + λ_a·‖∇_A L‖ (+ ``extra``'s term). With
  tables for the coefficients (``ord=1``) the penalty is
  Σₜ cₜ·‖∇ₜ L‖₁ over the tensors t, e.g. cₜ = λ·Δₜ/2, the first-order bound
  on the loss change that quantizing t with bin width Δₜ causes
  (docs/method.md §1.1).

  Args:
    loss_fn: ``(params, *args) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``), applying any Flax linen model, e.g. a BatchNorm model in
      train mode that returns its new ``batch_stats`` through ``aux``, or one
      with dropout (pass the rng in ``args``: both passes reuse it).
      ``params`` holds the kernels to regularize as leaves named ``kernel``.
    ord: 1 (the paper's penalty) or 2 (each group's gradients taken as one
      vector, ‖·‖₂).
    weight_coef: λ_w: a Python number or a traced scalar (a literal 0 drops
      the term and its cost); or, for ``ord=1``, a table ``{layer: c}``
      keyed like :func:`l1grad.params.split_kernels` (module paths), one
      entry per kernel, each a scalar or an array that broadcasts against
      the kernel (per output channel: shape ``(1, …, 1, C)``), traced values
      allowed: the term is then Σ Σ c·|∇_W L| (no gradient flows into c).
      A scalar λ gives exactly the same numbers as before tables existed,
      at no extra cost; a table of equal entries gives the same value up to
      rounding.
    act_coef: λ_a, likewise; a table is keyed by activation point (the
      reading layer's module path, :func:`l1grad.perturb.activation_shapes`).
    method: ``"hvp"``, ``"reverse"``, ``"finite_difference"`` or
      ``"central_difference"``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    fd_step: relative probe distance of the finite differences.
    track_activations: also compute ‖∇_A L‖ for logging when ``act_coef`` is
      0 (adds the perturbation points to the forward pass).
    hvp_impl: how ``"hvp"`` computes the Hessian-vector product:
      ``"linearize"`` (one forward-over-reverse pass gives the gradient and
      the product) or ``"jvp"`` (the gradient, then ``jax.jvp`` of the
      gradient function, which recomputes it). The same step either way, up
      to float rounding; the second is there to measure the difference.
      ``"two_pass"``: ``"jvp"`` with the second pass made to start only
      after the first has ended, so no backward residual of the first is
      alive during the second: the same step up to rounding at ≤ 2× the
      plain step's memory on ResNet-18 (1.93×, against 2.61× for
      ``"linearize"``), for ~1.5× its time (``benchmarks/RESULTS.md``). For
      when memory, not time, binds.
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
    extra: a user term ``S(lin) -> scalar``, given the
      :class:`Linearization` of this very pass (kernels, activation values,
      loss, aux, ∇_θ L, ∇_W L, ∇_A L and the Hessian map ``lin.hvp``). S is
      added to the total, and its gradient w.r.t. ``params`` to the
      gradient: exactly, through everything S reads (a term built on
      ``lin.hvp`` is differentiated to third order). It shares the forward,
      backward and linearized passes with the penalty, whose gradient is
      still the forward-mode product through that map; only S is pulled
      back, through what it reads (a term on the loss alone costs no
      reverse pass through the backward pass). The value is the same as
      without ``extra``, the gradient equal up to rounding. ``method`` must
      then be ``"hvp"`` or ``"reverse"``.
      Randomness (a Hutchinson probe) comes from a key the caller closes
      over. Do not put such a term in ``loss_fn``: the penalty would then be
      the norm of ∇(L + S).
    return_grads: with ``has_aux``, also put into ``info`` the tensors the
      penalty is built from: ``grad_w`` (``{layer: ∇_W L}``), ``grad_a``
      (``{point: ∇_A L}``) and ``activations`` (``{point: A}``, the values
      at the points), keyed like the coefficient tables. Adds no pass.

  Returns:
    ``(params, *args) -> (total, grads)``, or with ``has_aux``
    ``(params, *args) -> ((total, info), grads)`` where ``info`` is a dict:
    ``aux`` (the loss's aux, from the unperturbed pass), ``loss`` (L),
    ``penalty``, ``weight_penalty``, ``act_penalty`` and the gradient norms
    ``weight_grad_l1``, ``weight_grad_l2``, ``act_grad_l1``, ``act_grad_l2``
    (of L, on this batch, unweighted); with ``extra`` also ``extra`` (S);
    with ``return_grads`` the tensors above.

  Raises:
    ValueError: an unknown option; a table with ``ord=2`` (the ℓ2 penalty is
      one norm over a whole group, which per-tensor coefficients cannot
      split; rejected rather than redefined); ``extra`` with
      a finite difference; ``return_grads`` without ``has_aux``. When
      called: a table that misses a tensor or names an unknown one (the
      message lists the valid keys), or a term that is not a scalar.
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
  tables = [
    n
    for n, c in (("weight_coef", weight_coef), ("act_coef", act_coef))
    if isinstance(c, Mapping)
  ]
  if tables and ord != 1:
    raise ValueError(
      f"Per-tensor coefficients ({' and '.join(tables)} as tables) need"
      " ord=1: the ℓ2 penalty is one norm over the whole group, which a"
      " coefficient per tensor cannot split. Use ord=1, or one scalar."
    )
  if extra is not None and method in FD_METHODS:
    raise ValueError(
      'extra needs an exact method ("hvp" or "reverse"): its gradient and'
      " the penalty's are taken together by one reverse pass."
    )
  if return_grads and not has_aux:
    raise ValueError(
      "return_grads puts the gradients into info, which only has_aux=True"
      " returns; wrap a loss without aux as lambda *a: (loss_fn(*a), None)."
    )
  use_w = not _is_static_zero(weight_coef)
  use_a = not _is_static_zero(act_coef)
  record = extra is not None or return_grads
  with_points = use_a or track_activations or record

  def wrapped(params: PyTree, *args: Any):
    setup = _setup(
      loss_fn,
      params,
      args,
      has_aux=has_aux,
      with_points=with_points,
      points=points,
      record=record,
    )
    eps = setup.eps
    a_coef = act_coef
    if use_a and ord == 2 and act_norm == "batch_mean":
      a_coef = jnp.asarray(act_coef, jnp.float32) * math.sqrt(
        _batch_size(setup.shapes)
      )
    names = list(params_lib.split_kernels(params)[0])
    if isinstance(weight_coef, Mapping):
      _check_table(weight_coef, names, "weight_coef (keyed by layer)")
    if isinstance(a_coef, Mapping):
      _check_table(a_coef, list(eps), "act_coef (keyed by activation point)")

    if extra is not None:
      return _with_extra(
        setup,
        params,
        extra,
        weight_coef,
        a_coef,
        use_w,
        use_a,
        ord,
        has_aux,
        return_grads,
      )

    # The penalty differentiates along the kernels (λ_w) and the activation
    # perturbations (λ_a) only: the other parameters (biases, batch-norm
    # scales) carry no tangent, so the HVP does no tangent work for them.
    linear = method == "hvp" and (use_w or use_a) and hvp_impl == "linearize"
    lin = _linearization(setup, params, wrt_w=use_w, wrt_a=use_a, linear=linear)
    g_params, g_eps, loss, aux = lin.grads, lin.grad_a, lin.loss, lin.aux
    norms, w_pen, t_w, a_pen, t_a = _penalty_terms(
      _kernel_list(g_params),
      g_eps,
      names,
      weight_coef,
      a_coef,
      ord,
      use_w,
      use_a,
    )

    grads = g_params
    if linear:
      hv, _ = lin._linear(t_w, t_a)  # pylint: disable=protected-access
      grads = jax.tree.map(jnp.add, g_params, hv)
    elif method == "reverse" and (use_w or use_a):
      grads = _reverse_grad(
        setup, params, weight_coef, a_coef, use_w, use_a, ord
      )
    elif use_w or use_a:
      grads_at, _, kernels = _grads_at_fn(setup, params)
      lin_k = kernels if use_w else []
      lin_e = eps if use_a else {}
      if method == "hvp" and hvp_impl == "two_pass":
        lin_k, lin_e = _after_first_pass(lin_k, lin_e, t_w, t_a)
      hv = _penalty_grad(
        grads_at, kernels, lin_k, lin_e, g_params, t_w, t_a, method, fd_step
      )
      grads = jax.tree.map(jnp.add, g_params, hv)

    total = loss + (w_pen + a_pen)
    if not has_aux:
      return total, grads
    info = _info(aux, loss, w_pen, a_pen, norms)
    if return_grads:
      info.update(
        grad_w=lin.grad_w, grad_a=lin.grad_a, activations=lin.activations
      )
    return (total, info), grads

  return wrapped


def _with_extra(
  setup: _Setup,
  params: PyTree,
  extra: Callable[[Linearization], Any],
  weight_coef: Coef,
  act_coef: Coef,
  use_w: bool,
  use_a: bool,
  ord: int,
  has_aux: bool,
  return_grads: bool,
):
  """``value_and_grad`` with a user term: one pass, then S's reverse pass.

  The forward computation builds the linearization (forward, backward and
  the linearized map) at the traced params and evaluates S on it. The
  penalty's gradient is H_θz·t with t = λ·sign(∇_z L), applied through that
  same linearized map (forward mode, as without ``extra``); only S is
  pulled back (reverse mode through what S reads: for a term on the
  Hessian map, third order). Pulling the penalty back too would be
  reverse-over-reverse, several times the cost of the map.
  """
  names = list(params_lib.split_kernels(params)[0])

  def build(p):
    lin = _linearization(setup, p, wrt_w=True, wrt_a=True)
    s = jnp.asarray(extra(lin))
    if s.shape:
      raise ValueError(
        f"extra must return a scalar; it returned shape {s.shape}."
      )
    g_k = jax.lax.stop_gradient([lin.grad_w[n] for n in names])
    g_a = jax.lax.stop_gradient(dict(lin.grad_a))
    norms, w_pen, t_w, a_pen, t_a = _penalty_terms(
      g_k, g_a, names, weight_coef, act_coef, ord, use_w, use_a
    )
    hv = jax.tree.map(jnp.zeros_like, lin.grads)
    if use_w or use_a:
      # The map spans all of z: a term that is off has a zero tangent.
      t_w = t_w if use_w else [jnp.zeros_like(g) for g in g_k]
      t_a = t_a if use_a else jax.tree.map(jnp.zeros_like, g_a)
      hv, _ = lin._linear(t_w, t_a)  # pylint: disable=protected-access
    rest = (lin.grads, lin.loss, lin.aux, lin.activations, g_k, g_a)
    return s, (*rest, hv, w_pen, a_pen, norms)

  s, pullback, rest = jax.vjp(build, params, has_aux=True)
  g_params, loss, aux, activations, g_k, g_a, hv, w_pen, a_pen, norms = rest
  (g_extra,) = pullback(jnp.ones_like(s))
  g_extra = jax.tree.map(jnp.add, hv, g_extra)
  grads = jax.tree.map(jnp.add, g_params, g_extra)
  total = loss + (w_pen + a_pen) + s
  if not has_aux:
    return total, grads
  info = {**_info(aux, loss, w_pen, a_pen, norms), "extra": s}
  if return_grads:
    info.update(
      grad_w=dict(zip(names, g_k)), grad_a=g_a, activations=activations
    )
  return (total, info), grads


def _penalty_terms(
  g_kernels: list[jax.Array],
  g_eps: dict[str, jax.Array],
  names: Sequence[str],
  weight_coef: Coef,
  act_coef: Coef,
  ord: int,
  use_w: bool,
  use_a: bool,
) -> tuple[dict[str, jax.Array], jax.Array, Any, jax.Array, Any]:
  """The gradient norms, each group's penalty and tangent.

  Returns ``(norms, w_pen, t_w, a_pen, t_a)``: ``t_w`` a list like
  ``g_kernels``, ``t_a`` a dict like ``g_eps``; a term that is off has
  penalty 0 and an empty tangent.
  """
  norms = gradient_norms(g_kernels, g_eps)
  zero = jnp.zeros((), jnp.float32)
  w_pen, t_w = zero, []
  a_pen, t_a = zero, {}
  if use_w:
    w_pen, t_w = _term(g_kernels, names, norms, "weight", weight_coef, ord)
  if use_a:
    a_pen, t_a = _term(g_eps, list(g_eps), norms, "act", act_coef, ord)
  return norms, w_pen, t_w, a_pen, t_a


def _info(
  aux: Any,
  loss: jax.Array,
  w_pen: jax.Array,
  a_pen: jax.Array,
  norms: Mapping[str, jax.Array],
) -> dict[str, Any]:
  """``value_and_grad``'s ``info``: the loss, the penalty and its parts."""
  return {
    "aux": aux,
    "loss": loss,
    "penalty": w_pen + a_pen,
    "weight_penalty": w_pen,
    "act_penalty": a_pen,
    **norms,
  }


def _after_first_pass(
  kernels: list[jax.Array],
  eps: dict[str, jax.Array],
  t_w: list[jax.Array],
  t_a: dict[str, jax.Array],
) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """The second pass's inputs, made to depend on the first pass's end.

  Without this XLA schedules the second pass's forward early and both
  passes' activations live at once (the linearization's memory again); an
  ``optimization_barrier`` does not order them on XLA:CPU (it is expanded
  away). Each input is made to depend on its own tangent, c·sign(∇L), by a
  select that never fires (the tangent is finite), which XLA cannot drop;
  the first layer's gradient comes last in the backward pass, and the
  forward starts there.
  """
  never = lambda x, t: jnp.where(jnp.isinf(t), jnp.zeros_like(x), x)
  kernels = [never(k, t) for k, t in zip(kernels, t_w)]
  eps = {k: never(v, t_a[k]) for k, v in eps.items()}
  return kernels, eps


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

  def probe(side: float) -> PyTree:
    shift = lambda p, t: p + (side * r * t).astype(p.dtype)
    return params_grad(
      jax.tree.map(shift, lin_k, t_w), jax.tree.map(shift, lin_e, t_a)
    )

  if method == "central_difference":
    return jax.tree.map(
      lambda g1, g2: ((g1 - g2) / (2 * r)).astype(g1.dtype),
      probe(1.0),
      probe(-1.0),
    )
  return jax.tree.map(
    lambda g1, g0: ((g1 - g0) / r).astype(g0.dtype), probe(1.0), g_params
  )


def _reverse_grad(setup, params, weight_coef, act_coef, use_w, use_a, ord):
  """∇_params (L + penalty) by reverse-over-reverse differentiation."""
  names = list(params_lib.split_kernels(params)[0])

  def total(p):
    (loss, _), (g_p, g_e) = jax.value_and_grad(
      setup.loss_params_eps, argnums=(0, 1), has_aux=True
    )(p, setup.eps)
    value = loss
    if use_w:
      g_k = _kernel_list(g_p)
      if isinstance(weight_coef, Mapping):
        value = value + _table_norm(g_k, names, weight_coef)
      else:
        norm = _norm(g_k, ord)
        value = value + jnp.asarray(weight_coef, norm.dtype) * norm
    if use_a:
      if isinstance(act_coef, Mapping):
        value = value + _table_norm(list(g_e.values()), list(g_e), act_coef)
      else:
        norm = _norm(g_e, ord)
        value = value + jnp.asarray(act_coef, norm.dtype) * norm
    return value

  return jax.grad(total)(params)


class PenaltyGradientCosine(NamedTuple):
  """How two methods' penalty gradients compare (:func:`penalty_gradient_cosine`).

  Attributes:
    cosine: cos∠(∇_θ P by ``method``, ∇_θ P by ``reference``), all leaves
      flattened into one vector; NaN where either gradient is exactly zero.
    norm: ‖∇_θ P‖₂ by ``method``.
    reference_norm: ‖∇_θ P‖₂ by ``reference``.
  """

  cosine: jax.Array
  norm: jax.Array
  reference_norm: jax.Array


def _tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(
    (
      jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ),
    jnp.zeros((), jnp.float32),
  )


def penalty_gradient_cosine(
  loss_fn: Callable[..., Any],
  params: PyTree,
  *args: Any,
  weight_coef: Any,
  act_coef: Any,
  has_aux: bool = False,
  method: str = "finite_difference",
  reference: str = "hvp",
  fd_step: float = 1e-3,
  points: str = "layer_inputs",
  act_norm: str = "none",
  ord: int = 1,
) -> PenaltyGradientCosine:
  """The cosine between the penalty gradients of two methods.

  The penalty is P = λ_w·‖∇_W L‖ + λ_a·‖∇_A L‖ (the total minus the loss of
  :func:`value_and_grad`). Its gradient by each method is that method's
  total gradient minus ``jax.grad`` of the loss, both from
  :func:`value_and_grad` (the loss gradient with zero coefficients, the same
  pass and activation points), so this measures exactly the direction the
  trainer would add to the loss gradient. The cosine does not change when
  λ_w and λ_a are scaled together, but it does depend on their ratio: the
  two terms' gradients point differently. Pure and jittable.

  Args:
    loss_fn: As for :func:`value_and_grad`.
    params: Where to compare; leaves named ``kernel`` are W.
    *args: The rest of ``loss_fn``'s arguments (a batch, batch statistics…).
    weight_coef: λ_w (a literal 0 drops the term).
    act_coef: λ_a (likewise).
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    method: The method measured (:data:`METHODS`).
    reference: The method compared with (default the exact ``"hvp"``).
    fd_step: The finite differences' relative probe distance.
    points: Where A is read (:data:`l1grad.perturb.POINTS`).
    act_norm: As for :func:`value_and_grad`.
    ord: 1 (the paper's ℓ1 penalty) or 2.

  Returns:
    The cosine and both gradients' ℓ2 norms (a tiny norm means the cosine
    compares rounding noise).
  """
  for name, m in (("method", method), ("reference", reference)):
    if m not in METHODS:
      raise ValueError(f"{name} must be one of {METHODS}, got {m!r}.")
  common = dict(
    ord=ord,
    has_aux=has_aux,
    fd_step=fd_step,
    track_activations=True,
    points=points,
    act_norm=act_norm,
  )
  # Zero coefficients: ∇_θ L from the very pass each method starts from (with
  # the zero activation perturbations in), so the difference is the penalty's
  # share only, up to rounding.
  _, loss_grad = value_and_grad(
    loss_fn, weight_coef=0.0, act_coef=0.0, **common
  )(params, *args)

  def penalty_grad(m: str) -> PyTree:
    _, total_grad = value_and_grad(
      loss_fn, weight_coef=weight_coef, act_coef=act_coef, method=m, **common
    )(params, *args)
    return jax.tree.map(
      lambda t, g: t.astype(jnp.float32) - g.astype(jnp.float32),
      total_grad,
      loss_grad,
    )

  got = penalty_grad(method)
  ref = got if reference == method else penalty_grad(reference)
  norm = jnp.sqrt(_tree_dot(got, got))
  ref_norm = jnp.sqrt(_tree_dot(ref, ref))
  denom = norm * ref_norm
  cosine = jnp.where(
    denom > 0,
    jnp.clip(_tree_dot(got, ref) / jnp.where(denom > 0, denom, 1.0), -1, 1),
    jnp.nan,
  )
  return PenaltyGradientCosine(cosine, norm, ref_norm)
