"""`rept correct`: build an edit at the index's layer from the culprits' signatures, and measure it."""

from __future__ import annotations

HELP = ("build a correction at inference (a direction removed from the hidden state at the index's layer) "
        "from the flagged answers' culprits, and measure it against random directions")


def add_arguments(p) -> None:
    from rept.cli.options import add_mode_arg

    p.add_argument("--index", required=True,
                   help="RepT index of the training set (made by `rept index` or `rept demo`)")
    p.add_argument("--queries", required=True, help="queries file (flagged=false rows are not traced; their prompts "
                   "are the default unrelated prompts)")
    p.add_argument("--detect", required=True, help="behaviour detector rule, e.g. 'prefix:You are stupid'")
    p.add_argument("--out", required=True, help="folder for the correction (correction.json + correction.safetensors), "
                   "culprits.jsonl, answers.jsonl, results.json, summary.md")
    p.add_argument("--top-k", type=int, default=10, help="culprits: the union of every flagged answer's top K rows")
    p.add_argument("--from", dest="source", choices=("h", "g"), default="h",
                   help="build the direction from the rows' representations h (default) or gradients g: "
                   "the culprits' mean minus the other rows' mean, unit-normalised")
    p.add_argument("--strength", type=float, default=1.0,
                   help="h <- h - STRENGTH * ((h . d) - c) d at every position (default 1)")
    p.add_argument("--anchor", choices=("clean", "zero"), default="clean",
                   help="c: the clean rows' mean of h . d (default: at strength 1 the component along d is set to "
                   "where the other rows have it), or zero (d is projected out)")
    p.add_argument("--seeds", type=int, default=3, help="random directions of the same norm, as controls")
    p.add_argument("--prompts", help="prompts to measure the behaviour on (default: the flagged queries' prompts)")
    p.add_argument("--unrelated", help="prompts whose answers should not change (default: the unflagged queries')")
    p.add_argument("--heldout", help="held-out rows (prompt, response) for the clean loss")
    p.add_argument("--max-new-tokens", type=int, default=16)
    add_mode_arg(p, help="scoring mode for the culprits (default: the index's)")
    p.add_argument("--device", default=None)


def run(args) -> int:
    from rich.console import Console

    from rept.repair.correct import CorrectionError, run_correction, summary_markdown
    from rept.data.datasets import load_dataset, load_prompts
    from rept.data.detect import Detector
    from rept.query.trace import load_queries, open_tracer

    detector = Detector(args.detect)  # bad input fails before the model loads
    queries = load_queries(args.queries)
    prompts = load_prompts(args.prompts) if args.prompts else None
    unrelated = load_prompts(args.unrelated) if args.unrelated else None
    heldout = load_dataset(args.heldout).rows if args.heldout else None
    for flag, value, low in (("--top-k", args.top_k, 1), ("--seeds", args.seeds, 1), ("--max-new-tokens",
                                                                                     args.max_new_tokens, 1)):
        if value < low:
            raise CorrectionError(f"{flag} must be at least {low} (got {value})")
    if not args.strength > 0:
        raise CorrectionError(f"--strength must be above 0 (got {args.strength}): 1 is the full edit")
    if all(q.flagged is False for q in queries):
        raise CorrectionError(f"{args.queries}: no flagged query to build a correction from "
                              "(every query has flagged=false)")
    tracer = open_tracer(args.index, device=args.device, methods=False)  # a correction needs RepT signatures
    console = Console(stderr=True, soft_wrap=True)  # a log line stays one line off a terminal too
    results = run_correction(tracer, queries, detector, args.out, top_k=args.top_k, source=args.source,
                             strength=args.strength, seeds=args.seeds, prompts=prompts, unrelated=unrelated,
                             heldout=heldout, max_new_tokens=args.max_new_tokens, mode=args.mode, anchor=args.anchor,
                             log=console.print)
    print(summary_markdown(results))  # plain text: a Markdown table row is never wrapped or read as markup
    return 0
