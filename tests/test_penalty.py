"""The gradient-norm penalty: three methods against a hand-written reference."""

from typing import Any

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


class MLP(nn.Module):
  """Two hidden layers; ``eps`` given explicitly adds the perturbations itself."""

  act: Any = jnp.tanh

  @nn.compact
  def __call__(self, x, eps=None):
    x = self.act(nn.Dense(6)(x))
    if eps is not None:
      x = x + eps["Dense_1"]
    x = self.act(nn.Dense(5)(x))
    if eps is not None:
      x = x + eps["Dense_2"]
    return nn.Dense(3)(x)


class ConvNet(nn.Module):
  """Conv → BN (train mode) → act, twice, then a dense head."""

  act: Any = jnp.tanh

  @nn.compact
  def __call__(self, x, eps=None, train=True):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    x = self.act(norm()(nn.Conv(4, (3, 3), use_bias=False)(x)))
    if eps is not None:
      x = x + eps["Conv_1"]
    x = self.act(norm()(nn.Conv(5, (3, 3), strides=2, use_bias=False)(x)))
    x = jnp.mean(x, axis=(1, 2))
    if eps is not None:
      x = x + eps["Dense_0"]
    return nn.Dense(3)(x)


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _mlp_problem(act=jnp.tanh, batch=8):
  model = MLP(act=act)
  x = jax.random.normal(jax.random.key(1), (batch, 4))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 3)
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(p, x, y, eps=None):
    return _xent(model.apply({"params": p}, x, eps), y)

  return loss_fn, params, (x, y)


def _conv_problem(act=jnp.tanh, batch=6):
  model = ConvNet(act=act)
  x = jax.random.normal(jax.random.key(3), (batch, 6, 6, 2))
  y = jax.random.randint(jax.random.key(4), (batch,), 0, 3)
  variables = model.init(jax.random.key(0), x)
  stats = variables["batch_stats"]

  def loss_fn(p, x, y, eps=None):
    logits, updates = model.apply(
      {"params": p, "batch_stats": stats}, x, eps, mutable=["batch_stats"]
    )
    return _xent(logits, y), updates["batch_stats"]

  return loss_fn, variables["params"], (x, y)


def _reference(loss_fn, params, args, *, ord, weight_coef, act_coef, has_aux):
  """Penalized loss and gradient from explicit eps arguments, reverse mode."""
  shapes = perturb.activation_shapes(lambda p: loss_fn(p, *args), params)
  eps0 = perturb.zero_perturbations(shapes)
  norm = (
    (lambda t: sum(jnp.abs(v).sum() for v in jax.tree.leaves(t)))
    if ord == 1
    else (lambda t: jnp.sqrt(sum((v**2).sum() for v in jax.tree.leaves(t))))
  )

  def plain(p, e):
    out = loss_fn(p, *args, eps=e)
    return out[0] if has_aux else out

  def total(p):
    g_p, g_e = jax.grad(plain, argnums=(0, 1))(p, eps0)
    g_w, _ = params_lib.split_kernels(g_p)
    return plain(p, eps0) + weight_coef * norm(g_w) + act_coef * norm(g_e)

  return jax.jit(jax.value_and_grad(total))(params)


COEFS = [(0.3, 0.0), (0.0, 0.5), (0.3, 0.5)]


