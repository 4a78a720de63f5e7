"""What the test files share: JAX settings, helpers, and tiny trained runs.

* Compile-time settings: CPU compiles are the suite's main cost on 2 cores.
* Helpers (import them: ``from conftest import ROOT, history``): ``ROOT``,
  :func:`history` (a run's ``metrics.jsonl``), :func:`load_script` (a
  top-level script such as ``eval_ptq.py`` as a module) and
  :func:`run_main` (a script's ``main`` as its command line would run it).
* Session fixtures, each training once per test session (per xdist worker):
  ``tiny_runs`` (a function: ``tiny_runs(**overrides)`` is the workdir of a
  finished ``tiny_configs.tiny_digits(**overrides)`` run, trained on first
  use and shared by every test that asks for the same overrides), and
  ``tiny_run``, the whole default tiny run (2 epochs, 44 steps). Tests must
  not write into these workdirs: copy one first.
"""

from collections.abc import Callable
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from types import ModuleType
from typing import Any

from absl import flags
from absl import logging
import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's optimisation passes dominate compile time on small test graphs and do
# not change the math the tests check (flax examples/imagenet does the same).
jax.config.update("jax_disable_most_optimizations", True)

# One persistent compilation cache for this session and every process it
# starts (they inherit the environment): the many tiny runs compile the same
# few programs. A cached executable is the one XLA compiled, so runs stay bit
# for bit what they would be without it. Set before any test module imports,
# so no compile happens before the cache is configured.
_CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp(
  prefix="l1grad-tests-jax-cache-"
)
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
_CACHE_ENV = {
  "JAX_COMPILATION_CACHE_DIR": _CACHE_DIR,
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
os.environ.update(_CACHE_ENV)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def history(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The rows of a run's ``metrics.jsonl``, oldest first."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def load_script(path: str, name: str | None = None) -> ModuleType:
  """A Python file of the repository (e.g. ``"eval_ptq.py"``) as a module.

  Loaded once and kept in ``sys.modules`` under ``name`` (default: the file
  name without ``.py``), so absl flags are defined only once.

  Args:
    path: the file, relative to the repository root.
    name: the module name.
  """
  name = name or os.path.splitext(os.path.basename(path))[0]
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, path)
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
  return sys.modules[name]


def run_main(path: str, *argv: str) -> Any:
  """Runs a script's ``main`` as ``python PATH ARGV`` would, in this process.

  Flags are parsed by absl (no usage-error conversion), and reset after, as
  is absl's verbosity. ``SystemExit`` (e.g. exit 2 on bad input) propagates.
  """
  module = load_script(path)
  script = os.path.basename(path)
  verbosity = logging.get_verbosity()
  flags.FLAGS.unparse_flags()
  flags.FLAGS([script, *argv])
  try:
    return module.main([script])
  finally:
    flags.FLAGS.unparse_flags()
    logging.set_verbosity(verbosity)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> Callable[..., str]:
  """``tiny_runs(**overrides)``: the workdir of a finished tiny digits run.

  ``overrides`` are ``tiny_configs.tiny_digits``'s (dotted keys). Each
  distinct set trains once per session; later calls return the same folder.
  """
  # pylint: disable=g-import-not-at-top
  from tiny_configs import tiny_digits

  from l1grad import train
  # pylint: enable=g-import-not-at-top

  done: dict[tuple[tuple[str, Any], ...], str] = {}

  def get(**overrides: Any) -> str:
    key = tuple(sorted(overrides.items()))
    if key not in done:
      workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
      train.train_and_evaluate(tiny_digits(**overrides), workdir)
      done[key] = workdir
    return done[key]

  return get


@pytest.fixture(scope="session")
def tiny_run(tiny_runs) -> str:
  """The default tiny digits run to its end: 2 epochs, 44 steps, unregularized."""
  return tiny_runs()


def copy_run(source: str, destination: str | os.PathLike[str]) -> str:
  """A copy of a shared run's workdir that a test may write into."""
  shutil.copytree(source, destination, ignore=shutil.ignore_patterns(".lock"))
  return str(destination)
