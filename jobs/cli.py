"""The `maskrcnn` console script.

Each subcommand is a module in jobs/ that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules import torch, Ray
and the rest inside ``run`` so that ``maskrcnn --help`` stays instant.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading

from jobs.args import UsageError

# (subcommand, module), in the order `maskrcnn --help` shows them.
COMMANDS: list[tuple[str, str]] = [
    ("demo", "jobs.demo"),
    ("shapes", "jobs.shapes"),
    ("train", "jobs.train"),
    ("segment", "jobs.segment"),
    ("evaluate", "jobs.evaluate"),
    ("query", "jobs.query"),
    ("export-coco", "jobs.export_coco"),
    ("render", "jobs.render"),
    ("history", "jobs.history"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn",
        description="maskrcnn: Mask R-CNN instance segmentation at dataset scale on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS:
        module = importlib.import_module(modname)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"maskrcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for people; the traceback behind --debug
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = (
            "" if isinstance(exc, UsageError | ValueError | OSError) else f"{type(exc).__name__}: "
        )
        print(f"maskrcnn {args.command}: error: {kind}{msg}", file=sys.stderr)
        if not isinstance(exc, UsageError | ValueError | OSError):
            print("  (run with --debug for the traceback)", file=sys.stderr)
        return 2


def entry() -> None:
    """The console script: :func:`main`, then an exit without the interpreter's teardown.

    With torch, torchvision and Ray loaded, Python's teardown (module finalization, then
    native destructors) takes 2-8 s of CPU after the last line is printed (measured on a
    2-core machine; ``os._exit`` takes 0.06 s). Everything a normal exit does for the
    program runs first: other threads are joined and the atexit handlers run (Ray's
    shutdown, temporary files), then the streams are flushed.
    """
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
