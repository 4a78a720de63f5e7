"""Reports: the tables, JSON and CSV of the PTQ sweep and of the analysis.

One kind of thing, report writing, for both entry points (they share the
table code), which is why the module is longer than most.

PTQ (``eval_ptq.py``): :func:`summarize` groups ``ptq.json``'s result
entries into rows (per run, per method, or per value of config fields) and
columns (one per (W,A) pair); :func:`markdown_table` and :func:`results_csv`
print them; :class:`Report` holds a sweep and :func:`write_report` writes
``ptq.json``, ``ptq.md``, ``ptq.csv`` and ``ptq.png`` without ever losing an
earlier report silently.

Analysis (``analyze.py``): :func:`analysis_markdown` and
:func:`write_analysis` (``analysis.json``, ``analysis.md`` and figures).

The figures themselves are drawn by :mod:`l1grad.plots`.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import csv
import dataclasses
import io
import json
import os
import time
from typing import Any, NamedTuple

from flax import traverse_util
import jax
import numpy as np

from l1grad import errors
from l1grad import plots
from l1grad import runs as runs_lib

__all__ = [
  "COLLAPSE_FACTOR",
  "CONVENTION_KEYS",
  "Report",
  "TableRow",
  "analysis_markdown",
  "column_name",
  "conventions",
  "conventions_markdown",
  "is_collapsed",
  "markdown_table",
  "parse_group_by",
  "plot_results",
  "results_csv",
  "summarize",
  "write_analysis",
  "write_report",
]

JSON_FORMAT = "l1grad.ptq/1"
# Marks a table cell where an STE run's own training grid beat re-quantizing.
OWN_GRID_MARK = "†"
# A run whose float accuracy is at most this multiple of chance (1/classes) is
# flagged as collapsed: a (nearly) constant predictor, e.g. a too-large λ
# (docs/method.md §1). Flagged in every table, never dropped from a mean.
COLLAPSE_FACTOR = 2.0
COLLAPSE_MARK = "collapsed"
GROUP_BY = ("run", "method")
GroupBy = str | tuple[str, ...]
CSV_FIELDS = (
  "run",
  "method",
  "seed",
  "step",
  "w_bits",
  "a_bits",
  "accuracy",
  "kl",
  "correct",
  "count",
  "ste_grid",
  "collapsed",
)
REPORT_EXTENSIONS = ("json", "md", "csv", "png")


def is_collapsed(float_accuracy: float, num_classes: int | None) -> bool:
  """Whether a float accuracy is near chance (≤ ``COLLAPSE_FACTOR``/classes).

  A network that predicts (nearly) one class has zero gradient and stays
  there: the signature of a too-large penalty. ``num_classes`` None (unknown)
  never flags.
  """
  if not num_classes:
    return False
  return float_accuracy <= COLLAPSE_FACTOR / num_classes


# ---------------------------------------------------------------------------
# PTQ tables: rows, columns, Markdown, CSV.
# ---------------------------------------------------------------------------


def parse_group_by(spec: str | Sequence[str]) -> GroupBy:
  """``"run"``, ``"method"``, or config fields (``"reg.kind,reg.weight_coef"``).

  Args:
    spec: A keyword, a comma-separated list of dotted config fields, or a
      sequence of such fields.

  Returns:
    The keyword, or a tuple of dotted field names.

  Raises:
    errors.ConfigError: an empty spec or an empty field name.
  """
  if isinstance(spec, str):
    if spec in GROUP_BY:
      return spec
    fields = tuple(f.strip() for f in spec.split(","))
  else:
    fields = tuple(str(f).strip() for f in spec)
  if not fields or any(not f for f in fields):
    raise errors.ConfigError(
      f"--group_by must be 'run', 'method' or comma-separated config fields"
      f" (e.g. reg.kind,reg.weight_coef), got {spec!r}."
    )
  return fields


def config_field(config: Any, field: str, run: str) -> Any:
  """The dotted ``field`` (``"reg.kind"``) of a JSON config.

  Raises:
    errors.ConfigError: the config has no such field.
  """
  path = tuple(field.split("."))
  flat = (
    traverse_util.flatten_dict(config, is_leaf=lambda p, _: p == path)
    if isinstance(config, dict)
    else {}
  )
  if path not in flat:
    raise errors.ConfigError(
      f"--group_by field {field!r}: run {run!r} has no such config field"
      " (see configs/default.py for the fields)."
    )
  return flat[path]


def _group_labels(
  result: Mapping[str, Any], group_by: GroupBy, configs: Mapping[str, Any]
) -> dict[str, str]:
  if group_by == "run":
    return {"run": str(result["run"]), "method": str(result["method"])}
  if group_by == "method":
    return {"method": str(result["method"])}
  if result["run"] not in configs:
    raise errors.ConfigError(
      f"Grouping by config fields needs the runs' configs; run"
      f" {result['run']!r} has none (pass runs=..., the ptq.json 'runs'"
      " list)."
    )
  config = configs[result["run"]]
  labels = {}
  for field in group_by:
    value = config_field(config, field, result["run"])
    labels[field] = f"{value:g}" if isinstance(value, float) else str(value)
  return labels


class TableRow(NamedTuple):
  """One table row: its labels and, per column, the values it summarizes.

  Attributes:
    labels: ``{"run": ..., "method": ...}``; only ``method`` when grouped by
      method; ``{field: value}`` when grouped by config fields.
    cells: ``{column: [accuracy, ...]}``: one value per run in the group.
    own_grid: Columns where an STE run kept its own grid.
    kl: ``{column: [kl, ...]}``.
    runs: The runs in the group, in first-seen order.
    collapsed: The runs in the group whose float accuracy is near chance.
  """

  labels: dict[str, str]
  cells: dict[str, list[float]]
  own_grid: set[str]
  kl: dict[str, list[float]]
  runs: list[str]
  collapsed: list[str]


def column_name(w_bits: int | None, a_bits: int | None) -> str:
  """``"FP"`` for the float row, else the paper's ``"(W,A)"``."""
  return "FP" if w_bits is None else f"({w_bits},{a_bits})"


