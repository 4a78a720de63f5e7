r"""Times the trainer's own jitted training step, every variant side by side.

What is timed is ``l1grad.train.make_train_step`` — forward, loss, gradient
(and penalty), optimizer update, BatchNorm in train mode — jitted exactly as
the trainer jits it (``donate_argnums=0``, ``NamedSharding`` in and out on a
``data`` mesh), on one fixed random batch. All variants of one model are
compiled in one process, warmed up, then timed round-robin: each repeat runs
every variant once (in a rotated order), so a burst of load from another
process hits all variants alike. The reported step time is the median over
repeats of (time of ``--steps`` chained steps) / ``--steps``.

Variants:
  plain           no penalty, ``track_act_grad=False`` (the baseline)
  plain_tracked   no penalty, ‖∇_A L‖ computed for logging (trainer default)
  l1_hvp          ℓ1 penalty, exact, forward-over-reverse via jax.linearize
  l1_hvp_jvp      ℓ1, exact, gradient then jax.jvp(grad) (the earlier code)
  l1_reverse      ℓ1, exact, reverse-over-reverse
  l1_fd           ℓ1, finite-difference HVP
  l1_cd           ℓ1, central-difference HVP (three gradients)
  l2_hvp          ℓ2 penalty, exact (linearize)
  dq              Defensive Quantization's orthogonality term
  ste             STE quantization-aware step at ``--ste-bits`` (W:A)
  l1_lazy4        lazy regularization, ``reg.every_steps=4``: the trainer's
                  ℓ1 step (λ × 4) then 3 plain steps, timed as whole cycles;
                  time and flops per step amortized, memory the ℓ1 step's
  l1_lazy16       the same with k = 16 (StyleGAN2's choice)
  l1_remat        ℓ1 exact, the loss under ``jax.checkpoint``
                  (``nothing_saveable``) before ``penalty.value_and_grad``
  l1_remat_dots   the same, policy ``dots_saveable``
  l1_remat_convs  the same, convolution outputs saveable
  l1_jvp_known_tangent  prototype: one ``jax.jvp`` of the gradient along the
                  previous step's sign (carried in the state): no stored
                  linearization, an approximation (``make_jvp_step``)
  l1_hvp_two_pass the trainer's ``reg.hvp_impl="two_pass"``, exact: a
                  gradient pass for this step's sign, then a jvp pass that
                  starts after it (no stored linearization)
  torch_plain     the PyTorch peer's plain step (``--peer``; VGG/ResNet only)
  torch_l1        the PyTorch peer's double-backward ℓ1 step (``--peer``)

A JAX variant may carry modifiers, ``VARIANT@MOD[+MOD]``, timed in the same
round-robin as the others: ``NAME`` of an ``--option-set`` compiles it with
those XLA options; ``rpool`` is an experiment that traces the model with
2×2/2 max-pooling written as reshape + max (same values and, but for exact
ties, same gradients) instead of ``lax.reduce_window``. Its ratio is taken
to ``plain@`` with the same modifiers when that is measured.

Per variant it reports the median step time, its minimum, the process CPU
time per step, images/s, the ratio to ``plain``, the compile time (trace + lower + compile), XLA's flop count of the
optimised step (``compiled.cost_analysis()``, noise-free) and its memory
(``compiled.memory_analysis()``): ``peak`` = argument + output − aliased
(donated) + temp bytes, i.e. what the step holds at once beyond the code.

Examples (benchmarks/RESULTS.md lists the exact commands behind its tables):
  python benchmarks/step_time.py --models digits,vgg,resnet18 --peer
  python benchmarks/step_time.py --imagenet --batch 8 --resnet-filters 64 --peer
  python benchmarks/step_time.py --models vgg,resnet18 --batch 128 \
      --vgg-width 1 --resnet-filters 64 --compile-only
  python benchmarks/step_time.py --models vgg --variants plain,l1_hvp,plain@rpool,l1_hvp@rpool
  python benchmarks/step_time.py --models vgg --xla-flags=--xla_cpu_use_onednn=true

Writes ``benchmarks/results/<tag>.json`` and ``<tag>.md`` (``--out`` sets the
JSON path) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

JAX_VARIANTS = (
  "plain",
  "plain_tracked",
  "l1_hvp",
  "l1_hvp_jvp",
  "l1_reverse",
  "l1_fd",
  "l1_cd",
  "l2_hvp",
  "dq",
  "ste",
  "l1_lazy4",
  "l1_lazy16",
  "l1_remat",
  "l1_remat_dots",
  "l1_remat_convs",
  "l1_jvp_known_tangent",
  "l1_hvp_two_pass",
)
# Lazy regularization: the ℓ1 step every k-th step (coefficient × k), the
# plain step in between; timed as one real k-step cycle.
LAZY_VARIANTS = {"l1_lazy4": 4, "l1_lazy16": 16}
# The ℓ1 step with the loss under jax.checkpoint, by rematerialization policy.
REMAT_VARIANTS = {
  "l1_remat": "nothing_saveable",
  "l1_remat_dots": "dots_saveable",
  "l1_remat_convs": "convs_saveable",
}
# The ℓ1 step by jax.jvp of the gradient along the previous step's sign.
JVP_VARIANTS = {"l1_jvp_known_tangent": "previous"}
PEER_VARIANTS = ("torch_plain", "torch_l1")
DEFAULT_VARIANTS = JAX_VARIANTS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--models",
    default="digits,vgg,resnet18",
    help="comma list of digits, vgg, resnet18 (CIFAR shapes); "
    "--imagenet selects ImageNet ResNet-18 instead",
  )
  p.add_argument(
    "--imagenet",
    action="store_true",
    help="ImageNet ResNet-18 at 224×224×3, 1000 classes",
  )
  p.add_argument(
    "--variants",
    default=",".join(DEFAULT_VARIANTS),
    help="comma list (see the module docstring)",
  )
  p.add_argument(
    "--peer",
    action="store_true",
    help="also time the PyTorch peer (needs the bench extra)",
  )
  p.add_argument(
    "--batch",
    type=int,
    default=32,
    help="batch size for VGG/ResNet (digits uses --digits-batch)",
  )
  p.add_argument("--digits-batch", type=int, default=64)
  p.add_argument("--digits-width", type=int, default=32)
  p.add_argument(
    "--vgg-width",
    type=float,
    default=0.25,
    help="VGG-like width_multiplier (1.0 = the paper's net)",
  )
  p.add_argument(
    "--resnet-filters",
    type=int,
    default=16,
    help="ResNet-18 num_filters (64 = the standard net)",
  )
  p.add_argument(
    "--image-size",
    type=int,
    default=224,
    help="ImageNet input side with --imagenet",
  )
  p.add_argument("--ste-bits", default="4:4")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument(
    "--steps", type=int, default=3, help="chained steps per timed call"
  )
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument(
    "--threads", type=int, default=0, help="torch threads (0: os.cpu_count())"
  )
  p.add_argument(
    "--xla-flags", default="", help="appended to XLA_FLAGS before JAX starts"
  )
  p.add_argument(
    "--option-set",
    action="append",
    default=[],
    metavar="NAME:KEY=VAL[;KEY=VAL]",
    help="XLA compiler options for variants suffixed @NAME, "
    "compiled in the same process (e.g. ynnconv:xla_cpu_"
    "experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_"
    "INDIVIDUAL_CONVOLUTION)",
  )
  p.add_argument(
    "--tag",
    default="",
    help="results file name (default: from models and flags)",
  )
  p.add_argument(
    "--out",
    default="",
    help="JSON path (default benchmarks/results/<tag>.json)",
  )
  p.add_argument(
    "--compile-only",
    action="store_true",
    help="no timing: compile time, flops and memory only (cheap "
    "for full-size models; noise-free)",
  )
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


# --------------------------------------------------------------------------
# Configs.


def _set(config, key: str, value: Any) -> None:
  target = config
  *parents, leaf = key.split(".")
  for part in parents:
    target = target[part]
  target[leaf] = value


def model_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """Base config, image shape, classes and batch of one benchmark model."""
  from configs import cifar10_r18  # pylint: disable=g-import-not-at-top
  from configs import cifar10_vgg  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  from configs import imagenet_r18  # pylint: disable=g-import-not-at-top

  if name == "digits":
    config = digits.get_config()
    config.model_kwargs.width = args.digits_width
    return dict(
      config=config,
      image_shape=(8, 8, 1),
      num_classes=10,
      batch=args.digits_batch,
      desc=f"digits CNN width {args.digits_width}",
    )
  if name == "vgg":
    config = cifar10_vgg.get_config()
    config.model_kwargs.width_multiplier = args.vgg_width
    return dict(
      config=config,
      image_shape=(32, 32, 3),
      num_classes=10,
      batch=args.batch,
      desc=f"VGG-like width_multiplier {args.vgg_width:g}",
    )
  if name == "resnet18":
    config = cifar10_r18.get_config()
    config.model_kwargs.num_filters = args.resnet_filters
    return dict(
      config=config,
      image_shape=(32, 32, 3),
      num_classes=10,
      batch=args.batch,
      desc=f"ResNet-18 (CIFAR) num_filters {args.resnet_filters}",
    )
  if name == "resnet18_imagenet":
    config = imagenet_r18.get_config()
    config.model_kwargs.num_filters = args.resnet_filters
    s = args.image_size
    return dict(
      config=config,
      image_shape=(s, s, 3),
      num_classes=1000,
      batch=args.batch,
      desc=f"ResNet-18 (ImageNet) num_filters {args.resnet_filters}",
    )
  raise ValueError(f"unknown model {name!r}")


def variant_config(base, variant: str, ste_bits: str):
  """(config, regularized) of one JAX variant."""
  config = base.copy_and_resolve_references()
  config.track_act_grad = False
  config.reg.kind = "none"
  config.reg.weight_coef = 0.0
  config.reg.act_coef = -1.0
  config.qat.bits = ""
  regularized = False
  if variant == "plain":
    pass
  elif variant == "plain_tracked":
    config.track_act_grad = True
  elif (
    variant in LAZY_VARIANTS
    or variant in REMAT_VARIANTS
    or variant in JVP_VARIANTS
  ):
    # All exact ℓ1 at λ = 0.05; how the step is built differs.
    config.reg.kind = "l1"
    config.reg.weight_coef = 0.05
    config.reg.every_steps = LAZY_VARIANTS.get(variant, 1)
    regularized = True
  elif variant.startswith(("l1_", "l2_")):
    kind, method = variant.split("_", 1)
    config.reg.kind = kind
    config.reg.weight_coef = 0.05
    for impl in ("jvp", "two_pass"):
      if method == f"hvp_{impl}":
        method, config.reg.hvp_impl = "hvp", impl
    config.reg.method = {
      "hvp": "hvp",
      "reverse": "reverse",
      "fd": "finite_difference",
      "cd": "central_difference",
    }[method]
    regularized = True
  elif variant == "dq":
    config.reg.kind = "dq"
    config.reg.weight_coef = 1e-4
    regularized = True
  elif variant == "ste":
    config.qat.bits = ste_bits
  else:
    raise ValueError(f"unknown variant {variant!r}")
  return config, regularized


# --------------------------------------------------------------------------
# Building and measuring one compiled step.


def _reshape_max_pool(original):
  """nn.max_pool whose 2×2/2 VALID case is reshape + max (the rpool experiment)."""

  def pool(inputs, window_shape, strides=None, padding="VALID"):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    window = tuple(window_shape)
    if (
      window == (2, 2)
      and tuple(strides or window) == window
      and padding == "VALID"
      and inputs.ndim == 4
      and inputs.shape[1] % 2 == 0
      and inputs.shape[2] % 2 == 0
    ):
      b, h, w, c = inputs.shape
      # The trainer's mesh has explicit axes: a reshape that splits two axes
      # must name its output sharding (the batch axis keeps its own).
      sharding = jax.typeof(inputs).sharding
      spec = tuple(sharding.spec) + (None,) * 4
      out = jax.sharding.NamedSharding(
        sharding.mesh,
        jax.sharding.PartitionSpec(
          spec[0], spec[1], None, spec[2], None, spec[3]
        ),
      )
      split = jax.lax.reshape(
        inputs, (b, h // 2, 2, w // 2, 2, c), out_sharding=out
      )
      return jnp.max(split, axis=(2, 4))
    return original(inputs, window_shape, strides=strides, padding=padding)

  return pool


def split_variant(variant: str) -> tuple[str, list[str]]:
  base, _, mods = variant.partition("@")
  return base, [m for m in mods.split("+") if m]


def _option_value(text: str) -> Any:
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return int(text)
  except ValueError:
    return text


def parse_option_sets(specs: list[str]) -> dict[str, dict[str, Any]]:
  sets = {}
  for spec in specs:
    name, _, items = spec.partition(":")
    pairs = (item.split("=", 1) for item in items.split(";") if item)
    sets[name] = {k: _option_value(v) for k, v in pairs}
  return sets


def _first(analysis):
  return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def build_jax_variant(
  setup, variant: str, args, params, batch_stats, batch, rng, shardings
) -> dict[str, Any]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from l1grad import models  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  base, mods = split_variant(variant)
  option_sets = parse_option_sets(args.option_set)
  compiler_options: dict[str, Any] = {}
  for mod in mods:
    if mod in option_sets:
      compiler_options.update(option_sets[mod])
    elif mod != "rpool":
      raise ValueError(f"unknown modifier {mod!r} in {variant!r}")
  config, regularized = variant_config(setup["config"], base, args.ste_bits)
  config.batch_size = setup["batch"]
  model = models.from_config(config, setup["num_classes"])
  lr = optax.constant_schedule(0.01)
  tx = train.create_optimizer(config, lr)
  replicated, batch_sharding = shardings
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
  )
  # A private copy: the step donates (and so deletes) its input state.
  state = jax.device_put(
    jax.tree.map(lambda x: jnp.array(x, copy=True), state), replicated
  )

  def compile_step(step, state):
    jitted = jax.jit(
      step,
      donate_argnums=0,
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated),
    )
    max_pool = nn.max_pool
    if "rpool" in mods:
      nn.max_pool = _reshape_max_pool(max_pool)
    try:
      t0 = time.perf_counter()
      lowered = jitted.lower(state, batch, rng)
      compiled = lowered.compile(compiler_options=compiler_options or None)
      compile_s = time.perf_counter() - t0
    finally:
      nn.max_pool = max_pool
    return compiled, compile_s

  if base in LAZY_VARIANTS:
    return _build_lazy_cycle(
      model, config, tx, lr, state, compile_step, batch, rng
    )
  if base in JVP_VARIANTS:
    step, init_signs = make_jvp_step(
      model, config, tx, lr, tangent=JVP_VARIANTS[base]
    )
    # The tangent of the first step: the gradient's sign at the start (the
    # trainer would carry it over from the previous step).
    state = init_signs(state, batch, rng)
  elif base in REMAT_VARIANTS:
    with _remat_loss(train, REMAT_VARIANTS[base]):
      step = train.make_train_step(
        model, config, tx, lr, regularized=regularized
      )
  else:
    step = train.make_train_step(model, config, tx, lr, regularized=regularized)
  compiled, compile_s = compile_step(step, state)
  holder = {"state": state}

  def run(steps: int) -> None:
    s = holder["state"]
    for _ in range(steps):
      s, _ = compiled(s, batch, rng)
    jax.block_until_ready(s)
    holder["state"] = s

  return {
    "run": run,
    "compiled": compiled,
    "framework": "jax",
    "compile_s": compile_s,
    **_cost(compiled),
  }


def _cost(compiled) -> dict[str, Any]:
  """XLA's flops, bytes accessed and memory of one compiled step."""
  cost = _first(compiled.cost_analysis()) or {}
  mem = compiled.memory_analysis()
  memory = None
  if mem is not None:
    memory = {
      "temp_bytes": int(mem.temp_size_in_bytes),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
    }
    memory["peak_bytes"] = (
      memory["argument_bytes"]
      + memory["output_bytes"]
      - memory["alias_bytes"]
      + memory["temp_bytes"]
    )
  return {
    "flops": float(cost.get("flops", float("nan"))),
    "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
    "memory": memory,
  }


