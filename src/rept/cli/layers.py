"""`rept layers`: the phase-transition layer of a model on a probe set, with the curve it is read from."""

from __future__ import annotations

import json

from rept.cli.options import add_data_args, add_model_args, positive

HELP = "find the phase-transition layer on a probe set"


def add_arguments(p) -> None:
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--probe-rows", type=positive, default=64, help="the first N rows make the probe set")
    p.add_argument("--max-length", type=positive, default=512, help="tokens per row (longer rows are cut)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from rich.console import Console

    from rept.cli.options import dataset_from_args, load_model_from_args
    from rept.signatures.layers import phase_transition_layer

    loaded, data = load_model_from_args(args), dataset_from_args(args)
    choice = phase_transition_layer(loaded, data.rows[: args.probe_rows], max_length=args.max_length)
    if args.json:
        print(json.dumps(choice.as_dict()))
        return 0
    console = Console()
    console.print("adjacent-layer cosine of the last prompt token (hidden_states i -> i+1):")
    low = min(choice.similarities)
    for i, s in enumerate(choice.similarities):
        bar = "#" * max(1, round(40 * (s - low + 0.02) / (1 - low + 0.02)))
        mark = "  <- chosen" if i + 1 == choice.layer else ""
        console.print(f"  {i:>3} -> {i + 1:<3} {s:7.4f} {bar}{mark}")
    console.print(f"layer: {choice.layer} ({choice.reason})")
    return 0
