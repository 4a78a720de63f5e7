r"""Post-training quantization of trained runs: the paper's table at every bit-width.

  python eval_ptq.py --workdir runs/digits [--workdir runs/digits_l1 ...] \
      [--bits 8:4,6:4,4:4] [--act_ranges bn|calibrate] [--per_channel] \
      [--first_last_bits 8] [--act_points layer_inputs|tensors] \
      [--group_by run|method|reg.kind,reg.weight_coef] \
      [--export 4:4 --export_dir exported/digits_w4a4]

Writes ptq.json, ptq.md, ptq.csv and ptq.png into --out (default: the first
--workdir) and prints the table. An earlier report there is not lost: its files
are renamed ptq.<UTC time it was written>.* (e.g. ptq.20250131-142501.json) and
the command says so; --overwrite replaces it instead, and a rerun with the same
results simply rewrites it. --export without --bits is an export only: no sweep,
no report written (the earlier report stays as it is); --export with --bits
sweeps, reports and exports. With --group_by method (or config fields),
runs that differ only in their seed share a row: mean ± std over them, and the
plot draws the spread as a band. A run whose float accuracy is near chance is
flagged "collapsed" in every table. The logic is in l1grad.ptq (the sweep),
l1grad.runs (loading), l1grad.report (the files) and l1grad.export.
"""

import os

from absl import flags
from absl import logging

from l1grad import bits
from l1grad import cli
from l1grad import export
from l1grad import ptq
from l1grad import ranges
from l1grad import report as report_lib
from l1grad import runs
from l1grad.errors import ConfigError