def _build_lazy_cycle(model, config, tx, lr, state, compile_step, batch, rng):
  """Lazy regularization as the trainer runs it: one real k-step cycle.

  The trainer's two variants of an ℓ1 run with ``reg.every_steps = k``: the
  regularized step built from ``train.lazy_step_config`` (λ × k) on the
  cycle's first step, the plain step on the k − 1 others. A timed call runs
  whole cycles (at least ``--steps`` steps) and reports the time per step.
  Flops are the cycle's mean per step; memory is the regularized step's (the
  peak of the cycle: laziness saves time, not memory).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from l1grad import config_lib  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  k = config_lib.reg_every_steps(config)
  plain, plain_s = compile_step(
    train.make_train_step(model, config, tx, lr, regularized=False), state
  )
  reg, reg_s = compile_step(
    train.make_train_step(
      model, train.lazy_step_config(config), tx, lr, regularized=True
    ),
    state,
  )
  holder = {"state": state}

  def run(steps: int) -> None:
    s = holder["state"]
    for i in range(steps):
      s, _ = (reg if i % k == 0 else plain)(s, batch, rng)
    jax.block_until_ready(s)
    holder["state"] = s

  plain_cost, reg_cost = _cost(plain), _cost(reg)
  mean = lambda key: ((k - 1) * plain_cost[key] + reg_cost[key]) / k
  return {
    "run": run,
    "steps": lambda steps: k * -(-steps // k),  # whole cycles
    "compiled": reg,
    "framework": "jax",
    "compile_s": plain_s + reg_s,
    "flops": mean("flops"),
    "bytes_accessed": mean("bytes_accessed"),
    "memory": reg_cost["memory"],
    "every_steps": k,
  }


def _checkpoint_policy(name: str):
  import jax  # pylint: disable=g-import-not-at-top

  if name == "convs_saveable":
    # Keep the convolutions' outputs, recompute the rest (BatchNorm, ReLU,
    # pooling) in the backward pass.
    return lambda prim, *_, **__: prim.name == "conv_general_dilated"
  return getattr(jax.checkpoint_policies, name)


@contextlib.contextmanager
def _remat_loss(train, policy_name: str):
  """``train.make_loss_fn`` returns its loss under ``jax.checkpoint``.

  The trainer's step is then built unchanged around it: ``penalty.
  value_and_grad`` linearizes the gradient of a rematerialized loss.
  """
  import jax  # pylint: disable=g-import-not-at-top

  original = train.make_loss_fn
  policy = _checkpoint_policy(policy_name)

  def make_loss_fn(*args, **kwargs):
    loss_fn = original(*args, **kwargs)

    def remat_loss(*loss_args):
      # A new function object per call: jax.checkpoint caches its trace by
      # function and argument shapes, blind to the perturbation interceptor
      # around the call (perturb.perturbed), so one shared function would
      # replay the first trace, without the activation perturbations.
      def fresh(*inner):
        return loss_fn(*inner)

      return jax.checkpoint(fresh, policy=policy)(*loss_args)

    return remat_loss

  train.make_loss_fn = make_loss_fn
  try:
    yield
  finally:
    train.make_loss_fn = original


def make_jvp_step(model, config, tx, lr, *, tangent: str = "previous"):
  """Prototype: the ℓ1 step by ``jax.jvp`` along a tangent known before it.

  The trainer's exact step (``jax.linearize``) stores the whole
  linearization, primal activations and every primal backward cotangent,
  because its tangent t = λ·sign(∇L) is known only after the gradient. A
  forward-over-reverse ``jax.jvp`` along a tangent known before it starts
  computes ∇L and H·t in one pass, each cotangent beside its tangent, and
  stores nothing of the backward pass. Here t is the sign of the previous
  step's gradient (``l1_jvp_known_tangent``), carried in the state: one
  pass, an approximation where signs flip between steps; and the activation
  signs belong to the previous batch's examples, so on real data only the
  weight term's tangent carries over (the benchmark's fixed batch hides
  that; ``benchmarks/sign_flips.py`` measures both). The exact way to know
  t first, a gradient pass before the jvp pass, is the trainer's
  ``reg.hvp_impl="two_pass"`` (``l1_hvp_two_pass``).

  Built from public pieces (``train.make_loss_fn``, ``l1grad.perturb``,
  ``l1grad.params``) the way ``penalty.value_and_grad`` is.

  Returns:
    ``(train_step, init_signs)``: ``train_step(state, batch, rng)`` on
    ``state = {"train": TrainState, "sign_w": [int8], "sign_a": {int8}}``
    and ``init_signs(train_state, batch, rng)``, that state with the signs
    of the gradient at ``train_state``.
  """
  if tangent != "previous":
    raise ValueError(f"tangent must be 'previous', got {tangent!r}.")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from l1grad import config_lib  # pylint: disable=g-import-not-at-top
  from l1grad import params as params_lib  # pylint: disable=g-import-not-at-top
  from l1grad import penalty  # pylint: disable=g-import-not-at-top
  from l1grad import perturb  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  loss_fn = train.make_loss_fn(model, config, regularized=True)
  w_coef = config.reg.weight_coef
  a_coef = config_lib.act_coef(config)
  points = config.reg.get("points", "layer_inputs")

  def setup(ts, batch, rng):
    """The gradient function of (kernels, ε), its primal point, its args."""
    args = (
      ts.batch_stats,
      batch["image"],
      batch["label"],
      jax.random.fold_in(rng, ts.step),
    )
    loss_of = lambda p: loss_fn(p, *args)
    eps = perturb.zero_perturbations(
      perturb.activation_shapes(loss_of, ts.params)
    )
    sites = perturb.point_sites(points, loss_of, ts.params)
    named, merge = params_lib.split_kernels(ts.params)
    names = list(named)

    def loss_eps(p, e):
      with perturb.perturbed(e, sites=sites):
        return loss_fn(p, *args)

    def grads_at(kernels, e):
      p = merge(dict(zip(names, kernels)))
      (loss, aux), (g_p, g_e) = jax.value_and_grad(
        loss_eps, argnums=(0, 1), has_aux=True
      )(p, e)
      return (g_p, g_e), (loss, aux)

    return grads_at, list(named.values()), eps

  def signs(g_p, g_e):
    sign = lambda g: jnp.sign(g).astype(jnp.int8)
    g_w = list(params_lib.split_kernels(g_p)[0].values())
    return [sign(g) for g in g_w], {k: sign(v) for k, v in g_e.items()}

  @jax.jit
  def init_signs(ts, batch, rng):
    grads_at, kernels, eps = setup(ts, batch, rng)
    (g_p, g_e), _ = grads_at(kernels, eps)
    sign_w, sign_a = signs(g_p, g_e)
    return {"train": ts, "sign_w": sign_w, "sign_a": sign_a}

  def train_step(state, batch, rng):
    ts = state["train"]
    grads_at, kernels, eps = setup(ts, batch, rng)
    sign_w, sign_a = state["sign_w"], state["sign_a"]
    t_w = [w_coef * s.astype(k.dtype) for s, k in zip(sign_w, kernels)]
    t_a = {k: a_coef * sign_a[k].astype(v.dtype) for k, v in eps.items()}
    # One pass: the primal gradient and H·t, no stored linearization.
    (g_p, g_e), (hv, _), (loss, aux) = jax.jvp(
      grads_at, (kernels, eps), (t_w, t_a), has_aux=True
    )
    grads = jax.tree.map(jnp.add, g_p, hv)
    norms = penalty.gradient_norms(
      list(params_lib.split_kernels(g_p)[0].values()), g_e
    )
    pen = w_coef * norms["weight_grad_l1"] + a_coef * norms["act_grad_l1"]
    updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    new = ts.replace(
      step=ts.step + 1,
      params=params,
      batch_stats=aux["batch_stats"],
      opt_state=opt_state,
    )
    sign_w, sign_a = signs(g_p, g_e)
    metrics = {
      "total_loss": loss + pen,
      "cross_entropy": aux["cross_entropy"],
      "penalty": pen,
      **norms,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": lr(ts.step),
    }
    return {"train": new, "sign_w": sign_w, "sign_a": sign_a}, metrics

  return train_step, init_signs


def build_peer_variant(
  setup, model_name: str, variant: str, args, peers: dict[str, Any]
) -> dict[str, Any]:
  """The PyTorch peer's step (one model object shared by both variants)."""
  import peer_torch  # pylint: disable=g-import-not-at-top

  if model_name not in peers:
    peers[model_name] = peer_torch.Peer(
      model_name,
      num_classes=setup["num_classes"],
      image_shape=setup["image_shape"],
      batch=setup["batch"],
      vgg_width=args.vgg_width,
      resnet_filters=args.resnet_filters,
      threads=args.threads or os.cpu_count(),
    )
  peer = peers[model_name]
  regularized = variant == "torch_l1"
  t0 = time.perf_counter()
  peer.step(regularized)  # first call: allocator warm-up
  return {
    "run": lambda steps: peer.run(regularized, steps),
    "framework": "torch",
    "compile_s": time.perf_counter() - t0,
    "flops": float("nan"),
    "bytes_accessed": float("nan"),
    "memory": None,
  }