def summarize(
  results: Sequence[Mapping[str, Any]],
  *,
  group_by: str | Sequence[str] = "run",
  runs: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[str], list[TableRow]]:
  """Groups result entries into table rows, one column per bit-width.

  Args:
    results: Entries of ``ptq.json``'s ``results`` list.
    group_by: ``"run"``: one row per run (and its method); ``"method"``: one
      row per method label (:func:`l1grad.runs.method_label`), each cell
      holding the values of all its runs (seeds), shown as mean ± std; config
      fields (``"reg.kind,reg.weight_coef"`` or a sequence): one row per
      distinct value of those fields. Runs differing in a field not named are
      pooled (e.g. an STE run has ``reg.kind == "none"``), so name enough
      fields.
    runs: ``ptq.json``'s ``runs`` list (each with ``run`` and ``config``);
      needed only to group by config fields.

  Returns:
    ``(columns, rows)``: columns in first-seen order (FP first), rows in
    first-seen order.

  Raises:
    errors.ConfigError: an unknown keyword or config field.
  """
  group_by = parse_group_by(group_by)
  configs = {
    r["run"]: r.get("config") for r in runs if r.get("config") is not None
  }
  columns: list[str] = []
  rows: dict[tuple[str, ...], TableRow] = {}
  for r in results:
    col = column_name(r["w_bits"], r["a_bits"])
    if col not in columns:
      columns.append(col)
    labels = _group_labels(r, group_by, configs)
    key = tuple(labels.values())
    if key not in rows:
      rows[key] = TableRow(
        labels,
        collections.defaultdict(list),
        set(),
        collections.defaultdict(list),
        [],
        [],
      )
    row = rows[key]
    row.cells[col].append(float(r["accuracy"]))
    row.kl[col].append(float(r["kl"]))
    if r["run"] not in row.runs:
      row.runs.append(r["run"])
      if r.get("collapsed"):
        row.collapsed.append(r["run"])
    if r.get("ste_grid") == "own":
      row.own_grid.add(col)
  if "FP" in columns:
    columns.remove("FP")
    columns.insert(0, "FP")
  return columns, list(rows.values())


