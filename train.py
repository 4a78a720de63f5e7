r"""Trains a model, with or without quantization-robustness regularization.

  python train.py --config configs/digits.py --workdir runs/digits \
      [--config.reg.kind=l1 --config.reg.weight_coef=0.05 ...]

Rerunning the same command resumes from the latest checkpoint.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from l1grad import train
from l1grad.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file from configs/.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO logs bury progress.
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.TrainingDivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
