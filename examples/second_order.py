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

NAMES = ("hutchinson", "curvature", "induced", "antithetic")


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

  @jax.jit
  def widths(params, stats, bits):  # Δ of each kernel element and point
    v = {"params": params, "batch_stats": stats}
    bw = quant.bin_widths(model, v, batch["image"], bits, bits)
    step = {"weights": bw.unfolded_weights(), "acts": bw.activations}
    return jax.lax.stop_gradient(step)

  def make_step(kind):  # "plain", "l1", "l1+hutchinson" or "l1+antithetic"
    lam, term = 0.0 if kind == "plain" else 0.01, kind.partition("+")[2]
    kw = dict(weight_coef=lam, act_coef=lam, track_activations=bool(lam))

    @jax.jit
    def train_step(params, mom, stats, batch, key):
      step = widths(params, stats, 4)

      def extra(lin):  # given the penalty's pass: z, ∇L, the Hessian map
        if term == "hutchinson":  # one more HVP through the penalty's map
          z, hvp_fn = expansion.linearization_point(lin)
          return expansion.hutchinson_from_hvp(hvp_fn, z, step, key)
        z, fn = expansion.point_loss(loss_fn, lin.params, stats, batch)
        delta = expansion.uniform_noise(key, z, step)  # antithetic: 2 passes
        return expansion.antithetic_gap(
          lambda z: fn(z)[0], z, delta, loss=lin.loss
        )

      vg = penalty.value_and_grad(
        loss_fn, has_aux=True, extra=extra if term else None, **kw
      )
      (_, info), g = vg(params, stats, batch)
      updates, mom = opt.update(g, mom, params)
      return optax.apply_updates(params, updates), mom, info["aux"], info

    return train_step

  plain = make_step("plain")
  for _ in range(steps):  # a short plain training: the expansion point
    params, mom, stats, _ = plain(params, mom, stats, next(batches), key)
  args = (params, mom, stats, batch, key)

  def run(f):  # seconds of one call
    return timeit.timeit(lambda: jax.block_until_ready(f(*args)), number=1)

  kinds = ("plain", "l1", "l1+hutchinson", "l1+antithetic")
  fns = {kind: make_step(kind) for kind in kinds}
  first = {kind: run(f) for kind, f in fns.items()}  # the first call compiles
  times = {kind: [] for kind in kinds}
  for _ in range(timed):  # interleaved: a burst of load hits every kind
    for kind, f in fns.items():
      times[kind].append(run(f))
  times = {kind: np.median(t) for kind, t in times.items()}
  for kind, t in times.items():
    print(f"{kind}: {1e3 * t:.1f} ms/step, {t / times['plain']:.1f}x plain;")
    print(f"  first call (compiles) {first[kind]:.0f} s")

  @jax.jit
  def draw(params, stats, step, key):  # one draw of each, on one batch
    z, fn = expansion.point_loss(loss_fn, params, stats, batch)
    d = expansion.second_order_draw(lambda z: fn(z)[0], z, step, key)
    return jax.numpy.stack([d[n] for n in NAMES])

  print("bits", *NAMES, "(mean ± standard error)")
  results, ok = {}, True
  for bits in (8, 4, 3):
    step = widths(params, stats, bits)
    keys = jax.random.split(jax.random.fold_in(key, bits), draws)
    x = np.array([draw(params, stats, step, k) for k in keys])
    mean, err = x.mean(0), x.std(0, ddof=1) / np.sqrt(draws)
    results[bits] = dict(zip(NAMES, zip(mean, err)))
    ok &= abs(mean[0] - mean[1]) < 4 * np.hypot(err[0], err[1])
    ok &= abs(mean[2] - mean[3]) < 4 * np.hypot(err[2], err[3])
    print(bits, *(f"{m:.3e}±{e:.0e}" for m, e in zip(mean, err)))
  print("verification (4 s.e.):", "PASS" if ok else "FAIL")
  return {"times": times, "estimates": results, "ok": bool(ok)}


if __name__ == "__main__":
  main(sys.argv[1:])
