"""Checks of a parsed command line that need no heavy import (no torch, transformers or pandas).

`rept.cli.main` runs `check_args` right after argparse, before a command imports anything heavy
or loads a model, so a wrong command is refused in well under a second instead of after the
model load: an input file that is missing or of a kind rept does not read, an index folder
without a manifest, a bad detector rule, `--prompt` without `--response`, a device that is not
there. Each check raises the same one-line error the loader would raise later.

The checks go by argparse dest, and a dest means the same in every command: `data`,
`prompts`, `heldout`, `test_prompts`, `control_prompts` and `base_data` are datasets (when they
are strings: `rept demo --prompts` is a count), `queries` and `control_answers` queries files,
`index` an index folder, `detect` a detector rule, `device` a torch device.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rept.errors import ReptError

DATA_FLAGS = ("data", "prompts", "heldout", "test_prompts", "control_prompts", "base_data")
QUERY_FLAGS = ("queries", "control_answers")
DEVICE_RE = re.compile(r"(cpu|cuda|mps|auto)(:\d+)?")


class ArgumentError(ReptError):
    """Flags that do not go together, or a value no command can use (one line)."""


def check_args(args) -> None:
    """Every check that applies to the parsed `args` (an argparse Namespace), cheapest first."""
    from rept.data.datasets import check_data_path, check_queries_path

    if getattr(args, "command", None) == "trace":
        check_trace_flags(args)
    for dest in DATA_FLAGS:
        value = getattr(args, dest, None)
        if isinstance(value, str):
            check_data_path(value)
    for dest in QUERY_FLAGS:
        value = getattr(args, dest, None)
        if isinstance(value, str):
            check_queries_path(value)
    if isinstance(getattr(args, "index", None), str):
        check_index_folder(args.index)
    if isinstance(getattr(args, "detect", None), str):
        from rept.data.detect import Detector

        Detector(args.detect)
    if getattr(args, "command", None) == "report":
        from rept.report import load_mitigation

        for path in args.mitigation:
            load_mitigation(path)
    if getattr(args, "device", None):  # last: asking about cuda imports torch
        check_device(args.device)


def check_trace_flags(args) -> None:
    if args.prompt is not None and args.response is None and not args.generate:
        raise ArgumentError("--prompt needs --response, or --generate to let the model answer")
    if args.response is not None and (args.prompt is None or args.generate):
        raise ArgumentError("--response goes with --prompt (without --generate): the pair to trace")
    if args.token_layer is not None and not args.tokens:
        raise ArgumentError("--token-layer needs --tokens (it sets the layer of the word scores)")


def check_index_folder(folder: str) -> None:
    # the same words as rept.store.index.read_manifest, which cannot be imported here (it loads torch)
    if not os.path.isdir(folder):
        raise ArgumentError(f"no such index folder: {folder}")
    if not (Path(folder) / "manifest.json").exists():
        raise ArgumentError(f"{folder} is not a rept index (no manifest.json)")


def check_device(device: str | None) -> None:
    """`device` is cpu, cuda, cuda:N, mps or auto, and (for cuda or mps) this machine has it.
    Only a cuda or mps device imports torch, to ask."""
    if not device or device == "auto":
        return
    if not DEVICE_RE.fullmatch(device):
        raise ArgumentError(f"bad --device '{device}' (use cpu, cuda or cuda:N)")
    kind, _, number = device.partition(":")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ArgumentError(f"--device {device}: no CUDA device on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if number and int(number) >= count:
            raise ArgumentError(f"--device {device}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                                f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    elif kind == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ArgumentError(f"--device {device}: no MPS device on this machine (use --device cpu)")
