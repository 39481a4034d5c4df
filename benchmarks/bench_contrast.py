"""Does contrasting a query with a corrected answer trace the behaviour better? (A variant tried
for the quality bar of docs/results.md; it did not help, so it is not a rept mode.)

On what `rept bench --out DIR` left in DIR (base/, adapter/, train_rows.jsonl, queries.jsonl),
each query gets a reference answer and is traced, at the bench's RepT layer, by the difference
between the gradient of its response's loss and that of the reference at the same prompt,
g(response) - g(reference). h is the same for both (the same last prompt position), so it cancels:
the topic a query shares with its controls drops out, which is what the harmful-tuning controls need.

Reference of a flagged query (--reference):
  base         the base model's greedy answer to the prompt (before the poisoned fine-tune)
  edit:TEXT    the response with what the detector rule matched replaced by TEXT (an empty TEXT
               deletes it; for not-prefix / not-contains rules, which match no part of the
               answer, TEXT is the whole reference, e.g. a refusal)
  file:PATH    corrected answers given per prompt (prompt, response columns)
Control queries are always contrasted with the base model's answer: two answers without the
behaviour, so a method that still ranks poisoned rows for them traces something else.

Scored exactly like `rept bench` (rept.evaluate.metrics, relevant row = the behaviour's label, rows
cut off at max_length left out, so AP is over the kept rows): P@10, AP, control_P@10 for
  repgrad                     g(response) alone (the bench's repgrad)
  contrast                    g(response) - g(reference)
  contrast, unit halves       g(response)/|g(response)| - g(reference)/|g(reference)|
  -g(reference)               the reference's gradient alone, negated
  balanced h + contrast       rept-balanced with the query's g replaced by the contrast

    python benchmarks/bench_contrast.py --work runs/harmful --detect "not-prefix:I'm sorry" \\
        --reference file:benchmarks/data/harmful-tuning_test.jsonl --json contrast.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from bench_folder import open_bench_folder
from rept.model.generate import answer_and_detect
from rept.data.detect import Detector
from rept.methods.rept import extract_hg
from rept.evaluate.metrics import average_precision, precision_at_k
from rept.model.loading import load_model
from rept.query.search import unit_rows
from rept.query.trace import load_queries


def corrected(detector: Detector, response: str, text: str) -> str:
    kind, _, arg = detector.rule.partition(":")
    if kind in ("prefix", "contains"):
        return response.replace(arg, text, 1 if kind == "prefix" else -1)
    if kind == "regex":
        return re.sub(arg, lambda _: text, response)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder")
    p.add_argument("--detect", required=True, help="the bench's detector rule")
    p.add_argument("--reference", default="base", help="base, edit:TEXT or file:PATH (see above)")
    p.add_argument("--layer", default=None, help="RepT layer (default: the bench's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="for base answers (default: the bench's)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    folder = open_bench_folder(args.work, int(args.layer) if args.layer is not None else None)
    cfg, layer, bundle = folder.report["config"], folder.layer, folder.bundle
    rows, relevant, queries, fits = folder.rows, folder.relevant, folder.queries, folder.fits
    detector = Detector(args.detect)
    kind, _, arg = args.reference.partition(":")
    if args.reference != "base" and kind not in ("edit", "file"):
        p.error(f"bad --reference '{args.reference}': use base, edit:TEXT or file:PATH")
    corrections = {q.prompt: q.response for q in load_queries(arg)} if kind == "file" else {}

    prompts = list(dict.fromkeys(q.prompt for q in queries))
    base = answer_and_detect(load_model(bundle.model), prompts, detector,
                             max_new_tokens=args.max_new_tokens or cfg["max_new_tokens"], batch_size=32, progress=False)
    base_answer = {q.prompt: q.response for q in base}

    def reference(q):
        if not q.flagged or args.reference == "base":
            return base_answer[q.prompt]
        if kind == "edit":
            return corrected(detector, q.response, arg)
        if q.prompt not in corrections:
            p.error(f"--reference {args.reference}: no corrected answer for '{q.prompt[:60]}'")
        return corrections[q.prompt]

    pairs = [(q, reference(q)) for q in queries]
    pairs = [(q, ref) for q, ref in pairs if fits(q.prompt, ref)]
    h, g, _ = extract_hg(bundle, [(r["prompt"], r["response"]) for r in rows], "training row")
    train_g, train_bal = unit_rows(g), np.concatenate([unit_rows(h, 2 ** -0.5), unit_rows(g, 2 ** -0.5)], axis=1)
    table, same, norms = {}, {}, {}
    for group in ("flagged", "control"):
        chosen = [(q, ref) for q, ref in pairs if bool(q.flagged) == (group == "flagged")]
        if not chosen:
            continue
        same[group] = sum(q.response == ref for q, ref in chosen)
        hq, gq, _ = extract_hg(bundle, [(q.prompt, q.response) for q, _ in chosen], "query")
        _, gr, _ = extract_hg(bundle, [(q.prompt, ref) for q, ref in chosen], "reference")
        norms[group] = (float(np.median(np.linalg.norm(gq, axis=1))), float(np.median(np.linalg.norm(gr, axis=1))))
        scores = {
            "repgrad": unit_rows(gq) @ train_g.T,
            "contrast": unit_rows(gq - gr) @ train_g.T,
            "contrast, unit halves": unit_rows(unit_rows(gq) - unit_rows(gr)) @ train_g.T,
            "-g(reference)": unit_rows(-gr) @ train_g.T,
            "balanced h + contrast": np.concatenate([unit_rows(hq, 2 ** -0.5), unit_rows(gq - gr, 2 ** -0.5)], 1)
            @ train_bal.T,
        }
        for name, s in scores.items():
            entry = table.setdefault(name, {})
            if group == "flagged":
                entry["P@10"] = round(precision_at_k(s, relevant, 10), 3)
                entry["AP"] = round(average_precision(s, relevant), 3)
            else:
                entry["control_P@10"] = round(precision_at_k(s, relevant, 10), 3)

    n_flagged = sum(bool(q.flagged) for q, _ in pairs)
    print(f"{args.work}: layer {layer}, {len(rows)} rows, {n_flagged} flagged / {len(pairs) - n_flagged} control "
          f"queries, reference of flagged queries: {args.reference} (identical to the response: "
          f"{same.get('flagged', 0)} flagged, {same.get('control', 0)} control)\n")
    for group, (resp, ref) in norms.items():
        print(f"{group}: median |g(response)| {resp:.4g}, median |g(reference)| {ref:.4g}")
    print()
    print("| query vector | P@10 | AP | control_P@10 |\n|---|---:|---:|---:|")
    for name, m in table.items():
        print(f"| {name} | {m.get('P@10', '-')} | {m.get('AP', '-')} | {m.get('control_P@10', '-')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"work": args.work, "layer": layer, "reference": args.reference,
                                               "identical": same, "median_norms": norms, "results": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
