"""Reliability: kill and resume, SIGTERM, divergence, bad input, reproducibility.

The subprocess tests run ``train.py`` as a user would. They all set
``JAX_DISABLE_MOST_OPTIMIZATIONS`` (compiles ~30 % faster on CPU), and compare
only runs made under the same setting, so "bit for bit" holds. Bad config
values are checked in this process (the trainer raises a ``UserError``, which
``train.py`` prints as one paragraph with exit 2); a few subprocess cases
check that path itself: flag parsing, exit code, no traceback.
"""

import fcntl
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
from conftest import ROOT
from conftest import history
import jax
import numpy as np
import pytest
from tiny_configs import tiny_digits

from l1grad import checkpoint
from l1grad import config_lib
from l1grad import run_guard
from l1grad import train
from l1grad.errors import CheckpointError
from l1grad.errors import UserError
from l1grad.errors import WorkdirError

ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")

# A run long enough to be interrupted on purpose: 2 epochs × 89 steps, of
# which a few seconds remain after its first checkpoint (step 10 with
# checkpoint_every_steps=10) or its "step 20" line.
LONG = (
  "--config.model_kwargs.width=4",
  "--config.num_epochs=2",
  "--config.batch_size=16",
  "--config.log_every_steps=5",
  "--config.eval_every_epochs=-1",
  "--config.max_eval_examples=64",
)
LONG_STEPS = 2 * 89
# metrics.jsonl of an interrupted-and-resumed LONG run saving every 10 (or
# 100000) steps: one row per 5 steps and the last, each exactly once.
LONG_ROWS = [
  s for s in range(1, LONG_STEPS + 1) if s % 5 == 0 or s == LONG_STEPS
]
# tiny_configs.tiny_digits as flags (the batch size is digits.py's, 64).
TINY = (
  "--config.model_kwargs.width=4",
  "--config.num_epochs=2",
  "--config.log_every_steps=1",
  "--config.eval_every_epochs=-1",
)


def _cmd(workdir, *overrides):
  return [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    "--config",
    os.path.join(ROOT, "configs", "digits.py"),
    "--workdir",
    str(workdir),
    *overrides,
  ]


def _run(workdir, *overrides, env=None, timeout=300):
  return subprocess.run(
    _cmd(workdir, *overrides),
    cwd=ROOT,
    env=env or ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _finalized_steps(workdir):
  """Checkpoint steps whose folder Orbax has renamed into place."""
  directory = checkpoint.checkpoint_dir(str(workdir))
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The LONG run straight through: what every interrupted run must equal."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = _run(workdir, *LONG)
  assert result.returncode == 0, result.stderr
  run = checkpoint.load_run(str(workdir))
  assert run.step == LONG_STEPS
  return run


def test_sigkill_then_rerun_equals_an_uninterrupted_run(
  tmp_path, uninterrupted
):
  workdir = tmp_path / "killed"
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(
    _cmd(workdir, *LONG, "--config.checkpoint_every_steps=10"),
    cwd=ROOT,
    env=ENV,
    stdout=log,
    stderr=log,
  )
  try:
    deadline = time.time() + 240
    while not _finalized_steps(workdir):
      assert proc.poll() is None, open(tmp_path / "killed.log").read()
      assert time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
  latest = _finalized_steps(workdir)[-1]
  assert latest < LONG_STEPS

  # What a kill in the middle of a save leaves: a temporary folder holding
  # part of a newer step. It must be ignored (and cleaned away).
  ckpt_dir = checkpoint.checkpoint_dir(str(workdir))
  partial = os.path.join(ckpt_dir, f"{latest + 5}.orbax-checkpoint-tmp-1")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "truncated"), "wb") as f:
    f.write(b"\0" * 10)
  # metrics.jsonl may hold rows past the checkpoint; they must be dropped.
  assert checkpoint.load_run(str(workdir)).step == latest

  result = _run(workdir, *LONG, "--config.checkpoint_every_steps=10")
  assert result.returncode == 0, result.stderr
  assert f"Resumed from step {latest}" in result.stdout
  assert not os.path.exists(partial)
  resumed = checkpoint.load_run(str(workdir))
  assert resumed.step == LONG_STEPS
  chex.assert_trees_all_equal(resumed.params, uninterrupted.params)
  chex.assert_trees_all_equal(resumed.batch_stats, uninterrupted.batch_stats)
  assert [r["step"] for r in history(str(workdir))] == LONG_ROWS


