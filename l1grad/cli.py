"""What every entry point shares: absl, and bad input as one paragraph, exit 2.

``train.py``, ``eval_ptq.py`` and ``analyze.py`` end with
``cli.run(main)``, which is ``absl.app.run(main)`` with two changes:

* flag parsing turns every mistake (an unknown flag, a value of the wrong
  type, an override of a config field that does not exist, a missing config
  file) into one ``error: ...`` paragraph on stderr and exit status
  :data:`EXIT_BAD_INPUT`, instead of absl's usage dump or a traceback;
* ``main`` runs inside :func:`guard`, so any :class:`l1grad.errors.UserError`
  it raises ends the same way.

Example::

  from l1grad import cli

  def main(argv):
    if len(argv) > 1:
      cli.bad_input(f"unexpected arguments {argv[1:]}.")
    ...

  if __name__ == "__main__":
    cli.run(main)
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import sys
from typing import Any, NoReturn

from absl import app
from absl import flags
import ml_collections

from l1grad.errors import UserError

__all__ = [
  "EXIT_BAD_INPUT",
  "bad_input",
  "guard",
  "loaded_config",
  "parse_flags",
  "run",
]

# The exit status of bad input (flags, config, data, workdir, checkpoint),
# as absl and argparse use for usage errors.
EXIT_BAD_INPUT = 2


def bad_input(message: str) -> NoReturn:
  """Prints ``error: message`` on stderr; exits with :data:`EXIT_BAD_INPUT`."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def _unknown_field(error: Exception, argv: list[str]) -> str:
  """The message for an override of a field the config does not have."""
  # ml_collections raises AttributeError(KeyError("'name'\nDid you mean …"))
  # from inside the flag parser, which absl does not turn into a usage error.
  inner = error.args[0] if error.args else error
  text = (
    inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
  )
  name, _, hint = str(text).strip().partition("\n")
  name = name.strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  culprit = next(
    (a for a in overrides if a.rsplit(".", 1)[-1] == name), f"{name!r}"
  )
  hint = f" {' '.join(hint.split())}" if hint.strip() else ""
  return (
    f"{culprit}: the config has no such field.{hint} Every field is"
    " listed, with its meaning, in configs/default.py; check the"
    " spelling and the nesting (e.g. --config.reg.weight_coef)."
  )


def _config_load_message(error: Exception) -> str:
  cause = error.__cause__ or error
  return (
    f"could not load --config ({' '.join(str(cause).split())}). Pass a"
    " config file, e.g. --config configs/digits.py."
  )


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake one ``error:`` line and exit 2.

  The ``flags_parser`` that :func:`run` gives ``absl.app.run``.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    bad_input(
      f"{' '.join(str(e).split()).rstrip('.')}. Pass --helpshort to"
      " list the flags."
    )
  except (AttributeError, KeyError) as e:
    bad_input(_unknown_field(e, argv))
  except OSError as e:  # The config file is missing (seen by an override).
    bad_input(_config_load_message(e))


def loaded_config(
  holder: flags.FlagHolder[ml_collections.ConfigDict],
) -> ml_collections.ConfigDict:
  """The value of a ``config_flags`` flag; a missing file exits with 2 here.

  Args:
    holder: what ``config_flags.DEFINE_config_file`` returned.

  Returns:
    The parsed config, overrides applied.
  """
  config = holder.value
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # ml_collections defers a load failure to the first access.
      config.keys()
    except OSError as e:
      bad_input(_config_load_message(e))
  return config


def guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main`` with any :class:`UserError` turned into :func:`bad_input`."""

  @functools.wraps(main)
  def guarded(argv: list[str]) -> Any:
    try:
      return main(argv)
    except UserError as e:
      bad_input(str(e))

  return guarded


def run(main: Callable[[list[str]], Any]) -> NoReturn:
  """``absl.app.run(main)`` with :func:`parse_flags` and :func:`guard`."""
  app.run(guard(main), flags_parser=parse_flags)
  raise AssertionError("absl.app.run returned")  # It always exits.
