"""Command-line values parsed once, each with its type and range, before anything slow runs.

The functions here are argparse `type=` callables: they take an option's text and return the
value, or raise argparse.ArgumentTypeError saying what was expected. `OneLineParser` prints
any argparse error as one line, `diffdraft: error: ...`, with exit code 2, like every other
refusal of the command line (the full usage stays behind --help). Seeds share their range
with the engine and the dLLM (prompting.check_seed). Knows nothing of models.
"""

from __future__ import annotations

import argparse
import sys

from diffdraft.config import check_threads
from diffdraft.errors import DiffdraftError
from diffdraft.prompting import SEED_LIMIT


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_int_or_auto(text: str) -> int | str:
    """A positive integer, or "auto" (the program chooses)."""
    return "auto" if text == "auto" else positive_int(text)


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {text!r}")
    return value


def threads(text: str) -> int:
    """Torch threads: 1 up to this machine's cores (config.check_threads)."""
    try:
        return check_threads(positive_int(text))
    except DiffdraftError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def int_in(low: int, high: int | None = None):
    """An integer in low..high (no upper bound when high is None)."""
    def parse(text: str) -> int:
        value = _int(text)
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value
    parse.__name__ = f"int_in_{low}_{high}"
    return parse


def finite_float(text: str) -> float:
    return _float(text)


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A fraction in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def probability_mass(text: str) -> float:
    """top-p: in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A fraction strictly between 0 and 1."""
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _comma_list(text: str, item, what: str) -> tuple:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return tuple(item(part) for part in items)


def float_list(text: str) -> tuple[float, ...]:
    """Comma-separated numbers >= 0, at least one: "0,0.8"."""
    return _comma_list(text, non_negative_float, "numbers")


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 0, at least one: "1,15,27"."""
    return _comma_list(text, non_negative_int, "integers")


def port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line on stderr and exit code 2."""

    def error(self, message: str):
        print(f"diffdraft: error: {self.prog.removeprefix('diffdraft ')}: {message}", file=sys.stderr)
        raise SystemExit(2)