def _format_cell(
  values: Sequence[float], scale: float = 100.0, digits: int = 2
) -> str:
  if not values:
    return "–"
  v = np.asarray(values, np.float64) * scale
  if len(v) == 1:
    return f"{v[0]:.{digits}f}"
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _row_label(row: TableRow, label: str, grouped: bool) -> str:
  """``label``, marked when runs of the row collapsed (float ≈ chance)."""
  if not row.collapsed:
    return label
  if not grouped or len(row.runs) == 1:
    return f"{label} ({COLLAPSE_MARK})"
  return f"{label} ({len(row.collapsed)}/{len(row.runs)} {COLLAPSE_MARK})"


def markdown_table(
  results: Sequence[Mapping[str, Any]],
  *,
  group_by: str | Sequence[str] = "run",
  metric: str = "accuracy",
  runs: Sequence[Mapping[str, Any]] = (),
) -> str:
  """The paper's Table 1 layout: a row per run (or group), a column per (W,A).

  Grouped cells are mean ± sample standard deviation over the group's runs
  (an ``n`` column gives the group sizes). A row holding collapsed runs (float
  accuracy near chance, :func:`is_collapsed`) is marked ``(collapsed)`` or
  ``(k/n collapsed)`` and stays in the table and in the means.

  Args:
    results: Entries of ``ptq.json``'s ``results`` list.
    group_by: See :func:`summarize`.
    metric: ``"accuracy"`` (top-1 %) or ``"kl"`` (mean KL, nats).
    runs: ``ptq.json``'s ``runs`` (needed to group by config fields).

  Returns:
    A Markdown table; cells where an STE run kept its own grid end in ``†``.
  """
  group_by = parse_group_by(group_by)
  grouped = group_by != "run"
  columns, rows = summarize(results, group_by=group_by, runs=runs)
  label_names = list(rows[0].labels) if rows else ["run", "method"]
  size_col = ["n"] if grouped else []
  lines = [
    "| " + " | ".join(label_names + size_col + columns) + " |",
    "|" + "---|" * len(label_names) + "---:|" * (len(size_col) + len(columns)),
  ]
  for row in rows:
    cells = []
    for col in columns:
      if metric == "accuracy":
        text = _format_cell(row.cells.get(col, []))
      else:
        text = _format_cell(row.kl.get(col, []), scale=1.0, digits=4)
      if col in row.own_grid and text != "–":
        text += OWN_GRID_MARK
      cells.append(text)
    labels = [row.labels[n] for n in label_names]
    labels[-1] = _row_label(row, labels[-1], grouped)
    size = [str(len(row.runs))] if grouped else []
    lines.append("| " + " | ".join(labels + size + cells) + " |")
  return "\n".join(lines) + "\n"


def results_csv(results: Sequence[Mapping[str, Any]]) -> str:
  """One line per result entry (long format), the float row with empty bits."""
  buf = io.StringIO()
  writer = csv.DictWriter(
    buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n"
  )
  writer.writeheader()
  for r in results:
    writer.writerow(
      {k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS}
    )
  return buf.getvalue()


def plot_results(
  results: Sequence[Mapping[str, Any]],
  path: str,
  *,
  group_by: str | Sequence[str] = "run",
  title: str = "Post-training quantization",
  runs: Sequence[Mapping[str, Any]] = (),
) -> None:
  """Accuracy vs bit-width: a line per run, or per group with a ±std band."""
  group_by = parse_group_by(group_by)
  grouped = group_by != "run"
  columns, rows = summarize(results, group_by=group_by, runs=runs)
  lines = []
  for row in rows:
    values = [
      np.asarray(row.cells.get(c, []), np.float64) * 100 for c in columns
    ]
    means = np.array([v.mean() if v.size else np.nan for v in values])
    stds = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in values])
    label = _row_label(row, " · ".join(row.labels.values()), grouped)
    if grouped and len(row.runs) > 1:
      label += f" (n={len(row.runs)})"
    lines.append((label, means, stds))
  banded = grouped and any(len(row.runs) > 1 for row in rows)
  plots.accuracy_vs_bits(
    columns,
    lines,
    path,
    title=title,
    ylabel="top-1 accuracy (%)" + (", mean ± std band" if banded else ""),
  )


