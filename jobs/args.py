"""argparse types shared by the subcommands.

Each one turns the option's text into its value or raises ArgumentTypeError
naming the text and what was expected, which argparse prints as
``argument --batch-size: expected a positive integer, got 'x'``. Only argparse
is imported here, so that `maskrcnn --help` stays instant.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def checked(text: str, convert: Callable[[str], T], ok: Callable[[T], bool], expected: str) -> T:
    """``convert(text)`` when it succeeds and ``ok`` holds for the value; otherwise an
    ArgumentTypeError "expected EXPECTED, got 'TEXT'"."""
    try:
        value = convert(text)
        valid = ok(value)
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return checked(text, int, lambda v: v >= 1, "a positive integer")


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    return checked(text, float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")


def score(text: str) -> float:
    """A detection score threshold in 0..1."""
    return checked(text, float, lambda v: 0 <= v <= 1, "a score in 0..1")


def _int_pair(text: str) -> tuple[int, int]:
    """ "N" -> (N, N); "MIN,MAX" -> (MIN, MAX); ValueError for anything else."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ValueError(text)


def actors(text: str) -> tuple[int, int]:
    """A (min, max) actor count from "N" or "MIN,MAX", 1 <= MIN <= MAX."""
    return checked(
        text, _int_pair, lambda p: 1 <= p[0] <= p[1], "N or MIN,MAX with 1 <= MIN <= MAX"
    )
