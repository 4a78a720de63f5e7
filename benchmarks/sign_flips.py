r"""How much of sign(∇L) flips per step during ℓ1 fine-tuning (issue 16).

The exact ℓ1 step needs the tangent t = λ·sign(∇L) of the step itself; a
one-pass forward-over-reverse step (``step_time.py``'s
``l1_jvp_known_tangent``) would use the previous step's sign instead. This
script measures how stale that is on a trained model: it trains the digits
CNN (``configs/digits.py``, width 32) for ``--base-epochs`` epochs (or
reuses ``--base``), then fine-tunes it with the trainer's own regularized
step (ℓ1, λ = ``--coef``, SGD at ``--lr``, the trainer's batches), and at
every step t (parameters θ_t, batch b_t) compares signs of the gradient of
the batch loss (batch norm in train mode, as the penalty sees it):

* ``w_consecutive``: sign ∇_W L(θ_t, b_t) against sign ∇_W L(θ_{t−1},
  b_{t−1}): what the known-tangent step would use for the weight term;
* ``w_same_batch``: sign ∇_W L(θ_{t+1}, b_t) against sign ∇_W L(θ_t, b_t):
  the drift from one update alone, the batch held fixed;
* ``a_same_batch``: the same for ∇_A L (the activation points of
  ``l1grad.perturb``), whose entries belong to the batch's examples;
* ``a_other_batch``: sign ∇_A L(θ_t, b_t) against sign ∇_A L(θ_{t−1},
  b_{t−1}) entry by entry. Different examples: the reference for "no
  information", since a previous step's activation signs are not the
  current batch's.

Each is the fraction of entries whose sign differs (zero counts as a sign)
and, in ``*_mass``, the share of ‖g‖₁ on those entries (a stale tangent s
gives ⟨s, g⟩ = (1 − 2·mass)·‖g‖₁). ``w_hvp_cosine``: the cosine between
H_θW·sign(∇_W L(θ_t, b_t)) and H_θW·sign(∇_W L(θ_{t−1}, b_{t−1})), both at
(θ_t, b_t): the weight term's penalty gradient, exact against stale.
Medians over steps (the first step has no predecessor).

Example:
  python benchmarks/sign_flips.py --steps 40
Writes ``benchmarks/results/sign_flips.json`` and ``.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

KEYS = (
  "w_consecutive",
  "w_consecutive_mass",
  "w_same_batch",
  "w_same_batch_mass",
  "a_same_batch",
  "a_same_batch_mass",
  "a_other_batch",
  "a_other_batch_mass",
  "w_hvp_cosine",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--base",
    default="",
    help="workdir of a trained digits run (default: train one in a temp dir)",
  )
  p.add_argument("--base-epochs", type=int, default=15)
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--steps", type=int, default=40, help="fine-tuning steps")
  p.add_argument("--coef", type=float, default=0.02, help="ℓ1 λ (λ_a = λ_w)")
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--out",
    default=os.path.join(ROOT, "benchmarks", "results", "sign_flips.json"),
  )
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


def base_config(args: argparse.Namespace):
  from configs import digits  # pylint: disable=g-import-not-at-top

  config = digits.get_config()
  config.model_kwargs.width = args.width
  config.num_epochs = args.base_epochs
  config.seed = args.seed
  config.eval_every_epochs = -1
  return config


def finetune_config(args: argparse.Namespace, base: str):
  config = base_config(args)
  config.init_from = base
  config.num_epochs = 10  # the README's fine-tuning length (lr schedule)
  config.learning_rate = args.lr
  config.reg.kind = "l1"
  config.reg.weight_coef = args.coef
  return config


def make_sign_tools(model, config):
  """Jitted ``grads(params, stats, batch, rng)`` and ``hvp_w(..., t_w)``.

  ``grads`` gives (∇_W L as a list of kernels, ∇_A L as a dict) of the
  plain batch loss (``train.make_loss_fn``, batch norm in train mode);
  ``hvp_w`` gives H_θW·t_w, the gradient of ⟨∇_W L, t_w⟩ w.r.t. every
  parameter (one forward-over-reverse product), as a flat list of leaves.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from l1grad import params as params_lib  # pylint: disable=g-import-not-at-top
  from l1grad import perturb  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  loss_fn = train.make_loss_fn(model, config, regularized=False)

  def setup(params, stats, batch, rng):
    args = (stats, batch["image"], batch["label"], rng)
    loss_of = lambda p: loss_fn(p, *args)
    eps = perturb.zero_perturbations(perturb.activation_shapes(loss_of, params))
    named, merge = params_lib.split_kernels(params)
    names = list(named)

    def grads_at(kernels):
      def loss_eps(p, e):
        with perturb.perturbed(e):
          return loss_fn(p, *args)[0]

      p = merge(dict(zip(names, kernels)))
      g_p, g_e = jax.grad(loss_eps, argnums=(0, 1))(p, eps)
      return list(params_lib.split_kernels(g_p)[0].values()), g_e, g_p

    return grads_at, list(named.values())

  @jax.jit
  def grads(params, stats, batch, rng):
    grads_at, kernels = setup(params, stats, batch, rng)
    g_w, g_e, _ = grads_at(kernels)
    return g_w, g_e

  @jax.jit
  def hvp_w(params, stats, batch, rng, t_w):
    grads_at, kernels = setup(params, stats, batch, rng)
    _, (_, _, hv) = jax.jvp(grads_at, (kernels,), (t_w,))
    return jax.tree.leaves(hv)

  return grads, hvp_w


