"""`rept report`: a self-contained HTML audit report (token heat maps, score histograms, layer curve, metrics)."""

from __future__ import annotations

HELP = ("write one self-contained HTML audit report: top rows with word heat maps, histograms, layer curve, metrics"
        " (and mitigation charts)")


def add_arguments(p) -> None:
    from rept.cli.options import add_index_model_args, add_mode_arg, positive

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
    add_index_model_args(p)


def run(args) -> int:
    import sys

    from rept.cli.options import open_index
    from rept.report import write_report
    from rept.query.trace import load_queries

    queries = load_queries(args.queries)
    tracer = open_index(args, signatures_only=True)  # word heat maps need RepT signatures
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    data = write_report(tracer, queries, args.out, k=args.top_k, mode=args.mode, max_queries=args.max_queries, log=log,
                        token_layer=args.token_layer, mitigations=args.mitigation)
    extra = f", {len(data.mitigations)} mitigation result{'s' if len(data.mitigations) != 1 else ''}" \
        if data.mitigations else ""
    print(f"wrote {args.out}: {data.run['n_queries']} queries, top {data.run['k']} rows each{extra}")
    return 0
