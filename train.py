r"""Trains a model, with or without quantization-robustness regularization.

  python train.py --config configs/digits.py --workdir runs/digits \
      [--config.reg.kind=l1 --config.reg.weight_coef=0.05 ...]

Rerunning the same command resumes from the latest checkpoint. SIGTERM saves
a checkpoint at the current step and exits 0.

Exit codes: 0 done (or stopped by SIGTERM after saving); 1 training diverged
(a non-finite loss or gradient; the message names the step, the loss parts
and the last good checkpoint); 2 bad input (flags, config, data, workdir or
checkpoint), reported as one ``error: ...`` paragraph without a traceback.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from l1grad import train
from l1grad.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file from configs/.", lock_config=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Call jax.distributed.initialize() first: one process per host of a"
    " multi-host cluster (it reads the coordinator address, process count and"
    " id from the cluster's environment, e.g. SLURM or Cloud TPU).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_DIVERGED = 1
EXIT_BAD_INPUT = 2


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
  if _MULTIHOST.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except UserError as e:
    _bad_input(str(e))
  except train.TrainingDivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
