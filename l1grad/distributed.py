"""Starting JAX's distributed runtime for a multi-process (multi-host) run.

``train.py --multihost`` calls :func:`initialize` before anything touches a
device. Every process of the run then executes the same program: JAX joins
their devices into one global mesh, each process feeds its slice of every
global batch, and Orbax saves one checkpoint from all of them together.

Where the three settings come from, per setting:

* the argument, when given (``train.py --coordinator_address``,
  ``--num_processes``, ``--process_id``);
* else ``JAX_COORDINATOR_ADDRESS`` for the address (JAX reads only that one
  variable; there is no ``JAX_NUM_PROCESSES`` or ``JAX_PROCESS_ID``);
* else JAX's cluster auto-detection: SLURM (``srun``), Cloud TPU VMs and
  GKE TPU pods, Open MPI (``mpirun``), or ``mpi4py`` when asked.

On CPU the processes exchange data through gloo over TCP, which this module
selects unless another CPU collectives implementation was chosen.
"""

from __future__ import annotations

import errno
import os
import socket

import jax

from l1grad.errors import ConfigError

__all__ = ["initialize"]

_HOW = (
  " Pass --coordinator_address HOST:PORT (process 0's address, the same on"
  " every process), --num_processes N and --process_id I (0 to N-1, a"
  " different one per process), or start the processes with a launcher"
  " JAX detects (SLURM srun, a Cloud TPU or GKE TPU pod, Open MPI mpirun),"
  " which fills in all three."
)

# jax.distributed.initialize's messages for a setting nobody provided.
_MISSING = {
  "coordinator_address": "the coordinator address",
  "Number of processes": "the number of processes",
  "process id": "this process's id",
}


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(
      f"--coordinator_address={address!r} is not HOST:PORT (e.g."
      " 10.0.0.1:12345, or 127.0.0.1:12345 when every process runs on"
      " this machine): process 0 listens on that port and every process"
      " connects to it."
    )


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_seconds: int | None = None,
  initialization_timeout_seconds: int | None = None,
) -> None:
  """Joins this process to a multi-process JAX run (``jax.distributed``).

  Call it once, first: before any JAX computation or device query. Any
  setting left None is taken from ``JAX_COORDINATOR_ADDRESS`` (the address
  only) or from JAX's cluster auto-detection (SLURM, Cloud TPU, GKE TPU,
  Open MPI); a setting given here wins over both. On one machine without a
  cluster, start N processes with the same address and count and ids
  ``0..N-1``::

    distributed.initialize("127.0.0.1:12345", num_processes=2, process_id=0)

  Args:
    coordinator_address: ``HOST:PORT`` of process 0, which listens there;
      the same string on every process.
    num_processes: how many processes the run has (hosts, usually).
    process_id: this process's index, ``0 <= process_id < num_processes``.
    heartbeat_timeout_seconds: after how long without a heartbeat a
      process is declared dead and the others stop (JAX's default: 100 s).
    initialization_timeout_seconds: how long to wait for every process to
      connect (JAX's default: 300 s).

  A process that cannot reach the coordinator is ended by JAX itself after
  the initialization timeout (it aborts; there is nothing to catch).

  Raises:
    ConfigError: a setting is malformed or out of range, some are given
      but the rest cannot be determined, or none is given outside a cluster
      JAX recognises; or process 0 cannot listen at the coordinator
      address (the port is in use). Nothing has been started then.
  """
  if coordinator_address is not None:
    _check_address(coordinator_address)
  if num_processes is not None and num_processes < 1:
    raise ConfigError(
      f"--num_processes={num_processes}: needs at least 1." + _HOW
    )
  if process_id is not None and process_id < 0:
    raise ConfigError(f"--process_id={process_id}: needs 0 or more." + _HOW)
  if (
    num_processes is not None
    and process_id is not None
    and process_id >= num_processes
  ):
    raise ConfigError(
      f"--process_id={process_id} with --num_processes={num_processes}:"
      f" ids run from 0 to {num_processes - 1}." + _HOW
    )
  # gloo is JAX's default CPU collectives since 0.5; set it where an older
  # JAX has none, and keep a choice the user made (e.g. "mpi").
  try:
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # A JAX without the option: nothing to choose.
    pass
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if process_id == 0 and address:
    _check_port_free(address)
  kwargs = {}
  if heartbeat_timeout_seconds is not None:
    kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds
  if initialization_timeout_seconds is not None:
    kwargs["initialization_timeout"] = initialization_timeout_seconds
  try:
    jax.distributed.initialize(
      coordinator_address, num_processes, process_id, **kwargs
    )
  except ValueError as e:
    # JAX checks its settings before it starts or connects anything.
    text = str(e)
    missing = next(
      (what for key, what in _MISSING.items() if key in text), None
    )
    if missing is None:
      raise ConfigError(f"--multihost: {text}" + _HOW) from None
    given = [
      f"--{name}"
      for name, value in (
        ("coordinator_address", coordinator_address),
        ("num_processes", num_processes),
        ("process_id", process_id),
      )
      if value is not None
    ]
    context = (
      f"only {', '.join(given)} given and no cluster detected"
      if given
      else "no cluster detected (SLURM, Cloud TPU, GKE TPU,"
      " Open MPI) and no --coordinator_address, --num_processes,"
      " --process_id given"
    )
    raise ConfigError(
      f"--multihost could not determine {missing}: {context}." + _HOW
    ) from None
  except jax.errors.JaxRuntimeError as e:
    if "RPC server" not in str(e):
      raise
    raise ConfigError(
      _port_taken(address or "the coordinator address", _first_line(e))
    ) from None


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def _port_taken(address: str, reason: str) -> str:
  return (
    f"--multihost: process 0 cannot listen at {address} for the other"
    f" processes ({reason}). The port is probably in use, e.g. by a"
    " run still alive; pick another port in --coordinator_address on"
    " every process, or stop that run."
  )


def _check_port_free(coordinator_address: str) -> None:
  """Raises ConfigError if process 0's coordinator port is already taken.

  jaxlib can crash (not raise) when its coordinator cannot bind, so
  process 0 tries the port first, where JAX will listen: on every interface,
  or at ``JAX_COORDINATOR_BIND_ADDRESS``.
  """
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or (
    "[::]:" + coordinator_address.rpartition(":")[2]
  )
  host, _, port = bind.rpartition(":")
  host = host.strip("[]")
  if not port.isdigit():
    return  # JAX reports a malformed bind address itself.
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  try:
    with socket.socket(family, socket.SOCK_STREAM) as s:
      # As gRPC does: a port in TIME_WAIT from a finished run is free.
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind((host, int(port)))
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise ConfigError(_port_taken(bind, e.strerror or str(e))) from None
    # Anything else (no IPv6 on this host, ...): let JAX try.
