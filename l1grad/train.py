"""The trainer: plain, gradient-ℓ1/ℓ2-regularized, DQ and STE training.

``train_and_evaluate(config, workdir)`` is what ``train.py`` calls. The step is
a pure function ``train_step(state, batch, rng) -> (state, metrics)``, jitted
once per variant (plain, regularized) with the state donated, data-parallel
over the ``data`` axis of a ``jax.make_mesh`` mesh. The loss is the mean over
the *global* batch inside one jitted computation, so the penalty is that of
the global batch loss whatever the number of devices.

This module holds the step and the loop; what guards a run (the workdir
lock, SIGTERM/Ctrl-C, the finite checks, the metric writer) is
:mod:`l1grad.run_guard`, whose names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from l1grad import bits as bits_lib
from l1grad import checkpoint
from l1grad import config_lib
from l1grad import data
from l1grad import fold
from l1grad import models
from l1grad import params as params_lib
from l1grad import penalty
from l1grad import perturb
from l1grad import qat
from l1grad import quant
from l1grad import ranges as ranges_lib
from l1grad import regularizers
from l1grad import run_guard
from l1grad.errors import CheckpointError
from l1grad.errors import ConfigError
from l1grad.errors import UserError

PyTree = Any
Metrics = dict[str, jax.Array]

# The run guard's names, importable from here as before the split (the
# private ones too: tests and callers of the trainer used them).
MetricWriter = run_guard.MetricWriter
TrainingDivergedError = run_guard.TrainingDivergedError
TrainingInterrupted = run_guard.TrainingInterrupted
_WorkdirLock = run_guard.WorkdirLock
_StopSignal = run_guard.StopSignal
_check_finite = run_guard.check_finite
_check_state_finite = run_guard.check_state_finite
_prepare_workdir = run_guard.prepare_workdir
_signal_name = run_guard.signal_name
_WATCHED = run_guard.WATCHED
_REPORTED = run_guard.REPORTED


def console(message: str, *args: Any) -> None:
  """Progress for the person at the terminal (first process only).

  Printed rather than logged: Orbax logs every file rename at INFO level,
  which would bury progress lines at absl's INFO verbosity.
  """
  if jax.process_index() == 0:
    print(message % args if args else message, flush=True)


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; a pytree of arrays (checkpointed as a dict)."""

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  def to_dict(self) -> dict[str, Any]:
    return {
      "step": self.step,
      "params": self.params,
      "batch_stats": self.batch_stats,
      "opt_state": self.opt_state,
    }


# --------------------------------------------------------------------------
# Model, optimizer, schedule.


def create_model(
  config: ml_collections.ConfigDict, num_classes: int | None = None
) -> nn.Module:
  """The config's model (:func:`l1grad.models.from_config`).

  Args:
    config: a training config.
    num_classes: the number of logits; default: the config's dataset's.
  """
  if num_classes is None:
    num_classes = data.get_info(
      config.dataset, **config_lib.data_kwargs(config)
    ).num_classes
  return models.from_config(config, num_classes)