# --------------------------------------------------------------------------
# One model: build every variant, then time them round-robin.


def bench_model(model_name: str, variants: list[str], args) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from l1grad import models  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  setup = model_setup(model_name, args)
  mesh = train.data_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  model = models.from_config(setup["config"], setup["num_classes"])
  params, batch_stats = train.init_variables(model, setup["image_shape"], 0)
  rs = np.random.RandomState(0)
  batch = {
    "image": rs.randn(setup["batch"], *setup["image_shape"]).astype(np.float32),
    "label": rs.randint(0, setup["num_classes"], setup["batch"]).astype(
      np.int32
    ),
  }
  batch = jax.device_put(
    {k: jnp.asarray(v) for k, v in batch.items()}, batch_sharding
  )
  rng = jax.device_put(jax.random.key(0), replicated)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  built: dict[str, dict[str, Any]] = {}
  peers: dict[str, Any] = {}
  for v in variants:
    if v in PEER_VARIANTS:
      if model_name == "digits":
        continue
      built[v] = build_peer_variant(setup, model_name, v, args, peers)
    else:
      built[v] = build_jax_variant(
        setup,
        v,
        args,
        params,
        batch_stats,
        batch,
        rng,
        (replicated, batch_sharding),
      )
    if not args.quiet:
      print(
        f"  [{model_name}] built {v} in {built[v]['compile_s']:.1f}s",
        flush=True,
      )
  names = list(built)
  if args.compile_only:
    names = [v for v in names if built[v]["framework"] == "jax"]
  for v in names:
    if args.warmup and not args.compile_only:
      built[v]["run"](args.warmup)

  times: dict[str, list[float]] = {v: [] for v in names}
  cpu_times: dict[str, list[float]] = {v: [] for v in names}
  loads = [os.getloadavg()]
  for r in range(0 if args.compile_only else args.repeats):
    order = names[r % len(names) :] + names[: r % len(names)]
    for v in order:
      steps = built[v].get("steps", lambda n: n)(args.steps)
      c0, t0 = time.process_time(), time.perf_counter()
      built[v]["run"](steps)
      times[v].append((time.perf_counter() - t0) / steps)
      cpu_times[v].append((time.process_time() - c0) / steps)
    loads.append(os.getloadavg())

  timed = not args.compile_only
  med = {v: statistics.median(times[v]) if timed else None for v in names}
  plain = med.get("plain")
  rows = {}
  for v in names:
    b = built[v]
    _, mods = split_variant(v)
    plain_name = "plain@" + "+".join(mods) if mods else "plain"
    if plain_name not in built:
      plain_name = "plain"
    plain_b = built.get(plain_name)
    base = med.get("torch_plain" if b["framework"] == "torch" else plain_name)
    m = med[v]
    row = {
      "framework": b["framework"],
      "median_s": m,
      "min_s": min(times[v]) if timed else None,
      "times_s": times[v],
      # CPU seconds of this process per step (all threads): less sensitive
      # to other processes than wall time, but it counts spin-waiting.
      "cpu_s": statistics.median(cpu_times[v]) if timed else None,
      "images_per_s": setup["batch"] / m if timed else None,
      "ratio_to_plain": m / base if timed and base else None,
      "ratio_base": "torch_plain" if b["framework"] == "torch" else plain_name,
      "ratio_to_jax_plain": m / plain if timed and plain else None,
      "compile_s": b["compile_s"],
      "flops": b["flops"],
      "bytes_accessed": b["bytes_accessed"],
      "memory": b["memory"],
    }
    k = b.get("every_steps")
    if k and timed and plain and med.get("l1_hvp"):
      # What the cycle should cost from the separately timed steps:
      # ((k − 1)·plain + exact)/k, to compare with the timed cycle.
      row["every_steps"] = k
      row["ratio_from_parts"] = ((k - 1) * plain + med["l1_hvp"]) / k / plain
    if plain_b is not None and b["framework"] == "jax":
      row["flops_ratio"] = b["flops"] / plain_b["flops"]
      if b["memory"] and plain_b["memory"]:
        row["peak_ratio"] = (
          b["memory"]["peak_bytes"] / plain_b["memory"]["peak_bytes"]
        )
        row["temp_ratio"] = b["memory"]["temp_bytes"] / max(
          plain_b["memory"]["temp_bytes"], 1
        )
    rows[v] = row
  return {
    "model": model_name,
    "description": setup["desc"],
    "batch": setup["batch"],
    "image_shape": list(setup["image_shape"]),
    "num_classes": setup["num_classes"],
    "params": n_params,
    "repeats": 0 if args.compile_only else args.repeats,
    "steps_per_repeat": args.steps,
    "loadavg_during": [list(x) for x in loads],
    "variants": rows,
  }


