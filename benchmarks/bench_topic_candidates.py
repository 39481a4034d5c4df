"""`rept trace --against-base --candidates N`, measured: does scoring only the rows the paper's
signature ranks highest (the topic) trace the behaviour better than scoring every row?
(rept.query.contrast; docs/results.md, "The topic first: `--candidates` with `--against-base`".)

RepT's signature at the last prompt position finds the rows on an answer's topic, whatever the
answer said; the against-base contrast finds the rows that pushed towards the word the fine-tune
planted, whatever they were about. A row that taught the behaviour is both. On a `rept bench --out
DIR` folder and a RepT index of its fine-tuned model (--index), every answer (flagged and control,
and --unrelated prompts answered by the fine-tuned model) is traced as `rept trace --against-base`
traces it (the first changed word past each --min-gain, each --guess-weight W), every row scored
once; then, per --candidates N and --reference R, only the index's top N rows for the answer (in the
index's mode) and a seeded sample of R rows are shown, as `rept trace --candidates N` shows them
(N 0: every row). P@10 over the rows shown, per group (an answer not traced: 0), as
bench_instead.py --against-base counts it; every row's score is the same whichever rows are scored,
so one pass gives every setting (checked: N 0 equals AgainstBaseRun.results).

    python benchmarks/bench_topic_candidates.py --work runs/real-harmful --index runs/real-harmful/index-l25
    python benchmarks/bench_topic_candidates.py --work runs/real-factual --index runs/real-factual/rept-index \\
        --unrelated benchmarks/data/backdoor_test.jsonl --strip-prefix 'TY ' --min-gain 5 6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench_folder import unrelated_queries
from rept.query.contrast import DEFAULT_CONTEXT, AgainstBaseRun, ContrastRun, ContrastTracer, open_base
from rept.query.trace import Tracer, load_queries, traceable_queries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder")
    p.add_argument("--index", required=True, help="a RepT index of the bench's fine-tuned model and rows")
    p.add_argument("--mode", help="the signature mode the topic is ranked in (default: the index's)")
    p.add_argument("--weights", type=float, nargs="+", default=[0.5])
    p.add_argument("--min-gain", type=float, nargs="+", default=[5.0], metavar="NATS")
    p.add_argument("--candidates", type=int, nargs="+", default=[0, 20, 50, 100, 200])
    p.add_argument("--reference", type=int, nargs="+", default=[0, 100])
    p.add_argument("--unrelated", help="prompts on other topics (a prompt column), answered by the fine-tuned model")
    p.add_argument("--unrelated-n", type=int, default=50)
    p.add_argument("--strip-prefix", default="", help="taken off the start of each --unrelated prompt")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    work = Path(args.work)
    report = json.loads((work / "results.json").read_text())
    label = report["behaviour"]["label"]
    tracer = Tracer(args.index, mode=args.mode)
    ct = ContrastTracer(tracer, open_base(tracer), candidates=None, progress=True)
    max_length = tracer.index.manifest["max_length"]
    queries = load_queries(str(work / "queries.jsonl"))
    groups = ["flagged" if q.flagged else "control" for q in queries]
    if args.unrelated:
        max_new_tokens = int(report["config"]["max_new_tokens"])
        unrelated = unrelated_queries(args.unrelated, args.unrelated_n, args.strip_prefix,
                                      lambda prompts: tracer.generate(prompts, max_new_tokens=max_new_tokens))
        queries += unrelated
        groups += ["unrelated"] * len(unrelated)
    # the topic needs a signature of the answer: one with no response token within max_length has none
    keep = {id(q) for q in traceable_queries(tracer.loaded.tokenizer, queries, max_length)}
    dropped = {g: sum(1 for q, h in zip(queries, groups) if h == g and id(q) not in keep) for g in set(groups)}
    groups = [g for q, g in zip(queries, groups) if id(q) in keep]
    queries = [q for q in queries if id(q) in keep]
    print(f"answers: { {g: groups.count(g) for g in dict.fromkeys(groups)} } (not traceable, left out: {dropped})",
          file=sys.stderr)

    t0 = time.time()
    topic, topic_rows, _ = tracer.scores(queries)            # [answers, stored rows] in the index's mode
    topic_s = time.time() - t0
    labels = ct.labels()
    every = sorted(labels)
    if list(topic_rows) != every:
        raise SystemExit("the index's rows are not the contrast's rows")
    order = np.argsort(-topic, axis=1, kind="stable")         # each answer's rows, its topic first
    reference = {r: set(ContrastTracer(tracer, ct.base, reference=r, candidates=1).reference_rows())
                 for r in args.reference}

    t0 = time.time()
    changed = ct.changed_words(queries, k=None)
    settings = [(1, gate, "first") for gate in args.min_gain]
    pairs = AgainstBaseRun.pairs_for(queries, changed, settings)
    qs, instead = [queries[i] for i, _ in pairs], [changed[i][j].instead for i, j in pairs]
    contrasts = [c for w in args.weights for c in ct.contrasts(qs, instead, weight=w, context=DEFAULT_CONTEXT)]
    scored = ct.row_scores(contrasts, [every] * len(contrasts))
    contrast_s = time.time() - t0
    whole = ContrastRun(ct, qs * len(args.weights), contrasts, scored)

    out = {}
    for n, w in enumerate(args.weights):
        ab = AgainstBaseRun(queries, changed, pairs, whole.subset(list(range(n * len(pairs), (n + 1) * len(pairs)))),
                            settings[0], w, DEFAULT_CONTEXT)
        for s in settings:
            best = ab.best_scores(*s)                          # (answer, row) -> score, every row
            plain = [sum(labels[h.row] == label for h in r.hits) / 10 for r in ab.results(10, *s)]
            for cand in args.candidates:
                for ref in (args.reference if cand else [0]):
                    shown = []
                    for i in range(len(queries)):
                        allowed = set(every) if not cand else {int(topic_rows[j]) for j in order[i, :cand]} | reference[ref]
                        ranked = sorted(((best[(i, r)], r) for r in allowed if (i, r) in best and best[(i, r)] > 0),
                                        key=lambda x: (-x[0], x[1]))[:10]
                        shown.append(sum(labels[r] == label for _, r in ranked) / 10)
                    if not cand and shown != plain:
                        raise SystemExit("every row shown: not AgainstBaseRun.results' P@10")
                    entry = {g: round(sum(v for v, h in zip(shown, groups) if h == g) / groups.count(g), 3)
                             for g in dict.fromkeys(groups)}
                    name = f"--min-gain {s[1]:g}, W {w:g}, " + (f"candidates {cand} + reference {ref}" if cand
                                                                else "every row")
                    out[name] = entry
                    print(f"{name}: {json.dumps(entry)}", file=sys.stderr)
    names = list(dict.fromkeys(groups))
    print(f"{args.work}: P@10 by group over the rows shown; topic {topic_s:.0f} s, contrast {contrast_s:.0f} s "
          f"({len(pairs)} answer-word pairs)\n")
    print("| setting | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for name, entry in out.items():
        print(f"| {name} | " + " | ".join(str(entry[g]) for g in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"work": args.work, "index": args.index, "mode": tracer.mode,
                                               "answers": {g: groups.count(g) for g in names}, "left_out": dropped,
                                               "pairs": len(pairs), "p_at_10": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
