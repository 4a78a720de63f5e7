"""Every figure of the project (matplotlib, imported only when drawing).

* :func:`accuracy_vs_bits`: the PTQ sweep, accuracy per (W,A) column, a line
  per run or group with a ±std band (``ptq.png``; the data comes from
  :func:`l1grad.report.plot_results`);
* :func:`plot_analysis`: the analysis figures, drawn from an
  ``analysis.json`` report: gradient norms and KL (paper Fig. 2), the loss
  expansion against the induced loss (Fig. 3), noise histograms per tensor
  (Fig. 6) and the training log (Fig. 7).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import math
import os
from typing import Any

import numpy as np

__all__ = [
  "accuracy_vs_bits",
  "plot_analysis",
  "plot_expansion",
  "plot_noise",
  "plot_norms_and_kl",
  "plot_training_log",
]


def _fmt(x: float | None, spec: str = ".3f") -> str:
  return "–" if x is None else format(x, spec)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _safe_name(label: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _finite(values: Iterable[Any]) -> np.ndarray:
  """Floats, None (a missing value in the JSON) as NaN."""
  return np.asarray([np.nan if v is None else v for v in values], np.float64)


def accuracy_vs_bits(
  columns: Sequence[str],
  lines: Iterable[tuple[str, np.ndarray, np.ndarray]],
  path: str,
  *,
  title: str,
  ylabel: str,
) -> None:
  """Accuracy vs bit-width, one line per ``(label, means, stds)``.

  Args:
    columns: The x tick labels (``"FP"``, ``"(8,4)"``, …).
    lines: Per line its legend label and, per column, the mean accuracy (%)
      and its standard deviation (drawn as a band where non-zero).
    path: The PNG to write.
    title: The figure title.
    ylabel: The y axis label.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(columns) + 3.5), 4.5))
  x = np.arange(len(columns))
  for label, means, stds in lines:
    (line,) = ax.plot(x, means, marker="o", label=label)
    if np.any(stds):
      ax.fill_between(
        x,
        means - stds,
        means + stds,
        color=line.get_color(),
        alpha=0.2,
        linewidth=0,
      )
  ax.set_xticks(x)
  ax.set_xticklabels(columns)
  ax.set_xlabel("(weight bits, activation bits)")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_analysis(report: Mapping[str, Any], out_dir: str) -> dict[str, str]:
  """Writes the analysis figures (paper Figs. 2, 3, 6, 7).

  Returns:
    ``{name: path}`` of the files written.
  """
  files = {
    "fig2": os.path.join(out_dir, "analysis_grad_norms_kl.png"),
    "fig3": os.path.join(out_dir, "analysis_expansion.png"),
  }
  plot_norms_and_kl(report, files["fig2"])
  plot_expansion(report, files["fig3"])
  for run in report["runs"]:
    path = os.path.join(out_dir, f"analysis_noise_{_safe_name(run['run'])}.png")
    plot_noise(run, report["conventions"], path)
    files[f"fig6_{run['run']}"] = path
  if any(run.get("training_log") for run in report["runs"]):
    files["fig7"] = os.path.join(out_dir, "analysis_penalty.png")
    plot_training_log(report, files["fig7"])
  return files


