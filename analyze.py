r"""Does the first-order theory hold? The loss expansion against real noise.

  python analyze.py --workdir runs/digits [--workdir runs/digits_l1 ...] \
      [--bits 8:8,4:4,3:3,4:2] [--num_batches N] [--batch_size 16] \
      [--out DIR] [--act_ranges bn|calibrate|dynamic] [--per_channel] \
      [--nofold] [--split test|train] [--step S] [--noplot]

For each run, batch, (W,A) pair and perturbation kind (weights only,
activations only, both), quantizes the model as eval_ptq.py does, records the
real noise and measures the induced loss, the first-order term, the
worst-case ℓ1 bound, the second-order prediction, the gradient norms and the
KL divergence. Writes analysis.json, analysis.md and PNG figures into --out
(default: the first --workdir) and prints the tables. The logic is in
l1grad.analysis; ``python -m l1grad.analysis`` runs this same command.
"""

from absl import flags
from absl import logging

from l1grad import analysis
from l1grad import bits
from l1grad import cli
from l1grad import report

_WORKDIR = flags.DEFINE_multi_string(
  "workdir", None, "A training run's directory (repeat to compare runs)."
)
_BITS = flags.DEFINE_string(
  "bits",
  analysis.DEFAULT_BITS,
  "Comma-separated W:A pairs (weight bits : activation bits), each in 2..16.",
)
_NUM_BATCHES = flags.DEFINE_integer(
  "num_batches",
  None,
  "Analyse only the first N batches (default: the whole split).",
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size",
  None,
  "Batch size (default: the run's eval batch size); correlations are over"
  " batches, so smaller batches give more points.",
)
_OUT = flags.DEFINE_string(
  "out", None, "Output directory (default: the first --workdir)."
)
_SPLIT = flags.DEFINE_enum(
  "split", "test", list(analysis.SPLITS), "The data split to analyse."
)
_ACT_RANGES = flags.DEFINE_enum(
  "act_ranges",
  "bn",
  list(analysis.ACT_RANGE_METHODS),
  "Activation ranges: 'bn' from batch-norm β and γ (Data-Free Quantization"
  " rule, eval_ptq.py's default), 'calibrate' as min/max over training"
  " batches, or 'dynamic' as each batch's own min/max.",
)
_CALIB_BATCHES = flags.DEFINE_integer(
  "calib_batches", 8, "Training batches for --act_ranges calibrate."
)
_PER_CHANNEL = flags.DEFINE_bool(
  "per_channel",
  False,
  "Weight scales per output channel (default: per tensor).",
)
_FOLD = flags.DEFINE_bool(
  "fold",
  True,
  "Fold batch norm into the preceding kernels first, as eval_ptq.py does;"
  " --nofold quantizes the unfolded kernels and keeps batch norm in float.",
)
_STEP = flags.DEFINE_integer(
  "step", None, "Checkpoint step (default: the latest)."
)
_PLOT = flags.DEFINE_bool(
  "plot", True, "Write the PNG figures (--noplot skips them)."
)


def main(argv):
  if len(argv) > 1:
    cli.bad_input(
      f"unexpected arguments {argv[1:]}; every option is a flag"
      " (--workdir DIR)."
    )
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every read-only checkpoint open at WARNING level.
    logging.set_verbosity(logging.ERROR)
  settings = analysis.Settings(
    bits=tuple(bits.parse_pairs(_BITS.value)),
    num_batches=_NUM_BATCHES.value,
    batch_size=_BATCH_SIZE.value,
    split=_SPLIT.value,
    act_ranges=_ACT_RANGES.value,
    calib_batches=_CALIB_BATCHES.value,
    per_channel=_PER_CHANNEL.value,
    fold=_FOLD.value,
    step=_STEP.value,
  )
  results, files = analysis.analyze(
    _WORKDIR.value or [],
    settings,
    out_dir=_OUT.value,
    plot=_PLOT.value,
    progress=lambda line: print(line, flush=True),
  )
  print()
  print(report.analysis_markdown(results))
  print("Wrote " + ", ".join(files[k] for k in sorted(files)))


if __name__ == "__main__":
  cli.run(main)