# ---------------------------------------------------------------------------
# The PTQ report and its files.
# ---------------------------------------------------------------------------

# The order of the conventions in ptq.json and under every table.
CONVENTION_KEYS = (
  "shortcuts",
  "first_last_layers",
  "weights",
  "batch_norm",
  "activations",
  "activation_ranges",
)


def _shortcut_convention(settings: runs_lib.Settings) -> str:
  """Which readers of a tensor see its quantized value (``act_points``)."""
  points = getattr(settings, "act_points", "layer_inputs")
  if points == "tensors":
    return (
      "act_points=tensors: a tensor is quantized once for every reader, a"
      " residual add included (an identity shortcut reads the quantized"
      " block input)"
    )
  return (
    f"act_points={points}: a tensor is quantized once, where Conv/Dense"
    " layers read it; other readers (a residual add) read the float tensor"
  )


def _first_last_convention(
  settings: runs_lib.Settings, runs: Sequence[Mapping[str, Any]]
) -> str:
  """Which layers ``first_last_bits`` keeps wider, named as in ptq.json."""
  bits = getattr(settings, "first_last_bits", None)
  named = []
  for run in runs:
    ends = run.get("first_last_layers") or {}
    if ends.get("first") is None:
      continue
    text = f"{ends['first']} and {ends['last']}"
    if bits and ends.get("last_input"):
      text = f"{ends['first']} and {ends['last']} weights and the input of"
      text += f" {ends['last_input']}"
    if text not in named:
      named.append(text)
  if not bits:
    which = "; ".join(named) if named else "the first and last Conv/Dense"
    return f"{which} quantized at (W,A) like every layer, the paper's setting"
  which = (
    "; ".join(named)
    if named
    else "the weights of the first and last Conv/Dense (call order) and the"
    " last one's input"
  )
  return f"{which} kept at {bits} bits (more where W or A is more)"


def conventions(
  settings: runs_lib.Settings, runs: Sequence[Mapping[str, Any]] = ()
) -> dict[str, str]:
  """What a PTQ table simulated, in words: one entry per convention.

  Written into ``ptq.json`` (``"conventions"``) and under every table of
  ``ptq.md``.

  Args:
    settings: The sweep's settings.
    runs: ``ptq.json``'s ``runs`` (for the names of the first and last
      layers).

  Returns:
    ``{name: text}`` in :data:`CONVENTION_KEYS` order: shortcuts,
    first_last_layers, weights, batch_norm, activations, activation_ranges.
  """
  s = settings
  scales = "per output channel" if s.per_channel else "per tensor"
  return {
    "shortcuts": _shortcut_convention(s),
    "first_last_layers": _first_last_convention(s, runs),
    "weights": f"symmetric, {scales}",
    "batch_norm": (
      "folded into the preceding kernels before quantizing"
      if s.fold
      else "not folded (unfolded kernels quantized, batch norm in float)"
    ),
    "activations": (
      "the inputs of every Conv/Dense but the first (the image is not"
      " quantized)"
    ),
    "activation_ranges": (
      "from batch-norm parameters, Data-Free Quantization rule [β ± "
      f"{s.num_std:g}|γ|]"
      if s.act_ranges == "bn"
      else f"calibrated min/max over {s.calib_batches} training batches"
    ),
  }


