"""A real multi-process run: 2 processes × 2 CPU devices on 127.0.0.1.

``train.py --multihost`` with explicit ``--coordinator_address``,
``--num_processes`` and ``--process_id``, as two shells on one machine would
start it (CPU collectives through gloo). Checked against a 1-process run over
4 devices with the same global batch: the same loss, ℓ1 penalty and gradient
norms (to 2e-3 relative; the sign tangent of the ℓ1 penalty amplifies the
float-level difference between the two all-reduce orders, while the mean of
each process's half-batch penalty would be 18 % off at step 1), one
checkpoint a 1-device process evaluates, and a run that loses a process
stops instead of hanging and resumes when both are restarted.

About 2 minutes on 2 CPU cores (five training runs; the 2-process ones share
a persistent compilation cache). Every subprocess has a timeout; nothing
listens beyond the loopback interface except gloo's pair sockets, which bind
to the address this host's name resolves to (see README, "Several devices
and hosts").
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
from conftest import ROOT
from conftest import history
import numpy as np
import pytest

from l1grad import checkpoint
from l1grad import distributed
from l1grad.errors import ConfigError

# 1 epoch of 22 steps at a global batch of 64 (16 per device), ℓ1 from step 0,
# a checkpoint every 6 steps, evaluation on 128 test images at the end.
OVERRIDES = (
  "--config.model_kwargs.width=4",
  "--config.num_epochs=1",
  "--config.batch_size=64",
  "--config.log_every_steps=1",
  "--config.eval_every_epochs=-1",
  "--config.max_eval_examples=128",
  "--config.reg.kind=l1",
  "--config.reg.weight_coef=0.02",
  "--config.checkpoint_every_steps=6",
)
STEPS = 22
# The logged values that must not depend on how the devices are spread over
# processes.
COMPARED = (
  "cross_entropy",
  "penalty",
  "weight_penalty",
  "act_penalty",
  "weight_grad_l1",
  "act_grad_l1",
  "weight_grad_l2",
  "act_grad_l2",
  "grad_norm",
  "total_loss",
)
RTOL = 2e-3
RUN_TIMEOUT = 300  # seconds, per training run (about 30-60 s on 2 cores)
HEARTBEAT = 10  # --heartbeat_timeout_seconds of the run that loses a process


def _env(devices, cache_dir):
  env = {
    k: v for k, v in os.environ.items() if "_proxy" not in k.lower()
  }  # gRPC would route 127.0.0.1 there
  env.update(
    JAX_PLATFORMS="cpu",
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    # The three 2-process runs compile the same programs: compile once.
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    PYTHONUNBUFFERED="1",
  )
  return env


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, *flags):
  return [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    "--config",
    os.path.join(ROOT, "configs", "digits.py"),
    "--workdir",
    str(workdir),
    *OVERRIDES,
    *flags,
  ]


def _launch_pair(workdir, cache_dir, *flags):
  """Starts processes 0 and 1 of a 2-process run; their output goes to files."""
  port = _free_port()
  env = _env(2, cache_dir)
  # Process 0's coordinator listens on the loopback interface only.
  env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
  procs = []
  for i in range(2):
    log = open(f"{workdir}.p{i}.{time.monotonic_ns()}.log", "w+")
    procs.append(
      (
        subprocess.Popen(
          _train_cmd(
            workdir,
            "--multihost",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            *flags,
          ),
          cwd=ROOT,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
        ),
        log,
      )
    )
  return procs


def _output(log):
  log.flush()
  log.seek(0)
  return log.read()


def _finish(procs, timeout=RUN_TIMEOUT):
  """Waits for both; returns [(returncode, output)], killing them on timeout."""
  deadline = time.monotonic() + timeout
  try:
    for proc, _ in procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
  results = [(p.returncode, _output(log)) for p, log in procs]
  for _, log in procs:
    log.close()
  assert time.monotonic() < deadline, (
    f"a process was still running after {timeout} s:\n"
    + "\n---\n".join(out[-3000:] for _, out in results)
  )
  return results


def _finalized_steps(workdir):
  directory = checkpoint.checkpoint_dir(str(workdir))
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _assert_ok(results):
  for i, (code, out) in enumerate(results):
    assert code == 0, f"process {i} exited {code}:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
  """The reference: the same run in 1 process over 4 devices."""
  workdir = tmp_path_factory.mktemp("one_process") / "run"
  result = subprocess.run(
    _train_cmd(workdir),
    cwd=ROOT,
    env=_env(4, cache_dir),
    capture_output=True,
    text=True,
    timeout=RUN_TIMEOUT,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert "4 device(s)" in result.stdout
  return str(workdir)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, cache_dir):
  """The same run as 2 processes × 2 devices; ``(workdir, outputs)``."""
  workdir = tmp_path_factory.mktemp("two_processes") / "run"
  results = _finish(_launch_pair(workdir, cache_dir))
  _assert_ok(results)
  return str(workdir), [out for _, out in results]


@pytest.mark.slow
def test_two_processes_log_what_one_process_logs(one_process, two_processes):
  workdir, (out0, out1) = two_processes
  assert "4 device(s)" in out0
  assert "step 1/" not in out1  # progress and metrics: process 0 only
  one, two = history(one_process), history(workdir)
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))
  assert [r["step"] for r in one] == [r["step"] for r in two]
  assert two[0]["penalty"] > 0.1 * two[0]["cross_entropy"]  # ℓ1 is on
  worst = {}
  for a, b in zip(one, two):
    for key in COMPARED:
      worst[key] = max(
        worst.get(key, 0.0), abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
      )
  assert max(worst.values()) <= RTOL, worst
  # Evaluation over the test split, each process feeding half of each batch.
  assert one[-1]["test_accuracy"] == two[-1]["test_accuracy"]
  np.testing.assert_allclose(
    two[-1]["test_loss"], one[-1]["test_loss"], rtol=RTOL
  )


@pytest.mark.slow
def test_a_one_device_process_reads_and_evaluates_the_checkpoint(
  tmp_path, two_processes, cache_dir
):
  workdir, _ = two_processes
  assert _finalized_steps(workdir)[-1] == STEPS
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "eval_ptq.py"),
      "--workdir",
      workdir,
      "--bits",
      "8:8",
      "--max_examples",
      "128",
      "--out",
      str(tmp_path / "ptq"),
    ],
    cwd=ROOT,
    env=_env(1, cache_dir),
    capture_output=True,
    text=True,
    timeout=RUN_TIMEOUT,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  with open(tmp_path / "ptq" / "ptq.json") as f:
    (run,) = json.load(f)["runs"]
  assert run["step"] == STEPS
  # The float model on the same 128 images: what the 2-process run logged
  # (up to one image whose top two logits tie within float error).
  logged = history(workdir)[-1]["test_accuracy"]
  assert abs(run["float_accuracy"] - logged) <= 1 / 128 + 1e-9


@pytest.mark.slow
def test_losing_a_process_stops_the_other_and_both_resume(
  tmp_path, two_processes, cache_dir
):
  reference, _ = two_processes
  workdir = tmp_path / "killed"
  procs = _launch_pair(
    workdir, cache_dir, f"--heartbeat_timeout_seconds={HEARTBEAT}"
  )
  (proc0, log0), (proc1, _) = procs
  try:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not _finalized_steps(workdir):
      assert proc0.poll() is None and proc1.poll() is None, _output(log0)
      assert time.monotonic() < deadline, "no checkpoint appeared"
      time.sleep(0.02)
    proc1.send_signal(signal.SIGKILL)
    # JAX's coordination service declares process 1 dead after the
    # heartbeat timeout and terminates process 0 (or its next all-reduce
    # fails at once); it must not wait for a peer that will never come.
    results = _finish(procs, timeout=HEARTBEAT + 60)
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
  (code0, out0), (code1, _) = results
  assert code1 == -signal.SIGKILL, "process 1 ended before the kill"
  assert code0 != 0, f"process 0 finished although process 1 died:\n{out0}"
  # Its next collective failed (one paragraph, exit 3), or JAX's
  # coordination service terminated it (a signal).
  assert (code0 == 3 and "lost its peers" in out0) or code0 < 0, out0[-3000:]
  latest = _finalized_steps(workdir)[-1]
  assert latest < STEPS

  results = _finish(_launch_pair(workdir, cache_dir))
  _assert_ok(results)
  assert f"Resumed from step {latest}" in results[0][1]
  assert _finalized_steps(workdir)[-1] == STEPS

  def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]

  # Bit for bit what the uninterrupted 2-process run logged and saved.
  assert without_timing(history(workdir)) == without_timing(history(reference))
  resumed, uninterrupted = (
    checkpoint.load_run(str(workdir)),
    checkpoint.load_run(reference),
  )
  chex.assert_trees_all_equal(resumed.params, uninterrupted.params)


# --------------------------------------------------------------------------
# Bad settings: one error paragraph, exit 2, nothing started.


@pytest.mark.parametrize(
  "kwargs,expected",
  [
    (dict(coordinator_address="localhost"), "is not HOST:PORT"),
    (dict(coordinator_address="10.0.0.1:99999"), "is not HOST:PORT"),
    (dict(num_processes=0), "needs at least 1"),
    (dict(process_id=-1), "needs 0 or more"),
    (
      dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2),
      "ids run from 0 to 1",
    ),
  ],
)
def test_initialize_rejects_bad_settings_before_starting(kwargs, expected):
  with pytest.raises(ConfigError, match=expected):
    distributed.initialize(**kwargs)


def _no_cluster_env():
  """This machine's environment without any cluster JAX would detect."""
  return {
    k: v
    for k, v in _env(1, "").items()
    if not k.startswith(
      ("SLURM_", "OMPI_", "PMI_", "TPU_", "JAX_COORDINATOR", "JAX_COMPILATION")
    )
  }


@pytest.mark.parametrize(
  "flags,expected",
  [
    (
      ["--num_processes=2", "--process_id=0"],
      "--num_processes/--process_id apply only to a multi-process run",
    ),
    (
      ["--multihost", "--num_processes=2", "--process_id=0"],
      "could not determine the coordinator address: only --num_processes,"
      " --process_id given",
    ),
  ],
)
def test_incomplete_or_stray_multihost_flags_exit_2(tmp_path, flags, expected):
  result = subprocess.run(
    _train_cmd(tmp_path / "run", *flags),
    cwd=ROOT,
    env=_no_cluster_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error: ")
  assert expected in " ".join(result.stderr.split())
  assert "Traceback" not in result.stderr


def test_a_taken_coordinator_port_exits_2(tmp_path):
  # jaxlib may crash (SIGSEGV) rather than raise when it cannot bind.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    env = dict(
      _no_cluster_env(), JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}"
    )
    result = subprocess.run(
      _train_cmd(
        tmp_path / "run",
        "--multihost",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        "--process_id=0",
      ),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
  assert result.returncode == 2, result.stderr
  assert "cannot listen at 127.0.0.1:" in result.stderr
  assert "Traceback" not in result.stderr
