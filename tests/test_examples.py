"""The research examples (examples/*.py) run, small, on the public API.

Each runs in this process at its ``--small`` size (the conftest's compile
settings apply) and must print a passing verification: for
``second_order.py`` the Hutchinson estimate against ½·δᵀHδ of real uniform
noise, and the mean induced loss against the antithetic gap, each within
four standard errors of its Monte-Carlo mean; for ``custom_penalty.py`` the
user term against a coefficient table and plain ``jax.grad``.
"""

import ast
import importlib
import os

from conftest import ROOT
from conftest import load_script
import numpy as np
import pytest

EXAMPLES = ("examples/second_order.py", "examples/custom_penalty.py")


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_uses_only_the_public_api(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  modules = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "l1grad":
      for alias in node.names:
        modules[alias.asname or alias.name] = alias.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      assert not node.module.startswith("l1grad."), node.module
  assert modules, "the example imports no l1grad module"
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in modules
    ):
      module = importlib.import_module(f"l1grad.{modules[node.value.id]}")
      assert node.attr in module.__all__, (path, node.value.id, node.attr)


def test_second_order_example(capsys):
  example = load_script("examples/second_order.py")
  out = example.main(["--small"])
  printed = capsys.readouterr().out
  assert "verification (4 s.e.): PASS" in printed, printed
  assert out["ok"]
  assert set(out["times"]) == {"plain", "l1", "l1+hutchinson", "l1+antithetic"}
  for bits, est in out["estimates"].items():
    (hutch, h_err), (curv, c_err) = est["hutchinson"], est["curvature"]
    assert hutch > 0 and curv > 0, (bits, est)
    assert abs(hutch - curv) < 4 * np.hypot(h_err, c_err), (bits, est)
  # Coarser grids, larger noise: the expected loss change grows.
  assert (
    out["estimates"][8]["curvature"][0]
    < out["estimates"][4]["curvature"][0]
    < out["estimates"][3]["curvature"][0]
  )


def test_custom_penalty_example(capsys):
  example = load_script("examples/custom_penalty.py")
  out = example.main(["--small"])
  printed = capsys.readouterr().out
  assert "verification (extra = table = plain jax.grad): PASS" in printed
  assert out["ok"]
  assert out["after"] < out["before"]