def conventions_markdown(
  settings: runs_lib.Settings, runs: Sequence[Mapping[str, Any]] = ()
) -> str:
  """:func:`conventions` as one Markdown line, for under a table."""
  names = {
    "shortcuts": "shortcuts",
    "first_last_layers": "first/last layers",
    "weights": "weights",
    "batch_norm": "batch norm",
    "activations": "activations",
    "activation_ranges": "activation ranges",
  }
  parts = [f"{names[k]}: {v}" for k, v in conventions(settings, runs).items()]
  return "Conventions — " + "; ".join(parts) + "."


@dataclasses.dataclass
class Report:
  """What :func:`l1grad.ptq.evaluate` computed and wrote.

  Attributes:
    settings: The evaluation settings (:class:`l1grad.ptq.Settings`).
    runs: Per-run metadata (``ptq.json``'s ``runs``).
    results: Per-run, per-pair entries (``ptq.json``'s ``results``).
    files: ``{"json"|"md"|"csv"|"png": path}`` written, if any.
    replaced: Paths of an earlier report's files that writing this one
      replaced (see :func:`write_report`); empty if there was none.
    kept: ``{path replaced: where the earlier file now is}`` for the earlier
      report's files moved aside (``ptq.<UTC time>.<ext>``); empty with
      ``overwrite=True`` or when the earlier report had the same results.
    prepared: The prepared runs (not serialized), e.g. for an export.
    group_by: How the tables and the plot group runs (:func:`summarize`):
      ``"run"``, ``"method"`` or a tuple of config fields.
  """

  settings: runs_lib.Settings
  runs: list[dict[str, Any]]
  results: list[dict[str, Any]]
  files: dict[str, str] = dataclasses.field(default_factory=dict)
  replaced: list[str] = dataclasses.field(default_factory=list)
  kept: dict[str, str] = dataclasses.field(default_factory=dict)
  prepared: list[runs_lib.PreparedRun] = dataclasses.field(
    default_factory=list, repr=False
  )
  group_by: GroupBy = "run"

  def __post_init__(self):
    self.group_by = parse_group_by(self.group_by)

  def to_json(self) -> dict[str, Any]:
    return {
      "format": JSON_FORMAT,
      "settings": self.settings.to_json(),
      "conventions": conventions(self.settings, self.runs),
      "act_ranges": self.settings.act_ranges,
      "group_by": (
        self.group_by
        if isinstance(self.group_by, str)
        else ",".join(self.group_by)
      ),
      "runs": self.runs,
      "results": self.results,
    }

  def table(
    self, metric: str = "accuracy", group_by: GroupBy | None = None
  ) -> str:
    """The Markdown table of ``metric``, grouped as the report (or as given)."""
    return markdown_table(
      self.results,
      metric=metric,
      runs=self.runs,
      group_by=self.group_by if group_by is None else group_by,
    )

  @property
  def markdown(self) -> str:
    """The accuracy table, a KL table, and the settings, as Markdown."""
    conv = conventions_markdown(self.settings, self.runs)
    steps = ", ".join(f"{r['run']}: step {r['step']}" for r in self.runs)
    grouped = self.group_by != "run"
    if grouped:
      by = (
        "of each method"
        if self.group_by == "method"
        else "sharing " + ", ".join(self.group_by)
      )
      heading = (
        "## Post-training quantization: top-1 accuracy (%), mean ±"
        f" std over the runs {by}"
      )
    else:
      heading = "## Post-training quantization: top-1 accuracy (%)"
    lines = [
      heading,
      "",
      self.table(),
      f"(W,A) = (weight bits, activation bits). Checkpoints: {steps}.",
    ]
    if any(r.get("ste_grid") == "own" for r in self.results):
      lines.append(
        f"{OWN_GRID_MARK} STE run evaluated on its own training grid (better"
        " than re-quantizing at the wider grid; the paper prints – there)."
      )
    if grouped:
      lines.append(
        "n = runs in the group (seeds); ± is the sample standard deviation."
      )
    collapsed = [r for r in self.runs if r.get("collapsed")]
    if collapsed:
      chance = collapsed[0].get("chance_accuracy")
      limit = f" ≤ {100 * COLLAPSE_FACTOR * chance:.0f} %" if chance else ""
      lines.append(
        f"**{len(collapsed)} run(s) collapsed** (float accuracy near"
        f" chance{limit}: a (nearly) constant predictor, e.g. a too-large λ;"
        f" kept in the means): {', '.join(r['run'] for r in collapsed)}."
      )
    lines += [
      "",
      conv,
      "",
      "## Mean KL(p_float ‖ p_quant) over test examples (nats)",
      "",
      self.table(metric="kl"),
      conv,
    ]
    if grouped:
      lines += [
        "",
        "## Per run: top-1 accuracy (%)",
        "",
        self.table(group_by="run"),
        conv,
      ]
    return "\n".join(lines)


