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

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from l1grad import distributed
from l1grad import train
from l1grad.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "A config file from configs/ (e.g. configs/digits.py). Every field, with"
    " its meaning and default, is listed in configs/default.py; override one"
    " with --config.<field>=<value>, e.g. --config.reg.weight_coef=0.05.",
    lock_config=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "One process of a multi-process run (one per host, usually): joins the"
    " others through jax.distributed first. The coordinator address, process"
    " count and id come from the three flags below or, where not given, from"
    " JAX's cluster auto-detection (SLURM srun, Cloud TPU / GKE TPU pods,"
    " Open MPI mpirun). See README, 'Several devices and hosts'.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "With --multihost: HOST:PORT of process 0, the same on every process"
    " (default: $JAX_COORDINATOR_ADDRESS or the detected cluster's).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "With --multihost: the number of processes (default: the detected"
    " cluster's).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "With --multihost: this process's id, 0 to --num_processes - 1 (default:"
    " the detected cluster's).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", None,
    "With --multihost: after how many seconds without a heartbeat a process"
    " counts as dead and the others stop (default: JAX's, 100).", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])

EXIT_DIVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_PEER_LOST = 3


def _bad_input(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def _unknown_field(error: Exception, argv: list[str]) -> str:
  """The message for an override of a field the config does not have."""
  # ml_collections raises AttributeError(KeyError("'name'\nDid you mean …"))
  # from inside the flag parser, which absl does not turn into a usage error.
  inner = error.args[0] if error.args else error
  text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
  name, _, hint = str(text).strip().partition("\n")
  name = name.strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  culprit = next((a for a in overrides if a.rsplit(".", 1)[-1] == name),
                 f"{name!r}")
  hint = f" {' '.join(hint.split())}" if hint.strip() else ""
  return (f"{culprit}: the config has no such field.{hint} Every field is"
          " listed, with its meaning, in configs/default.py; check the"
          " spelling and the nesting (e.g. --config.reg.weight_coef).")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake a one-line error and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _bad_input(f"{' '.join(str(e).split()).rstrip('.')}. Pass --helpshort to"
               " list the flags.")
  except (AttributeError, KeyError) as e:
    _bad_input(_unknown_field(e, argv))
  except OSError as e:  # The config file is missing (seen by an override).
    _bad_input(_config_load_message(e))
  raise AssertionError("unreachable")


def _config_load_message(error: Exception) -> str:
  cause = error.__cause__ or error
  return (f"could not load --config ({' '.join(str(cause).split())}). Pass a"
          " config file, e.g. --config configs/digits.py.")


def _loaded_config() -> ml_collections.ConfigDict:
  """The parsed config; a missing file becomes a usage error here."""
  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # ml_collections defers a load failure to the first access.
      config.keys()
    except OSError as e:
      _bad_input(_config_load_message(e))
  return config


def main(argv):
  if len(argv) > 1:
    _bad_input(f"unexpected arguments {argv[1:]}. Config values are flags:"
               " --config.<field>=<value>.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO logs bury progress.
  config = _loaded_config()
  cluster_flags = (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID)
  if _MULTIHOST.value:
    try:
      distributed.initialize(
          *(f.value for f in cluster_flags),
          heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    except UserError as e:
      _bad_input(str(e))
  elif given := [f"--{f.name}" for f in (*cluster_flags, _HEARTBEAT_TIMEOUT)
                 if f.value is not None]:
    _bad_input(
        f"{'/'.join(given)} {'applies' if len(given) == 1 else 'apply'} only"
        " to a multi-process run: add --multihost (and start one"
        " process per --process_id), or drop them for a single process.")
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except UserError as e:
    _bad_input(str(e))
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
    print(f"error: process {jax.process_index()} lost its peers"
          f" ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})."
          " Another process of this run probably died. Restart every"
          " process with the same command: training resumes from the last"
          " checkpoint.", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
