"""`rept trace`: rank the training rows for a misbehaving output (and, with --tokens, their words)."""

from __future__ import annotations

import json

from rept.cli.options import (AGAINST_BASE_FLAGS, add_against_base_args, add_context_arg, add_index_model_args,
                              add_mode_arg, against_base_setting, positive, refuse_without_against_base)

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
    contrast = p.add_argument_group("behaviour, not topic (docs/cli.md, rept.query.contrast)")
    contrast.add_argument("--instead", metavar="TEXT",
                          help="what the model should have said (with --prompt): rank the rows that pushed the "
                          "base model towards the response rather than TEXT, by a signed score")
    contrast.add_argument("--contrast", action="store_true",
                          help="the same for --queries, each against its `instead` column")
    contrast.add_argument("--against-base", action="store_true",
                          help="each answer against itself with a word the fine-tune planted put back to the "
                          "base model's guess (no --instead needed; which word: --pick, --min-gain)")
    add_against_base_args(contrast, "with --against-base")
    contrast.add_argument("--base-model", metavar="PATH",
                          help="with a contrast (--instead, --contrast, --against-base): the model before the "
                          "fine-tune (default: the index's model with its adapter off)")
    contrast.add_argument("--contrast-layer", type=int, default=None, metavar="N",
                          help="with a contrast: hidden_states index of the gradients compared "
                          "(default: -1, the final normed output)")
    contrast.add_argument("--contrast-tokens", type=int, default=None, metavar="N",
                          help="with a contrast: compare only the first N tokens of the words that "
                          "differ (default: all of them)")
    add_context_arg(contrast, "with a contrast", "on with --against-base, off with --instead and --contrast")
    contrast.add_argument("--candidates", type=int, default=None, metavar="N",
                          help="with a contrast: score the N rows the index ranks highest for each "
                          "query and a seeded sample of 100 rows of the whole index, the others score 0 "
                          "(default: 100 with --instead/--contrast, every row with --against-base; 0: every row)")
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
        if args.contrast:
            lacking = [i + 1 for i, q in enumerate(queries) if q.instead is None]
            if lacking:
                raise QueryError(f"--contrast: {args.queries} has no `instead` (what the model should have said) "
                                 f"for query {lacking[0]}" + (f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""))
        if args.generate:
            answers = tracer.generate([q.prompt for q in queries], max_new_tokens=args.max_new_tokens,
                                      progress=not args.quiet)
            queries = [Query(q.prompt, a, q.label, q.flagged, q.instead) for q, a in zip(queries, answers)]
        return queries
    if args.generate:
        return [Query(args.prompt, tracer.generate([args.prompt], max_new_tokens=args.max_new_tokens)[0],
                      instead=args.instead)]
    if args.response is None:
        raise QueryError("--prompt needs --response, or --generate to let the model answer")
    return [Query(args.prompt, args.response, instead=args.instead)]


def _check_contrast_flags(args) -> bool:
    """Whether the command traces a contrast (--instead or --contrast); the flags that belong to it
    are refused without it, and --instead with --queries, in one line."""
    from rept.query.trace import QueryError

    if args.against_base and (args.instead is not None or args.contrast):
        raise QueryError("--against-base takes the base model's guess as the alternative; it cannot be "
                         "combined with --instead or --contrast")
    if args.instead is not None and args.queries:
        raise QueryError("--instead is the alternative of one --prompt; for --queries give an `instead` column "
                         "and --contrast")
    if args.contrast and not args.queries:
        raise QueryError("--contrast reads the `instead` column of --queries; with --prompt give --instead TEXT")
    on = args.instead is not None or args.contrast or args.against_base
    refuse_without_against_base(args, AGAINST_BASE_FLAGS)  # --base-model serves --instead too
    against_base_setting(args)  # bad values refused before any model loads
    given = [f for f, v in (("--base-model", args.base_model), ("--contrast-layer", args.contrast_layer),
                            ("--contrast-tokens", args.contrast_tokens), ("--context", args.context),
                            ("--candidates", args.candidates))
             if v is not None]
    if given and not on:
        raise QueryError(f"{given[0]} belongs to a contrast: give --instead TEXT, --contrast with --queries, "
                         "or --against-base")
    if on and args.token_layer is not None:
        raise QueryError("--token-layer has no effect with a contrast: the words are scored at "
                         "--contrast-layer")
    if on and args.candidates is not None and args.candidates < 0:
        raise QueryError(f"--candidates must be 0 (every row) or more, not {args.candidates}")
    return on


def run(args) -> int:
    from rept.cli.options import open_index
    from rept.signatures.tokens import attach_word_scores, resolve_token_layer

    if args.nprobe is not None and args.search not in ("ivf", "ivfpq"):
        from rept.query.trace import QueryError

        raise QueryError(f"--nprobe sets how much of an IVF index is scanned; it needs --search ivf or ivfpq, "
                         f"not {args.search}")
    contrast = _check_contrast_flags(args)
    tracer = open_index(args)
    mode = tracer.search_mode(args.mode)  # checked before any answer is generated
    if contrast:
        return _run_contrast(args, tracer, mode)
    token_layer = resolve_token_layer(tracer, args.token_layer) if args.tokens else None  # likewise
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