def learning_rate_fn(
  config: ml_collections.ConfigDict, plan: config_lib.StepPlan
) -> optax.Schedule:
  """The config's learning-rate schedule, by step."""
  warmup = int(round(config.warmup_epochs * plan.steps_per_epoch))
  total = plan.total_steps
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(
      config.learning_rate, max(total - warmup, 1)
    )
  elif config.schedule == "step":
    boundaries = {
      int(e * plan.steps_per_epoch) - warmup: config.step_factor
      for e in config.step_epochs
    }
    main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  else:
    main = optax.constant_schedule(config.learning_rate)
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def kernel_mask(params: PyTree) -> PyTree:
  """True at Conv/Dense kernels (weight decay applies there only)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: params_lib.is_kernel_path(path), params
  )


def create_optimizer(
  config: ml_collections.ConfigDict, lr: optax.Schedule
) -> optax.GradientTransformation:
  if config.optimizer == "adamw":
    return optax.adamw(lr, weight_decay=config.weight_decay, mask=kernel_mask)
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
    optax.sgd(lr, momentum=config.momentum, nesterov=config.nesterov),
  )


def init_variables(
  model: nn.Module, image_shape: tuple[int, ...], seed: int
) -> tuple[PyTree, PyTree]:
  """Fresh ``(params, batch_stats)``, initialised under jit."""

  @jax.jit
  def init(rng):
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return model.init({"params": rng}, x, train=False)

  variables = init(jax.random.key(seed))
  return variables["params"], variables.get("batch_stats", {})


# --------------------------------------------------------------------------
# The step.


def make_loss_fn(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  *,
  regularized: bool,
  bn_frozen: bool = False,
) -> Callable[..., Any]:
  """``(params, batch_stats, images, labels, rng[, act_ranges]) -> (loss, aux)``.

  ``loss`` is the batch-mean cross-entropy, plus the DQ term when it is on;
  ``aux`` holds the new batch statistics, the logits and the loss parts.
  STE training (``config.qat.bits``) follows ``config.qat.scheme``
  (:mod:`l1grad.qat`). For ``"folded"``, ``bn_frozen`` selects the
  frozen-statistics (PTQ) forward pass, and ``act_ranges`` are the activation
  ranges of :meth:`l1grad.qat.FoldedSTE.ranges`, computed by the loss when not
  given (the train step passes them, computed outside the gradient penalty).
  The cross-entropy is computed in the logits' dtype promoted to at least
  float32: float32 for float32 and bfloat16 models, float64 for a float64
  model under ``jax_enable_x64`` (third-order checks).
  """
  qat_bits = bits_lib.parse_pair(config.qat.bits) if config.qat.bits else None
  folded_ste = qat.from_config(model, config)
  dq_beta = (
    config.reg.weight_coef if regularized and config.reg.kind == "dq" else 0.0
  )

  def loss_fn(params, batch_stats, images, labels, rng, act_ranges=None):
    if folded_ste is not None:
      ste = folded_ste(images.shape[1:], images.dtype)
      logits, new_stats = ste.apply(
        params,
        batch_stats,
        images,
        act_ranges=act_ranges,
        bn_frozen=bn_frozen,
        rngs={"dropout": rng},
      )
    else:
      applied = params
      context = perturb.transform_layer_inputs(lambda k, x: x)
      if qat_bits is not None:
        applied = quant.quantize_kernels(params, qat_bits[0], ste=True)
        context = quant.quantized_activations(qat_bits[1], None, ste=True)
      with context:
        logits, updates = model.apply(
          {"params": applied, "batch_stats": batch_stats},
          images,
          train=True,
          mutable=["batch_stats"],
          rngs={"dropout": rng},
        )
      new_stats = updates["batch_stats"]
    xent = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), labels
    ).mean()
    dq = (
      regularizers.orthogonality_penalty(params, beta=dq_beta)
      if dq_beta
      else jnp.zeros((), jnp.float32)
    )
    aux = {
      "batch_stats": new_stats,
      "logits": logits,
      "cross_entropy": xent,
      "dq_penalty": dq,
    }
    return xent + dq, aux

  return loss_fn


@functools.lru_cache(maxsize=16)
def _bin_width_pairs(
  model: nn.Module,
  example_shape: tuple[int, ...],
  dtype_name: str,
  with_activations: bool,
) -> Any:
  """The model's Conv/Dense → BatchNorm pairs, its DFQ ranges checked.

  Found on stand-in variables (the pairs and the ranges' derivation depend
  on the graph, not on the values), once per model and input shape; may be
  called while the step is traced.

  Raises:
    ConfigError: ``with_activations`` and a quantized activation is not
      computed from batch-norm outputs only (no DFQ range, so no Δ).
  """
  with jax.ensure_compile_time_eval():
    sample = jnp.zeros((1, *example_shape), jnp.dtype(dtype_name))
    abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), sample, train=False)
    )
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)
    pairs = fold.find_conv_bn_pairs(model, variables, sample, train=False)
    if with_activations:
      try:
        ranges_lib.bn_activation_ranges(model, variables, sample)
      except UserError as e:
        raise ConfigError(
          "config.reg.weighting: 'bin_width' takes the activations' bin"
          " widths from the batch-norm (DFQ) ranges, which this model does"
          f" not allow ({e}). Use --config.reg.act_coef=0 to weight the"
          " kernels only, or --config.reg.weighting=none."
        ) from None
  return pairs


def bin_width_coefs(
  model: nn.Module,
  params: PyTree,
  batch_stats: PyTree,
  images: jax.Array,
  bits: tuple[int, int],
  *,
  weight_coef: float,
  act_coef: float,
) -> tuple[Any, Any]:
  """The ``reg.weighting="bin_width"`` coefficients: λ·Δ/2 per tensor.

  The kernels' Δ is that of PTQ at ``bits`` (batch norm folded with the
  running statistics, :func:`l1grad.quant.bin_widths`) mapped onto the
  unfolded kernel the penalty differentiates (Δ/|a| per output channel,
  :meth:`l1grad.quant.BinWidths.unfolded_weights`); the activations' Δ
  comes from the DFQ ranges of the current BN parameters. Held fixed in the
  derivative (``stop_gradient``): Δ weights the gradient norm, it is not
  something to optimize. Traceable; called by the train step.

  Args:
    model: The linen model.
    params: The current (unfolded) params.
    batch_stats: The running statistics.
    images: A batch (its shape and dtype).
    bits: ``(W, A)``, ``reg.target_bits``.
    weight_coef: λ_w (a literal 0: no weight term).
    act_coef: λ_a (likewise).

  Returns:
    ``(weight_coef, act_coef)`` for :func:`l1grad.penalty.value_and_grad`:
    tables ``{layer: λ_w·Δ/2}`` (shape ``(C,)`` for folded layers) and
    ``{point: λ_a·Δ/2}``, or 0 for a term that is off.

  Raises:
    ConfigError: The activation term is on and the model has no DFQ ranges.
  """
  with_a = act_coef != 0
  pairs = _bin_width_pairs(
    model, tuple(images.shape[1:]), jnp.dtype(images.dtype).name, with_a
  )
  widths = jax.lax.stop_gradient(
    quant.bin_widths(
      model,
      {"params": params, "batch_stats": batch_stats},
      images,
      bits[0],
      bits[1],
      pairs=pairs,
      ranges=None if with_a else {},
    )
  )
  w = 0.0
  if weight_coef != 0:
    w = {n: weight_coef * d / 2 for n, d in widths.unfolded_weights().items()}
  a = 0.0
  if with_a:
    a = {k: act_coef * d / 2 for k, d in widths.activations.items()}
  return w, a


def make_train_step(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
  lr: optax.Schedule,
  *,
  regularized: bool,
  bn_frozen: bool = False,
) -> Callable[..., Any]:
  """The pure step ``(state, batch, rng) -> (state, metrics)`` (not jitted).

  ``regularized`` switches the gradient-norm penalty or the DQ term on;
  ``bn_frozen`` the frozen batch statistics of folded STE training
  (:mod:`l1grad.qat`). The trainer compiles each variant it uses once and
  picks per step. With ``reg.weighting="bin_width"`` the ℓ1 penalty's
  coefficients are per tensor, λ·Δ/2 at ``reg.target_bits``, recomputed in
  the step from the current params (:func:`bin_width_coefs`).
  """
  reg = config.reg
  grad_reg = regularized and reg.kind in ("l1", "l2")
  weight_coef = reg.weight_coef if grad_reg else 0.0
  act_coef = config_lib.act_coef(config) if grad_reg else 0.0
  loss_fn = make_loss_fn(
    model, config, regularized=regularized, bn_frozen=bn_frozen
  )
  folded_ste = qat.from_config(model, config)
  penalty_kwargs = dict(
    ord=2 if reg.kind == "l2" else 1,
    method=reg.method,
    has_aux=True,
    fd_step=reg.fd_step,
    hvp_impl=reg.get("hvp_impl", "linearize"),
    track_activations=config.get("track_act_grad", True),
    points=reg.get("points", "layer_inputs"),
    act_norm=reg.get("act_norm", "none"),
  )
  value_and_grad = penalty.value_and_grad(
    loss_fn, weight_coef=weight_coef, act_coef=act_coef, **penalty_kwargs
  )
  target_bits = None
  if grad_reg and reg.get("weighting", "none") == "bin_width":
    target_bits = bits_lib.parse_pair(reg.target_bits)

  def train_step(
    state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
  ) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(rng, state.step)
    args = (
      state.params,
      state.batch_stats,
      batch["image"],
      batch["label"],
      step_rng,
    )
    if folded_ste is not None:
      # Computed here, outside the penalty: its perturbation of the layer
      # inputs must not see the ranges' own forward pass.
      ste = folded_ste(batch["image"].shape[1:], batch["image"].dtype)
      args += (ste.ranges(state.params, state.batch_stats),)
    step_value_and_grad = value_and_grad
    if target_bits is not None:
      # Outside the penalty too, from the params before the update.
      w_coef, a_coef = bin_width_coefs(
        model,
        state.params,
        state.batch_stats,
        batch["image"],
        target_bits,
        weight_coef=weight_coef,
        act_coef=act_coef,
      )
      step_value_and_grad = penalty.value_and_grad(
        loss_fn, weight_coef=w_coef, act_coef=a_coef, **penalty_kwargs
      )
    (total, info), grads = step_value_and_grad(*args)
    aux = info["aux"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(aux["logits"], -1) == batch["label"])
    metrics = {
      "total_loss": total,
      "cross_entropy": aux["cross_entropy"],
      "penalty": info["penalty"],
      "weight_penalty": info["weight_penalty"],
      "act_penalty": info["act_penalty"],
      "dq_penalty": aux["dq_penalty"],
      "weight_grad_l1": info["weight_grad_l1"],
      "weight_grad_l2": info["weight_grad_l2"],
      "act_grad_l1": info["act_grad_l1"],
      "act_grad_l2": info["act_grad_l2"],
      "grad_norm": optax.tree.norm(grads),
      "update_norm": optax.tree.norm(updates),
      "param_norm": optax.tree.norm(params),
      "train_accuracy": accuracy,
      "learning_rate": lr(state.step),
      "regularized": jnp.asarray(regularized, jnp.float32),
    }
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=aux["batch_stats"],
      opt_state=opt_state,
    )
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable[..., Any]:
  """``(state, batch) -> sums`` of correct predictions, loss and examples."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> Metrics:
    logits = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      batch["image"],
      train=False,
    )
    mask = batch["mask"].astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["label"]
    )
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
      "correct": jnp.sum(correct * mask),
      "loss": jnp.sum(xent * mask),
      "count": jnp.sum(mask),
    }

  return eval_step


