"""Smoke run of benchmarks/step_time.py: it builds, runs and reports (no timings asserted)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  path = os.path.join(ROOT, "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_step_time_smoke_on_digits(tmp_path):
  step_time = _load("step_time")
  out = tmp_path / "digits.json"
  result = step_time.main([
      "--models", "digits", "--digits-width", "4", "--digits-batch", "16",
      "--variants", "plain,l1_hvp,l1_fd", "--repeats", "1", "--steps", "1",
      "--warmup", "0", "--quiet", "--out", str(out)])
  stored = json.loads(out.read_text())
  assert stored["models"][0]["model"] == "digits"
  rows = result["models"][0]["variants"]
  assert set(rows) == {"plain", "l1_hvp", "l1_fd"}
  for row in rows.values():
    assert row["median_s"] > 0 and row["images_per_s"] > 0
    assert row["flops"] > 0 and row["memory"]["peak_bytes"] > 0
  assert rows["plain"]["ratio_to_plain"] == 1.0
  # XLA's flop count is deterministic: the exact penalty costs more than a
  # plain step (one HVP), the finite difference about one more gradient.
  assert rows["l1_hvp"]["flops_ratio"] > rows["l1_fd"]["flops_ratio"] > 1.0
  table = (tmp_path / "digits.md").read_text()
  assert "| l1_hvp |" in table