def _run_contrast(args, tracer, mode) -> int:
    """`--instead` / `--contrast` / `--against-base`: the signed contrast on the base model
    (rept.query.contrast)."""
    from rept.query.contrast import DEFAULT_CANDIDATES, DEFAULT_LAYER, ContrastTracer, open_base

    base = open_base(tracer, args.base_model, dtype=args.dtype, device=args.device)
    layer = DEFAULT_LAYER if args.contrast_layer is None else args.contrast_layer
    # --against-base scores every row unless told: the topic's candidates rank its behaviour's rows lower
    # (docs/results.md, "The topic first: --candidates with --against-base"); --instead keeps the cheap default
    if args.candidates is None:
        candidates = None if args.against_base else DEFAULT_CANDIDATES
    else:
        candidates = args.candidates or None
    ct = ContrastTracer(tracer, base, layer=layer, candidates=candidates,  # checked before any answer
                        first_tokens=args.contrast_tokens, mode=mode, progress=not args.quiet)
    queries = _queries(args, tracer)
    if args.against_base:
        return _run_against_base(args, ct, queries, mode)
    results, contrasts = ct.trace(queries, [q.instead for q in queries], k=args.top_k, tokens=args.tokens,
                                  context=bool(args.context))
    if args.json:
        out = _contrast_json(args, ct, mode)
        out["queries"] = [r.to_dict() | _compared(c) for r, c in zip(results, contrasts)]
        print(json.dumps(out, indent=2))
        return 0
    from rept.render import print_results

    print_results(results, show_words=args.tokens, token_layer=ct.layer if args.tokens else None)
    for i, (r, c) in enumerate(zip(results, contrasts)):
        if not r.hits:
            said, other = c.words
            print(f"query {i + 1}: no row pushed {said!r} over {other!r}")
    return 0


def _run_against_base(args, ct, queries, mode) -> int:
    """`--against-base`: each answer against the base model's guesses at its words changed most,
    those that gained less than --min-gain (a change of wording) left out."""
    from dataclasses import replace

    from rept.query.trace import QueryResult

    words, min_gain, pick, weight, context = against_base_setting(args)
    ab = ct.against_base(queries, words=words, min_gain=min_gain, pick=pick, weight=weight, context=context)
    traced = ab.traced()  # the run's own setting: these words, this gate, this pick
    found = ab.results(args.top_k, tokens=args.tokens)
    results = [QueryResult(replace(r.query, instead=ab.changed[i][js[0]].instead) if js else r.query, r.hits)
               for i, (r, js) in enumerate(zip(found, traced))]
    if args.json:
        out = _contrast_json(args, ct, mode)
        out["contrast"] |= {"changed_words": words, "min_gain": min_gain, "pick": pick, "guess_weight": weight,
                            "context": context}
        out["queries"] = []
        for i, r in enumerate(results):
            c = ab.contrast(i, traced[i][0]) if traced[i] else None
            shown = sorted(set(traced[i]) | ({0} if ab.changed[i] else set()))  # the traced words and the top one
            out["queries"].append(r.to_dict() | _compared(c) | {"changed": [
                {"word": w.word, "gain": w.gain, "base_logprob": w.base_logprob, "tuned_logprob": w.tuned_logprob,
                 "start": w.start, "instead": w.instead, "traced": j in traced[i]}
                for j, w in ((j, ab.changed[i][j]) for j in shown)]})
        print(json.dumps(out, indent=2))
        return 0
    from rept.render import print_results

    print_results(results, show_words=args.tokens, token_layer=ct.layer if args.tokens else None)
    for i, r in enumerate(results):
        if not ab.changed[i]:
            print(f"query {i + 1}: the base model predicts every token of this answer: no row taught it")
            continue
        if not traced[i]:
            w = ab.changed[i][0]
            print(f"query {i + 1}: the word the fine-tune changed most, {w.word!r}, is only {w.gain:.1f} nats more "
                  f"likely than on the base model (--min-gain {min_gain:g}): a change of wording, not traced")
            continue
        pairs = [(ab.contrast(i, j).words, ab.changed[i][j].gain) for j in traced[i]]
        print(f"query {i + 1}: " + "; ".join(f"{said!r} against the base model's {other!r} ({gain:+.1f} nats on the "
                                             "fine-tuned model)" for (said, other), gain in pairs)
              + ("" if r.hits else ": no row pushed the answer over the base model's guess"))
    return 0


def _contrast_json(args, ct, mode) -> dict:
    """The JSON head of a contrast run: how it was traced."""
    candidates = ct.candidates
    return {"layer": ct.tracer.layer, "mode": mode, "search": args.search,
            "contrast": {"layer": ct.layer, "base_model": ct.base.model_id, "candidates": candidates,
                         "reference": ct.reference if candidates else None, "tokens": ct.first_tokens,
                         "context": bool(args.context),  # --against-base's own default: its settings below
                         "against_base": bool(args.against_base)}}


def _compared(c) -> dict:
    """A query's compared words and direction norm in JSON (null without a contrast)."""
    said, other = c.words if c else (None, None)
    return {"compared": {"response": said, "instead": other} if c else None,
            "direction_norm": float(c.direction.norm()) if c else None}