# --------------------------------------------------------------------------
# Devices.


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device, axis ``data``."""
  return jax.make_mesh((jax.device_count(),), ("data",))


def global_batch(
  batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
  """This process's slice of a batch → one global array split over ``data``."""
  return {
    k: jax.make_array_from_process_local_data(sharding, v)
    for k, v in batch.items()
  }


def evaluate(
  eval_step: Callable[..., Any],
  state: TrainState,
  config: ml_collections.ConfigDict,
  sharding: NamedSharding,
) -> dict[str, float]:
  """Accuracy and loss over ``config.eval_split`` (padded batches masked).

  The keys are ``test_accuracy`` and ``test_loss`` whichever split was read
  (their names predate the ``"minival"`` split); ``eval_on_minival`` is 1.0
  when it was ``"minival"``, 0.0 when ``"test"``.
  """
  max_examples = (
    config.max_eval_examples if config.max_eval_examples > 0 else None
  )
  split = config_lib.eval_split(config)
  sums = None
  for batch in data.eval_batches(
    config.dataset,
    split,
    global_batch_size=config_lib.eval_batch_size(config),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    data_dir=config.data_dir or None,
    max_examples=max_examples,
    minival_examples=config_lib.minival_examples(config),
  ):
    out = eval_step(state, global_batch(batch, sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = max(float(sums["count"]), 1.0)
  return {
    "test_accuracy": float(sums["correct"]) / count,
    "test_loss": float(sums["loss"]) / count,
    # A number, not the name: every scalar also goes to TensorBoard.
    "eval_on_minival": float(split == data.MINIVAL),
  }


# --------------------------------------------------------------------------
# The loop.


def abstract_variables(
  model: nn.Module, image_shape: tuple[int, ...]
) -> tuple[PyTree, PyTree]:
  """``(params, batch_stats)`` as shapes and dtypes only; nothing compiles."""
  variables = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0)},
      jnp.zeros((1, *image_shape), jnp.float32),
      train=False,
    )
  )
  return variables["params"], variables.get("batch_stats", {})


