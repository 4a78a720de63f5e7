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
import numpy as np
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


def manager(
  workdir: str, *, keep: int = 3, read_only: bool = False
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
    create=not read_only,
    read_only=read_only,
    # A kill mid-save leaves a temporary folder behind; it is never read,
    # only wasted space, so the next writer removes it.
    cleanup_tmp_directories=not read_only,
  )
  # Handlers named up front (not inferred at the first save or restore), so
  # the state's metadata (shapes, dtypes) can be read before restoring it.
  handlers = {
    "state": ocp.StandardCheckpointHandler(),
    "config": ocp.JsonCheckpointHandler(),
    "metrics": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), options=options, item_handlers=handlers
  )


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: dict[str, Any],
  config: ml_collections.ConfigDict,
  history: list[dict[str, Any]],
) -> None:
  """Saves ``state`` (a pytree of arrays), the config and the metrics."""
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict()),
      metrics=ocp.args.JsonSave({"history": history}),
    ),
    force=True,
  )


def reader_sharding() -> jax.sharding.Sharding:
  """Where :func:`restore` without a target puts arrays, on this machine.

  A checkpoint records the device mesh it was saved from (e.g. 8 devices,
  axis ``data``); restoring onto that recorded mesh fails on any other
  device count, and even on the same count hands back arrays on a mesh with
  ``Explicit`` axis types that eager JAX code cannot use. Readers get plain
  arrays instead: on the default device in a single process (what
  ``jnp.asarray`` gives), replicated over every device (``Auto`` axes) in a
  multi-process job, where arrays must be global.
  """
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  mesh = jax.sharding.Mesh(
    np.asarray(jax.devices()),
    ("replica",),
    axis_types=(jax.sharding.AxisType.Auto,),
  )
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract_state(mngr: ocp.CheckpointManager, step: int) -> Any:
  """The stored state's shapes and dtypes, placed by :func:`reader_sharding`."""
  metadata = mngr.metadata(step).item_metadata["state"]
  if metadata is None:
    raise ValueError(f"no state metadata in step {step}")
  tree = getattr(metadata, "tree", metadata)
  sharding = reader_sharding()

  def leaf(m: Any) -> Any:
    if isinstance(m, ocp.metadata.ArrayMetadata):
      return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)
    return m

  return jax.tree.map(leaf, tree)


def restore(
  mngr: ocp.CheckpointManager, step: int, target: Any | None
) -> tuple[Any, ml_collections.ConfigDict, list[dict[str, Any]]]:
  """Restores ``(state, config, history)``; ``target`` gives shapes/shardings.

  Without ``target`` (readers: evaluation, analysis, export), the shapes and
  dtypes come from the checkpoint's metadata and the arrays are placed by
  :func:`reader_sharding`, whatever device count saved the checkpoint.

  Raises:
    CheckpointError: the step is unreadable or does not match ``target``.
  """
  try:
    abstract = (
      _abstract_state(mngr, step)
      if target is None
      else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    )
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        config=ocp.args.JsonRestore(),
        metrics=ocp.args.JsonRestore(),
      ),
    )
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


def stored_config(
  mngr: ocp.CheckpointManager, step: int
) -> ml_collections.ConfigDict:
  """The config saved with ``step``, read without the state."""
  try:
    restored = mngr.restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
    )
  except Exception as e:  # Orbax raises many types for unreadable data.
    raise CheckpointError(
      f"Could not read the config of checkpoint step {step} in"
      f" {mngr.directory}: {type(e).__name__}: {_first_line(e)}. Delete"
      " that step's folder to fall back to an earlier one, or use a new"
      " --workdir."
    ) from e
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
      f" python train.py --config configs/digits.py --workdir {workdir}"
    )
  mngr = manager(workdir, read_only=True)
  try:
    if step is None:
      step = mngr.latest_step()
    if step is None:
      raise CheckpointError(
        f"{directory!r} holds no complete checkpoint (a run killed before"
        " its first save leaves none). Re-run the training command to"
        " produce one."
      )
    state, config, _ = restore(mngr, step, None)
  finally:
    mngr.close()
  return Run(
    os.path.abspath(workdir),
    config,
    int(step),
    state["params"],
    state.get("batch_stats", {}),
  )