def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(
  tmp_path, uninterrupted
):
  workdir = tmp_path / "preempted"
  # No scheduled save before the end: the only checkpoint can come from the
  # signal.
  overrides = (*LONG, "--config.checkpoint_every_steps=100000")
  proc = subprocess.Popen(
    _cmd(workdir, *overrides),
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    for line in proc.stdout:
      if line.startswith("step 20/"):
        proc.send_signal(signal.SIGTERM)
        break
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err
  assert "Traceback" not in err
  stopped = re.search(
    r"Stopped by SIGTERM after step (\d+) of (\d+); saved"
    r" checkpoint (\d+)",
    out,
  )
  assert stopped, out[-2000:]
  step = int(stopped.group(1))
  assert 20 <= step < LONG_STEPS and int(stopped.group(3)) == step
  assert _finalized_steps(workdir) == [step]
  rows = history(str(workdir))
  assert rows[-1]["step"] <= step  # the stop itself adds no row

  result = _run(workdir, *overrides)
  assert result.returncode == 0, result.stderr
  assert f"Resumed from step {step}" in result.stdout
  resumed = checkpoint.load_run(str(workdir))
  assert resumed.step == LONG_STEPS
  chex.assert_trees_all_equal(resumed.params, uninterrupted.params)
  chex.assert_trees_all_equal(resumed.batch_stats, uninterrupted.batch_stats)
  assert [r["step"] for r in history(str(workdir))] == LONG_ROWS


def _popen_interruptible(workdir, *overrides):
  # A background job of a non-interactive shell (and so maybe this test)
  # starts with SIGINT ignored, which Python keeps: restore the default, as
  # an interactive shell gives a foreground command.
  # (A Python trampoline rather than preexec_fn: forking a process that runs
  # JAX threads is unsafe.)
  restore_then_exec = (
    "import os, signal, sys;"
    " signal.signal(signal.SIGINT, signal.SIG_DFL);"
    " os.execv(sys.executable, sys.argv[1:])"
  )
  return subprocess.Popen(
    [sys.executable, "-c", restore_then_exec, *_cmd(workdir, *overrides)],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_ctrl_c_saves_the_current_step_exits_130_and_resumes_exactly(
  tmp_path, uninterrupted
):
  workdir = tmp_path / "interrupted"
  overrides = (*LONG, "--config.checkpoint_every_steps=100000")
  proc = _popen_interruptible(workdir, *overrides)
  try:
    for line in proc.stdout:
      if line.startswith("step 20/"):
        proc.send_signal(signal.SIGINT)
        break
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err
  assert "Traceback" not in err and "Fatal Python error" not in err, err
  stopped = re.search(
    r"Stopped by SIGINT after step (\d+) of (\d+); saved"
    r" checkpoint (\d+)",
    out,
  )
  assert stopped, out[-2000:]
  step = int(stopped.group(1))
  assert 20 <= step < LONG_STEPS and _finalized_steps(workdir) == [step]
  assert not os.path.exists(workdir / ".lock")

  result = _run(workdir, *overrides)
  assert result.returncode == 0, result.stderr
  assert f"Resumed from step {step}" in result.stdout
  resumed = checkpoint.load_run(str(workdir))
  assert resumed.step == LONG_STEPS
  chex.assert_trees_all_equal(resumed.params, uninterrupted.params)
  chex.assert_trees_all_equal(resumed.batch_stats, uninterrupted.batch_stats)
  assert [r["step"] for r in history(str(workdir))] == LONG_ROWS


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
  workdir = tmp_path / "twice"
  proc = _popen_interruptible(
    workdir, *LONG, "--config.checkpoint_every_steps=100000"
  )
  err_before = []
  try:
    for line in proc.stdout:
      if line.startswith("step 20/"):
        proc.send_signal(signal.SIGINT)
        # The second Ctrl-C once the first one's handler has run (it says
        # so on stderr): two signals that arrive while the main thread is
        # inside one C call reach Python as one.
        for err_line in proc.stderr:
          err_before.append(err_line)
          if err_line.startswith("SIGINT: finishing the current step"):
            break
        proc.send_signal(signal.SIGINT)
        break
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  err = "".join(err_before) + err
  assert proc.returncode == 130, err
  assert "again: stopping at once, without saving" in err
  assert "Traceback" not in err and "Fatal Python error" not in err, err


def test_divergence_stops_with_step_loss_parts_and_last_good_checkpoint(
  tmp_path,
):
  # The learning rate jumps ×1e9 after epoch 1 (a "step" schedule): the run
  # diverges a few steps after its epoch-1 checkpoint at step 22.
  result = _run(
    tmp_path,
    *TINY,
    "--config.schedule=step",
    "--config.step_epochs=(1,)",
    "--config.step_factor=1e9",
  )
  assert result.returncode == 1, result.stderr
  err = result.stderr
  assert "Traceback" not in err
  match = re.search(
    r"Non-finite loss or gradient at step (\d+)/44 \((.*?)\)", err
  )
  assert match, err
  assert int(match.group(1)) > 22
  for part in (
    "cross_entropy=",
    "weight_penalty=",
    "act_penalty=",
    "dq_penalty=",
    "penalty=",
    "total_loss=",
    "grad_norm=",
    "learning_rate=",
  ):
    assert part in match.group(2)
  assert (
    "last good checkpoint is step 22 in"
    f" {checkpoint.checkpoint_dir(str(tmp_path))}"
  ) in err
  steps = _finalized_steps(tmp_path)
  assert steps == [22]
  mngr = checkpoint.manager(str(tmp_path), read_only=True)
  try:
    for step in steps:
      state, _, stored_rows = checkpoint.restore(mngr, step, None)
      for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
      assert all(np.isfinite(r["total_loss"]) for r in stored_rows)
  finally:
    mngr.close()
  assert all(np.isfinite(r["total_loss"]) for r in history(str(tmp_path)))


def test_every_pending_step_is_checked_not_only_the_logged_one():
  finite = {k: np.float32(1.0) for k in run_guard.REPORTED + run_guard.WATCHED}
  bad = dict(
    finite, cross_entropy=np.float32(np.nan), total_loss=np.float32(np.nan)
  )
  pending = [(4, finite), (5, bad), (6, finite), (7, finite)]
  with pytest.raises(
    run_guard.TrainingDivergedError,
    match=r"at step 6/9 \(cross_entropy=nan.*last good"
    r" checkpoint is step 3",
  ):
    run_guard.check_finite(pending, 3, "/w", 9)
  overflow = dict(finite, update_norm=np.float32(np.inf))
  with pytest.raises(
    run_guard.TrainingDivergedError,
    match="Non-finite parameter update at step 1/9.*no checkpoint",
  ):
    run_guard.check_finite([(0, overflow)], None, "/w", 9)
  run_guard.check_finite([(0, finite)], None, "/w", 9)


def test_a_non_finite_state_is_never_saved():
  state = train.TrainState(
    step=np.int32(3),
    params={"w": np.ones(3, np.float32)},
    batch_stats={"mean": np.array([0.0, np.inf], np.float32)},
    opt_state=(),
  )
  with pytest.raises(
    run_guard.TrainingDivergedError, match="without saving step 3"
  ):
    run_guard.check_state_finite(state, 3, 2, "/w")
  run_guard.check_state_finite(state.replace(batch_stats={}), 3, 2, "/w")


@pytest.fixture(scope="module")
def source_run(tiny_runs):
  """A finished one-step run: an init_from source and an occupied workdir."""
  return tiny_runs(max_steps=1)


def _paths(tmp_path, source_run):
  """The placeholders of the cases below, with their folders created."""
  empty = tmp_path / "empty"
  os.makedirs(empty / "checkpoints")
  empty_data = tmp_path / "tfds"
  os.makedirs(empty_data)
  return {
    "tmp": tmp_path,
    "empty": empty,
    "source": source_run,
    "empty_data": empty_data,
    "root": ROOT,
  }


def _assert_nothing_started(tmp_path, stdout):
  assert "Training " not in stdout  # stopped before the loop
  assert not _finalized_steps(tmp_path / "run")
  assert not os.path.exists(tmp_path / "run" / ".lock")


# Bad values the trainer refuses before anything compiles: (name, config
# file, overrides, workdir, environment, text the message must contain).
# "{tmp}" etc. are the folders of _paths; tiny_digits' fields as in TINY.
_TINY = {
  "model_kwargs.width": 4,
  "num_epochs": 2,
  "log_every_steps": 1,
  "eval_every_epochs": -1,
}
_BAD_CONFIGS = [
  (
    "bits",
    "digits",
    {"qat.bits": "1:4"},
    None,
    None,
    ["config.qat.bits", "between 2 and 16"],
  ),
  (
    "bits_high",
    "digits",
    {"qat.bits": "8:17"},
    None,
    None,
    ["config.qat.bits", "between 2 and 16"],
  ),
  (
    "weight_coef",
    "digits",
    {"reg.weight_coef": -0.1},
    None,
    None,
    ["config.reg.weight_coef", "negative", ">= 0"],
  ),
  (
    "act_coef",
    "digits",
    {"reg.act_coef": -2.0},
    None,
    None,
    ["config.reg.act_coef", "negative", "-1"],
  ),
  (
    "reg_kind",
    "digits",
    {"reg.kind": "l3"},
    None,
    None,
    ["config.reg.kind", "'l3'", "none, l1, l2, dq"],
  ),
  (
    "model",
    "digits",
    {"model": "resnet99"},
    None,
    None,
    ["config.model", "'resnet99'", "digits_cnn"],
  ),
  (
    "dataset",
    "digits",
    {"dataset": "mnist"},
    None,
    None,
    ["config.dataset", "'mnist'", "cifar10"],
  ),
  (
    "last_epochs",
    "digits",
    {"reg.kind": "l1", "reg.last_epochs": 5, "num_epochs": 2},
    None,
    None,
    ["config.reg.last_epochs", "longer than the run", "num_epochs=2"],
  ),
  # 8 devices as jax.device_count() reports them (the trainer on 8 real
  # devices: test_train.py::test_one_and_eight_devices_take_the_same_steps).
  (
    "batch_vs_devices",
    "digits",
    {"batch_size": 12},
    None,
    {"devices": 8},
    ["config.batch_size", "(12)", "8 device(s)", "divisible by 8"],
  ),
  (
    "init_from_missing",
    "digits",
    {"init_from": "{tmp}/nowhere"},
    None,
    None,
    ["config.init_from", "does not exist", "--workdir of a finished"],
  ),
  (
    "init_from_empty",
    "digits",
    {"init_from": "{empty}"},
    None,
    None,
    [
      "config.init_from: ",
      "holds no complete checkpoint",
      "Re-run the training command",
    ],
  ),
  (
    "init_from_other_model",
    "digits",
    {"init_from": "{source}", **_TINY, "model_kwargs.width": 8},
    None,
    None,
    [
      "do not match",
      "model_kwargs {{'width': 4}}",
      "params/",
      "(4,) float32 there and (8,) float32 here",
      "--config.model_kwargs",
    ],
  ),
  (
    "workdir_of_another_run",
    "digits",
    {**_TINY, "seed": 1},
    "{source}",
    None,
    [
      "holds a run of a different config",
      "seed: checkpoint 0, now 1",
      "new --workdir",
    ],
  ),
  (
    "missing_cifar",
    "digits",
    {"dataset": "cifar10", "model": "tiny_vgg", "data_dir": "{empty_data}"},
    None,
    None,
    [
      "'cifar10'",
      "not prepared",
      "tfds build cifar10 --file_format=array_record --data_dir={empty_data}",
    ],
  ),
  (
    "coef_without_kind",
    "digits",
    {"reg.weight_coef": 0.1},
    None,
    None,
    [
      "config.reg.kind",
      "reg.weight_coef=0.1",
      "silently ignored",
      "--config.reg.kind=l1",
    ],
  ),
  (
    "act_coef_without_kind",
    "digits",
    {"reg.act_coef": 0.2},
    None,
    None,
    ["config.reg.kind", "reg.act_coef=0.2", "--config.reg.kind=l1"],
  ),
  # The paper's headline configs on a fresh machine: no data in the
  # default data dir (tfds raises a KeyError there, not its usual error).
  # imagenet_r18 is a subprocess case below.
  *[
    (
      f"headline_{name}",
      name,
      {},
      None,
      {"TFDS_DATA_DIR": "{empty_data}"},
      [
        f"'{dataset}'",
        "not prepared",
        f"tfds build {dataset}"
        " --file_format=array_record --data_dir={empty_data}",
      ],
    )
    for name, dataset in (
      ("cifar10_vgg", "cifar10"),
      ("cifar10_r18", "cifar10"),
    )
  ],
]


def _formatted(value, paths):
  return value.format(**paths) if isinstance(value, str) else value


@pytest.mark.parametrize(
  "name,config_file,overrides,workdir,env,expected",
  _BAD_CONFIGS,
  ids=[c[0] for c in _BAD_CONFIGS],
)
def test_bad_config_is_a_user_error_before_compiling(
  tmp_path,
  source_run,
  monkeypatch,
  capsys,
  name,
  config_file,
  overrides,
  workdir,
  env,
  expected,
):
  del name
  paths = _paths(tmp_path, source_run)
  config = importlib.import_module(f"configs.{config_file}").get_config()
  config.update_from_flattened_dict(
    {k: _formatted(v, paths) for k, v in overrides.items()}
  )
  for key, value in (env or {}).items():
    if key == "devices":
      monkeypatch.setattr(jax, "device_count", lambda n=value: n)
    else:
      monkeypatch.setenv(key, _formatted(value, paths))
  workdir = _formatted(workdir, paths) if workdir else str(tmp_path / "run")
  with pytest.raises(UserError) as raised:
    train.train_and_evaluate(config, workdir)
  message = str(raised.value)
  for text in expected:
    assert text.format(**paths) in message, message
  _assert_nothing_started(tmp_path, capsys.readouterr().out)


# What only the command shows: flag parsing, exit 2, no traceback, and one
# headline config end to end (data missing).
_BAD_COMMANDS = [
  (
    "unknown_field",
    ["--config.foo=1"],
    None,
    ["--config.foo", "no such field", "configs/default.py"],
  ),
  (
    "typo_field",
    ["--config.reg.kindd=l1"],
    None,
    ["--config.reg.kindd", 'Did you mean "kind"'],
  ),
  (
    "bad_value",
    ["--config.batch_size=abc"],
    None,
    ["--config.batch_size=abc", "--helpshort"],
  ),
  (
    "headline_imagenet_r18",
    ["--config={root}/configs/imagenet_r18.py"],
    {"TFDS_DATA_DIR": "{empty_data}"},
    [
      "'imagenet2012'",
      "not prepared",
      "tfds build imagenet2012"
      " --file_format=array_record --data_dir={empty_data}",
    ],
  ),
]


@pytest.mark.parametrize(
  "name,overrides,env,expected",
  _BAD_COMMANDS,
  ids=[c[0] for c in _BAD_COMMANDS],
)
def test_bad_input_is_one_paragraph_exit_2_before_compiling(
  tmp_path, name, overrides, env, expected
):
  del name
  paths = _paths(tmp_path, source_run=None)
  overrides = [o.format(**paths) for o in overrides]
  env = {k: v.format(**paths) for k, v in (env or {}).items()}
  result = _run(tmp_path / "run", *overrides, env=dict(ENV, **env))
  err = result.stderr
  assert result.returncode == 2, err
  assert "Traceback" not in err
  assert "error: " in err, err
  # Only library log lines (absl format, e.g. tfds noting an empty folder)
  # may come before the error paragraph.
  before, message = err[: err.index("error: ")], err[err.index("error: ") :]
  assert all(re.match(r"[IWEF]\d{4} ", line) for line in before.splitlines()), (
    err
  )
  for text in expected:
    assert text.format(**paths) in message, err
  _assert_nothing_started(tmp_path, result.stdout)


def test_a_second_trainer_in_the_same_workdir_is_refused(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, ".lock"), "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write("12345")
    held.flush()
    with pytest.raises(WorkdirError, match=r"pid 12345\) is running"):
      train.train_and_evaluate(tiny_digits(max_steps=1), workdir)


def test_two_identical_runs_agree_exactly_and_store_their_settings(tmp_path):
  # Regularized from step 0 (the penalty's HVP must be deterministic too),
  # evaluated at the end, a checkpoint after every step.
  config = tiny_digits(
    max_steps=3,
    checkpoint_every_steps=1,
    seed=7,
    **{"reg.kind": "l1", "reg.weight_coef": 0.01},
  )
  handler = signal.getsignal(signal.SIGTERM)
  a = train.train_and_evaluate(config, str(tmp_path / "a"))
  b = train.train_and_evaluate(config, str(tmp_path / "b"))
  assert signal.getsignal(signal.SIGTERM) is handler  # restored after the run
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)
  rows_a, rows_b = history(str(tmp_path / "a")), history(str(tmp_path / "b"))
  assert len(rows_a) == 3 and "test_accuracy" in rows_a[-1]
  assert rows_a[-1]["penalty"] > 0
  for ra, rb in zip(rows_a, rows_b):
    ra.pop("images_per_sec"), rb.pop("images_per_sec")
    assert ra == rb

  run = checkpoint.load_run(str(tmp_path / "a"))
  assert run.step == 3 and run.config.seed == 7
  assert run.config.to_dict() == json.loads(json.dumps(config.to_dict()))
  chex.assert_trees_all_equal(run.params, a.params)
  mngr = checkpoint.manager(str(tmp_path / "a"), read_only=True)
  try:
    assert mngr.all_steps() == [1, 2, 3]
    for step in mngr.all_steps():  # every step carries the whole config
      assert (
        checkpoint.stored_config(mngr, step).to_dict() == run.config.to_dict()
      )
  finally:
    mngr.close()
  config_lib.check_same_run(config, run.config, str(tmp_path / "a"))


def test_a_half_copied_step_names_itself_and_the_previous_one_still_loads(
  tmp_path,
):
  workdir = str(tmp_path / "run")
  # Also: the embedded digits data ignores data_dir, even a missing one.
  config = tiny_digits(
    max_steps=3,
    checkpoint_every_steps=2,
    data_dir=str(tmp_path / "no_such_dir"),
  )
  train.train_and_evaluate(config, workdir)
  assert _finalized_steps(workdir) == [2, 3]
  step3 = os.path.join(checkpoint.checkpoint_dir(workdir), "3")
  shutil.rmtree(os.path.join(step3, "state"))  # as if copied half-way
  with pytest.raises(
    CheckpointError,
    match=r"(?s)step 3 .*delete that step's"
    r" folder",
  ):
    checkpoint.load_run(workdir)
  shutil.rmtree(step3)
  assert checkpoint.load_run(workdir).step == 2
