"""Penalty extension points: per-tensor coefficients, ``extra`` terms, trees.

Every reference is plain ``jax.grad`` (reverse mode, to third order for the
Hessian term) of a model that takes its activation perturbations explicitly,
in float64: batch norm in train mode, so the activation gradients couple the
batch's examples.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l1grad import params as params_lib
from l1grad import penalty
from l1grad import perturb

# The activation points of Net: the inputs of every Conv/Dense but the first.
POINTS = ("Conv_1", "Dense_0")


class Net(nn.Module):
  """Conv → BN (train) → tanh, twice, mean, Dense; ``eps`` added explicitly."""

  @nn.compact
  def __call__(self, x, eps=None):
    acts = {}

    def point(key, a):
      if eps is not None:
        a = a + eps[key]
      acts[key] = a
      return a

    norm = lambda: nn.BatchNorm(use_running_average=False, momentum=0.9)
    x = jnp.tanh(norm()(nn.Conv(3, (3, 3), use_bias=False)(x)))
    x = point("Conv_1", x)
    x = jnp.tanh(norm()(nn.Conv(4, (3, 3), strides=2)(x)))
    x = point("Dense_0", jnp.mean(x, axis=(1, 2)))
    return nn.Dense(3)(x), acts


def _problem(dtype=jnp.float64, batch=5):
  """``loss_fn(p, x, y) -> (loss, stats)``, ``plain(p, eps) -> (loss, acts)``."""
  model = Net()
  x = jax.random.normal(jax.random.key(1), (batch, 6, 6, 2), dtype)
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 3)
  variables = model.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v.astype(dtype), variables)
  params, stats = variables["params"], variables["batch_stats"]

  def apply(p, eps=None):
    (logits, acts), updates = model.apply(
      {"params": p, "batch_stats": stats}, x, eps, mutable=["batch_stats"]
    )
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return xent, acts, updates["batch_stats"]

  def loss_fn(p, x_, y_):
    del x_, y_  # closed over; passed to show the usual signature
    loss, _, new_stats = apply(p)
    return loss, new_stats

  def plain(p, eps):
    loss, acts, _ = apply(p, eps)
    return loss, acts

  shapes = perturb.activation_shapes(lambda p: loss_fn(p, x, y), params)
  eps0 = perturb.zero_perturbations(shapes)
  return loss_fn, plain, params, eps0, (x, y)


def _split(p):
  return params_lib.split_kernels(p)


def _tables(params, eps0):
  """Distinct coefficients: scalars, a per-output-channel array, a zero."""
  kernels = _split(params)[0]
  names = list(kernels)
  w = {n: 0.1 * (i + 1) for i, n in enumerate(names)}
  w[names[1]] = jnp.linspace(0.05, 0.4, kernels[names[1]].shape[-1])
  w[names[2]] = 0.0
  a = {k: 0.2 + 0.3 * i for i, k in enumerate(eps0)}
  return w, a


def _weighted_l1(grads, table):
  return sum(
    jnp.sum(jnp.asarray(table[k]) * jnp.abs(g)) for k, g in grads.items()
  )


def _reference(plain, params, eps0, w_table, a_table, extra=None):
  """L + Σ c·|∇_W L| + Σ c·|∇_A L| (+ extra(p)) and its jax.grad."""

  def total(p):
    (loss, _), (g_p, g_e) = jax.value_and_grad(
      plain, argnums=(0, 1), has_aux=True
    )(p, eps0)
    value = loss + _weighted_l1(_split(g_p)[0], w_table)
    value = value + _weighted_l1(g_e, a_table)
    return value if extra is None else value + extra(p)

  return jax.jit(jax.value_and_grad(total))(params)


@pytest.mark.parametrize("method", ["hvp", "reverse"])
def test_table_coefficients_match_the_reference(method):
  with jax.enable_x64(True):
    loss_fn, plain, params, eps0, args = _problem()
    w, a = _tables(params, eps0)
    ref_value, ref_grad = _reference(plain, params, eps0, w, a)
    (value, info), grads = jax.jit(
      penalty.value_and_grad(
        loss_fn, weight_coef=w, act_coef=a, method=method, has_aux=True
      )
    )(params, *args)
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    chex.assert_trees_all_close(grads, ref_grad, rtol=1e-8, atol=1e-12)
    # The unweighted norms are logged as before.
    (_, g_e) = jax.grad(lambda p, e: plain(p, e)[0], argnums=(0, 1))(
      params, eps0
    )
    np.testing.assert_allclose(
      info["act_grad_l1"], sum(jnp.abs(g).sum() for g in g_e.values())
    )
    np.testing.assert_allclose(
      info["act_penalty"], _weighted_l1(g_e, a), rtol=1e-10
    )


def test_table_of_equal_coefficients_is_the_scalar_penalty():
  loss_fn, _, params, eps0, args = _problem(jnp.float32)
  names = list(_split(params)[0])
  kw = dict(has_aux=True)
  (v_s, i_s), g_s = jax.jit(
    penalty.value_and_grad(loss_fn, weight_coef=0.3, act_coef=0.5, **kw)
  )(params, *args)
  (v_t, i_t), g_t = jax.jit(
    penalty.value_and_grad(
      loss_fn,
      weight_coef=dict.fromkeys(names, 0.3),
      act_coef=dict.fromkeys(eps0, 0.5),
      **kw,
    )
  )(params, *args)
  np.testing.assert_allclose(v_t, v_s, rtol=1e-6)
  np.testing.assert_allclose(i_t["penalty"], i_s["penalty"], rtol=1e-6)
  chex.assert_trees_all_close(g_t, g_s, rtol=1e-5, atol=1e-7)


def test_table_errors_name_the_valid_keys():
  loss_fn, _, params, eps0, args = _problem(jnp.float32)
  names = list(_split(params)[0])

  def trace(**coefs):  # the checks run when the function is traced
    fn = penalty.value_and_grad(loss_fn, has_aux=True, **coefs)
    jax.eval_shape(fn, params, *args)

  with pytest.raises(ValueError, match="ord=1"):
    penalty.value_and_grad(loss_fn, ord=2, weight_coef={})
  bad = {**dict.fromkeys(names[1:], 0.1), "Conv_9": 0.1}
  with pytest.raises(ValueError, match="Conv_9") as e:
    trace(weight_coef=bad)
  assert repr(names[0]) in str(e.value) and str(names) in str(e.value)
  with pytest.raises(ValueError, match="Dense_0"):
    trace(act_coef={"Conv_1": 1.0})
  wrong_shape = {**dict.fromkeys(names, 0.1), names[0]: jnp.ones(7)}
  with pytest.raises(ValueError, match="broadcast"):
    trace(weight_coef=wrong_shape)


def test_traced_tables_compile_once():
  loss_fn, _, params, eps0, args = _problem(jnp.float32)
  names = list(_split(params)[0])

  @jax.jit
  def step(params, c):
    fn = penalty.value_and_grad(
      loss_fn,
      weight_coef=dict.fromkeys(names, c),
      act_coef=dict.fromkeys(eps0, c),
      has_aux=True,
    )
    return fn(params, *args)[0][0]

  assert float(step(params, 0.2)) > float(step(params, 0.1))
  assert step._cache_size() == 1


def _probe(params, eps0):
  """A fixed Rademacher probe v over the kernels and the points."""
  kernels = _split(params)[0]
  leaves = {**{f"w:{k}": v for k, v in kernels.items()}, **eps0}
  keys = jax.random.split(jax.random.key(7), len(leaves))
  signs = {
    k: jax.random.rademacher(key, x.shape, x.dtype) * 0.3
    for key, (k, x) in zip(keys, leaves.items())
  }
  v_w = {k: signs[f"w:{k}"] for k in kernels}
  v_a = {k: signs[k] for k in eps0}
  return v_w, v_a


def _dot(a, b):
  return sum(jnp.vdot(a[k], b[k]) for k in a)


def test_extra_term_value_and_gradient_match_the_reference():
  """L + λ‖∇L‖₁ + S with S = ½·vᵀHv + Σ mean(A²): third-order gradient."""
  with jax.enable_x64(True):
    loss_fn, plain, params, eps0, args = _problem()
    v_w, v_a = _probe(params, eps0)

    def extra(lin):
      h_w, h_a = lin.hvp(v_w, v_a)
      curvature = 0.5 * (_dot(v_w, h_w) + _dot(v_a, h_a))
      return curvature + sum(jnp.mean(a**2) for a in lin.activations.values())

    def extra_ref(p):
      kernels, merge = _split(p)

      def grad_dot_v(k, e):
        g_p, g_e = jax.grad(lambda q, e: plain(q, e)[0], argnums=(0, 1))(
          merge(k), e
        )
        return _dot(v_w, _split(g_p)[0]) + _dot(v_a, g_e)

      h_w, h_a = jax.grad(grad_dot_v, argnums=(0, 1))(kernels, eps0)
      acts = plain(p, eps0)[1]
      curvature = 0.5 * (_dot(v_w, h_w) + _dot(v_a, h_a))
      return curvature + sum(jnp.mean(a**2) for a in acts.values())

    names = list(_split(params)[0])
    w, a = dict.fromkeys(names, 0.3), dict.fromkeys(eps0, 0.5)
    ref_value, ref_grad = _reference(plain, params, eps0, w, a, extra_ref)
    # (With extra, "hvp" and "reverse" take the same path: one VJP.)
    fn = penalty.value_and_grad(
      loss_fn, weight_coef=0.3, act_coef=0.5, has_aux=True, extra=extra
    )
    (value, info), grads = jax.jit(fn)(params, *args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    np.testing.assert_allclose(
      info["extra"], jax.jit(extra_ref)(params), rtol=1e-10
    )
    chex.assert_trees_all_close(grads, ref_grad, rtol=1e-8, atol=1e-12)
    assert set(info["aux"]) == {"BatchNorm_0", "BatchNorm_1"}
    with pytest.raises(ValueError, match="exact method"):
      penalty.value_and_grad(
        loss_fn, method="finite_difference", extra=extra, has_aux=True
      )


def test_quadratic_form_gradient_by_forward_mode_is_exact():
  """``lin.quadratic_form``: ½·vᵀHv and its gradient as reverse mode gives."""
  with jax.enable_x64(True):
    loss_fn, plain, params, eps0, args = _problem()
    v_w, v_a = _probe(params, eps0)

    def reverse(lin):  # reverse mode through the Hessian map
      h_w, h_a = lin.hvp(v_w, v_a)
      return 0.5 * (_dot(v_w, h_w) + _dot(v_a, h_a))

    out = {}
    for name, term in (
      ("reverse", reverse),
      ("forward", lambda lin: lin.quadratic_form(v_w, v_a)),
    ):
      fn = penalty.value_and_grad(
        loss_fn, weight_coef=0.3, act_coef=0.5, has_aux=True, extra=term
      )
      (value, info), grads = jax.jit(fn)(params, *args)
      out[name] = value, info["extra"], grads
    np.testing.assert_allclose(out["forward"][0], out["reverse"][0], rtol=1e-8)
    np.testing.assert_allclose(out["forward"][1], out["reverse"][1], rtol=1e-8)
    chex.assert_trees_all_close(
      out["forward"][2], out["reverse"][2], rtol=1e-9, atol=1e-12
    )

    # Its gradient w.r.t. the probe is H·v (a probe that depends on params).
    lin = penalty.linearize(loss_fn, params, *args, has_aux=True)
    g_w, g_a = jax.grad(lin.quadratic_form, argnums=(0, 1))(v_w, v_a)
    h_w, h_a = lin.hvp(v_w, v_a)
    chex.assert_trees_all_close((g_w, g_a), (h_w, h_a), rtol=1e-10)


def test_return_grads_are_the_trees_keyed_by_module_path():
  loss_fn, plain, params, eps0, args = _problem(jnp.float32)
  kw = dict(weight_coef=0.3, act_coef=0.5, has_aux=True)
  (value, info), grads = jax.jit(
    penalty.value_and_grad(loss_fn, return_grads=True, **kw)
  )(params, *args)
  (ref_value, _), ref_grads = jax.jit(penalty.value_and_grad(loss_fn, **kw))(
    params, *args
  )
  # Asking for the trees changes nothing else.
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-6, atol=1e-8)
  assert list(info["grad_w"]) == list(_split(params)[0])
  assert list(info["grad_w"]) == ["Conv_0", "Conv_1", "Dense_0"]
  assert list(info["grad_a"]) == list(info["activations"]) == list(POINTS)
  (_, acts), (g_p, g_e) = jax.value_and_grad(
    plain, argnums=(0, 1), has_aux=True
  )(params, eps0)
  chex.assert_trees_all_close(
    info["grad_w"], _split(g_p)[0], rtol=1e-5, atol=1e-8
  )
  chex.assert_trees_all_close(info["grad_a"], g_e, rtol=1e-5, atol=1e-8)
  chex.assert_trees_all_close(info["activations"], acts, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="has_aux"):
    penalty.value_and_grad(loss_fn, return_grads=True)


def test_linearize_is_the_expansion_point():
  """The public building block: gradients and the Hessian map at z."""
  with jax.enable_x64(True):
    loss_fn, plain, params, eps0, args = _problem()
    lin = penalty.linearize(loss_fn, params, *args, has_aux=True)
    (loss, acts), (g_p, g_e) = jax.value_and_grad(
      plain, argnums=(0, 1), has_aux=True
    )(params, eps0)
    np.testing.assert_allclose(lin.loss, loss, rtol=1e-12)
    chex.assert_trees_all_close(lin.grads, g_p, rtol=1e-10)
    chex.assert_trees_all_close(lin.grad_a, g_e, rtol=1e-10)
    chex.assert_trees_all_close(lin.activations, acts, rtol=1e-12)
    assert list(lin.kernels) == list(lin.grad_w) == list(_split(params)[0])
    # H·v along the activation points only (kernel tangents left out = 0).
    v_w, v_a = _probe(params, eps0)
    _, h_a = lin.hvp(t_a=v_a)
    ref = jax.grad(
      lambda e: _dot(v_a, jax.grad(lambda e: plain(params, e)[0])(e))
    )(eps0)
    chex.assert_trees_all_close(h_a, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no such tensors"):
      lin.hvp({"Conv_9": v_w["Conv_0"]})