def _keep_aside(paths: Sequence[str]) -> dict[str, str]:
  """Renames ``DIR/ptq.EXT`` to ``DIR/ptq.<UTC write time>[-k].EXT``."""
  written = next((p for p in paths if p.endswith(".json")), paths[0])
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(os.path.getmtime(written)))
  out_dir = os.path.dirname(paths[0])
  for k in range(1000):
    tag = stamp if k == 0 else f"{stamp}-{k}"
    targets = {
      p: os.path.join(out_dir, f"ptq.{tag}.{p.rsplit('.', 1)[1]}")
      for p in paths
    }
    if not any(os.path.exists(t) for t in targets.values()):
      break
  for path, target in targets.items():
    os.replace(path, target)
  return targets


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.generic, jax.Array)):
    return np.asarray(obj).tolist()
  return str(obj)


def write_report(
  report: Report, out_dir: str, *, plot: bool = True, overwrite: bool = False
) -> dict[str, str]:
  """Writes ``ptq.json``, ``.md``, ``.csv`` and ``.png`` into ``out_dir``.

  An earlier report there (any of these files) is never lost silently: its
  files are renamed ``ptq.<UTC time it was written>.<ext>`` (e.g.
  ``ptq.20250131-142501.json``) before the new ones are written, unless its
  ``ptq.json`` holds the same results (then it is simply rewritten) or
  ``overwrite`` is set. ``report.replaced`` and ``report.kept`` say what
  happened, for the caller to print.
  """
  os.makedirs(out_dir, exist_ok=True)
  files = {
    ext: os.path.join(out_dir, f"ptq.{ext}") for ext in REPORT_EXTENSIONS
  }
  text = (
    json.dumps(
      report.to_json(), indent=2, ensure_ascii=False, default=_json_default
    )
    + "\n"
  )
  existing = [
    files[ext] for ext in REPORT_EXTENSIONS if os.path.exists(files[ext])
  ]
  report.replaced, report.kept = existing, {}
  if existing and not overwrite:
    try:
      with open(files["json"]) as f:
        same = f.read() == text
    except OSError:
      same = False
    if not same:
      report.kept = _keep_aside(existing)
  with open(files["json"], "w") as f:
    f.write(text)
  with open(files["md"], "w") as f:
    f.write(report.markdown)
  with open(files["csv"], "w") as f:
    f.write(results_csv(report.results))
  if plot:
    plot_results(
      report.results, files["png"], group_by=report.group_by, runs=report.runs
    )
  else:
    del files["png"]
  report.files = files
  return files


# ---------------------------------------------------------------------------
# The analysis report.
# ---------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".3f") -> str:
  """``x`` formatted, or ``"–"`` for a missing value (None)."""
  return "–" if x is None else format(x, spec)


