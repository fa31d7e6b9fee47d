"""The README's command reference is the real CLI: every command and flag it lists exists,
and every command and flag the CLI has is listed.

Regenerate the reference block after changing flags::

    .venv/bin/python tests/test_readme.py   # prints the block between the markers
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.cli import build_parser  # noqa: E402

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _arguments(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """Positionals first, then options; -h and --debug (every command has them) left out."""
    actions = [
        a
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and "--debug" not in a.option_strings
    ]
    return [a for a in actions if not a.option_strings] + [a for a in actions if a.option_strings]


def _name(a: argparse.Action) -> str:
    if not a.option_strings:
        return a.metavar or a.dest.upper()
    flag = max(a.option_strings, key=len)
    if a.nargs == 0:
        return flag
    metavar = a.metavar or ("{" + ",".join(a.choices) + "}" if a.choices else a.dest.upper())
    return f"{flag} {metavar}"


def _meaning(a: argparse.Action) -> str:
    text = (a.help or "").replace("|", "\\|")
    if a.required and a.option_strings:
        text = f"required; {text}" if text else "required"
    if (
        a.option_strings
        and a.nargs != 0
        and a.default not in (None, argparse.SUPPRESS)
        and "default" not in text
    ):
        default = ",".join(map(str, a.default)) if isinstance(a.default, tuple) else a.default
        text = f"{text} (default {default})" if text else f"default {default}"
    return text


def reference() -> str:
    """The README block: one table of arguments per command."""
    out = []
    for command, p in _subparsers().items():
        positionals = " ".join(_name(a) for a in _arguments(p) if not a.option_strings)
        out.append(f"#### `maskrcnn {command}{' ' + positionals if positionals else ''}`")
        out.append("")
        out.append(p.description or "")
        out.append("")
        out.append("| argument | meaning |")
        out.append("|---|---|")
        for a in _arguments(p):
            out.append(f"| `{_name(a)}` | {_meaning(a)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _readme_block() -> str:
    text = (REPO / "README.md").read_text()
    assert START in text and END in text, "README lost its cli-reference markers"
    return text.split(START, 1)[1].split(END, 1)[0]


def _listed(block: str) -> dict[str, set[str]]:
    """command -> the flags its README table lists."""
    listed: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        heading = re.match(r"#### `maskrcnn ([\w-]+)", line)
        if heading:
            command = heading.group(1)
            listed[command] = set()
        elif command and line.startswith("| `-"):
            listed[command].add(line.split("`")[1].split()[0])
    return listed


def test_readme_lists_every_command_and_flag_and_no_other():
    actual = {
        command: {max(a.option_strings, key=len) for a in _arguments(p) if a.option_strings}
        for command, p in _subparsers().items()
    }
    listed = _listed(_readme_block())
    assert sorted(listed) == sorted(actual), "commands in README vs `maskrcnn --help`"
    for command in actual:
        assert listed[command] == actual[command], (
            f"maskrcnn {command}: README lists {sorted(listed[command] - actual[command])} "
            f"that do not exist and misses {sorted(actual[command] - listed[command])}; "
            "regenerate with `.venv/bin/python tests/test_readme.py`"
        )


def test_readme_commands_in_examples_parse():
    """Every `maskrcnn ...` command line in the README's code blocks parses."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    parser = build_parser()
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if "maskrcnn " in line and not line.startswith("#"):
                argv = line[line.index("maskrcnn ") :].split()[1:]
                if argv and argv[0] in _subparsers():
                    commands.append(argv)
    assert len(commands) >= 8, commands
    for argv in commands:
        try:
            parser.parse_args([a.strip("'\"") for a in _shell_words(" ".join(argv))])
        except SystemExit as exc:
            raise AssertionError(
                f"README command does not parse: maskrcnn {' '.join(argv)}"
            ) from exc


def _shell_words(line: str) -> list[str]:
    import shlex

    return shlex.split(line)


if __name__ == "__main__":
    print(START)
    print()
    print(reference(), end="")
    print()
    print(END)
