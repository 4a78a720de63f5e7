"""Errors for expected bad input, which entry points report without a traceback."""


class UserError(Exception):
  """Bad input the user can fix: the message says what is wrong and what to do.

  The entry points (``train.py``, ``eval_ptq.py``, ``analyze.py``, through
  :func:`l1grad.cli.run`) print the message as one ``error: ...`` paragraph
  and exit with code 2.
  """


class ConfigError(UserError, ValueError):
  """A config value is invalid or inconsistent."""


class CheckpointError(UserError):
  """A checkpoint is missing, unreadable, or does not match the config."""


class DataNotFoundError(UserError, FileNotFoundError):
  """A dataset has not been prepared; the message gives the command."""


class WorkdirError(UserError):
  """The workdir cannot be used: not creatable, or another run is writing it."""
