"""The expected second-order loss of quantization noise as a training term.

On the digits CNN (batch norm in train mode) the ℓ1 penalty gets one more
term, E[½·δᵀHδ] for uniform noise δ ~ U[−Δ/2, Δ/2] on every kernel and
activation point, Δ those of post-training quantization at (4, 4) bits
(``quant.bin_widths``: unfolded kernels, DFQ ranges). Two estimates, each
added through ``penalty.value_and_grad(extra=...)``, which shares the
penalty's forward, backward and linearized passes:

* ``hutchinson``: Σ (Δ²/24)·Hᵢᵢ from one Rademacher probe, one extra HVP
  through the penalty's linearization (trained by third-order autodiff);
* ``antithetic``: ½[L(z+δ) + L(z−δ)] − L(z) for one uniform δ: two extra
  forward passes; it sees the ReLU/max-pool kinks the Hessian cannot.

Then, at 8, 4 and 3 bits, brute force with real uniform noise: the
Hutchinson estimate against ½·δᵀHδ of the noise (the same expectation), and
the mean induced loss L(z+δ) − L(z) against the antithetic gap (the same
expectation too, δ being symmetric; the gap cancels the first-order term's
variance). Each step is timed against a plain one. ``--small``: tiny, short.

  python examples/second_order.py [--small]
"""

import sys
import timeit

import jax
import numpy as np
import optax

from l1grad import data
from l1grad import expansion
from l1grad import models
from l1grad import penalty
from l1grad import quant

KINDS = ("plain", "l1", "l1+hutchinson", "l1+antithetic")


def main(argv=()):
  small = "--small" in argv
  width, steps, draws, timed = (4, 10, 30, 2) if small else (32, 300, 200, 20)
  model = models.get_model("digits_cnn", num_classes=10, width=width)
  batches = data.train_batches("digits", global_batch_size=32, seed=0)
  batch, key, opt = next(batches), jax.random.key(1), optax.sgd(0.05, 0.9)
  v = model.init(jax.random.key(0), batch["image"], train=False)
  params, stats, mom = v["params"], v["batch_stats"], opt.init(v["params"])

  def loss_fn(params, stats, batch):  # train mode: new statistics as aux
    v = {"params": params, "batch_stats": stats}
    out, new = model.apply(v, batch["image"], train=True, mutable=True)
    return expansion.cross_entropy(out, batch["label"]), new["batch_stats"]

  def widths(params, stats, bits):  # Δ of each kernel element and point
    v = {"params": params, "batch_stats": stats}
    bw = quant.bin_widths(model, v, batch["image"], bits, bits)
    return jax.lax.stop_gradient(bw.point_widths())

  def make_step(kind):
    lam = 0.0 if kind == "plain" else 0.01

    @jax.jit
    def train_step(params, mom, stats, batch, key):
      step = widths(params, stats, 4)

      def extra(lin):  # sees the penalty's own pass: z, ∇L, the Hessian map
        if kind == "l1+hutchinson":  # one more HVP through the penalty's map
          return expansion.hutchinson_term(lin, step, key)
        z, fn = expansion.point_loss(loss_fn, lin.params, stats, batch)
        delta = expansion.uniform_noise(key, z, step)  # two more passes
        f = lambda z: fn(z)[0]
        return expansion.antithetic_gap(f, z, delta, loss=lin.loss)

      term = extra if "+" in kind else None
      kw = dict(weight_coef=lam, act_coef=lam, extra=term, has_aux=True)
      (_, info), g = penalty.value_and_grad(loss_fn, **kw)(params, stats, batch)
      updates, mom = opt.update(g, mom, params)
      return optax.apply_updates(params, updates), mom, info["aux"], info

    return train_step

  fns = {kind: make_step(kind) for kind in KINDS}
  for _ in range(steps):  # a short plain training: the expansion point
    params, mom, stats, _ = fns["plain"](params, mom, stats, next(batches), key)
  args = (params, mom, stats, batch, key)
  run = lambda f: timeit.timeit(
    lambda: jax.block_until_ready(f(*args)), number=1
  )
  times = {kind: [run(f)] for kind, f in fns.items()}  # the first compiles
  for _ in range(timed):  # interleaved: a burst of load hits every kind
    for kind, f in fns.items():
      times[kind].append(run(f))
  ms = {kind: 1e3 * np.median(t[1:]) for kind, t in times.items()}
  for kind, t in times.items():
    print(f"{kind}: {ms[kind]:.1f} ms, {ms[kind] / ms['plain']:.1f}x plain;")
    print(f"  first call (compiles) {t[0]:.0f} s")

  z, fn = expansion.point_loss(loss_fn, params, stats, batch)
  results, ok = {}, True
  for bits in (8, 4, 3):  # brute force: real uniform noise on one batch
    step, k = widths(params, stats, bits), jax.random.fold_in(key, bits)
    est = expansion.second_order_estimates(
      lambda z: fn(z)[0], z, step, k, num_draws=draws
    )
    for a, b in (("hutchinson", "curvature"), ("induced", "antithetic")):
      (ma, ea), (mb, eb) = est[a], est[b]
      ok &= abs(ma - mb) < 4 * np.hypot(ea, eb)  # the same expectation
    results[bits] = est
    print(bits, *(f"{n} {m:.3e}±{e:.0e}" for n, (m, e) in est.items()))
  print("verification (4 s.e.):", "PASS" if ok else "FAIL")
  return {"times": ms, "estimates": results, "ok": bool(ok)}


if __name__ == "__main__":
  main(sys.argv[1:])