def _shape_table(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"params/Conv_0/kernel": (shape, dtype), ...}``, parameters first."""
  table = {
    params_lib.layer_name(path): (tuple(x.shape), str(x.dtype))
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }
  # A user recognises a kernel's shape sooner than a batch-norm statistic's.
  return dict(
    sorted(
      table.items(), key=lambda kv: (not kv[0].startswith("params/"), kv[0])
    )
  )


def _restore_init_from(
  init_from: str, params: PyTree, batch_stats: PyTree
) -> tuple[PyTree, PyTree]:
  """Parameters and batch statistics of another run, checked against ours.

  ``params`` and ``batch_stats`` give the expected shapes and dtypes (arrays
  or ``jax.ShapeDtypeStruct``), so the check runs before anything compiles.

  Raises:
    CheckpointError: nothing readable there, or another architecture.
  """
  try:
    source = checkpoint.load_run(init_from)
  except CheckpointError as e:
    raise CheckpointError(f"config.init_from: {e}") from None
  expected = _shape_table({"params": params, "batch_stats": batch_stats})
  got = _shape_table(
    {"params": source.params, "batch_stats": source.batch_stats}
  )
  if expected != got:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
      detail = (
        f"this model has {len(missing)} array(s) the source lacks"
        f" (e.g. {missing[0] if missing else extra[0]})"
      )
      if extra and not missing:
        detail = (
          f"the source has {len(extra)} array(s) this model lacks"
          f" (e.g. {extra[0]})"
        )
    else:
      key = next(k for k in expected if expected[k] != got[k])
      detail = (
        f"{key} is {got[key][0]} {got[key][1]} there and"
        f" {expected[key][0]} {expected[key][1]} here"
      )
    kwargs = source.config.get("model_kwargs") or {}
    if hasattr(kwargs, "to_dict"):
      kwargs = kwargs.to_dict()
    raise CheckpointError(
      f"--config.init_from={init_from!r} holds a {source.config.model!r}"
      f" model (model_kwargs {kwargs}) on {source.config.dataset!r} whose"
      f" parameters do not match this run's model: {detail}. Fine-tune"
      " with the same --config.model and --config.model_kwargs as the"
      " source run."
    )
  return (
    jax.tree.map(jnp.asarray, source.params),
    jax.tree.map(jnp.asarray, source.batch_stats),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Trains (or resumes) the configured run in ``workdir`` and evaluates it.

  Every check of the user's input (config, data, workdir, ``init_from``)
  runs before the first training step compiles. SIGTERM makes the run save
  a checkpoint at the current step and return early (the returned state's
  ``step`` is then below the schedule's end); rerunning resumes it.

  Args:
    config: a config from ``configs/``.
    workdir: where checkpoints, ``metrics.jsonl`` and TensorBoard files go;
      rerunning with the same workdir resumes from the latest checkpoint.

  Returns:
    The final train state.

  Raises:
    UserError: bad config, missing data, unusable checkpoint or workdir.
    TrainingDivergedError: a non-finite loss, gradient or state.
  """
  config_lib.validate(config)
  # Before the workdir is created or locked: a missing dataset (or a
  # hold-out larger than it) must leave nothing behind.
  data.get_info(config.dataset, **config_lib.data_kwargs(config))
  workdir = run_guard.prepare_workdir(workdir)
  with run_guard.WorkdirLock(workdir):
    return _train_locked(config, workdir)


