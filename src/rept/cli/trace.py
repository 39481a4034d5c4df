"""`rept trace`: rank the training rows for a misbehaving output (and, with --tokens, their words)."""

from __future__ import annotations

import json

from rept.cli.options import add_index_model_args, add_mode_arg, positive

HELP = "rank training rows for a misbehaving output"


def add_arguments(p) -> None:
    p.add_argument("--index", required=True, help="index folder made by `rept index`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt (with --response, or --generate)")
    src.add_argument("--queries", help="JSONL/CSV/Parquet with prompt, response[, label, flagged] "
                     "(with --generate, prompts only)")
    p.add_argument("--response", help="the output to trace")
    p.add_argument("--generate", action="store_true", help="let the model answer greedily and trace its answers")
    p.add_argument("--max-new-tokens", type=positive, default=64, help="with --generate: the answer's length at most")
    p.add_argument("--top-k", type=positive, default=10, help="training rows to show per query")
    add_mode_arg(p)
    p.add_argument("--tokens", action="store_true",
                   help="score every word of the top rows; show their top phrases (JSON: words and phrases)")
    p.add_argument("--token-layer", type=int, default=None, metavar="N",
                   help="with --tokens: hidden_states index for the per-token gradients (default: the index's layer)")
    p.add_argument("--search", choices=("exact", "flat", "ivf", "ivfpq"), default="exact",
                   help="top-k search: exact (default: every row scored, shard by shard), or a faiss index built in "
                   "memory over the stored signatures: flat (exact), ivf or ivfpq (approximate, for large "
                   "stores: recall@100 0.72-0.99 on 1M rows, docs/performance.md)")
    p.add_argument("--nprobe", type=positive, default=None,
                   help="with --search ivf/ivfpq: clusters scanned per query (default: nlist / 16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_index_model_args(p)


def _queries(args, tracer):
    """The queries the flags name: a file, or one --prompt with its --response, or the model's answers."""
    from rept.query.trace import Query, QueryError, load_queries

    if args.queries:
        queries = load_queries(args.queries, need_response=not args.generate)
        if args.generate:
            answers = tracer.generate([q.prompt for q in queries], max_new_tokens=args.max_new_tokens,
                                      progress=not args.quiet)
            queries = [Query(q.prompt, a, q.label, q.flagged) for q, a in zip(queries, answers)]
        return queries
    if args.generate:
        return [Query(args.prompt, tracer.generate([args.prompt], max_new_tokens=args.max_new_tokens)[0])]
    if args.response is None:
        raise QueryError("--prompt needs --response, or --generate to let the model answer")
    return [Query(args.prompt, args.response)]


def run(args) -> int:
    from rept.cli.options import open_index
    from rept.signatures.tokens import attach_word_scores, resolve_token_layer

    if args.nprobe is not None and args.search not in ("ivf", "ivfpq"):
        from rept.query.trace import QueryError

        raise QueryError(f"--nprobe sets how much of an IVF index is scanned; it needs --search ivf or ivfpq, "
                         f"not {args.search}")
    tracer = open_index(args)
    token_layer = resolve_token_layer(tracer, args.token_layer) if args.tokens else None  # checked before any work
    mode = tracer.search_mode(args.mode)  # likewise: before any answer is generated
    queries = _queries(args, tracer)
    results = tracer.trace(queries, k=args.top_k, mode=mode)
    if args.tokens:
        attach_word_scores(tracer, results, layer=token_layer)
    if args.json:
        out = {"layer": tracer.layer, "mode": mode, "search": args.search}
        if tracer.method_name is not None:
            out["method"] = tracer.method_name
        if args.tokens:
            out["token_layer"] = token_layer
        out["queries"] = [r.to_dict() for r in results]
        print(json.dumps(out, indent=2))
        return 0
    from rept.render import print_results

    print_results(results, show_words=args.tokens, token_layer=token_layer)
    return 0
