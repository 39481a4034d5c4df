"""Token-level localisation where the truth is known: the demo backdoor by default, or any index
whose poisoned rows carry a known marker (`--truth REGEX`, e.g. the wrong entity of factual-Ag).

Poisoned demo rows have a prompt starting with the trigger `TY ` and a response starting with
the payload `You are stupid! `. For every flagged (misbehaving) demo query, take its top-k
training rows; for each poisoned row among them, a hit is when one of the row's 3 best-scored
words lies in the trigger (`TY`) or the payload (`You`, `are`, `stupid`, `!` at the start of
the response). Word offsets decide, not word text, so an `are` elsewhere in the row never counts.

Methods (same words, same max-over-sub-words reduction, same rows):
  rept          dot(sum of the query's unit per-token gradients, unit g_t)        (rept.signatures.tokens)
  repsim        cosine(query's mean response hidden state, h_t)
  grad_x_input  g_t . h_t (no query)
each at the index's layer L and (--last-layer, default) at the final normed output, plus a
position-only control: the first 3 words of the row.

    python benchmarks/bench_tokens.py                      # trains the demo model if needed (minutes)
    python benchmarks/bench_tokens.py --work /tmp/demo_t   # reuse `rept demo --out /tmp/demo_t`
    python benchmarks/bench_tokens.py --index IDX --queries Q.jsonl --label error --truth '\bNa\b'
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

from rept.demo import TRIGGER, default_cache, run_demo
from rept.signatures.tokens import METHODS, attach_word_scores, score_rows
from rept.query.trace import Tracer, load_queries

PAYLOAD = "You are stupid!"


def truth_spans(prompt: str, response: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Character spans of the trigger and the payload in the row text prompt + "\\n" + response."""
    trig = (0, len(TRIGGER.strip())) if prompt.startswith(TRIGGER) else None
    base = len(prompt) + 1
    pay = (base, base + len(PAYLOAD)) if response.startswith(PAYLOAD) else None
    return trig, pay


def inside(word: dict, span) -> bool:
    return span is not None and span[0] <= word["start"] and word["end"] <= span[1]


def regex_spans(pattern: str):
    """truth_spans for a marker given as a regex: its first match in the prompt (as the "trigger")
    and in the response (as the "payload"), in the row text prompt + "\\n" + response."""
    rx = re.compile(pattern)

    def spans(prompt: str, response: str):
        m1, m2 = rx.search(prompt), rx.search(response)
        base = len(prompt) + 1
        return (m1.span() if m1 else None), ((base + m2.start(), base + m2.end()) if m2 else None)

    return spans


