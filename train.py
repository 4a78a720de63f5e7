r"""Trains a model, with or without quantization-robustness regularization.

  python train.py --config configs/digits.py --workdir runs/digits \
      [--config.reg.kind=l1 --config.reg.weight_coef=0.05 ...]

Rerunning the same command resumes from the latest checkpoint. SIGTERM (what
a scheduler sends before it kills a job) and Ctrl-C (SIGINT) finish the
current step, save a checkpoint there and stop; a second Ctrl-C stops at once
without saving. Every field of the config is documented in configs/default.py.

Exit codes: 0 done (or stopped by SIGTERM after saving); 1 training diverged
(a non-finite loss or gradient; the message names the step, the loss parts
and the last good checkpoint); 2 bad input (flags, config, data, workdir or
checkpoint), reported as one ``error: ...`` paragraph without a traceback;
3 a multi-process run lost a process (restart all of them to resume);
130 stopped by Ctrl-C after saving (a second Ctrl-C: 130 without saving).
"""

import os
import signal
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from l1grad import cli
from l1grad import distributed
from l1grad import train

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where checkpoints and logs go."
)
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file from configs/ (e.g. configs/digits.py). Every field, with"
  " its meaning and default, is listed in configs/default.py; override one"
  " with --config.<field>=<value>, e.g. --config.reg.weight_coef=0.05.",
  lock_config=True,
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "One process of a multi-process run (one per host, usually): joins the"
  " others through jax.distributed first. The coordinator address, process"
  " count and id come from the three flags below or, where not given, from"
  " JAX's cluster auto-detection (SLURM srun, Cloud TPU / GKE TPU pods,"
  " Open MPI mpirun). See README, 'Several devices and hosts'.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address",
  None,
  "With --multihost: HOST:PORT of process 0, the same on every process"
  " (default: $JAX_COORDINATOR_ADDRESS or the detected cluster's).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes",
  None,
  "With --multihost: the number of processes (default: the detected"
  " cluster's).",
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id",
  None,
  "With --multihost: this process's id, 0 to --num_processes - 1 (default:"
  " the detected cluster's).",
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout_seconds",
  None,
  "With --multihost: after how many seconds without a heartbeat a process"
  " counts as dead and the others stop (default: JAX's, 100).",
  lower_bound=1,
)
flags.mark_flags_as_required(["config", "workdir"])

EXIT_DIVERGED = 1
EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_PEER_LOST = 3


def main(argv):
  if len(argv) > 1:
    cli.bad_input(
      f"unexpected arguments {argv[1:]}. Config values are"
      " flags: --config.<field>=<value>."
    )
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO logs bury progress.
  config = cli.loaded_config(_CONFIG)
  cluster_flags = (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID)
  if _MULTIHOST.value:
    distributed.initialize(  # A UserError here exits 2 (cli.run).
      *(f.value for f in cluster_flags),
      heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
    )
  elif given := [
    f"--{f.name}"
    for f in (*cluster_flags, _HEARTBEAT_TIMEOUT)
    if f.value is not None
  ]:
    cli.bad_input(
      f"{'/'.join(given)} {'applies' if len(given) == 1 else 'apply'} only"
      " to a multi-process run: add --multihost (and start one"
      " process per --process_id), or drop them for a single process."
    )
  try:
    # A UserError (bad config, data, workdir or checkpoint) propagates to
    # cli.run, which prints it and exits with EXIT_BAD_INPUT.
    train.train_and_evaluate(config, _WORKDIR.value)
  except train.TrainingDivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
  except train.TrainingInterrupted:
    # The trainer saved and said how to resume; 128 + SIGINT as shells do.
    sys.exit(EXIT_INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    import jax  # pylint: disable=g-import-not-at-top

    if not (_MULTIHOST.value and isinstance(e, jax.errors.JaxRuntimeError)):
      raise
    # A collective failed: almost always another process died. JAX's exit
    # handler would wait out the heartbeat timeout and abort with a C++
    # stack; the checkpoints on disk are all a restart needs.
    print(
      f"error: process {jax.process_index()} lost its peers"
      f" ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})."
      " Another process of this run probably died. Restart every"
      " process with the same command: training resumes from the last"
      " checkpoint.",
      file=sys.stderr,
      flush=True,
    )
    os._exit(EXIT_PEER_LOST)


if __name__ == "__main__":
  cli.run(main)
