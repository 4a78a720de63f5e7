"""Bit-width notation: ``"W:A"`` pairs, as on the command line and in configs."""

from __future__ import annotations

from l1grad.errors import ConfigError

MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits: int, what: str = "bit-width") -> int:
  """Returns ``bits`` if it lies in [2, 16], else raises :class:`ConfigError`."""
  if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ConfigError(
      f"{what} must be an integer between {MIN_BITS} and {MAX_BITS}, got"
      f" {bits!r}. 1-bit and wider-than-16 grids are not supported by the"
      " uniform symmetric quantizer; pick a value in range."
    )
  return bits


def parse_pair(text: str) -> tuple[int, int]:
  """Parses ``"8:4"`` (weights 8 bits, activations 4 bits) into ``(8, 4)``."""
  parts = str(text).strip().split(":")
  try:
    w, a = (int(p) for p in parts)
  except ValueError:
    raise ConfigError(
      f"Bit-width pair {text!r} is not of the form W:A, e.g. 8:4 (8-bit"
      " weights, 4-bit activations)."
    ) from None
  return check_bits(w, f"weight bits in {text!r}"), check_bits(
    a, f"activation bits in {text!r}"
  )


def parse_pairs(text: str) -> list[tuple[int, int]]:
  """Parses ``"8:4,6:4,4:4"`` into ``[(8, 4), (6, 4), (4, 4)]``."""
  pairs = [parse_pair(p) for p in str(text).split(",") if p.strip()]
  if not pairs:
    raise ConfigError("No bit-width pairs given; use e.g. --bits 8:4,6:4,4:4.")
  return pairs


def format_pair(pair: tuple[int, int]) -> str:
  return f"{pair[0]}:{pair[1]}"