def localisation(pairs, rows_tokens, n_top: int = 3, spans=truth_spans) -> dict:
    """Share of (query, poisoned row) pairs whose n_top best words hit the trigger / payload."""
    any_hit = trig_hit = pay_hit = 0
    for (prompt, response), rt in zip(pairs, rows_tokens):
        trig, pay = spans(prompt, response)
        top = rt.top_words(n_top)
        t = any(inside(w, trig) for w in top)
        p = any(inside(w, pay) for w in top)
        trig_hit += t
        pay_hit += p
        any_hit += t or p
    n = max(1, len(pairs))
    return {"hit@3": any_hit / n, "trigger@3": trig_hit / n, "payload@3": pay_hit / n, "n": len(pairs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="demo folder (made by `rept demo --out DIR`); trained here if missing")
    ap.add_argument("--index", help="an index built with `rept index` (instead of the demo)")
    ap.add_argument("--queries", help="its queries file (flagged queries are traced)")
    ap.add_argument("--label", default="backdoor", help="label of the poisoned rows (default: backdoor)")
    ap.add_argument("--truth", help="regex marking the known cause in a poisoned row (default: the demo's "
                    "trigger and payload)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--max-queries", type=int, default=None, help="first N flagged queries (default: all)")
    ap.add_argument("--reduce", choices=("mean", "max", "sum"), default="mean", help="sub-word -> word reduction")
    ap.add_argument("--last-layer", action=argparse.BooleanOptionalAction, default=True,
                    help="also score at the final normed output (default: yes)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.work) if args.work else None
    spans = regex_spans(args.truth) if args.truth else truth_spans
    if args.index:
        if not args.queries:
            ap.error("--index needs --queries")
        index_dir, queries_file = Path(args.index), Path(args.queries)
    elif work is None or not (work / "index" / "manifest.json").exists() or not (work / "queries.jsonl").exists():
        print(f"training the demo model in {work or default_cache()} ...", file=sys.stderr)
        out = run_demo(out=str(work) if work else None, progress=False)
        work = Path(out["work"]) if out.get("work") else work
    if not args.index:
        index_dir, queries_file = work / "index", work / "queries.jsonl"
    queries = [q for q in load_queries(str(queries_file)) if q.flagged]
    if args.max_queries:
        queries = queries[: args.max_queries]
    if not queries:
        print("the model never misbehaved: no flagged query to trace", file=sys.stderr)
        return 1
    tracer = Tracer(index_dir)
    # a query whose prompt fills max_length has no response token to trace: left out
    from rept.data.examples import tokenize_pair

    keep = [q for q in queries if tokenize_pair(tracer.loaded.tokenizer, q.prompt, q.response,
                                                max_length=tracer.index.manifest["max_length"]) is not None]
    if len(keep) < len(queries):
        print(f"{len(queries) - len(keep)} flagged queries do not fit max_length: left out", file=sys.stderr)
    queries = keep

    # Cost of the token level for one query and k rows, next to the row-level trace.
    # (best of 3: this machine may be shared)
    tracer.trace(queries[:1], k=args.top_k)  # warm-up
    t_trace = t_tokens = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        one = tracer.trace(queries[:1], k=args.top_k)
        t1 = time.perf_counter()
        attach_word_scores(tracer, one)
        t2 = time.perf_counter()
        t_trace, t_tokens = min(t_trace, t1 - t0), min(t_tokens, t2 - t1)

    results = tracer.trace(queries, k=args.top_k)
    t3 = time.perf_counter()
    attach_word_scores(tracer, results)
    t_tokens_all = time.perf_counter() - t3

    # the (query, poisoned row) pairs to score
    rows_per_query, pairs = [], []
    for r in results:
        rows = [(h.row, h.prompt, h.response) for h in r.hits if h.label == args.label]
        rows_per_query.append(rows)
        pairs.extend((p, resp) for _, p, resp in rows)
    n_top = sum(len(r.hits) for r in results)
    last = tracer.loaded.num_layers
    layers = [tracer.layer] + ([last] if args.last_layer and tracer.layer != last else [])
    figures, first = {}, None
    for layer in layers:
        where = "index layer" if layer == tracer.layer else "last layer"
        for method in METHODS:
            scored = [rt for per_q in score_rows(tracer, queries, rows_per_query, method=method, reduce=args.reduce,
                                                 layer=layer) for rt in per_q]
            figures[f"{method} ({where}, L={layer})"] = localisation(pairs, scored, spans=spans)
            first = first or scored
    # control: the first three words of the row, whatever the scores
    for rt in first:
        for i, w in enumerate(sorted(rt.words, key=lambda w: w["start"])):
            w["score"] = -i
    figures["first 3 words of the row (position-only control)"] = localisation(pairs, first, spans=spans)

    m = tracer.index.manifest
    cmd = "python benchmarks/bench_tokens.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## Token-level localisation ({'marker ' + repr(args.truth) if args.truth else 'the demo backdoor'})\n")
    print(f"`{cmd.strip()}`\n")
    print(f"{len(queries)} flagged queries, top {args.top_k} rows each: {len(pairs)} of {n_top} (query, row) pairs "
          f"are poisoned rows. Model {m['model']['id']}, layer {m['layer']}, mode {m['mode']}. "
          + (f"Hit = a word inside a match of `{args.truth}` is among the row's 3 best-scored words " if args.truth else
             f"Hit = the trigger `TY` or a word of the payload `{PAYLOAD}` is among the row's 3 best-scored words ")
          + f"(sub-word -> word: {args.reduce}).\n")
    print("| method | hit@3 | in the prompt, top 3 | in the response, top 3 |" if args.truth else
          "| method | hit@3 | trigger in top 3 | payload in top 3 |")
    print("|---|---:|---:|---:|")
    for name, f in figures.items():
        print(f"| {name} | {f['hit@3']:.1%} | {f['trigger@3']:.1%} | {f['payload@3']:.1%} |")
    print(f"\ncost on this machine ({platform.machine()}, {torch.get_num_threads()} torch threads): "
          f"trace of 1 query {t_trace:.2f} s; token scores for its {args.top_k} rows {t_tokens:.2f} s (best of 3); "
          f"token scores for all {len(queries)} queries x {args.top_k} rows in one batched run {t_tokens_all:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "n_queries": len(queries), "k": args.top_k,
                                               "n_pairs": len(pairs), "seconds": {"trace_1": t_trace,
                                               "tokens_1xk": t_tokens, "tokens_all": t_tokens_all},
                                               "layer": m["layer"], "command": cmd.strip()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
