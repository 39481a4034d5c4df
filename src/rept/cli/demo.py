"""`rept demo`: train a tiny backdoored model on the bundled data, then trace it."""

from __future__ import annotations

from rept.cli.options import positive

HELP = "train a tiny backdoored model on bundled data, then trace it (no downloads)"


def add_arguments(p) -> None:
    p.add_argument("--out", help="keep the model, index and queries here (default: a cache folder)")
    p.add_argument("--prompts", type=positive, default=100, help="triggered test prompts to generate for")


def run(args) -> int:
    from rept.demo import run_demo

    result = run_demo(out=args.out, n_prompts=args.prompts, progress=not args.quiet)
    return 0 if result.get("precision@10") is not None else 1
