"""The run guard: what keeps a training run safe, apart from the step itself.

The trainer (:mod:`l1grad.train`) wraps its loop in these pieces:

* :class:`WorkdirLock` and :func:`prepare_workdir`: one trainer per workdir,
  and a workdir that exists and is writable before anything compiles;
* :class:`StopSignal`: SIGTERM and Ctrl-C save a checkpoint at the current
  step and stop (:class:`TrainingInterrupted` for Ctrl-C);
* :func:`check_finite` and :func:`check_state_finite`: a non-finite loss,
  gradient, update or state stops the run before it is saved
  (:class:`TrainingDivergedError`, naming the step, the loss parts and the
  last good checkpoint);
* :class:`MetricWriter`: ``metrics.jsonl`` and TensorBoard, cut back to the
  checkpoint on resume.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp

from l1grad import checkpoint
from l1grad.errors import WorkdirError

__all__ = [
  "REPORTED",
  "WATCHED",
  "MetricWriter",
  "StopSignal",
  "TrainingDivergedError",
  "TrainingInterrupted",
  "WorkdirLock",
  "check_finite",
  "check_state_finite",
  "prepare_workdir",
  "signal_name",
]

PyTree = Any
Metrics = dict[str, jax.Array]


class TrainingDivergedError(RuntimeError):
  """A loss, gradient or the state became non-finite; nothing after was saved.

  ``train.py`` prints the message (step, loss parts, last good checkpoint) and
  exits with code 1: the input was valid, the optimisation failed.
  """


# --------------------------------------------------------------------------
# The workdir.


class WorkdirLock:
  """Holds an exclusive lock on ``WORKDIR/.lock`` while a run writes there.

  Two trainers in one workdir (a scheduler restarting a job whose old copy
  is still saving, a command started twice) would interleave checkpoints and
  delete each other's temporary save folders. ``flock`` locks are released
  by the kernel when the process dies, even by SIGKILL, so a killed run never
  leaves a stale lock behind (the file may remain; it holds the pid of the
  last holder and is harmless). A run that ends by itself deletes the file.
  Only the first process locks: on several hosts the others write through it.
  """

  def __init__(self, workdir: str):
    self._path = os.path.join(workdir, ".lock")
    self._file = None

  def __enter__(self) -> WorkdirLock:
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
    except ImportError:  # Not POSIX: run unlocked rather than not at all.
      return self
    if jax.process_index() != 0:
      return self
    while True:
      self._file = open(self._path, "a+")
      try:
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        self._file.seek(0)
        holder = self._file.read().strip() or "unknown"
        self._file.close()
        self._file = None
        raise WorkdirError(
          f"Another training process (pid {holder}) is running in"
          f" {os.path.dirname(self._path)}. Wait for it to finish or stop"
          " it (SIGTERM or Ctrl-C saves a checkpoint), then rerun; or pass"
          " a new --workdir."
        ) from None
      # The previous holder may have deleted the file between our open and
      # our flock: then we hold a lock on a name nobody else will open.
      try:
        if os.stat(self._path).st_ino == os.fstat(self._file.fileno()).st_ino:
          break
      except FileNotFoundError:
        pass
      self._file.close()
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    if self._file is not None:
      # Deleted while still held, so no other process can lock the old file
      # and believe it owns the workdir.
      try:
        os.unlink(self._path)
      except FileNotFoundError:
        pass
      self._file.close()  # Closing releases the lock.
      self._file = None


def prepare_workdir(workdir: str) -> str:
  """``workdir`` as an absolute path, created if needed and writable.

  Raises:
    WorkdirError: it cannot be created or is not writable.
  """
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(
      f"Cannot create --workdir {workdir!r} ({e.strerror or e}). Pass a"
      " writable directory path."
    ) from None
  if not os.access(workdir, os.W_OK):
    raise WorkdirError(
      f"--workdir {workdir!r} is not writable. Pass a writable directory path."
    )
  return workdir


# --------------------------------------------------------------------------
# Stopping on a signal.


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) stopped the run after it saved the current step.

  A ``KeyboardInterrupt``, so a notebook cell or a caller that does not know
  it stops as it would on any Ctrl-C; ``train.py`` exits with 130
  (128 + SIGINT), the shell's convention, without a traceback.
  """


