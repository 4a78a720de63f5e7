"""The embedded demo (scripts/demo.sh) end to end, in reduced form.

The demo is the digits study (configs/studies/digits.py through study.py):
here with one seed, one epoch per run, a tiny model and short grids, so CI
notices when a flag, a file or a table breaks. The numbers are meaningless at
this size; the README's table comes from the full demo.
"""

import json
import os
import subprocess
import sys

from conftest import ROOT
import pytest

TINY = [
  "--config.seeds=0",
  "--config.base_epochs=1",
  "--config.finetune_epochs=1",
  "--config.train.model_kwargs.width=4",
  "--config.lambda_grid=0.01,0.1",
  "--config.l2_lambda_grid=1.0",
  "--config.bits=8:8,3:3",
  "--config.fd_cosine_batches=2",
  "--config.extra_lambda_grids.l1_bound44=0.5",
]
LABELS = ["none", "ℓ1 exact", "ℓ1 finite diff.", "ℓ2", "DQ", "STE"]


@pytest.mark.slow
def test_demo_runs_the_digits_study_and_prints_its_table(tmp_path):
  out = tmp_path / "demo_out"
  env = dict(
    os.environ,
    PYTHON=sys.executable,
    DEMO_OUT=str(out),
    # As tests/conftest.py: compile time dominates on small graphs.
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "scripts", "demo.sh"), *TINY],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  stdout = proc.stdout
  # The command is shown before it runs, as a user would type it.
  assert stdout.splitlines()[0].startswith("+ ")
  assert "study.py --config configs/studies/digits.py" in stdout
  for ext in ("md", "json", "csv", "png"):
    assert os.path.getsize(out / f"study.{ext}") > 0
  report = json.load(open(out / "study.json"))
  extra = ["ste_unfolded", "l1_bound44", "l1_cd", "l1_fd_short"]
  assert report["methods"][-4:] == extra
  # The printed table is the study's first one: a row per method, FP first.
  table = stdout[stdout.index("=== Demo done") :]
  assert "| method | n | FP | (8,8) | (3,3) |" in table
  for label in LABELS + extra:
    assert f"| {label}" in table
