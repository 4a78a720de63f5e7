r"""Runs the paper's whole protocol as one study and writes its tables.

Bases per seed, λ chosen on a validation split by the paper's rule, every
method fine-tuned from every base (none, ℓ1 exact and finite-difference, ℓ2,
Defensive Quantization, STE), one post-training-quantization sweep on the
test split, a finite-difference check; see l1grad/study.py.

  python study.py --config configs/studies/digits.py --workdir studies/digits
  python study.py --config configs/studies/fashion_mnist.py \
    --workdir studies/fashion_mnist

A quick run: --config.seeds=0 --config.base_epochs=1
--config.finetune_epochs=1 --config.max_train_examples=2000.
Rerunning the same command resumes (finished runs are skipped).
Writes DIR/study.md, study.json, study.csv and study.png.
"""

import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from l1grad import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A study config from configs/studies/.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where the runs and the report go (resumable)."
)
flags.mark_flags_as_required(["config", "workdir"])

EXIT_INTERRUPTED = 130


def main(argv):
  if len(argv) > 1:
    cli.bad_input(
      f"unexpected arguments {argv[1:]}. Config values are"
      " flags: --config.<field>=<value>."
    )
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = cli.loaded_config(_CONFIG)
  import jax  # pylint: disable=g-import-not-at-top

  from l1grad import study  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  # Every seed's runs compile the same programs: cache them on disk.
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    cache = os.path.join(_WORKDIR.value, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    study.run_study(config, _WORKDIR.value, say=lambda s: print(s, flush=True))
  except train.TrainingInterrupted:
    raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
  cli.run(main)