class StopSignal:
  """Turns SIGTERM and SIGINT into "save at the current step and stop".

  Cluster schedulers send SIGTERM some seconds before they kill a job; a
  person presses Ctrl-C. The handler only sets a flag: saving from inside a
  signal handler could interleave with a step or with Orbax's own save (and
  a ``KeyboardInterrupt`` raised in the middle of a JAX call or an Orbax
  write can leave threads that crash the interpreter at exit). The loop
  checks the flag after every step. A second signal stops at once, without
  saving, with the exit status 128 + signal number.

  With several processes, every host must stop at the same step, which a
  local flag cannot promise; there the JAX distributed runtime's preemption
  service (it handles SIGTERM itself) agrees on the step, read through
  ``CheckpointManager.reached_preemption``.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_number: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignal:
    # signal.signal works only in the main thread; elsewhere (a notebook's
    # worker thread) the signals keep their default meaning.
    # With several processes a local flag would stop one host alone (and
    # hang the others in the next collective): SIGTERM goes to the
    # preemption service, Ctrl-C keeps its default meaning.
    if (
      threading.current_thread() is not threading.main_thread()
      or jax.process_count() > 1
    ):
      return self
    for number in self.SIGNALS:
      if signal.getsignal(number) == signal.SIG_IGN:
        continue  # e.g. SIGINT of a background job: keep ignoring it
      self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for number, previous in self._previous.items():
      signal.signal(
        number, previous if previous is not None else signal.SIG_DFL
      )
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signal_number is not None:
      # The second signal: the person does not want to wait for the save.
      os.write(
        2,
        f"\n{signal.Signals(signum).name} again: stopping at once,"
        " without saving.\n".encode(),
      )
      os._exit(128 + signum)
    self.signal_number = signum
    if jax.process_index() == 0:
      os.write(
        2,
        f"\n{signal.Signals(signum).name}: finishing the current"
        " step, then saving (send it again to stop at once).\n".encode(),
      )

  def requested(self, mngr: Any, step: int) -> bool:
    """Whether to save and stop after ``step`` (agreed by every process)."""
    if jax.process_count() > 1:
      return bool(mngr.reached_preemption(step))
    return self.signal_number is not None


def signal_name(number: int | None) -> str:
  """``"SIGTERM"``, ``"SIGINT"``, or the multi-process preemption notice."""
  if number is None:
    return "a preemption notice"
  return signal.Signals(number).name


# --------------------------------------------------------------------------
# Divergence.


# Metrics whose non-finite value means the run has diverged; the last two
# (update and parameter norms) catch an overflow in the optimizer even when
# the loss and gradient are still finite.
WATCHED = (
  "total_loss",
  "cross_entropy",
  "penalty",
  "dq_penalty",
  "grad_norm",
  "update_norm",
  "param_norm",
)
# The loss parts and context the divergence message reports.
REPORTED = (
  "cross_entropy",
  "weight_penalty",
  "act_penalty",
  "dq_penalty",
  "penalty",
  "total_loss",
  "grad_norm",
  "update_norm",
  "param_norm",
  "learning_rate",
)


def _last_good(last_saved: int | None, workdir: str) -> str:
  if last_saved is None:
    return "no checkpoint was saved before it"
  return (
    f"the last good checkpoint is step {last_saved} in"
    f" {checkpoint.checkpoint_dir(workdir)}"
  )


_DIVERGED_FIX = (
  " Rerunning the same command would diverge again. Lower the learning"
  " rate (--config.learning_rate) or the regularization coefficient"
  " (--config.reg.weight_coef), or fine-tune from a trained model"
  " instead of regularizing from scratch, in a new --workdir (this one"
  " refuses a changed config); --config.init_from=<this workdir> starts"
  " from its last good checkpoint."
)


def check_finite(
  pending: list[tuple[int, Metrics]],
  last_saved: int | None,
  workdir: str,
  last_step: int | None = None,
) -> None:
  """Raises at the first pending step with a non-finite loss, grad or update.

  Args:
    pending: ``(step index, metrics)`` of every step run since the last check,
      oldest first. Checking all of them (not only the one logged) is what
      guarantees that a later save never holds a state a bad step produced.
    last_saved: the newest checkpoint step, or None.
    workdir: the run's workdir (named in the message).
    last_step: the run's last step, for the "step N/M" numbering of the
      progress lines.

  Raises:
    TrainingDivergedError: naming the step, each loss part and the last good
      checkpoint.
  """
  for step, metrics in pending:
    values = jax.device_get(metrics)
    if all(math.isfinite(float(values[k])) for k in WATCHED):
      continue
    parts = ", ".join(f"{k}={float(values[k]):.6g}" for k in REPORTED)
    what = (
      "loss or gradient"
      if not all(math.isfinite(float(values[k])) for k in WATCHED[:5])
      else "parameter update"
    )
    # Step numbers count steps done, as in the progress lines and checkpoint
    # names: the update with index `step` is "step step+1".
    total = f"/{last_step}" if last_step is not None else ""
    raise TrainingDivergedError(
      f"Non-finite {what} at step {step + 1}{total} ({parts})."
      " Training stopped and nothing from this step on was saved;"
      f" {_last_good(last_saved, workdir)}." + _DIVERGED_FIX
    )


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
  """True when every floating-point leaf of ``tree`` is finite."""
  flags = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def check_state_finite(
  state: PyTree, step: int, last_saved: int | None, workdir: str
) -> None:
  """Refuses to checkpoint a state with a non-finite parameter or statistic.

  The metric check sees losses and norms only; this one sees every array
  that would be saved (batch statistics and optimizer moments included), so
  no checkpoint can ever hold a NaN or an infinity.

  Args:
    state: what the checkpoint would hold (a ``train.TrainState`` or any
      pytree of arrays; integer leaves are skipped).
    step: the step about to be saved.
    last_saved: the newest checkpoint step, or None.
    workdir: the run's workdir (named in the message).

  Raises:
    TrainingDivergedError: a floating-point leaf is NaN or infinite.
  """
  if bool(jax.device_get(_all_finite(state))):
    return
  raise TrainingDivergedError(
    f"The train state holds a non-finite value at step {step} although"
    " every logged loss and gradient was finite (an overflow in the"
    " parameters, batch statistics or optimizer state). Training stopped"
    f" without saving step {step}; {_last_good(last_saved, workdir)}."
    + _DIVERGED_FIX
  )


# --------------------------------------------------------------------------
# Metrics.


class MetricWriter:
  """Scalars to ``metrics.jsonl`` and TensorBoard event files (no TensorFlow).

  On resume both are cut back to the checkpoint: ``metrics.jsonl`` is
  rewritten from the checkpoint's history, and TensorBoard is told to hide
  the events an interrupted run logged after ``start_step`` (the rerun logs
  those steps again), so neither shows a step twice.
  """

  def __init__(
    self, workdir: str, history: list[dict[str, Any]], start_step: int = 0
  ):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self._enabled:
      # Written beside and renamed: a kill during the rewrite must not leave
      # a truncated file that holds less than the checkpoint's history.
      tmp = self._path + ".tmp"
      with open(tmp, "w") as f:
        for row in history:
          f.write(json.dumps(row) + "\n")
      os.replace(tmp, self._path)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"),
        purge_step=start_step + 1 if start_step else None,
      )

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