@pytest.mark.parametrize("problem", ["mlp", "conv_bn"])
@pytest.mark.parametrize("ord", [1, 2])
@pytest.mark.parametrize("coefs", COEFS, ids=["weights", "acts", "both"])
def test_exact_methods_match_reference(problem, ord, coefs):
  build = _mlp_problem if problem == "mlp" else _conv_problem
  has_aux = problem == "conv_bn"
  loss_fn, params, args = build()
  weight_coef, act_coef = coefs
  ref_value, ref_grad = _reference(
    loss_fn,
    params,
    args,
    ord=ord,
    weight_coef=weight_coef,
    act_coef=act_coef,
    has_aux=has_aux,
  )
  for method in ("hvp", "reverse"):
    fn = jax.jit(
      penalty.value_and_grad(
        loss_fn,
        ord=ord,
        weight_coef=weight_coef,
        act_coef=act_coef,
        method=method,
        has_aux=has_aux,
      )
    )
    value, grads = fn(params, *args)
    if has_aux:
      value, info = value
      assert set(info["aux"]) == {"BatchNorm_0", "BatchNorm_1"}
      np.testing.assert_allclose(
        info["loss"] + info["penalty"], value, rtol=1e-6
      )
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grad, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("ord", [1, 2])
def test_finite_difference_approximates_hvp(ord):
  loss_fn, params, args = _conv_problem()
  kw = dict(ord=ord, weight_coef=0.3, act_coef=0.5, has_aux=True)
  _, exact = jax.jit(penalty.value_and_grad(loss_fn, method="hvp", **kw))(
    params, *args
  )
  _, approx = jax.jit(
    penalty.value_and_grad(loss_fn, method="finite_difference", **kw)
  )(params, *args)
  _, plain = jax.jit(penalty.value_and_grad(loss_fn, has_aux=True))(
    params, *args
  )
  # Compare the penalty's part of the gradient, relative to its overall size.
  exact_pen = jax.tree.map(jnp.subtract, exact, plain)
  approx_pen = jax.tree.map(jnp.subtract, approx, plain)
  err = penalty._l2(jax.tree.map(jnp.subtract, exact_pen, approx_pen))
  assert err / penalty._l2(exact_pen) < 2e-2


@pytest.mark.parametrize("ord", [1, 2])
def test_hvp_impls_take_the_same_step(ord):
  """``hvp_impl="jvp"`` computes the product ``"linearize"`` does."""
  loss_fn, params, args = _conv_problem()
  kw = dict(ord=ord, weight_coef=0.3, act_coef=0.5, has_aux=True)
  out = {}
  for impl in penalty.HVP_IMPLS:
    (value, _), grads = jax.jit(
      penalty.value_and_grad(loss_fn, hvp_impl=impl, **kw)
    )(params, *args)
    out[impl] = value, grads
  for impl in ("jvp", "two_pass"):
    np.testing.assert_allclose(out[impl][0], out["linearize"][0], rtol=1e-6)
    chex.assert_trees_all_close(
      out[impl][1], out["linearize"][1], rtol=1e-5, atol=1e-7
    )


def _fd_penalty_error(method: str, fd_step: float) -> float:
  """‖FD penalty gradient − exact‖ / ‖exact‖ on the smooth conv problem."""
  loss_fn, params, args = _conv_problem()
  kw = dict(weight_coef=0.3, act_coef=0.5, has_aux=True)
  grad = lambda **k: jax.jit(penalty.value_and_grad(loss_fn, **kw, **k))(
    params, *args
  )[1]
  _, plain = jax.jit(penalty.value_and_grad(loss_fn, has_aux=True))(
    params, *args
  )
  exact = jax.tree.map(jnp.subtract, grad(method="hvp"), plain)
  approx = jax.tree.map(
    jnp.subtract, grad(method=method, fd_step=fd_step), plain
  )
  err = penalty._l2(jax.tree.map(jnp.subtract, approx, exact))
  return float(err / penalty._l2(exact))


def test_central_difference_error_is_second_order():
  """Forward difference: error ∝ r; central: ∝ r² (a smooth model)."""
  fwd = [_fd_penalty_error("finite_difference", r) for r in (1e-2, 5e-3)]
  cen = [_fd_penalty_error("central_difference", r) for r in (1e-2, 5e-3)]
  assert fwd[0] / fwd[1] == pytest.approx(2.0, rel=0.1)
  assert cen[0] / cen[1] == pytest.approx(4.0, rel=0.2)
  assert cen[0] < fwd[0] / 5


def test_relu_network_methods_agree():
  """ReLU: the Hessian is piecewise, forward-over-reverse still exact."""
  loss_fn, params, args = _mlp_problem(act=nn.relu)
  kw = dict(weight_coef=0.2, act_coef=0.2)
  ref_value, ref_grad = _reference(
    loss_fn, params, args, ord=1, has_aux=False, **kw
  )
  value, grads = penalty.value_and_grad(loss_fn, **kw)(params, *args)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grad, rtol=2e-4, atol=1e-6)


