r"""Post-training quantization of trained runs: the paper's table at every bit-width.

  python eval_ptq.py --workdir runs/digits [--workdir runs/digits_l1 ...] \
      [--bits 8:4,6:4,4:4] [--act_ranges bn|calibrate] [--per_channel] \
      [--group_by run|method|reg.kind,reg.weight_coef] \
      [--export 4:4 --export_dir exported/digits_w4a4]

Writes ptq.json, ptq.md, ptq.csv and ptq.png into --out (default: the first
--workdir) and prints the table. With --group_by method (or config fields),
runs that differ only in their seed share a row: mean ± std over them, and the
plot draws the spread as a band. A run whose float accuracy is near chance is
flagged "collapsed" in every table. The logic is in l1grad.ptq and
l1grad.export.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from l1grad import bits
from l1grad import export
from l1grad import ptq
from l1grad.errors import ConfigError
from l1grad.errors import UserError

_WORKDIR = flags.DEFINE_multi_string(
    "workdir", None, "A training run's directory (repeat for several runs).")
_BITS = flags.DEFINE_string(
    "bits", ptq.DEFAULT_BITS,
    "Comma-separated W:A pairs (weight bits : activation bits), each in 2..16.")
_ACT_RANGES = flags.DEFINE_enum(
    "act_ranges", "bn", list(ptq.ACT_RANGE_METHODS),
    "Activation ranges: 'bn' from batch-norm β and γ (Data-Free Quantization"
    " rule, no data), or 'calibrate' as min/max over training batches.")
_PER_CHANNEL = flags.DEFINE_bool(
    "per_channel", False, "Weight scales per output channel (default: per tensor).")
_FOLD = flags.DEFINE_bool(
    "fold", True,
    "Fold batch norm into the preceding kernels before quantizing, as an"
    " integer deployment does; --nofold quantizes the unfolded kernels and keeps"
    " batch norm in float.")
_GROUP_BY = flags.DEFINE_string(
    "group_by", "run",
    "Table rows: 'run' (one per --workdir), 'method' (one per method label,"
    " e.g. 'l1 λ=0.05', mean ± std over its runs) or comma-separated config"
    " fields, e.g. 'reg.kind,reg.weight_coef' (runs differing only in other"
    " fields, such as the seed, are pooled).")
_OUT = flags.DEFINE_string("out", None, "Report directory (default: the first --workdir).")
_CALIB_BATCHES = flags.DEFINE_integer(
    "calib_batches", 8, "Training batches for --act_ranges calibrate.")
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", None, "Evaluate on the first N test examples only (quick checks).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Evaluation batch size (default: the run's config).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EXPORT = flags.DEFINE_string(
    "export", None, "Also export the integer model at this W:A pair (needs --export_dir).")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None,
    "Where --export writes (one subfolder per run when there are several --workdir).")


def _settings() -> ptq.Settings:
  return ptq.Settings(
      bits=tuple(bits.parse_pairs(_BITS.value)),
      act_ranges=_ACT_RANGES.value,
      per_channel=_PER_CHANNEL.value,
      fold=_FOLD.value,
      calib_batches=_CALIB_BATCHES.value,
      max_examples=_MAX_EXAMPLES.value,
      batch_size=_BATCH_SIZE.value,
      step=_STEP.value,
  )


def _run() -> None:
  if not _WORKDIR.value:
    raise ConfigError("Pass at least one --workdir (a directory train.py wrote).")
  settings = _settings()
  group_by = ptq.parse_group_by(_GROUP_BY.value)
  export_pair = None
  if _EXPORT.value:
    export_pair = bits.parse_pair(_EXPORT.value)
    if not _EXPORT_DIR.value:
      raise ConfigError("--export needs --export_dir, the folder to write the integer model to.")
  report = ptq.evaluate(_WORKDIR.value, settings, out_dir=_OUT.value,
                        progress=lambda line: print(line, flush=True),
                        group_by=group_by)
  print()
  print(report.markdown)
  print("Wrote " + ", ".join(report.files[k] for k in sorted(report.files)))
  if export_pair is not None:
    several = len(report.prepared) > 1
    for prepared in report.prepared:
      out = (os.path.join(_EXPORT_DIR.value, prepared.label) if several
             else _EXPORT_DIR.value)
      _, summary = export.export_run(prepared.workdir, export_pair, out, settings,
                                     prepared=prepared)
      print(summary)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every read-only checkpoint open at WARNING level.
    logging.set_verbosity(logging.ERROR)
  try:
    _run()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
