"""`rept eval`: precision@k, pooled auPRC@k, AP and recall@k of an index for labelled queries."""

from __future__ import annotations

import json

from rept.cli.options import (add_against_base_group, add_index_model_args, add_mode_arg, against_base_request,
                              positive)

HELP = "precision@k, pooled auPRC@k, AP and recall@k for labelled queries"


def add_arguments(p) -> None:
    p.add_argument("--index", required=True, help="index folder made by `rept index` (or a method index)")
    p.add_argument("--queries", required=True, help="queries with a label column (flagged=false rows are skipped)")
    p.add_argument("--k", type=positive, nargs="+", default=[10, 50, 100], help="the k of P@k, auPRC@k, recall@k")
    add_mode_arg(p)
    p.add_argument("--per-query", action="store_true",
                   help="also each query's P@k (the smallest k) and AP, worst first: which answers are missed")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_against_base_group(p, "score each answer as `rept trace --against-base --candidates 0` ranks it (every row, "
                           "on the base model), on the rows it shows: a row not shown, and every row of an answer "
                           "not traced, counts as not found")
    add_index_model_args(p)


def run(args) -> int:
    from rept.cli.options import open_index
    from rept.evaluate.metrics import evaluate, per_query_table
    from rept.query.trace import QueryError, load_queries, relevance

    queries = [q for q in load_queries(args.queries) if q.flagged is not False]
    labelled = [q for q in queries if q.label is not None]
    if not labelled:
        raise QueryError(f"{args.queries}: no query has a label (eval needs a label column naming the behaviour)")
    setting = against_base_request(args)  # refused before the index opens
    tracer = open_index(args, signatures_only=args.against_base)
    retrieved, traced = None, None
    if args.against_base:
        scores, labels, retrieved, traced = _against_base_scores(args, tracer, labelled, setting)
    else:
        scores, _, labels = tracer.scores(labelled, mode=args.mode)
    relevant = relevance(labels, labelled)
    metrics = evaluate(scores, relevant, ks=tuple(args.k), retrieved=retrieved)
    if traced is not None:
        metrics["answers_traced"] = sum(map(bool, traced))
    worst = per_query_table(scores, relevant, labelled, min(args.k), retrieved) if args.per_query else None
    if args.json:
        print(json.dumps(metrics | ({"per_query": worst} if worst is not None else {}), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    from rept.render import one_line

    table = Table(title=f"{len(labelled)} labelled queries, {scores.shape[1]} training rows")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if worst:
        k = min(args.k)
        table = Table(title=f"the 10 queries with the lowest P@{k}")
        for column in (f"P@{k}", "AP", "prompt", "response"):
            table.add_column(column, justify="right" if column in (f"P@{k}", "AP") else "left")
        for q in worst[:10]:
            table.add_row(f"{q[f'P@{k}']:.2f}", "-" if q["AP"] is None else f"{q['AP']:.3f}", one_line(q["prompt"], 60),
                          one_line(q["response"], 60))
        Console().print(table)
    return 0


def _against_base_scores(args, tracer, queries, setting):
    """[queries, stored rows] of `rept trace --against-base` over every row: a row's best score over
    the answer's traced words where it pushed towards the answer, -inf (not shown) elsewhere; the
    rows' labels, the shown mask and the words each answer was traced against."""
    import numpy as np

    from rept.query.contrast import ContrastTracer, open_base

    base = open_base(tracer, args.base_model, dtype=args.dtype, device=args.device)
    ct = ContrastTracer(tracer, base, candidates=None, mode=args.mode, progress=not args.quiet)
    words, min_gain, pick, weight, context = setting
    run = ct.against_base(queries, words=words, min_gain=min_gain, pick=pick, weight=weight, context=context)
    labels = ct.labels()
    rows = sorted(labels)
    scores = run.shown_scores(rows)
    return scores, [labels[row] for row in rows], scores > -np.inf, run.traced_words()