def test_no_penalty_is_plain_value_and_grad():
  loss_fn, params, args = _mlp_problem()
  value, grads = penalty.value_and_grad(loss_fn)(params, *args)
  ref_value, ref_grads = jax.value_and_grad(loss_fn)(params, *args)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-6, atol=1e-7)


def test_reported_norms_match_direct_gradients():
  loss_fn, params, args = _mlp_problem()
  shapes = perturb.activation_shapes(lambda p: loss_fn(p, *args), params)
  g_p, g_e = jax.grad(lambda p, e: loss_fn(p, *args, eps=e), argnums=(0, 1))(
    params, perturb.zero_perturbations(shapes)
  )
  fn = penalty.value_and_grad(
    lambda p, *a: (loss_fn(p, *a), None), weight_coef=0.1, has_aux=True
  )
  (_, info), _ = fn(params, *args)
  kern, _ = params_lib.split_kernels(g_p)
  np.testing.assert_allclose(
    info["weight_grad_l1"],
    sum(jnp.abs(v).sum() for v in kern.values()),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    info["act_grad_l1"], sum(jnp.abs(v).sum() for v in g_e.values()), rtol=1e-6
  )
  np.testing.assert_allclose(
    info["weight_penalty"], 0.1 * info["weight_grad_l1"], rtol=1e-6
  )
  assert float(info["act_penalty"]) == 0.0


def test_activation_term_is_independent_of_batch_duplication():
  """‖∇_A L‖₁ is the mean per-example norm: duplicating the batch keeps it."""
  loss_fn, params, (x, y) = _mlp_problem(batch=5)
  fn = penalty.value_and_grad(
    lambda p, *a: (loss_fn(p, *a), None), act_coef=1.0, has_aux=True
  )
  (_, once), _ = fn(params, x, y)
  (_, twice), _ = fn(params, jnp.concatenate([x, x]), jnp.concatenate([y, y]))
  np.testing.assert_allclose(
    twice["act_penalty"], once["act_penalty"], rtol=1e-5
  )
  np.testing.assert_allclose(
    twice["act_grad_l1"], once["act_grad_l1"], rtol=1e-5
  )
  # And it is the mean over examples of the per-example activation ℓ1 norms.
  shapes = perturb.activation_shapes(lambda p: loss_fn(p, x[:1], y[:1]), params)
  eps = perturb.zero_perturbations(shapes)

  def example_norm(xi, yi):
    g = jax.grad(lambda e: loss_fn(params, xi[None], yi[None], eps=e))(eps)
    return sum(jnp.abs(v).sum() for v in g.values())

  per_example = jax.jit(jax.vmap(example_norm))(x, y)
  np.testing.assert_allclose(once["act_grad_l1"], per_example.mean(), rtol=1e-5)


def test_traced_coefficients_compile_once():
  loss_fn, params, args = _mlp_problem()

  @jax.jit
  def step(params, coef):
    return penalty.value_and_grad(loss_fn, weight_coef=coef, act_coef=coef)(
      params, *args
    )

  v1, _ = step(params, 0.1)
  v2, _ = step(params, 0.2)
  assert step._cache_size() == 1
  assert float(v2) > float(v1)


def test_bad_arguments():
  with pytest.raises(ValueError, match="ord"):
    penalty.value_and_grad(lambda p: 0.0, ord=3)
  with pytest.raises(ValueError, match="method"):
    penalty.value_and_grad(lambda p: 0.0, method="double_backward")
  with pytest.raises(ValueError, match="hvp_impl"):
    penalty.value_and_grad(lambda p: 0.0, hvp_impl="vjp")


# ---------------------------------------------------------------------------
# What the activation term is, in both batch-norm modes (docs/method.md §1).
# ---------------------------------------------------------------------------