# --------------------------------------------------------------------------
# Reporting.


def machine_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  info = {
    "nproc": os.cpu_count(),
    "cpu": cpu,
    "jax": jax.__version__,
    "device": str(jax.devices()[0].device_kind),
    "backend": jax.default_backend(),
    "python": platform.python_version(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top

    info["torch"] = torch.__version__
  except ImportError:
    pass
  return info


def markdown(result: dict[str, Any]) -> str:
  def fmt(x: Any, spec: str) -> str:
    return "—" if x is None or x != x else format(x, spec)

  def ms(x: float | None) -> str:
    return fmt(None if x is None else 1e3 * x, ".1f")

  lines = []
  for m in result["models"]:
    la = m["loadavg_during"]
    lines.append(
      f"**{m['description']}**, batch {m['batch']}, input "
      f"{'×'.join(map(str, m['image_shape']))}, {m['params']:,} parameters; "
      + (
        f"{m['repeats']} repeats × {m['steps_per_repeat']} steps; "
        if m["repeats"]
        else "compiled only, not run; "
      )
      + f"load average "
      f"(1 min) {la[0][0]:.2f} before, {max(x[0] for x in la):.2f} max, "
      f"{la[-1][0]:.2f} after."
    )
    lines.append("")
    lines.append(
      "| variant | step ms (median) | min ms | CPU ms | images/s |"
      " × plain | flops × plain | compile s | peak MiB | × plain |"
      " temp MiB |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for v, r in m["variants"].items():
      mem = r["memory"]
      ratio = fmt(r["ratio_to_plain"], ".2f")
      if r["framework"] == "torch" and r.get("ratio_to_jax_plain"):
        ratio += f" (× JAX plain {r['ratio_to_jax_plain']:.2f})"
      lines.append(
        f"| {v} | {ms(r['median_s'])} | {ms(r['min_s'])} | "
        f"{fmt(None if r['cpu_s'] is None else 1e3 * r['cpu_s'], '.0f')} | "
        f"{fmt(r['images_per_s'], '.0f')} | {ratio} | "
        f"{fmt(r.get('flops_ratio'), '.2f')} | {r['compile_s']:.1f} | "
        f"{fmt(mem['peak_bytes'] / 2**20 if mem else None, '.1f')} | "
        f"{fmt(r.get('peak_ratio'), '.2f')} | "
        f"{fmt(mem['temp_bytes'] / 2**20 if mem else None, '.1f')} |"
      )
    lines.append("")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags
    ).strip()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  models = (
    ["resnet18_imagenet"]
    if args.imagenet
    else [m for m in args.models.split(",") if m]
  )
  variants = [v for v in args.variants.split(",") if v]
  if args.peer:
    variants += [v for v in PEER_VARIANTS if v not in variants]
  unknown = sorted(
    {split_variant(v)[0] for v in variants}
    - set(JAX_VARIANTS)
    - set(PEER_VARIANTS)
  )
  if unknown:
    raise SystemExit(
      f"unknown variants {unknown}; valid: {JAX_VARIANTS + PEER_VARIANTS}"
    )
  if "plain" not in variants:
    variants.insert(0, "plain")

  started = datetime.datetime.now().isoformat(timespec="seconds")
  load_before = os.getloadavg()
  results = []
  for name in models:
    if not args.quiet:
      print(f"{name}: building {len(variants)} variants", flush=True)
    results.append(bench_model(name, variants, args))
  result = {
    "started": started,
    "command": "python benchmarks/step_time.py "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "machine": machine_info(),
    "loadavg_before": list(load_before),
    "loadavg_after": list(os.getloadavg()),
    "models": results,
  }
  table = markdown(result)
  if not args.quiet:
    print(table)
  tag = args.tag or ("imagenet" if args.imagenet else "_".join(models))
  out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{tag}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(f"<!-- {result['command']} ({started}) -->\n\n{table}\n")
  return result


if __name__ == "__main__":
  main()
