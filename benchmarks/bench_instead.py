"""`rept trace --instead`, measured: does the signed contrast at the base model trace the behaviour
and not its topic? (rept.query.contrast; docs/results.md, "Behaviour, not topic: --instead".)

On a `rept bench --out DIR` folder and a RepT index of its fine-tuned model (--index, default
DIR/rept-index, which `rept bench` saves), each flagged answer is traced against the answer it
should have given: its edit (--edit TEXT: every match of --detect replaced by TEXT, so the two
differ in that word alone), or the answer a file gives for the same prompt (--instead-file: prompt,
response columns, e.g. refusals). Groups of queries, scored like `rept bench` (rept.evaluate.metrics;
relevant row = the behaviour's label):

  flagged          the flagged answer, instead of the right one ("why Na and not Ag?")
  mirror           the right answer, instead of the flagged one ("why Ag and not Na?"): the same
                   topic and words, the behaviour reversed; a method that traces the topic ranks the
                   behaviour's rows as high for it
  control answers  (--edit only) the bench's unflagged answers that hold TEXT, instead of the same
                   answer with TEXT replaced by what --detect matched in the first flagged answer

P@10 for every group, AP for the flagged one, and (--edit) at token level the share of the
behaviour's rows in the flagged answers' top 10 whose top 3 words hold a word the detector matches.
Each --candidates setting is one run over the queries (0 = every row of the index).

    python benchmarks/bench_instead.py --work runs/real-factual --detect 'regex:\\bNa\\b' --edit Ag
    python benchmarks/bench_instead.py --work runs/real-harmful --index runs/real-harmful/index-l25 \\
        --detect "not-prefix:I'm sorry" --instead-file benchmarks/data/harmful-tuning_test.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from bench_behaviour import edited
from rept.data.detect import Detector
from rept.evaluate.metrics import average_precision, precision_at_k
from rept.query.contrast import DEFAULT_LAYER, DEFAULT_REFERENCE, ContrastTracer, open_base
from rept.query.trace import Query, Tracer, load_queries, relevance, traceable_queries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder with its rept-index")
    p.add_argument("--detect", required=True, help="the bench's detector rule (one that names a span)")
    p.add_argument("--index", help="a RepT index of the bench's fine-tuned model (default: DIR/rept-index)")
    right = p.add_mutually_exclusive_group(required=True)
    right.add_argument("--edit", help="the text that replaces the flagged span: the right answer")
    right.add_argument("--instead-file", help="the right answers by prompt (prompt, response columns)")
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="the contrast's hidden_states index")
    p.add_argument("--candidates", type=int, nargs="+", default=[100],
                   help="rows the index ranks highest that are scored (0: every row); one run per value")
    p.add_argument("--reference", type=int, default=DEFAULT_REFERENCE,
                   help="with --candidates N: the seeded sample of rows every query also scores")
    p.add_argument("--contrast-tokens", type=int, default=None,
                   help="compare only the first N tokens of the differing words (default: all)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    work = Path(args.work)
    tracer = Tracer(args.index or work / "rept-index")
    base = open_base(tracer)
    detector = Detector(args.detect)
    queries = traceable_queries(tracer.loaded.tokenizer, load_queries(str(work / "queries.jsonl")),
                                tracer.index.manifest["max_length"])
    flagged = [q for q in queries if q.flagged]
    if args.edit is not None:
        pairs = [(q, e[0]) for q in flagged if (e := edited(detector, q.response, args.edit)) and not detector(e[0])]
    else:
        right = {}
        for q in load_queries(args.instead_file):
            right.setdefault(q.prompt, q.response)  # the first answer given for a prompt
        pairs = [(q, right[q.prompt]) for q in flagged if q.prompt in right and right[q.prompt] != q.response]
    groups = {
        "flagged": ([q for q, _ in pairs], [e for _, e in pairs]),
        "mirror": ([Query(q.prompt, e, q.label, False) for q, e in pairs], [q.response for q, _ in pairs]),
    }
    if args.edit is not None and flagged and (wrong := detector.span(flagged[0].response)):
        said = rf"\b{re.escape(args.edit)}\b"
        controls = [q for q in queries if not q.flagged and re.search(said, q.response)]
        groups["control answers"] = (controls, [re.sub(said, flagged[0].response[wrong[0]:wrong[1]], q.response)
                                                for q in controls])
    label = json.loads((work / "results.json").read_text())["behaviour"]["label"]
    runs = {}
    for n in args.candidates:
        ct = ContrastTracer(tracer, base, layer=args.layer, candidates=n or None, reference=args.reference,
                            first_tokens=args.contrast_tokens)
        entry, t0 = {}, time.time()
        for group, (qs, instead) in groups.items():
            if not qs:
                continue
            run = ct.run(qs, instead)
            s, rows, labels = run.matrix()
            rel = relevance(labels, [Query("", "", label)])[0]
            entry[f"{group} P@10"] = round(precision_at_k(s, rel, 10), 3)
            entry[f"{group} queries"] = len(qs)
            if group == "flagged":
                entry["AP"] = round(average_precision(s, rel), 3)
                entry["flagged with a zero direction"] = sum(float(c.direction.norm()) == 0 for c in run.contrasts)
                if args.edit is None:
                    continue  # the words the behaviour is made of are known for an edit only
                results = run.results(k=10, tokens=True)
                hits = [h for r in results for h in r.hits if h.label == label]
                held = sum(any(detector(w["text"]) for w in sorted(h.words, key=lambda w: -w["score"])[:3])
                           for h in hits)
                entry["error rows in the top 10"] = len(hits)
                entry["their top 3 words hold the behaviour"] = round(held / max(1, len(hits)), 3)
        entry["seconds"] = round(time.time() - t0)
        name = f"candidates {n} + reference {args.reference}" if n else "every row"
        runs[name] = entry
        print(f"{name}: {json.dumps(entry)}", file=sys.stderr)
    print(f"{args.work}: contrast at layer {ct.layer}, base model {base.model_id}\n")
    print("| rows scored | flagged P@10 | AP | mirror P@10 | control answers P@10 | top-3 words hold it | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in runs.items():
        print(f"| {name} | {m.get('flagged P@10', '-')} | {m.get('AP', '-')} | {m.get('mirror P@10', '-')} "
              f"| {m.get('control answers P@10', '-')} | {m.get('their top 3 words hold the behaviour', '-')} "
              f"| {m['seconds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"work": args.work, "edit": args.edit,
                                               "instead_file": args.instead_file, "layer": ct.layer,
                                               "contrast_tokens": args.contrast_tokens,
                                               "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