def _bn_problem(train, batch=6):
  """The BN ConvNet with ``eps`` explicit; per-example losses and the mean."""
  model = ConvNet()
  x = jax.random.normal(jax.random.key(5), (batch, 6, 6, 2))
  y = jax.random.randint(jax.random.key(6), (batch,), 0, 3)
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  # Running statistics unlike the batch's, so the two modes differ.
  stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])

  def losses(p, x, y, eps=None):
    logits, _ = model.apply(
      {"params": p, "batch_stats": stats},
      x,
      eps,
      train=train,
      mutable=["batch_stats"],
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  def loss_fn(p, x, y, eps=None):
    return losses(p, x, y, eps).mean(), None

  return losses, loss_fn, params, (x, y)


def _act_l1(tree):
  return sum(jnp.abs(v).sum() for v in jax.tree.leaves(tree))


def _zero_eps(losses, params, x, y):
  shapes = perturb.activation_shapes(lambda p: losses(p, x, y), params)
  assert list(shapes) == ["Conv_1", "Dense_0"]  # the keys eps= takes
  return perturb.zero_perturbations(shapes)


@pytest.mark.parametrize("train", [False, True], ids=["bn_eval", "bn_train"])
def test_activation_term_is_the_batch_loss_gradient_norm(train):
  """‖∇_A L‖₁ against brute force: per-example norms, cross terms and all."""
  losses, loss_fn, params, (x, y) = _bn_problem(train)
  fn = jax.jit(penalty.value_and_grad(loss_fn, act_coef=1.0, has_aux=True))
  (_, info), _ = fn(params, x, y)
  eps = _zero_eps(losses, params, x, y)

  # Brute force with the model's own eps argument (no interception):
  # jac[k][j, i] = ∂ℓⱼ/∂aᵢ at point k, for every pair of examples.
  jac = jax.jit(jax.jacrev(lambda e: losses(params, x, y, e)))(eps)
  grad_l = jax.grad(lambda e: loss_fn(params, x, y, e)[0])(eps)
  b = x.shape[0]
  # ∇_{aᵢ} L = (1/B)·Σⱼ ∂ℓⱼ/∂aᵢ: the penalty's norm is that gradient's.
  chex.assert_trees_all_close(
    jax.tree.map(lambda j: j.mean(0), jac), grad_l, rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(info["act_grad_l1"], _act_l1(grad_l), rtol=1e-5)
  # The mean over examples of the per-example norms ‖∂ℓᵢ/∂aᵢ‖₁.
  diag = jax.tree.map(lambda j: j[jnp.arange(b), jnp.arange(b)], jac)
  per_example_mean = _act_l1(diag) / b
  # Each example alone (its own forward pass, batch of one).
  if not train:
    # Eval mode: no cross terms; exactly the mean of the per-example norms.
    off = jax.tree.map(
      lambda j: j * (1 - jnp.eye(b)).reshape((b, b) + (1,) * (j.ndim - 2)), jac
    )
    assert float(_act_l1(off)) == 0.0
    np.testing.assert_allclose(info["act_grad_l1"], per_example_mean, rtol=1e-5)
    # And each example alone (its own forward pass, a batch of one).
    alone = jax.jit(
      jax.vmap(
        lambda xi, yi: _act_l1(
          jax.grad(lambda e: losses(params, xi[None], yi[None], e)[0])(
            jax.tree.map(lambda v: v[:1], eps)
          )
        )
      )
    )(x, y)
    np.testing.assert_allclose(info["act_grad_l1"], alone.mean(), rtol=1e-5)
  else:
    # Train mode: the batch statistics couple the examples; the term is the
    # batch loss's gradient norm, not the mean of the per-example norms.
    gap = abs(float(info["act_grad_l1"]) / float(per_example_mean) - 1)
    assert gap > 1e-2, gap


@pytest.mark.parametrize(
  "method, train",
  [("hvp", False), ("hvp", True), ("reverse", True)],
  ids=["hvp-bn_eval", "hvp-bn_train", "reverse-bn_train"],
)
def test_act_norm_batch_mean_makes_the_l2_term_invariant_to_duplication(
  method, train
):
  _, loss_fn, params, (x, y) = _bn_problem(train)
  b = x.shape[0]
  copies = lambda a, k: jnp.concatenate([a] * k)
  out = {}
  for act_norm in penalty.ACT_NORMS:
    fn = jax.jit(
      penalty.value_and_grad(
        loss_fn,
        ord=2,
        act_coef=0.5,
        has_aux=True,
        method=method,
        act_norm=act_norm,
      )
    )
    for k in (1, 3):
      out[act_norm, k] = fn(params, copies(x, k), copies(y, k))
  for k in (1, 3):
    (_, none), _ = out["none", k]
    (_, mean), grads = out["batch_mean", k]
    (_, none_1), _ = out["none", 1]
    (_, mean_1), grads_1 = out["batch_mean", 1]
    # "none": the ℓ2 term shrinks as 1/√k (the ℓ1 norm stays).
    np.testing.assert_allclose(
      none["act_penalty"], none_1["act_penalty"] / np.sqrt(k), rtol=1e-5
    )
    np.testing.assert_allclose(
      none["act_grad_l1"], none_1["act_grad_l1"], rtol=1e-5
    )
    # "batch_mean": √(kB)·‖∇_A L‖₂, the same for every k, and so is its
    # gradient (the penalty is the same function of the parameters).
    np.testing.assert_allclose(
      mean["act_penalty"],
      0.5 * np.sqrt(k * b) * none["act_grad_l2"],
      rtol=1e-6,
    )
    np.testing.assert_allclose(
      mean["act_penalty"], mean_1["act_penalty"], rtol=1e-5
    )
    chex.assert_trees_all_close(grads, grads_1, rtol=1e-4, atol=1e-6)
    # The logged norm is ‖∇_A L‖₂ either way.
    assert mean["act_grad_l2"] == none["act_grad_l2"]


def test_act_norm_leaves_l1_and_the_default_unchanged():
  _, loss_fn, params, args = _bn_problem(True)
  kw = dict(weight_coef=0.3, act_coef=0.5, has_aux=True)
  results = [
    jax.jit(penalty.value_and_grad(loss_fn, **kw, **extra))(params, *args)
    for extra in ({}, {"act_norm": "none"}, {"act_norm": "batch_mean"})
  ]
  for other in results[1:]:
    chex.assert_trees_all_equal(other, results[0])
  with pytest.raises(ValueError, match="act_norm"):
    penalty.value_and_grad(loss_fn, act_norm="rms")


def test_two_pass_takes_the_exact_step_in_less_memory():
  """``hvp_impl="two_pass"``: the linearize step, without its residuals.

  On a ResNet (BN in train mode) the linearization keeps the backward
  pass's residuals alive during the product; the two-pass form ends the
  first pass before the second starts, so XLA needs less scratch memory
  (ResNet-18: 1.96× a plain step's peak instead of 2.61×,
  benchmarks/RESULTS.md).
  """
  from l1grad import expansion
  from l1grad import models

  model = models.get_model("tiny_resnet", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  y = jnp.arange(8) % 10
  v = model.init(jax.random.key(1), x, train=False)

  def loss_fn(p, stats):
    out, new = model.apply(
      {"params": p, "batch_stats": stats}, x, train=True, mutable=True
    )
    return expansion.cross_entropy(out, y), new

  out = {}
  for impl in ("linearize", "two_pass"):
    fn = jax.jit(
      penalty.value_and_grad(
        loss_fn, weight_coef=0.1, act_coef=0.1, has_aux=True, hvp_impl=impl
      )
    )
    compiled = fn.lower(v["params"], v["batch_stats"]).compile()
    (value, _), grads = compiled(v["params"], v["batch_stats"])
    out[impl] = value, grads, compiled.memory_analysis().temp_size_in_bytes
  np.testing.assert_allclose(out["two_pass"][0], out["linearize"][0], rtol=1e-6)
  chex.assert_trees_all_close(
    out["two_pass"][1], out["linearize"][1], rtol=1e-4, atol=1e-6
  )
  assert out["two_pass"][2] < 0.85 * out["linearize"][2]
