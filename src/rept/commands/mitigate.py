"""`rept mitigate`: remove or unlearn the culprit rows and measure the behaviour again."""

from __future__ import annotations

HELP = "remove or unlearn the culprit rows and show the behaviour drops (vs. as many random rows)"


def add_arguments(p) -> None:
    from rept.cli import SEARCH_MODES

    p.add_argument("--index", required=True, help="index of the training set (made by `rept index` or `rept demo`; "
                   "a method index from `rept index --method` makes that method's culprits)")
    p.add_argument("--queries", required=True, help="queries file (flagged=false rows are not traced)")
    p.add_argument("--detect", required=True, help="behaviour detector rule, e.g. 'prefix:You are stupid'")
    p.add_argument("--out", required=True, help="folder for culprits.jsonl, the cleaned set, results.json, summary.md")
    p.add_argument("--data", help="training set (default: the one the index records)")
    p.add_argument("--select", default="top-k:10",
                   help="top-k:K (union of every query's top K), threshold:S (score >= S) or budget:N (N strongest)")
    p.add_argument("--culprits-from", default="rept", metavar="METHOD",
                   help="who ranks the training rows for --select: rept (the index, default), a RepT mode "
                   "(rept-official, rept-balanced, repsim, repgrad, rept-lookahead: from the index's signatures), "
                   "or tracin, less, datainf, rapidin, bm25, random (fitted on the indexed rows, on the model the "
                   "index records). "
                   "One method per run: compare methods with one --out each")
    p.add_argument("--method", choices=("remove", "unlearn", "both"), default="remove")
    p.add_argument("--seeds", type=int, default=3, help="random-removal controls")
    p.add_argument("--prompts", help="prompts to measure the behaviour on (default: the flagged queries' prompts)")
    p.add_argument("--heldout", help="held-out rows (prompt, response) for the utility loss")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--unlearn-steps", type=int, default=30)
    p.add_argument("--mode", choices=SEARCH_MODES, default=None,
                   help="RepT scoring mode for --culprits-from rept (default: the index's)")
    p.add_argument("--device", default=None)


def run(args) -> int:
    from rich.console import Console

    from rept.data import load_dataset, load_prompts
    from rept.detect import Detector
    from rept.mitigate import MitigationError, Selection, check_culprit_source, run_mitigation, summary_markdown
    from rept.trace import Tracer, load_queries

    selection = Selection.parse(args.select)
    check_culprit_source(args.culprits_from)  # before the model is loaded
    if args.mode and args.culprits_from != "rept":
        raise MitigationError(f"--mode sets the RepT mode of --culprits-from rept; with --culprits-from "
                              f"{args.culprits_from} leave it out (a RepT mode is also a --culprits-from name)")
    detector = Detector(args.detect)
    queries = load_queries(args.queries)
    prompts = load_prompts(args.prompts) if args.prompts else None
    heldout = load_dataset(args.heldout).rows if args.heldout else None
    from rept.methods.store import is_method_index
    from rept.trace import MethodTracer

    if is_method_index(args.index):  # a baseline's index (`rept index --method`): its culprits
        if args.mode:
            raise MitigationError(f"--mode is a RepT scoring mode; {args.index} is a method index: leave it out")
        tracer = MethodTracer(args.index, device=args.device, progress=not args.quiet)
    else:
        tracer = Tracer(args.index, device=args.device)
    if args.mode:
        tracer.index.manifest["mode"] = args.mode
    console = Console(stderr=True)
    results = run_mitigation(tracer, queries, detector, args.out, selection, method=args.method, seeds=args.seeds,
                             data=args.data, prompts=prompts, heldout=heldout, max_new_tokens=args.max_new_tokens,
                             unlearn_steps=args.unlearn_steps, progress=not args.quiet, log=console.print,
                             culprits_from=args.culprits_from)
    print(summary_markdown(results))  # plain Markdown: no console wrapping, so a table row stays on one line
    return 0
