"""The `rept` command line: a thin layer over the Python API, one module per command.

Each command module exposes HELP, add_arguments(parser) and run(args); flags shared by several
commands, and how they map onto library objects, live in rept.cli.options. Commands import the
library inside run(), so that `rept --help` and argument errors load no torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from rept.cli.options import add_global_flags
from rept.errors import ReptError

# Quiet the libraries before they are imported: rept prints its own progress.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

# Every command, in the order `rept --help` lists them: name -> module under rept.cli.
COMMANDS: dict[str, str] = {name: f"rept.cli.{module}" for name, module in (
    ("demo", "demo"), ("layers", "layers"), ("index", "index"), ("trace", "trace"), ("eval", "evaluate"),
    ("verify", "verify"), ("train", "train"), ("generate", "generate"), ("bench", "bench"),
    ("mitigate", "mitigate"), ("report", "report"), ("correct", "correct"), ("serve", "serve"),
)}


# Written into the --out folder of every command that makes one: the command line it ran with, so
# that `rept --config DIR/rept-run.json` runs it again (flags given after it override the saved ones).
RUN_FILE = "rept-run.json"
FOLDER_COMMANDS = ("demo", "index", "train", "bench", "mitigate", "correct")


class ReptArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in rept's one-line form (`rept: error: ...`, exit 2), not a usage block."""

    def error(self, message: str):
        command = self.prog.removeprefix("rept").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"rept: error: {where}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ReptArgumentParser(prog="rept", description="Trace an LLM's behaviour back to the training rows "
                                "that taught it (representation-gradient tracing, RepT).")
    parser.add_argument("--version", action="version", version=f"rept {__import__('rept').__version__}")
    parser.add_argument("--config", metavar="FILE", help=f"run a command again from the {RUN_FILE} it wrote into "
                        "its --out folder; flags given after it override the saved ones (e.g. --out NEW)")
    add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        add_global_flags(p, after_command=True)
    return parser


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # rept shows its own progress


def replayed_argv(argv: list[str]) -> list[str]:
    """argv with `--config FILE` replaced by the command line that FILE recorded (a RUN_FILE)."""
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise ReptError("--config needs a file (DIR/rept-run.json, written by the run to replay)")
    path = Path(argv[at + 1])
    if path.is_dir():
        path = path / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReptError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReptError(f"--config {path}: not a {RUN_FILE} ({exc})") from None
    saved = record.get("argv") if isinstance(record, dict) else None
    if not (isinstance(saved, list) and saved and all(isinstance(a, str) for a in saved)
            and record.get("command") in COMMANDS and record["command"] in saved):
        raise ReptError(f"--config {path}: not a {RUN_FILE} (no recorded rept command line)")
    return saved + argv[:at] + argv[at + 2:]


def _record_run(args, argv: list[str]) -> None:
    """Save the command line into the --out folder the command made (rank 0 only under torchrun)."""
    out = getattr(args, "out", None)
    if args.command not in FOLDER_COMMANDS or not out or not os.path.isdir(out):
        return
    from rept.store.distributed import rank_and_world
    from rept.store.index import atomic_write_bytes

    if rank_and_world()[0] != 0:
        return
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    record = {"rept_version": __import__("rept").__version__, "command": args.command, "argv": argv,
              "cwd": os.getcwd(), "settings": settings,
              # the library's settings objects the flags became (cli.options.record_settings)
              "typed": getattr(args, "typed_settings", {})}
    atomic_write_bytes(Path(out) / RUN_FILE, (json.dumps(record, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = replayed_argv(argv)
    except ReptError as exc:
        print(f"rept: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        from rept.preflight import check_args

        check_args(args)  # files, rules, flag pairs, the device: before torch is imported or a model loaded
        _quiet_libraries()
        code = importlib.import_module(COMMANDS[args.command]).run(args)
        if code == 0:
            _record_run(args, argv)
        return code
    except ReptError as exc:
        print(f"rept: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rept: interrupted (an index build resumes when rerun with the same command)", file=sys.stderr)
        return 130