def lazy_step_config(
  config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """The config the regularized step variant is built from.

  With ``reg.every_steps = k > 1`` the penalty runs on every k-th step only,
  so there its coefficients (λ_w, λ_a, or DQ's β) are multiplied by k:
  StyleGAN2's lazy regularization, the same penalty per step on average.
  The coefficients are constants of the compiled step, hence a scaled copy
  of the config. For k = 1 this is ``config`` itself: the step is the one it
  has always been.
  """
  k = config_lib.reg_every_steps(config)
  if k == 1:
    return config
  scaled = config.copy_and_resolve_references()
  scaled.reg.weight_coef = k * config.reg.weight_coef
  if config.reg.act_coef != -1:  # -1 ("same as λ_w") follows the scaled λ_w
    scaled.reg.act_coef = k * config.reg.act_coef
  return scaled


# The metrics of the penalty (its value and terms), per step.
_PENALTY_METRICS = ("penalty", "weight_penalty", "act_penalty", "dq_penalty")


def lazy_penalty_scalars(
  penalty_metrics: Mapping[str, Any] | None, every_steps: int
) -> dict[str, float]:
  """A lazy run's logged penalty: the last penalty step's, per step.

  With ``reg.every_steps = k`` the penalty runs on every k-th step with its
  coefficients × k, and the other steps log none; a row, whatever step it
  lands on, logs the most recent penalty step's values divided by k, i.e.
  λ·‖∇L‖ on the scale of a k = 1 run (0 before this invocation's first
  one). The penalty per step on average, so ``penalty / cross_entropy``
  reads as for k = 1, and a row never shows 0 just because the logging
  interval is a multiple of k.
  """
  if penalty_metrics is None:
    return {k: 0.0 for k in _PENALTY_METRICS}
  got = jax.device_get({k: penalty_metrics[k] for k in _PENALTY_METRICS})
  return {k: float(v) / every_steps for k, v in got.items()}


def _train_locked(
  config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """``train_and_evaluate`` once the workdir is this process's."""
  data_kwargs = config_lib.data_kwargs(config)
  info = data.get_info(config.dataset, **data_kwargs)
  plan = config_lib.step_plan(
    config,
    data.steps_per_epoch(config.dataset, config.batch_size, **data_kwargs),
  )
  model = create_model(config, info.num_classes)
  lr = learning_rate_fn(config, plan)
  tx = create_optimizer(config, lr)

  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
  writer = None
  try:
    latest = mngr.latest_step()
    if latest is not None:
      config_lib.check_same_run(
        config, checkpoint.stored_config(mngr, latest), workdir
      )
    if config.init_from and latest is None:
      # Checked on shapes alone so an incompatible source fails before any
      # compilation; the random init is skipped since it would be replaced.
      params, batch_stats = _restore_init_from(
        config.init_from, *abstract_variables(model, info.image_shape)
      )
    else:
      params, batch_stats = init_variables(model, info.image_shape, config.seed)
    state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
    )
    state = jax.device_put(state, replicated)
    history: list[dict[str, Any]] = []
    if latest is not None:
      restored, _, history = checkpoint.restore(mngr, latest, state.to_dict())
      state = TrainState(**restored)
      console("Resumed from step %d in %s", latest, workdir)

    freeze_step = qat.bn_freeze_step(config, plan.total_steps)
    step_fns = {}
    for regularized in (False, True):
      for frozen in (False, True) if freeze_step is not None else (False,):
        fn = make_train_step(
          model,
          lazy_step_config(config) if regularized else config,
          tx,
          lr,
          regularized=regularized,
          bn_frozen=frozen,
        )
        step_fns[regularized, frozen] = jax.jit(
          fn,
          donate_argnums=0,
          in_shardings=(replicated, batch_sharding, replicated),
          out_shardings=(replicated, replicated),
        )
    eval_step = jax.jit(
      make_eval_step(model),
      in_shardings=(replicated, batch_sharding),
      out_shardings=replicated,
    )

    rng = jax.random.key(config.seed)
    reg_every = config_lib.reg_every_steps(config)
    last_penalty_metrics = None
    start = int(jax.device_get(state.step))
    writer = run_guard.MetricWriter(workdir, history, start)
    if start >= plan.last_step:
      console(
        "Nothing to do: %s already holds step %d of %d.",
        workdir,
        start,
        plan.last_step,
      )
      return state
    batches = data.train_batches(
      config.dataset,
      global_batch_size=config.batch_size,
      seed=config.seed,
      start_step=start,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      worker_count=config.worker_count,
      **data_kwargs,
    )
    console(
      "Training %s on %s: %d steps (%d epochs × %d), %s, %d device(s).",
      config.model,
      config.dataset,
      plan.total_steps,
      config.num_epochs,
      plan.steps_per_epoch,
      "no regularization"
      if plan.reg_start_step >= plan.total_steps
      else f"regularization {config.reg.kind} from step {plan.reg_start_step}"
      + (
        f", every {plan.reg_every} steps (coefficients × {plan.reg_every})"
        if plan.reg_every > 1
        else ""
      ),
      jax.device_count(),
    )

    pending: list[tuple[int, Metrics]] = []
    last_saved = latest
    # Throughput counts training steps only: not the first call of each step
    # variant (it compiles), not evaluation, not saving. Otherwise the first
    # ETA of every run counts the compilation (3-4× too long on CPU).
    compiled: set[tuple[bool, bool]] = set()
    t_mark, timed_steps, rate = time.time(), 0, None
    with run_guard.StopSignal() as stop:
      for step in range(start, plan.last_step):
        batch = global_batch(next(batches), batch_sharding)
        regularized = plan.regularized(step)
        variant = (regularized, freeze_step is not None and step >= freeze_step)
        state, metrics = step_fns[variant](state, batch, rng)
        pending.append((step, metrics))
        if regularized:
          last_penalty_metrics = metrics
        done = step + 1
        if variant not in compiled:
          compiled.add(variant)
          jax.block_until_ready(metrics)
          t_mark, timed_steps = time.time(), 0
        else:
          timed_steps += 1
        log_now = done % config.log_every_steps == 0 or done == plan.last_step
        epoch_end = done % plan.steps_per_epoch == 0
        save_now = done % plan.checkpoint_every == 0 or done == plan.last_step
        eval_now = done == plan.last_step or (
          epoch_end
          and config.eval_every_epochs > 0
          and (done // plan.steps_per_epoch) % config.eval_every_epochs == 0
        )
        stop_now = stop.requested(mngr, done) and done < plan.last_step
        if not (log_now or save_now or eval_now or stop_now):
          continue
        # Every step since the last check, not only the logged one: a bad
        # step followed by finite-looking ones must still stop the run
        # before anything it produced is saved.
        run_guard.check_finite(pending, last_saved, workdir, plan.last_step)
        if log_now or save_now or eval_now:
          # A stop adds no row: the resumed run's metrics.jsonl then reads
          # exactly like an uninterrupted run's.
          scalars = {
            k: float(v) for k, v in jax.device_get(pending[-1][1]).items()
          }
          if reg_every > 1:
            scalars.update(
              lazy_penalty_scalars(last_penalty_metrics, reg_every)
            )
          if timed_steps:
            rate = (
              timed_steps * config.batch_size / max(time.time() - t_mark, 1e-9)
            )
          scalars["epoch"] = done / plan.steps_per_epoch
          scalars["images_per_sec"] = rate or 0.0
          if eval_now:
            scalars.update(evaluate(eval_step, state, config, batch_sharding))
          row = {"step": done, **scalars}
          history.append(row)
          writer.write(done, scalars)
          speed = "compiling"
          if rate:
            eta = (plan.last_step - done) * config.batch_size / rate
            speed = f"{rate:.0f} img/s ETA {eta:.0f}s"
          console(
            "step %d/%d (epoch %.2f) xent %.4f penalty %.4g |∇W|₁ %.4g"
            " |∇A|₁ %.4g train acc %.3f%s lr %.4g %s",
            done,
            plan.last_step,
            scalars["epoch"],
            scalars["cross_entropy"],
            scalars["penalty"] + scalars["dq_penalty"],
            scalars["weight_grad_l1"],
            scalars["act_grad_l1"],
            scalars["train_accuracy"],
            f" {config_lib.eval_split(config)} acc"
            f" {scalars['test_accuracy']:.4f}"
            if eval_now
            else "",
            scalars["learning_rate"],
            speed,
          )
        pending.clear()
        if save_now or stop_now:
          run_guard.check_state_finite(state, done, last_saved, workdir)
          checkpoint.save(mngr, done, state.to_dict(), config, history)
          last_saved = done
        t_mark, timed_steps = time.time(), 0
        if stop_now:
          mngr.wait_until_finished()
          console(
            "Stopped by %s after step %d of %d; saved checkpoint %d in"
            " %s. Rerun the same command to continue.",
            run_guard.signal_name(stop.signal_number),
            done,
            plan.last_step,
            done,
            checkpoint.checkpoint_dir(workdir),
          )
          if stop.signal_number == signal.SIGINT:
            raise run_guard.TrainingInterrupted(
              f"Stopped by SIGINT after step {done}; checkpoint {done} saved"
              f" in {checkpoint.checkpoint_dir(workdir)}."
            )
          break
      else:
        console(
          "Done: step %d of %d. Checkpoints: %s\nNext, the accuracy at"
          " every bit-width: python eval_ptq.py --workdir %s",
          done,
          plan.total_steps,
          checkpoint.checkpoint_dir(workdir),
          workdir,
        )
  finally:
    mngr.wait_until_finished()
    mngr.close()
    if writer is not None:
      writer.close()
  return state
