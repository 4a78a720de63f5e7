"""The trainer: plain, gradient-ℓ1/ℓ2-regularized, DQ and STE training.

``train_and_evaluate(config, workdir)`` is what ``train.py`` calls. The step is
a pure function ``train_step(state, batch, rng) -> (state, metrics)``, jitted
once per variant (plain, regularized) with the state donated, data-parallel
over the ``data`` axis of a ``jax.make_mesh`` mesh. The loss is the mean over
the *global* batch inside one jitted computation, so the penalty is that of
the global batch loss whatever the number of devices.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from l1grad import bits as bits_lib
from l1grad import checkpoint
from l1grad import config_lib
from l1grad import data
from l1grad import models
from l1grad import penalty
from l1grad import perturb
from l1grad import quant
from l1grad import regularizers
from l1grad.errors import CheckpointError

PyTree = Any
Metrics = dict[str, jax.Array]


def console(message: str, *args: Any) -> None:
  """Progress for the person at the terminal (first process only).

  Printed rather than logged: Orbax logs every file rename at INFO level,
  which would bury progress lines at absl's INFO verbosity.
  """
  if jax.process_index() == 0:
    print(message % args if args else message, flush=True)


class TrainingDivergedError(RuntimeError):
  """A loss or gradient became non-finite; nothing after it was saved."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; a pytree of arrays (checkpointed as a dict)."""

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  def to_dict(self) -> dict[str, Any]:
    return {"step": self.step, "params": self.params,
            "batch_stats": self.batch_stats, "opt_state": self.opt_state}


# --------------------------------------------------------------------------
# Model, optimizer, schedule.


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int | None = None) -> nn.Module:
  """The config's model (``config.model`` with ``config.model_kwargs``)."""
  if num_classes is None:
    num_classes = data.get_info(config.dataset,
                                data_dir=config.data_dir or None).num_classes
  kwargs = dict(config.model_kwargs.to_dict()) if config.model_kwargs else {}
  if config.get("compute_dtype", "float32") != "float32":
    kwargs["dtype"] = jnp.dtype(config.compute_dtype)
  return models.get_model(config.model, num_classes=num_classes, **kwargs)


def schedule_steps(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> config_lib.StepPlan:
  """All epoch/step arithmetic of a run, in one place."""
  return config_lib.step_plan(config, steps_per_epoch)


def learning_rate_fn(config: ml_collections.ConfigDict,
                     plan: config_lib.StepPlan) -> optax.Schedule:
  """The config's learning-rate schedule, by step."""
  warmup = int(round(config.warmup_epochs * plan.steps_per_epoch))
  total = plan.total_steps
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(config.learning_rate,
                                       max(total - warmup, 1))
  elif config.schedule == "step":
    boundaries = {int(e * plan.steps_per_epoch) - warmup: config.step_factor
                  for e in config.step_epochs}
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
      lambda path, _: penalty.is_kernel_path(path), params)


def create_optimizer(config: ml_collections.ConfigDict,
                     lr: optax.Schedule) -> optax.GradientTransformation:
  if config.optimizer == "adamw":
    return optax.adamw(lr, weight_decay=config.weight_decay, mask=kernel_mask)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
      optax.sgd(lr, momentum=config.momentum, nesterov=config.nesterov),
  )


def init_variables(model: nn.Module, image_shape: tuple[int, ...],
                   seed: int) -> tuple[PyTree, PyTree]:
  """Fresh ``(params, batch_stats)``, initialised under jit."""

  @jax.jit
  def init(rng):
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return model.init({"params": rng}, x, train=False)

  variables = init(jax.random.key(seed))
  return variables["params"], variables.get("batch_stats", {})


# --------------------------------------------------------------------------
# The step.


def quantize_kernels(params: PyTree, w_bits: Any, *, ste: bool) -> PyTree:
  """Fake-quantizes every Conv/Dense kernel per tensor (symmetric grid)."""

  def q(path, leaf):
    if not penalty.is_kernel_path(path):
      return leaf
    scale = jax.lax.stop_gradient(quant.symmetric_scale(leaf, w_bits))
    return quant.fake_quant(leaf, w_bits, scale, ste=ste)

  return jax.tree_util.tree_map_with_path(q, params)