_WORKDIR = flags.DEFINE_multi_string(
  "workdir", None, "A training run's directory (repeat for several runs)."
)
_BITS = flags.DEFINE_string(
  "bits",
  ptq.DEFAULT_BITS,
  "Comma-separated W:A pairs (weight bits : activation bits), each in 2..16.",
)
_ACT_RANGES = flags.DEFINE_enum(
  "act_ranges",
  "bn",
  list(ranges.ACT_RANGE_METHODS),
  "Activation ranges: 'bn' from batch-norm β and γ (Data-Free Quantization"
  " rule, no data), or 'calibrate' as min/max over training batches.",
)
_PER_CHANNEL = flags.DEFINE_bool(
  "per_channel",
  False,
  "Weight scales per output channel (default: per tensor).",
)
_FIRST_LAST_BITS = flags.DEFINE_integer(
  "first_last_bits",
  0,
  "Keep the first and last Conv/Dense layers (in call order) at this many"
  " bits, or more where W:A has more: their weights and the last layer's"
  " input activation (8: the convention of many deployments and PTQ"
  " baselines). 0 (default): every layer at W:A, the paper's setting.",
)
_ACT_POINTS = flags.DEFINE_enum(
  "act_points",
  "layer_inputs",
  ["layer_inputs", "tensors"],
  "Where activations are quantized: 'layer_inputs' (default) where the"
  " Conv/Dense layers read them, so a ResNet identity shortcut adds the float"
  " block input; 'tensors' once for every reader, the residual add included,"
  " as an integer deployment that stores each tensor once.",
)
_FOLD = flags.DEFINE_bool(
  "fold",
  True,
  "Fold batch norm into the preceding kernels before quantizing, as an"
  " integer deployment does; --nofold quantizes the unfolded kernels and keeps"
  " batch norm in float.",
)
_GROUP_BY = flags.DEFINE_string(
  "group_by",
  "run",
  "Table rows: 'run' (one per --workdir), 'method' (one per method label,"
  " e.g. 'l1 λ=0.05', mean ± std over its runs) or comma-separated config"
  " fields, e.g. 'reg.kind,reg.weight_coef' (runs differing only in other"
  " fields, such as the seed, are pooled).",
)
_OUT = flags.DEFINE_string(
  "out", None, "Report directory (default: the first --workdir)."
)
_CALIB_BATCHES = flags.DEFINE_integer(
  "calib_batches", 8, "Training batches for --act_ranges calibrate."
)
_MAX_EXAMPLES = flags.DEFINE_integer(
  "max_examples",
  None,
  "Evaluate on the first N test examples only (quick checks).",
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", None, "Evaluation batch size (default: the run's config)."
)
_STEP = flags.DEFINE_integer(
  "step", None, "Checkpoint step (default: the latest)."
)
_EXPORT = flags.DEFINE_string(
  "export",
  None,
  "Export the integer model at this W:A pair (needs --export_dir). Without"
  " --bits this is all the command does: no sweep, no report.",
)
_EXPORT_DIR = flags.DEFINE_string(
  "export_dir",
  None,
  "Where --export writes (one subfolder per run when there are several --workdir).",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Replace an earlier ptq.* report in --out instead of keeping it as"
  " ptq.<UTC time>.*.",
)


def _settings() -> ptq.Settings:
  return ptq.Settings(
    bits=tuple(bits.parse_pairs(_BITS.value)),
    act_ranges=_ACT_RANGES.value,
    per_channel=_PER_CHANNEL.value,
    first_last_bits=_FIRST_LAST_BITS.value,
    act_points=_ACT_POINTS.value,
    fold=_FOLD.value,
    calib_batches=_CALIB_BATCHES.value,
    max_examples=_MAX_EXAMPLES.value,
    batch_size=_BATCH_SIZE.value,
    step=_STEP.value,
  )


def _export(prepared_runs, pair, settings) -> None:
  several = len(prepared_runs) > 1
  for prepared in prepared_runs:
    out = (
      os.path.join(_EXPORT_DIR.value, prepared.label)
      if several
      else _EXPORT_DIR.value
    )
    _, summary = export.export_run(
      prepared.workdir, pair, out, settings, prepared=prepared
    )
    print(summary)


def _report_note(report: report_lib.Report) -> str | None:
  """Says what happened to an earlier report in the output folder, if any."""
  if report.kept:
    moves = ", ".join(
      f"{os.path.basename(old)} -> {os.path.basename(new)}"
      for old, new in report.kept.items()
    )
    folder = os.path.dirname(next(iter(report.kept)))
    return (
      f"Kept the earlier report in {folder}: {moves}"
      " (--overwrite replaces it instead)."
    )
  if report.replaced:
    why = "--overwrite" if _OVERWRITE.value else "same results as this one"
    return f"Replaced the earlier report {', '.join(report.replaced)} ({why})."
  return None


def _run() -> None:
  if not _WORKDIR.value:
    raise ConfigError(
      "Pass at least one --workdir (a directory train.py wrote)."
    )
  settings = _settings()
  group_by = report_lib.parse_group_by(_GROUP_BY.value)
  export_pair = None
  if _EXPORT.value:
    export_pair = bits.parse_pair(_EXPORT.value)
    if not _EXPORT_DIR.value:
      raise ConfigError(
        "--export needs --export_dir, the folder to write the integer model to."
      )
    if settings.first_last_bits:
      raise ConfigError(
        "--export writes every layer at the --export W:A; it does not support"
        " --first_last_bits yet. Export without it."
      )
    if settings.act_points != "layer_inputs":
      raise ConfigError(
        "--export quantizes activations where the Conv/Dense layers read"
        " them; it does not support --act_points tensors yet. Export without"
        " it."
      )
  if export_pair is not None and not flags.FLAGS["bits"].present:
    print(
      "Export only (no --bits given): no PTQ sweep, no report written.",
      flush=True,
    )
    labels = runs.run_labels(_WORKDIR.value)
    _export(
      [
        runs.prepare_run(w, settings, label=label)
        for w, label in zip(_WORKDIR.value, labels)
      ],
      export_pair,
      settings,
    )
    return
  report = ptq.evaluate(
    _WORKDIR.value,
    settings,
    out_dir=_OUT.value,
    progress=lambda line: print(line, flush=True),
    group_by=group_by,
    overwrite=_OVERWRITE.value,
  )
  print()
  print(report.markdown)
  print("Wrote " + ", ".join(report.files[k] for k in sorted(report.files)))
  note = _report_note(report)
  if note:
    print(note)
  if export_pair is not None:
    _export(report.prepared, export_pair, settings)


def main(argv):
  if len(argv) > 1:
    cli.bad_input(
      f"unexpected arguments {argv[1:]}; every option is a flag"
      " (--workdir DIR)."
    )
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every read-only checkpoint open at WARNING level.
    logging.set_verbosity(logging.ERROR)
  _run()


if __name__ == "__main__":
  cli.run(main)
