"""The embedded demo (scripts/demo.sh) end to end, in reduced form.

One seed, one epoch of base training and of each fine-tune, a tiny model:
the same commands the demo runs (train.py for every method, one eval_ptq.py
grouped by method), so CI notices when a flag, a file or a table breaks. The
numbers are meaningless at this size; the README's table comes from the full
demo.
"""

import json
import os
import subprocess
import sys

from conftest import ROOT
import pytest

METHODS = [
  "none",
  "l1 λ=0.02",
  "l1 λ=0.05",
  "l2 λ=5",
  "dq β=0.01",
  "ste 3:2",
  "ste 3:2 unfolded",
]


@pytest.mark.slow
def test_demo_runs_every_method_and_writes_the_grouped_report(tmp_path):
  out = tmp_path / "demo_out"
  env = dict(
    os.environ,
    PYTHON=sys.executable,
    DEMO_OUT=str(out),
    DEMO_SEEDS="1",
    DEMO_EPOCHS="1",
    DEMO_FT_EPOCHS="1",
    DEMO_WIDTH="4",
    DEMO_BITS="8:8,3:3",
    # As tests/conftest.py: compile time dominates on small graphs.
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "scripts", "demo.sh")],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  stdout = proc.stdout

  # Every command is shown before it runs, as a user would type it.
  commands = [line for line in stdout.splitlines() if line.startswith("+ ")]
  assert len(commands) == 9
  assert sum(" train.py " in c for c in commands) == 8
  assert " eval_ptq.py " in commands[-1] and "--group_by method" in commands[-1]
  assert "[9/9," in stdout and "Demo done" in stdout

  for ext in ("md", "json", "csv", "png"):
    assert os.path.getsize(out / f"ptq.{ext}") > 0
  report = json.load(open(out / "ptq.json"))
  assert report["group_by"] == "method"
  assert [r["method"] for r in report["runs"]] == METHODS
  assert all(r["step"] == 22 for r in report["runs"])  # the same steps each
  # The printed table is the grouped one, one row per method, FP first.
  table = stdout[stdout.index("=== Demo done") :]
  assert "| method | n | FP | (8,8) | (3,3) |" in table
  for method in METHODS:
    assert f"| {method}" in table