def make_loss_fn(model: nn.Module, config: ml_collections.ConfigDict,
                 *, regularized: bool) -> Callable[..., Any]:
  """``(params, batch_stats, images, labels, rng) -> (loss, aux)``.

  ``loss`` is the batch-mean cross-entropy, plus the DQ term when it is on;
  ``aux`` holds the new batch statistics, the logits and the loss parts.
  """
  qat_bits = bits_lib.parse_pair(config.qat.bits) if config.qat.bits else None
  dq_beta = (config.reg.weight_coef
             if regularized and config.reg.kind == "dq" else 0.0)

  def loss_fn(params, batch_stats, images, labels, rng):
    applied = params
    context = perturb.transform_layer_inputs(lambda k, x: x)
    if qat_bits is not None:
      applied = quantize_kernels(params, qat_bits[0], ste=True)
      context = perturb.quantized_activations(qat_bits[1], None, ste=True)
    with context:
      logits, updates = model.apply(
          {"params": applied, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
    xent = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()
    dq = (regularizers.orthogonality_penalty(params, beta=dq_beta)
          if dq_beta else jnp.zeros((), jnp.float32))
    aux = {"batch_stats": updates["batch_stats"], "logits": logits,
           "cross_entropy": xent, "dq_penalty": dq}
    return xent + dq, aux

  return loss_fn


def make_train_step(model: nn.Module, config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation, lr: optax.Schedule,
                    *, regularized: bool) -> Callable[..., Any]:
  """The pure step ``(state, batch, rng) -> (state, metrics)`` (not jitted).

  ``regularized`` switches the gradient-norm penalty or the DQ term on; the
  trainer compiles the two variants once each and picks per step.
  """
  reg = config.reg
  grad_reg = regularized and reg.kind in ("l1", "l2")
  weight_coef = reg.weight_coef if grad_reg else 0.0
  act_coef = config_lib.act_coef(config) if grad_reg else 0.0
  loss_fn = make_loss_fn(model, config, regularized=regularized)
  value_and_grad = penalty.value_and_grad(
      loss_fn, ord=2 if reg.kind == "l2" else 1, weight_coef=weight_coef,
      act_coef=act_coef, method=reg.method, has_aux=True,
      fd_step=reg.fd_step, track_activations=config.get("track_act_grad", True))

  def train_step(state: TrainState, batch: dict[str, jax.Array],
                 rng: jax.Array) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(rng, state.step)
    (total, info), grads = value_and_grad(
        state.params, state.batch_stats, batch["image"], batch["label"],
        step_rng)
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
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=aux["batch_stats"],
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable[..., Any]:
  """``(state, batch) -> sums`` of correct predictions, loss and examples."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> Metrics:
    logits = model.apply({"params": state.params,
                          "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(xent * mask),
            "count": jnp.sum(mask)}

  return eval_step


# --------------------------------------------------------------------------
# Devices.


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device, axis ``data``."""
  return jax.make_mesh((jax.device_count(),), ("data",))


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding
                 ) -> dict[str, jax.Array]:
  """This process's slice of a batch → one global array split over ``data``."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def evaluate(eval_step: Callable[..., Any], state: TrainState,
             config: ml_collections.ConfigDict, sharding: NamedSharding
             ) -> dict[str, float]:
  """Accuracy and loss over the whole test split (padded batches masked)."""
  max_examples = config.max_eval_examples if config.max_eval_examples > 0 else None
  sums = None
  for batch in data.eval_batches(
      config.dataset, "test", global_batch_size=config_lib.eval_batch_size(config),
      process_index=jax.process_index(), process_count=jax.process_count(),
      data_dir=config.data_dir or None, max_examples=max_examples):
    out = eval_step(state, global_batch(batch, sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = max(float(sums["count"]), 1.0)
  return {"test_accuracy": float(sums["correct"]) / count,
          "test_loss": float(sums["loss"]) / count}


# --------------------------------------------------------------------------
# Logging.


class MetricWriter:
  """Scalars to ``metrics.jsonl`` and TensorBoard event files (no TensorFlow)."""

  def __init__(self, workdir: str, history: list[dict[str, Any]]):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self._enabled:
      # Rewritten from the checkpoint's history: rows logged after the last
      # checkpoint by an interrupted run are dropped, the rerun adds them.
      with open(self._path, "w") as f:
        for row in history:
          f.write(json.dumps(row) + "\n")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _check_finite(pending: list[tuple[int, Metrics]], last_saved: int | None,
                  workdir: str) -> None:
  """Raises on the first pending step whose loss or gradient is not finite."""
  for step, metrics in pending:
    values = jax.device_get(metrics)
    watched = ("total_loss", "cross_entropy", "penalty", "grad_norm")
    if all(math.isfinite(float(values[k])) for k in watched):
      continue
    parts = ", ".join(
        f"{k}={float(values[k]):.6g}" for k in
        ("cross_entropy", "weight_penalty", "act_penalty", "dq_penalty",
         "penalty", "total_loss", "grad_norm"))
    last = (f"the last good checkpoint is step {last_saved} in"
            f" {checkpoint.checkpoint_dir(workdir)}" if last_saved is not None
            else "no checkpoint was saved")
    raise TrainingDivergedError(
        f"Non-finite loss or gradient at step {step} ({parts}). Training"
        f" stopped and nothing from this step on was saved; {last}. Lower"
        " the learning rate or the regularization coefficient"
        " (--config.reg.weight_coef), or fine-tune from a trained"
        " checkpoint (--config.init_from) instead of regularizing from"
        " scratch.")


# --------------------------------------------------------------------------
# The loop.


def _restore_init_from(init_from: str, params: PyTree, batch_stats: PyTree
                       ) -> tuple[PyTree, PyTree]:
  """Parameters and batch statistics of another run, checked against ours."""
  source = checkpoint.load_run(init_from)
  expected = jax.tree.map(lambda x: (x.shape, str(x.dtype)),
                          {"params": params, "batch_stats": batch_stats})
  got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)),
                     {"params": source.params,
                      "batch_stats": source.batch_stats})
  if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
    raise CheckpointError(
        f"--config.init_from={init_from!r} holds a {source.config.model!r}"
        f" model ({source.config.get('model_kwargs', {})}) on"
        f" {source.config.dataset!r} whose parameters do not match this"
        " run's model. Fine-tune with the same"
        " --config.model and --config.model_kwargs as the source run.")
  return (jax.tree.map(jnp.asarray, source.params),
          jax.tree.map(jnp.asarray, source.batch_stats))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
  """Trains (or resumes) the configured run in ``workdir`` and evaluates it.

  Args:
    config: a config from ``configs/`` (validated here before anything
      compiles).
    workdir: where checkpoints, ``metrics.jsonl`` and TensorBoard files go;
      rerunning with the same workdir resumes from the latest checkpoint.

  Returns:
    The final train state.

  Raises:
    UserError: bad config, missing data, unusable checkpoint.
    TrainingDivergedError: a non-finite loss or gradient.
  """
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  info = data.get_info(config.dataset, data_dir=config.data_dir or None)
  plan = schedule_steps(config, data.steps_per_epoch(
      config.dataset, config.batch_size, data_dir=config.data_dir or None))
  model = create_model(config, info.num_classes)
  lr = learning_rate_fn(config, plan)
  tx = create_optimizer(config, lr)

  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
  latest = mngr.latest_step()
  if latest is not None:
    config_lib.check_same_run(config, checkpoint.stored_config(mngr, latest),
                              workdir)

  params, batch_stats = init_variables(model, info.image_shape, config.seed)
  if config.init_from and latest is None:
    params, batch_stats = _restore_init_from(config.init_from, params,
                                             batch_stats)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=batch_stats, opt_state=tx.init(params))
  state = jax.device_put(state, replicated)
  history: list[dict[str, Any]] = []
  if latest is not None:
    restored, _, history = checkpoint.restore(mngr, latest, state.to_dict())
    state = TrainState(**restored)
    console("Resumed from step %d in %s", latest, workdir)

  step_fns = {}
  for regularized in (False, True):
    fn = make_train_step(model, config, tx, lr, regularized=regularized)
    step_fns[regularized] = jax.jit(
        fn, donate_argnums=0,
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated))
  eval_step = jax.jit(make_eval_step(model),
                      in_shardings=(replicated, batch_sharding),
                      out_shardings=replicated)

  writer = MetricWriter(workdir, history)
  rng = jax.random.key(config.seed)
  start = int(jax.device_get(state.step))
  batches = data.train_batches(
      config.dataset, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), data_dir=config.data_dir or None,
      worker_count=config.worker_count)
  console(
      "Training %s on %s: %d steps (%d epochs × %d), regularization %s from"
      " step %d, %d device(s).", config.model, config.dataset,
      plan.total_steps, config.num_epochs, plan.steps_per_epoch,
      config.reg.kind, plan.reg_start_step, jax.device_count())

  pending: list[tuple[int, Metrics]] = []
  last_saved = latest
  t_log, step_log = time.time(), start
  try:
    for step in range(start, plan.last_step):
      batch = global_batch(next(batches), batch_sharding)
      regularized = plan.regularized(step)
      state, metrics = step_fns[regularized](state, batch, rng)
      pending.append((step, metrics))
      done = step + 1
      log_now = done % config.log_every_steps == 0 or done == plan.last_step
      epoch_end = done % plan.steps_per_epoch == 0
      save_now = done % plan.checkpoint_every == 0 or done == plan.last_step
      eval_now = done == plan.last_step or (
          epoch_end and config.eval_every_epochs > 0 and
          (done // plan.steps_per_epoch) % config.eval_every_epochs == 0)
      if not (log_now or save_now or eval_now):
        continue
      _check_finite(pending, last_saved, workdir)
      scalars = {k: float(v) for k, v in jax.device_get(pending[-1][1]).items()}
      pending.clear()
      now = time.time()
      rate = (done - step_log) * config.batch_size / max(now - t_log, 1e-9)
      t_log, step_log = now, done
      scalars["epoch"] = done / plan.steps_per_epoch
      scalars["images_per_sec"] = rate
      if eval_now:
        scalars.update(evaluate(eval_step, state, config, batch_sharding))
      row = {"step": done, **scalars}
      history.append(row)
      writer.write(done, scalars)
      eta = (plan.last_step - done) * config.batch_size / max(rate, 1e-9)
      console(
          "step %d/%d (epoch %.2f) xent %.4f penalty %.4g |∇W|₁ %.4g"
          " |∇A|₁ %.4g train acc %.3f%s lr %.4g %.0f img/s ETA %.0fs",
          done, plan.last_step, scalars["epoch"], scalars["cross_entropy"],
          scalars["penalty"] + scalars["dq_penalty"],
          scalars["weight_grad_l1"], scalars["act_grad_l1"],
          scalars["train_accuracy"],
          f" test acc {scalars['test_accuracy']:.4f}" if eval_now else "",
          scalars["learning_rate"], rate, eta)
      if save_now:
        checkpoint.save(mngr, done, state.to_dict(), config, history)
        last_saved = done
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return state
