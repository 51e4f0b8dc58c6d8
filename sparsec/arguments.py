"""Range checks for command options, shared by the commands.

argparse converts an option's text to its type (``type=int``, ``type=float``) and
rejects text that is not a number, as for any option. Whether the number is in range is
checked here, once per command and before it loads a model or reads data: a value out
of range, NaN or infinity raises ``SparsecError`` naming the option, the value and the
allowed range, which the CLI prints as one line (exit 1). The checks take values, not
text, so a command's library API (an options dataclass such as ``SparsifyOptions``)
gets the same checks as its command line. (They are not argparse ``type=`` functions
for that reason: those would guard the command line only, and argparse reports their
errors its own way, with the usage text and exit status 2.)

A check is a ``Range``; the common ones are named:

* ``POSITIVE_INT``: an integer >= 1 (counts and sizes);
* ``NON_NEGATIVE_INT``: an integer >= 0 (0 usually meaning off or automatic);
* ``POSITIVE_FLOAT``: a finite number > 0 (rates, scales);
* ``NON_NEGATIVE_FLOAT``: a finite number >= 0 (intervals, weights);
* ``FRACTION``: a finite number from 0 to 1;
* ``SEED``: an integer from 0 to 2**32 - 1.

A command lists its options' ranges once, as ``{field name: Range}``, and calls
``check_ranges(options, ranges)``; ``Range.check(option, value)`` checks one value.
Narrower ranges are made with ``dataclasses.replace(POSITIVE_INT, maximum=4096)`` or
``Range(...)``, and ``note`` says what the special values mean or what to pass.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from sparsec.errors import SparsecError


@dataclass(frozen=True)
class Range:
    """The values an option accepts: integers or finite numbers within the bounds."""

    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    above: bool = False  # the minimum itself is excluded (> rather than >=)
    note: str = ""  # appended to the message: what special values mean, or what to pass

    def describe(self) -> str:
        """The accepted values in words, such as ``an integer from 1 to 4096``."""
        kind = "an integer" if self.integer else "a finite number"
        low, high = _number(self.minimum), _number(self.maximum)
        if self.minimum is not None and self.maximum is not None and not self.above:
            return f"{kind} from {low} to {high}"
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.above else '>='} {low}")
        if self.maximum is not None:
            parts.append(f"<= {high}")
        return " ".join([kind, " and ".join(parts)]).strip()

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        if self.minimum is not None and (
            value <= self.minimum if self.above else value < self.minimum
        ):
            return False
        return self.maximum is None or value <= self.maximum

    def check(self, option: str, value):
        """``value`` if it is in range, else SparsecError naming ``option`` (``--lr``)."""
        if not self.contains(value):
            shown = _number(value) if isinstance(value, numbers.Real) else repr(value)
            note = f" ({self.note})" if self.note else ""
            raise SparsecError(f"{option} {shown}: must be {self.describe()}{note}")
        return value


POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE_FLOAT = Range(0, above=True)
NON_NEGATIVE_FLOAT = Range(0)
FRACTION = Range(0, 1)
SEED = Range(0, 2**32 - 1, integer=True)


def option_name(field: str) -> str:
    """The command-line spelling of an options field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def check_ranges(options, ranges: Mapping[str, Range]) -> None:
    """Check every ``options.<field>`` listed in ``ranges``; None (unset) passes."""
    for field, allowed in ranges.items():
        value = getattr(options, field)
        if value is not None:
            allowed.check(option_name(field), value)


def _number(value) -> str:
    """A bound or value as the user would type it: 0.99, 1e-05, 4096, nan, inf."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def int_range(low: int, high: int | None = None):
    """An argparse ``type=`` for options that only the command line has: an integer in
    ``low..high`` (no upper bound when None); argparse names the option in its error."""
    allowed = f"{low}..{high}" if high is not None else f"{low} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer (allowed range: {allowed})"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside the allowed range ({allowed})")
        return value

    parse.__name__ = "integer"
    return parse
