"""Orbax checkpoints of a run: train state, config and metrics history.

Layout: ``WORKDIR/checkpoints/<step>/{state,config,metrics}``, written by an
``ocp.CheckpointManager``. Orbax writes each step into a temporary folder
(``<step>.orbax-checkpoint-tmp-<time>``) and renames it when complete, so a
kill during a save leaves the previous step usable: ``latest_step()`` lists
finalized folders only, and a writing manager deletes stale temporary
folders when it opens. The config is stored with every step: a checkpoint can be evaluated,
exported or fine-tuned from without knowing the command that made it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from l1grad.errors import CheckpointError

ITEMS = ("state", "config", "metrics")


class _DropReadOnlyNotice(logging.Filter):
  """Drops Orbax's warning that a reader's directory is read only.

  Readers open managers with ``read_only=True`` on purpose; the warning then
  precedes every evaluation's output and every ``error:`` line, where a user
  would take it for the problem.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, keep: int = 3, read_only: bool = False
            ) -> ocp.CheckpointManager:
  """The run's checkpoint manager (saves are asynchronous).

  Args:
    workdir: the run's workdir (checkpoints go to ``WORKDIR/checkpoints``).
    keep: how many of the newest steps to keep.
    read_only: for readers (evaluation, export); a writer must be the only
      one in the workdir, since it deletes temporary folders it finds.
  """
  options = ocp.CheckpointManagerOptions(
      # Read-only managers neither save nor delete; Orbax warns unless the
      # saving options are off too.
      max_to_keep=None if read_only else keep,
      save_interval_steps=0 if read_only else 1,
      create=not read_only, read_only=read_only,
      # A kill mid-save leaves a temporary folder behind; it is never read,
      # only wasted space, so the next writer removes it.
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any],
         config: ml_collections.ConfigDict, history: list[dict[str, Any]]
         ) -> None:
  """Saves ``state`` (a pytree of arrays), the config and the metrics."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict()),
      metrics=ocp.args.JsonSave({"history": history}),
  ), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any | None
            ) -> tuple[Any, ml_collections.ConfigDict, list[dict[str, Any]]]:
  """Restores ``(state, config, history)``; ``target`` gives shapes/shardings.

  Raises:
    CheckpointError: the step is unreadable or does not match ``target``.
  """
  abstract = None if target is None else jax.tree.map(
      ocp.utils.to_shape_dtype_struct, target)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        config=ocp.args.JsonRestore(),
        metrics=ocp.args.JsonRestore(),
    ))
  except Exception as e:  # Orbax raises many types for unreadable data.
    raise CheckpointError(
        f"Could not read checkpoint step {step} in {mngr.directory}:"
        f" {type(e).__name__}: {_first_line(e)}\nIf it was copied partially,"
        " copy it again or delete that step's folder to fall back to an"
        " earlier one; if the model or config changed, train into a new"
        " --workdir."
    ) from e
  config = ml_collections.ConfigDict(restored["config"])
  return restored["state"], config, list(restored["metrics"]["history"])


def stored_config(mngr: ocp.CheckpointManager, step: int
                  ) -> ml_collections.ConfigDict:
  """The config saved with ``step``, read without the state."""
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax raises many types for unreadable data.
    raise CheckpointError(
        f"Could not read the config of checkpoint step {step} in"
        f" {mngr.directory}: {type(e).__name__}: {_first_line(e)}. Delete"
        " that step's folder to fall back to an earlier one, or use a new"
        " --workdir.") from e
  return ml_collections.ConfigDict(restored["config"])


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:500] if text else ""


class Run(NamedTuple):
  """A trained run as read back from its checkpoint."""

  workdir: str
  config: ml_collections.ConfigDict
  step: int
  params: Any
  batch_stats: Any


def load_run(workdir: str, step: int | None = None) -> Run:
  """Reads a run's parameters, batch statistics and config (latest step).

  Raises:
    CheckpointError: no checkpoint in ``workdir``, or it cannot be read.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(
        f"No checkpoint in {os.path.abspath(workdir)!r} (no checkpoints/"
        " folder). Pass the --workdir that train.py wrote, or train first:"
        f" python train.py --config configs/digits.py --workdir {workdir}")
  mngr = manager(workdir, read_only=True)
  try:
    if step is None:
      step = mngr.latest_step()
    if step is None:
      raise CheckpointError(
          f"{directory!r} holds no complete checkpoint (a run killed before"
          " its first save leaves none). Re-run the training command to"
          " produce one.")
    state, config, _ = restore(mngr, step, None)
  finally:
    mngr.close()
  return Run(os.path.abspath(workdir), config, int(step), state["params"],
             state.get("batch_stats", {}))