def analysis_markdown(report: Mapping[str, Any]) -> str:
  """The summary tables of an analysis report, one per run."""
  conv = report["conventions"]
  lines = [
    "# Loss expansion vs real quantization noise",
    "",
    f"Batch norm {conv['batch_norm']}; weights {conv['weights']};"
    f" activation ranges {conv['activation_ranges']}.",
    "",
    "Per batch: induced = L(quantized) − L(float); 1st = ⟨δ, ∇L⟩;"
    " 2nd = 1st + ½δᵀHδ; bound = Σ(Δ/2)|∇L|. Columns are means over"
    " batches weighted by their example counts; r = Pearson correlation"
    " with the induced loss over batches,"
    " ρ = Spearman (rank) correlation; err = mean |prediction − induced|"
    " / mean |induced| (1 is no better than predicting 0).",
    "",
  ]
  for run in report["runs"]:
    pb = run["per_batch"]
    lines += [
      f"## {run['run']} ({run['method']}, step {run['step']})",
      "",
      f"{run['num_examples']} {run['split']} examples in"
      f" {run['num_batches']} batches of {run['batch_size']}; float accuracy"
      f" {100 * run['float_accuracy']:.2f} %; mean loss"
      f" {np.average(pb['loss'], weights=pb['count']):.4g}.",
      "Gradient norms (mean over batches):"
      f" ‖∇W‖₁ {np.mean(pb['weight_grad_l1']):.4g},"
      f" ‖∇W‖₂ {np.mean(pb['weight_grad_l2']):.4g}"
      f" ({run['num_weights']} weights),"
      f" ‖∇A‖₁ {np.mean(pb['act_grad_l1']):.4g},"
      f" ‖∇A‖₂ {np.mean(pb['act_grad_l2']):.4g}.",
      "",
      "| (W,A) | kind | acc % | KL | induced | 1st | 2nd | bound | r 1st |"
      " r 2nd | r bound | ρ 1st | ρ 2nd | err 1st | err 2nd |",
      "|---|---|" + "---:|" * 13,
    ]
    for entry in run["pairs"]:
      for kind, k in entry["kinds"].items():
        s = k["summary"]
        accuracy = None if s["accuracy"] is None else 100 * s["accuracy"]
        cells = [
          fmt(accuracy, ".2f"),
          fmt(s["kl_mean"], ".3g"),
          fmt(s["induced_mean"], ".3g"),
          fmt(s["first_order_mean"], ".3g"),
          fmt(s["second_order_mean"], ".3g"),
          fmt(s["bound_mean"], ".3g"),
          fmt(s["r_first_order"], ".2f"),
          fmt(s["r_second_order"], ".2f"),
          fmt(s["r_bound"], ".2f"),
          fmt(s["rho_first_order"], ".2f"),
          fmt(s["rho_second_order"], ".2f"),
          fmt(s["rel_err_first_order"], ".2f"),
          fmt(s["rel_err_second_order"], ".2f"),
        ]
        lines.append(
          f"| ({entry['w_bits']},{entry['a_bits']}) | {kind} | "
          + " | ".join(cells)
          + " |"
        )
    lines += [
      "",
      "Noise δ/Δ per tensor, first pair (std of a uniform [−½,½]: 0.289):",
      "",
      "| tensor | std | zero fraction | clipped fraction |",
      "|---|---:|---:|---:|",
    ]
    for entry in run["pairs"][:1]:
      for group, tag in (("weights", "W"), ("acts", "A")):
        for name, n in entry["noise"][group].items():
          b = entry["w_bits"] if tag == "W" else entry["a_bits"]
          lines.append(
            f"| {tag} {name} @ {b} bits | {n['std']:.3f} |"
            f" {n['zero_fraction']:.3f} |"
            f" {n['clipped_fraction']:.4f} |"
          )
    lines.append("")
  return "\n".join(lines)


def write_analysis(
  report: Mapping[str, Any], out_dir: str, *, plot: bool = True
) -> dict[str, str]:
  """Writes ``analysis.json``, ``analysis.md`` and (``plot``) the figures.

  Returns:
    ``{name: path}`` of the files written.
  """
  os.makedirs(out_dir, exist_ok=True)
  files = {
    "json": os.path.join(out_dir, "analysis.json"),
    "md": os.path.join(out_dir, "analysis.md"),
  }
  with open(files["json"], "w") as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
    f.write("\n")
  with open(files["md"], "w") as f:
    f.write(analysis_markdown(report))
  if plot:
    files.update(plots.plot_analysis(report, out_dir))
  return files
