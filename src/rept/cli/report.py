"""`rept report`: a self-contained HTML audit report (token heat maps, score histograms, layer curve, metrics)."""

from __future__ import annotations

HELP = ("write one self-contained HTML audit report: top rows with word heat maps, histograms, layer curve, metrics"
        " (and mitigation charts)")


def add_arguments(p) -> None:
    from rept.cli.options import add_against_base_group, add_index_model_args, add_mode_arg, positive

    p.add_argument("--index", required=True, help="index folder made by `rept index` (or `rept demo`)")
    p.add_argument("--queries", required=True, help="JSONL/CSV/Parquet with prompt, response[, label, flagged]; "
                   "flagged=false rows (controls) are left out")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--top-k", type=positive, default=10, help="training rows per query (default 10)")
    p.add_argument("--max-queries", type=positive, default=None, help="report on the first N queries only")
    add_mode_arg(p)
    p.add_argument("--token-layer", type=int, default=None,
                   help="hidden_states index for the word scores (default: the index's layer L)")
    p.add_argument("--mitigation", action="append", default=[], metavar="RESULTS_JSON",
                   help="a `rept mitigate` results.json (or its folder): adds before/after bar charts of the "
                   "behaviour rate and clean loss; repeat to compare runs (e.g. one per --culprits-from)")
    add_against_base_group(p, "rank the rows as `rept trace --against-base --candidates 0 --tokens` does (each "
                           "answer against the base model's guess at a word the fine-tune planted, every row scored "
                           "on the base model, signed) instead of by signature")
    add_index_model_args(p)


def run(args) -> int:
    import sys

    from rept.cli.options import open_index
    from rept.report import write_report
    from rept.query.trace import load_queries

    from rept.cli.options import against_base_request
    from rept.query.trace import QueryError

    setting = against_base_request(args)  # refused before the index opens
    if setting is not None and args.token_layer is not None:
        raise QueryError("--token-layer has no effect with --against-base: the words are scored by the contrast, "
                         "at the final normed output")
    queries = load_queries(args.queries)
    tracer = open_index(args, signatures_only=True)  # word heat maps need RepT signatures
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    against_base = None
    if setting is not None:
        from rept.query.contrast import ContrastTracer, open_base

        base = open_base(tracer, args.base_model, dtype=args.dtype, device=args.device)
        against_base = (ContrastTracer(tracer, base, candidates=None, mode=args.mode, progress=not args.quiet),
                        setting)
    data = write_report(tracer, queries, args.out, k=args.top_k, mode=args.mode, max_queries=args.max_queries, log=log,
                        token_layer=args.token_layer, mitigations=args.mitigation, against_base=against_base)
    extra = f", {len(data.mitigations)} mitigation result{'s' if len(data.mitigations) != 1 else ''}" \
        if data.mitigations else ""
    print(f"wrote {args.out}: {data.run['n_queries']} queries, top {data.run['k']} rows each{extra}")
    return 0
