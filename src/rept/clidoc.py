"""The flag tables of docs/cli.md, generated from the parser so that they cannot drift from it.

docs/cli.md holds, for each command, a block between `<!-- flags: NAME -->` and
`<!-- /flags -->`; this module writes each block as a Markdown table (flag, value, default,
what it does) taken from `rept.cli.build_parser()`:

    python -m rept.clidoc                     # print every command's table
    python -m rept.clidoc --write docs/cli.md # rewrite the blocks in place (a new command gets a block
                                              #   at the end of the file, to move where it belongs)
    python -m rept.clidoc --check docs/cli.md # exit 1, naming the commands, when a block differs

tests/cli/test_clidoc.py runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BLOCK_RE = re.compile(r"<!-- flags: (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /flags -->", re.S)
GLOBAL_FLAGS = {"-h", "--help", "-q", "--quiet"}  # documented once, at the top of docs/cli.md


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return ", ".join(map(str, action.choices))
    name = action.metavar or action.dest.upper()
    return f"{name} ..." if action.nargs in ("+", "*") else name


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse.BooleanOptionalAction):  # None: it depends (the help says on what)
        return {True: "on", False: "off"}.get(action.default, "")
    if action.nargs == 0:
        return "off" if action.default in (False, None) else ""
    if action.default is None or action.default == argparse.SUPPRESS:
        return ""
    value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
    return f"`{value}`"


def flag_table(parser: argparse.ArgumentParser) -> str:
    """One command's flags as a Markdown table, in the parser's order; flags that exclude each
    other say so, and a required group says that one of them is required."""
    groups = {}
    for group in parser._mutually_exclusive_groups:
        names = [a.option_strings[-1] for a in group._group_actions]
        for a in group._group_actions:
            groups[id(a)] = (names, group.required)
    lines = ["| flag | value | default | what it does |", "|---|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or set(action.option_strings) <= GLOBAL_FLAGS:
            continue
        flag = ", ".join(f"`{s}`" for s in action.option_strings)
        default = _default(action)
        help_text = action.help or ""
        if id(action) in groups:
            names, required = groups[id(action)]
            others = ", ".join(f"`{n}`" for n in names if n not in action.option_strings)
            default = "one of the group required" if required else default
            help_text += f" (not with {others})"
        lines.append(f"| {flag} | {_cell(_value(action))} | {_cell(default)} | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def tables() -> dict[str, str]:
    from rept.cli import build_parser

    return {name: flag_table(sub) for name, sub in _subparsers(build_parser()).items()}


def update(text: str, generated: dict[str, str]) -> str:
    """`text` with each flags block replaced by its generated table; a command without a block
    gets one appended under its own heading."""
    text = BLOCK_RE.sub(lambda m: f"<!-- flags: {m['name']} -->\n{generated.get(m['name'], '')}<!-- /flags -->", text)
    have = {m["name"] for m in BLOCK_RE.finditer(text)}
    for name in generated:
        if name not in have:
            text = text.rstrip("\n") + f"\n\n## rept {name}\n\n<!-- flags: {name} -->\n{generated[name]}<!-- /flags -->\n"
    return text


def differences(text: str, generated: dict[str, str]) -> list[str]:
    """The commands whose block in `text` is missing, out of date, or names no command."""
    found = {m["name"]: m["body"] for m in BLOCK_RE.finditer(text)}
    out = [f"{name}: no flags block" for name in generated if name not in found]
    out += [f"{name}: flags block out of date" for name in generated if name in found and found[name] != generated[name]]
    out += [f"{name}: flags block for a command the parser does not have" for name in found if name not in generated]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rept.clidoc", description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--write", metavar="MD", help="rewrite the flags blocks of this file")
    what.add_argument("--check", metavar="MD", help="exit 1 when this file's flags blocks differ from the parser")
    args = ap.parse_args(argv)
    generated = tables()
    if args.write:
        path = Path(args.write)
        path.write_text(update(path.read_text(encoding="utf-8"), generated), encoding="utf-8")
        return 0
    if args.check:
        problems = differences(Path(args.check).read_text(encoding="utf-8"), generated)
        for p in problems:
            print(f"{args.check}: {p} (regenerate: python -m rept.clidoc --write {args.check})", file=sys.stderr)
        return 1 if problems else 0
    for name, table in generated.items():
        print(f"## rept {name}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