def flips(now: list[Any], before: list[Any]) -> tuple[float, float]:
  """(fraction of entries whose sign differs, share of ‖now‖₁ on them)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  changed = total = mass = norm = 0.0
  for a, b in zip(now, before):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.sign(a) != np.sign(b)
    changed += diff.sum()
    total += diff.size
    mass += np.abs(a)[diff].sum()
    norm += np.abs(a).sum()
  return changed / total, mass / max(norm, 1e-300)


def cosine(a: list[Any], b: list[Any]) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top

  a = np.concatenate([np.ravel(x) for x in a]).astype(np.float64)
  b = np.concatenate([np.ravel(x) for x in b]).astype(np.float64)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from l1grad import checkpoint  # pylint: disable=g-import-not-at-top
  from l1grad import config_lib  # pylint: disable=g-import-not-at-top
  from l1grad import data  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  started = datetime.datetime.now().isoformat(timespec="seconds")
  load_before = os.getloadavg()
  base = args.base or os.path.join(tempfile.mkdtemp(), "digits_base")
  if not args.base or not os.path.isdir(checkpoint.checkpoint_dir(base)):
    train.train_and_evaluate(base_config(args), base)
  run = checkpoint.load_run(base)
  base_accuracy = None
  with open(os.path.join(base, "metrics.jsonl")) as f:
    for line in f:
      base_accuracy = json.loads(line).get("test_accuracy", base_accuracy)

  config = finetune_config(args, base)
  config_lib.validate(config)
  kwargs = config_lib.data_kwargs(config)
  plan = config_lib.step_plan(
    config, data.steps_per_epoch(config.dataset, config.batch_size, **kwargs)
  )
  model = train.create_model(config)
  lr = train.learning_rate_fn(config, plan)
  tx = train.create_optimizer(config, lr)
  params = jax.tree.map(jnp.asarray, run.params)
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=jax.tree.map(jnp.asarray, run.batch_stats),
    opt_state=tx.init(params),
  )
  step_fn = jax.jit(
    train.make_train_step(model, config, tx, lr, regularized=True)
  )
  grads, hvp_w = make_sign_tools(model, config)
  batches = data.train_batches(
    config.dataset,
    global_batch_size=config.batch_size,
    seed=config.seed,
    **kwargs,
  )
  rng = jax.random.key(config.seed)

  rows, prev = [], None
  for t in range(args.steps):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    # The trainer's step draws its dropout key like this; the signs use it.
    step_rng = jax.random.fold_in(rng, t)
    g_w, g_a = grads(state.params, state.batch_stats, batch, step_rng)
    before = state
    state, metrics = step_fn(state, batch, rng)
    g_w1, g_a1 = grads(state.params, before.batch_stats, batch, step_rng)
    row = {"step": t, "penalty": float(metrics["penalty"])}
    row["w_same_batch"], row["w_same_batch_mass"] = flips(g_w1, g_w)
    a_now, a_next = list(g_a.values()), list(g_a1.values())
    row["a_same_batch"], row["a_same_batch_mass"] = flips(a_next, a_now)
    if prev is not None:
      row["w_consecutive"], row["w_consecutive_mass"] = flips(g_w, prev[0])
      row["a_other_batch"], row["a_other_batch_mass"] = flips(
        a_now, list(prev[1].values())
      )
      exact = [jnp.sign(g) for g in g_w]
      stale = [jnp.sign(g) for g in prev[0]]
      hv_exact = hvp_w(
        before.params, before.batch_stats, batch, step_rng, exact
      )
      hv_stale = hvp_w(
        before.params, before.batch_stats, batch, step_rng, stale
      )
      row["w_hvp_cosine"] = cosine(hv_stale, hv_exact)
    prev = (g_w, g_a)
    rows.append(row)
    if not args.quiet:
      print(
        f"step {t}: " + " ".join(f"{k} {row[k]:.4f}" for k in KEYS if k in row),
        flush=True,
      )

  medians = {k: statistics.median(r[k] for r in rows if k in r) for k in KEYS}
  quartiles = {
    k: statistics.quantiles([r[k] for r in rows if k in r], n=4) for k in KEYS
  }
  result = {
    "started": started,
    "command": "python benchmarks/sign_flips.py "
    + " ".join(sys.argv[1:] if argv is None else argv),
    # The folder only when given: a temporary one means nothing later.
    "base": args.base or "trained by this run",
    "base_epochs": args.base_epochs,
    "base_test_accuracy": base_accuracy,
    "width": args.width,
    "coef": args.coef,
    "lr": args.lr,
    "steps": args.steps,
    "loadavg_before": list(load_before),
    "loadavg_after": list(os.getloadavg()),
    "medians": medians,
    "quartiles": quartiles,
    "rows": rows,
  }
  table = markdown(result)
  if not args.quiet:
    print(table)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(f"<!-- {result['command']} ({started}) -->\n\n{table}\n")
  return result


def markdown(result: dict[str, Any]) -> str:
  m = result["medians"]
  q = result["quartiles"]["w_hvp_cosine"]
  pct = lambda x: f"{100 * x:.2f} %"
  acc = result["base_test_accuracy"]
  lines = [
    f"Digits CNN width {result['width']}, base trained"
    f" {result['base_epochs']} epochs"
    + (f" (test accuracy {acc:.4f})" if acc is not None else "")
    + f", ℓ1 fine-tuning λ = {result['coef']:g}, lr {result['lr']:g},"
    f" {result['steps']} steps; medians over steps.",
    "",
    "| sign(∇L) compared | entries flipped | share of ‖∇L‖₁ flipped |",
    "|---|---|---|",
    f"| weights, consecutive steps (θ_t, b_t vs θ_t−1, b_t−1) |"
    f" {pct(m['w_consecutive'])} | {pct(m['w_consecutive_mass'])} |",
    f"| weights, one update, same batch | {pct(m['w_same_batch'])} |"
    f" {pct(m['w_same_batch_mass'])} |",
    f"| activations, one update, same batch | {pct(m['a_same_batch'])} |"
    f" {pct(m['a_same_batch_mass'])} |",
    f"| activations, consecutive steps (other examples) |"
    f" {pct(m['a_other_batch'])} | {pct(m['a_other_batch_mass'])} |",
    "",
    "Weight term's penalty gradient, stale sign against exact, cosine:"
    f" median {m['w_hvp_cosine']:.2f}, quartiles"
    f" {q[0]:.2f} to {q[2]:.2f}, over the steps.",
    "",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