def plot_norms_and_kl(report: Mapping[str, Any], path: str) -> None:
  """Fig. 2: per-batch ℓ1 vs ℓ2 gradient norms; KL per bit-width, per run."""
  plt = _pyplot()
  runs = report["runs"]
  fig, (ax_n, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
  names = [
    ("weight_grad_l1", "‖∇W L‖₁"),
    ("weight_grad_l2", "‖∇W L‖₂"),
    ("act_grad_l1", "‖∇A L‖₁"),
    ("act_grad_l2", "‖∇A L‖₂"),
  ]
  width = 0.8 / max(len(runs), 1)
  for i, run in enumerate(runs):
    color = f"C{i}"
    for j, (key, _) in enumerate(names):
      y = _finite(run["per_batch"][key])
      x = (
        j
        + (i - (len(runs) - 1) / 2) * width
        + np.linspace(-0.3, 0.3, len(y)) * width
      )
      ax_n.scatter(
        x,
        y,
        s=12,
        color=color,
        alpha=0.7,
        label=f"{run['run']} ({run['method']})" if j == 0 else None,
      )
  ax_n.set_xticks(range(len(names)))
  ax_n.set_xticklabels([n for _, n in names])
  ax_n.set_yscale("log")
  ax_n.set_ylabel("per test batch")
  ax_n.set_title("Gradient norms: ℓ1 vs ℓ2 (paper Fig. 2, left)")
  ax_n.grid(alpha=0.3, which="both", axis="y")
  ax_n.legend(fontsize="small")

  pairs = [(e["w_bits"], e["a_bits"]) for e in runs[0]["pairs"]] if runs else []
  for i, run in enumerate(runs):
    data = []
    for e in run["pairs"]:
      kl = _finite(e["kinds"]["both"]["per_batch"]["kl"])
      data.append(np.maximum(kl[np.isfinite(kl)], 1e-12))
    pos = np.arange(len(data)) + (i - (len(runs) - 1) / 2) * width
    bp = ax_k.boxplot(
      data,
      positions=pos,
      widths=width * 0.8,
      patch_artist=True,
      showfliers=True,
    )
    for patch in bp["boxes"]:
      patch.set_facecolor(f"C{i}")
      patch.set_alpha(0.5)
    ax_k.plot([], [], color=f"C{i}", lw=6, alpha=0.5, label=run["run"])
  ax_k.set_xticks(range(len(pairs)))
  ax_k.set_xticklabels([f"({w},{a})" for w, a in pairs])
  ax_k.set_yscale("log")
  ax_k.set_xlabel("(weight bits, activation bits)")
  ax_k.set_ylabel("KL(p_float ‖ p_quant) per batch (nats)")
  ax_k.set_title("Predictive shift under quantization (Fig. 2, right)")
  ax_k.grid(alpha=0.3, which="both", axis="y")
  ax_k.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_expansion(report: Mapping[str, Any], path: str) -> None:
  """Fig. 3: induced loss vs first- and second-order predictions, per batch."""
  plt = _pyplot()
  runs = report["runs"]
  pairs = [(e["w_bits"], e["a_bits"]) for e in runs[0]["pairs"]]
  kinds = list(report["conventions"]["kinds"])
  fig, axes = plt.subplots(
    len(kinds),
    len(pairs),
    figsize=(3.4 * len(pairs), 3.1 * len(kinds)),
    squeeze=False,
  )
  for col, pair in enumerate(pairs):
    for row, kind in enumerate(kinds):
      ax = axes[row][col]
      lo, hi = np.inf, -np.inf
      for i, run in enumerate(runs):
        entry = next(
          e for e in run["pairs"] if (e["w_bits"], e["a_bits"]) == pair
        )
        k = entry["kinds"][kind]
        x = _finite(k["per_batch"]["induced"])
        s = k["summary"]
        for key, marker, name in (
          ("first_order", "o", "1st"),
          ("second_order", "x", "2nd"),
        ):
          y = _finite(k["per_batch"][key])
          ax.scatter(
            x,
            y,
            s=14,
            marker=marker,
            color=f"C{i}",
            alpha=0.75,
            label=f"{run['run']} {name} r={_fmt(s[f'r_{key}'], '.2f')}"
            f" ρ={_fmt(s[f'rho_{key}'], '.2f')}",
          )
          both = np.concatenate([x, y])
          both = both[np.isfinite(both)]
          if both.size:
            lo, hi = min(lo, both.min()), max(hi, both.max())
      if np.isfinite(lo):
        pad = 0.05 * (hi - lo if hi > lo else abs(hi) + 1e-12)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
      ax.set_title(f"({pair[0]},{pair[1]}) {kind}", fontsize="medium")
      ax.ticklabel_format(style="sci", scilimits=(-2, 3), axis="both")
      ax.grid(alpha=0.3)
      ax.legend(fontsize="x-small")
      if row == len(kinds) - 1:
        ax.set_xlabel("induced loss L(z+δ) − L(z)")
      if col == 0:
        ax.set_ylabel("prediction")
  fig.suptitle(
    "Loss expansion vs real quantization noise, one point per batch"
    " (paper Fig. 3); dashed: y = x"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_noise(
  run: Mapping[str, Any], conventions: Mapping[str, Any], path: str
) -> None:
  """Fig. 6: histograms of δ/Δ per tensor, one line per bit-width."""
  plt = _pyplot()
  limit = float(conventions["hist_range"][1])
  nbins = int(conventions["hist_bins"])
  edges = np.linspace(-limit, limit, nbins + 1)
  centers = 0.5 * (edges[1:] + edges[:-1])
  width = edges[1] - edges[0]
  tensors = [
    ("weights", n, "W") for n in run["pairs"][0]["noise"]["weights"]
  ] + [("acts", n, "A") for n in run["pairs"][0]["noise"]["acts"]]
  ncols = min(4, max(len(tensors), 1))
  nrows = max(1, math.ceil(len(tensors) / ncols))
  fig, axes = plt.subplots(
    nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), squeeze=False
  )
  for idx, (group, name, tag) in enumerate(tensors):
    ax = axes[idx // ncols][idx % ncols]
    seen = set()
    for entry in run["pairs"]:
      b = entry["w_bits"] if tag == "W" else entry["a_bits"]
      if b in seen or name not in entry["noise"][group]:
        continue
      seen.add(b)
      n = entry["noise"][group][name]
      counts = np.asarray(n["counts"], np.float64)
      density = counts / max(counts.sum(), 1.0) / width
      ax.step(
        centers,
        density,
        where="mid",
        label=f"{b} bit (zeros {100 * n['zero_fraction']:.0f} %,"
        f" clipped {100 * n['clipped_fraction']:.1f} %)",
      )
    ax.plot([-0.5, -0.5, 0.5, 0.5], [0, 1, 1, 0], "k:", lw=0.8)
    if tag == "A":
      # Exact zeros (ReLU outputs that stay 0) make a spike far above the rest.
      ax.set_yscale("log")
    else:
      ax.set_ylim(0, max(1.6, ax.get_ylim()[1]))
    ax.set_title(f"{tag} {name}", fontsize="medium")
    ax.set_xlabel("δ / Δ")
    ax.legend(fontsize="xx-small")
    ax.grid(alpha=0.3)
  for idx in range(len(tensors), nrows * ncols):
    axes[idx // ncols][idx % ncols].axis("off")
  fig.suptitle(
    f"{run['run']}: quantization noise per tensor (paper Fig. 6);"
    " dotted: uniform on [−½, ½]"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_training_log(report: Mapping[str, Any], path: str) -> None:
  """Fig. 7: cross-entropy, penalty and gradient ℓ1 norms over training."""
  plt = _pyplot()
  runs = [r for r in report["runs"] if r.get("training_log")]
  fig, axes = plt.subplots(
    1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False
  )
  for ax, run in zip(axes[0], runs):
    log = run["training_log"]
    steps = np.asarray(log["step"], np.float64)
    curves = (
      ("cross_entropy", "cross-entropy"),
      ("penalty", "penalty λ‖∇L‖"),
      ("weight_grad_l1", "‖∇W L‖₁ (train batch)"),
      ("act_grad_l1", "‖∇A L‖₁ (train batch)"),
    )
    for i, (key, name) in enumerate(curves):
      y = _finite(log[key])
      if not np.any(np.isfinite(y) & (y > 0)):
        continue  # e.g. no penalty in an unregularized run
      ax.plot(
        steps, np.where(y > 0, y, np.nan), label=name, lw=1.2, color=f"C{i}"
      )
    reg = _finite(log["regularized"])
    if np.any(reg > 0):
      on = steps[reg > 0]
      ax.axvspan(
        on.min(), on.max(), color="0.5", alpha=0.12, label="penalty on"
      )
    phases = np.asarray(log["phase"])
    if np.any(phases == 0):
      ax.axvline(
        steps[phases == 1].min(),
        color="k",
        ls=":",
        lw=0.8,
        label="fine-tune starts",
      )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{run['run']} ({run['method']})", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
  fig.suptitle("Training log (paper Fig. 7)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
