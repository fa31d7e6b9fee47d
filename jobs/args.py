"""What the subcommands share in parsing their arguments: UsageError, argparse types,
the storage flags.

Each type turns the option's text into its value or raises ArgumentTypeError
naming the text and what was expected, which argparse prints as
``argument --batch-size: expected a positive integer, got 'x'``. Only argparse
is imported here, so that `maskrcnn --help` stays instant.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UsageError(Exception):
    """An error in what the user asked for; printed as one line, exit code 2."""


def require_at_least(flag: str, value: int | None, minimum: int, hint: str = "") -> None:
    """UsageError "FLAG must be at least MINIMUM[HINT], got VALUE" unless ``value`` is None
    (left out) or at least ``minimum``."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}{hint}, got {value}")


def add_storage_arguments(parser: Any, anon: bool = True) -> None:
    """--endpoint-url and (with ``anon``) --anon on ``parser`` (a parser or an argument
    group): the storage flags of every command that reads or writes URIs;
    :func:`storage_options_for` turns them into fsspec options."""
    parser.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)",
    )
    if anon:
        parser.add_argument(
            "--anon",
            action="store_true",
            default=None,
            help="anonymous S3 access (also MASKRCNN_S3_ANON=1)",
        )


def add_dashboard_argument(parser: Any) -> None:
    """--dashboard on ``parser``: the commands that may start an embedded Ray instance;
    :func:`use_dashboard` passes it on."""
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="start Ray's dashboard with a local Ray instance (off: it costs CPU all run long)",
    )


def use_dashboard(args: argparse.Namespace) -> None:
    """Whether an embedded Ray instance this command starts runs the dashboard (--dashboard)."""
    from pipeline.cluster import LOCAL_RAY

    LOCAL_RAY.dashboard = bool(getattr(args, "dashboard", False))


def storage_options_for(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    """fsspec storage options for ``uri`` from the storage flags (then the environment)."""
    from pipeline.storage import storage_options

    return storage_options(uri, endpoint_url=args.endpoint_url, anon=getattr(args, "anon", None))


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


def positive(text: str) -> float:
    """A finite number > 0."""
    return checked(text, float, lambda v: math.isfinite(v) and v > 0, "a number > 0")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """The type of an integer >= ``minimum`` ("expected an integer at least MINIMUM")."""

    def parse(text: str) -> int:
        return checked(text, int, lambda v: v >= minimum, f"an integer at least {minimum}")

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def number_list(text: str) -> tuple[float, ...]:
    """Numbers separated by commas ("0.75,0.92"); empty items are left out."""
    return checked(
        text,
        lambda t: tuple(float(v) for v in t.split(",") if v.strip()),
        lambda v: True,
        "numbers separated by commas",
    )


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


def timestamp(text: str) -> str:
    """An ISO 8601 time ("2026-01-31", "2026-01-31T12:00:00Z"); kept as text, which
    pipeline.output.table reads (without an offset it is UTC)."""
    from datetime import datetime

    def parse(t: str) -> datetime:
        t = t.strip()
        return datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t)

    checked(text, parse, lambda v: True, "an ISO 8601 time such as 2026-01-31T12:00:00Z")
    return text


def add_version_arguments(parser: Any, what: str = "OUTPUT") -> None:
    """--version N or --as-of TIMESTAMP (not both) on ``parser``: which version of the table
    ``what`` to read (default the latest); ``args.version`` and ``args.as_of`` go to
    pipeline.output.results.open_results."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--version",
        type=int_at_least(0),
        metavar="N",
        help=f"read version N of {what} (`maskrcnn history` lists them; default: the latest)",
    )
    group.add_argument(
        "--as-of",
        type=timestamp,
        metavar="TIMESTAMP",
        help=f"read {what} as it was at this ISO 8601 time (UTC unless it has an offset)",
    )
