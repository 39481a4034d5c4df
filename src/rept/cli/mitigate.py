"""`rept mitigate`: remove or unlearn the culprit rows and measure the behaviour again."""

from __future__ import annotations

HELP = "remove or unlearn the culprit rows and show the behaviour drops (vs. as many random rows)"


def add_arguments(p) -> None:
    from rept import registry
    from rept.cli.options import add_mode_arg

    index_modes = [name for name in registry.index_sources() if name != "rept"]
    fitted = [name for name in registry.culprit_sources() if name not in registry.index_sources()]

    p.add_argument("--index", required=True, help="index of the training set (made by `rept index` or `rept demo`; "
                   "a method index from `rept index --method` makes that method's culprits)")
    p.add_argument("--queries", required=True, help="queries file (flagged=false rows are not traced)")
    p.add_argument("--detect", required=True, help="behaviour detector rule, e.g. 'prefix:You are stupid'")
    p.add_argument("--out", required=True, help="folder for culprits.jsonl, the cleaned set, results.json, summary.md")
    p.add_argument("--data", help="training set (default: the one the index records)")
    p.add_argument("--select", default="top-k:10",
                   help="top-k:K (union of every query's top K), threshold:S (score >= S), budget:N (N strongest) "
                   "or separation (every row the flagged answers score higher than any control answer does: aims for "
                   "recall; needs flagged=false queries)")
    p.add_argument("--culprits", metavar="FILE",
                   help="take the culprits from a JSONL file (culprits.jsonl's format: 'row' required; 'score', "
                   "'label', 'prompt', 'response' optional and checked) instead of tracing")
    p.add_argument("--rounds", type=int, metavar="N",
                   help="trace-remove-retrain rounds: each round removes the culprits of the answers that still "
                   "misbehave (--select per round); DIR/round-K/ keeps each round, a rerun resumes")
    p.add_argument("--until", metavar="RATE",
                   help="stop the rounds once the behaviour rate is at most RATE (0.05 or 5%%; "
                   "up to 10 rounds unless --rounds)")
    p.add_argument("--max-removed", type=int, metavar="N", help="row budget of the rounds, all rounds together")
    p.add_argument("--expand", type=int, default=0, metavar="N",
                   help="rounds: each round also removes the N remaining rows most like every row removed so far "
                   "(cosine of their hidden states at the index's layer to the removed rows' mean): the removed "
                   "rows become queries, for a behaviour taught by many alike rows")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's results in --out (else refused)")
    p.add_argument("--culprits-from", default="rept", metavar="METHOD",
                   help="who ranks the training rows for --select: rept (the index, default), a RepT mode "
                   f"({', '.join(index_modes)}: from the index's signatures), "
                   f"or {', '.join(fitted)} (run on the indexed rows, on the model the "
                   "index records; against-base: the rows `rept trace --against-base` shows, with the "
                   "settings below). One method per run: compare methods with one --out each")
    g = p.add_argument_group("the against-base culprits (--culprits-from against-base)")
    from rept.cli.options import add_against_base_args, add_context_arg

    add_against_base_args(g, "with --culprits-from against-base")
    add_context_arg(g, "with --culprits-from against-base", "on")
    p.add_argument("--method", choices=("remove", "unlearn", "both"), default="remove")
    p.add_argument("--seeds", type=int, default=3, help="random-removal controls")
    p.add_argument("--prompts", help="prompts to measure the behaviour on (default: the flagged queries' prompts)")
    p.add_argument("--heldout", help="held-out rows (prompt, response) for the utility loss")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--unlearn-steps", type=int, default=30)
    add_mode_arg(p, help="RepT scoring mode for --culprits-from rept (default: the index's)")
    p.add_argument("--device", default=None)


def run(args) -> int:
    from rich.console import Console

    from rept.data.datasets import load_dataset, load_prompts
    from rept.data.detect import Detector
    from rept.repair.mitigate import MitigationError, Selection, check_culprit_source, run_mitigation, summary_markdown
    from rept.repair.rounds import parse_rate, run_rounds
    from rept.query.trace import load_queries, open_tracer

    selection = Selection.parse(args.select)
    check_culprit_source(args.culprits_from)  # before the model is loaded
    until = parse_rate(args.until) if args.until is not None else None
    in_rounds = args.rounds is not None or until is not None
    if args.max_removed is not None and not in_rounds:
        raise MitigationError("--max-removed is the row budget of --rounds/--until; a single run's budget is "
                              "--select budget:N")
    if args.expand and not in_rounds:
        raise MitigationError("--expand adds rows to each round of --rounds/--until; a single run selects with --select")
    if in_rounds and args.method != "remove":
        raise MitigationError(f"--rounds retrain without the culprits; --method {args.method} is not for rounds")
    if args.culprits:
        if in_rounds:
            raise MitigationError("--culprits replaces the tracing step, and rounds trace in every round: use one")
        if args.culprits_from != "rept" or args.mode:
            raise MitigationError("--culprits gives the culprits: leave out --culprits-from and --mode")
        import os

        if not os.path.isfile(args.culprits):
            raise MitigationError(f"--culprits {args.culprits}: no such file")
    if args.mode and args.culprits_from != "rept":
        raise MitigationError(f"--mode sets the RepT mode of --culprits-from rept; with --culprits-from "
                              f"{args.culprits_from} leave it out (a RepT mode is also a --culprits-from name)")
    from rept.cli.options import AGAINST_BASE_FLAGS, against_base_method_settings

    given = [flag for flag in AGAINST_BASE_FLAGS + ("context",) if getattr(args, flag) is not None]
    if given and args.culprits_from != "against-base":
        raise MitigationError(f"--{given[0].replace('_', '-')} is a setting of --culprits-from against-base")
    culprit_settings = None
    if args.culprits_from == "against-base":  # bad values refused before any model loads
        culprit_settings = against_base_method_settings(args)
    detector = Detector(args.detect)
    queries = load_queries(args.queries)
    prompts = load_prompts(args.prompts) if args.prompts else None
    heldout = load_dataset(args.heldout).rows if args.heldout else None
    # a baseline's index (`rept index --method`) gives its own culprits; --mode is refused there
    tracer = open_tracer(args.index, device=args.device, progress=not args.quiet, mode=args.mode)
    console = Console(stderr=True, soft_wrap=True)  # a log line stays one line off a terminal too
    inputs = {"queries": args.queries, "prompts": args.prompts, "held-out rows": args.heldout,
              "culprits file": args.culprits}
    common = dict(seeds=args.seeds, data=args.data, prompts=prompts, heldout=heldout,
                  max_new_tokens=args.max_new_tokens, progress=not args.quiet, log=console.print,
                  culprits_from=args.culprits_from, inputs=inputs, overwrite=args.overwrite,
                  culprit_settings=culprit_settings)
    if in_rounds:
        from rept.repair.rounds import rounds_markdown

        results = run_rounds(tracer, queries, detector, args.out, selection, rounds=args.rounds, until=until,
                             max_removed=args.max_removed, expand=args.expand, **common)
        text = rounds_markdown(results)
    else:
        results = run_mitigation(tracer, queries, detector, args.out, selection, method=args.method,
                                 unlearn_steps=args.unlearn_steps, culprits_file=args.culprits, **common)
        text = summary_markdown(results)
    print(text)  # plain text: a Markdown table row is never wrapped or read as markup
    return 0
