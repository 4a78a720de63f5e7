"""A penalty term of your own, on a Flax model of your own.

The model is a plain linen MLP (not one of ``l1grad.models``): any model
whose weights are ``nn.Dense``/``nn.Conv`` kernels works, its layers and
activation points named by module path (here ``"hidden2"`` is the input of
the layer named so). The term, λ·‖∇_A L‖₁ at that one activation point only,
is added through ``penalty.value_and_grad(extra=...)``, which hands it the
gradient trees of this very pass (``lin.grad_w``, ``lin.grad_a``) and trains
it through one Hessian-vector product. Checked first against the same
objective as a per-tensor coefficient table and as plain ``jax.grad``, then
trained. ``--small``: a few steps.

  python examples/custom_penalty.py [--small]
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from l1grad import data
from l1grad import penalty
from l1grad import perturb


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64, name="hidden1")(x))
    x = nn.relu(nn.Dense(32, name="hidden2")(x))
    return nn.Dense(10, name="out")(x)


def main(argv=()):
  steps, lam, model = (5 if "--small" in argv else 300), 0.05, MLP()
  batches = data.train_batches("digits", global_batch_size=64, seed=0)
  batch = next(batches)
  params = model.init(jax.random.key(0), batch["image"])["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return ce.mean()

  def term(lin):  # λ·‖∇_A L‖₁ at the input of layer "hidden2" only
    return lam * jnp.sum(jnp.abs(lin.grad_a["hidden2"]))

  custom = jax.jit(penalty.value_and_grad(loss_fn, extra=term))
  table = penalty.value_and_grad(loss_fn, act_coef={"hidden2": lam, "out": 0})

  def reference(params, batch):  # plain JAX: perturb the point, jax.grad
    eps = perturb.zero_perturbations(
      perturb.activation_shapes(loss_fn, params, batch)
    )

    def at(p, e):
      with perturb.perturbed(e):
        return loss_fn(p, batch)

    g_a = jax.grad(at, argnums=1)(params, eps)["hidden2"]
    return at(params, eps) + lam * jnp.sum(jnp.abs(g_a))

  ok = True
  for other in (jax.jit(table), jax.jit(jax.value_and_grad(reference))):
    (v1, g1), (v2, g2) = custom(params, batch), other(params, batch)
    ok &= bool(np.allclose(v1, v2, rtol=1e-5))
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    ok &= bool(np.allclose(flat(g1), flat(g2), rtol=1e-4, atol=1e-6))
  print(
    "verification (extra = table = plain jax.grad):", "PASS" if ok else "FAIL"
  )

  opt = optax.sgd(0.1, momentum=0.9)
  mom, first = opt.init(params), float(custom(params, batch)[0])
  for _ in range(steps):
    total, grads = custom(params, next(batches))
    updates, mom = opt.update(grads, mom, params)
    params = optax.apply_updates(params, updates)
  last = float(custom(params, batch)[0])
  print(f"L + term on the first batch: {first:.4f} before, {last:.4f} after")
  return {"ok": ok, "before": first, "after": last}


if __name__ == "__main__":
  main(sys.argv[1:])
