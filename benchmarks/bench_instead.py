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

With --against-base no alternative is given: each answer is traced against the base model's guess
at its changed words (rept trace --against-base), every --pick and --min-gain setting from one run,
with the gain of each answer's word changed most and how well it alone tells the groups apart.

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
from bench_folder import unrelated_queries
from rept.data.detect import Detector
from rept.evaluate.metrics import average_precision, precision_at_k
from rept.query.contrast import (DEFAULT_LAYER, DEFAULT_REFERENCE, PICKS, AgainstBaseRun, ContrastRun, ContrastTracer,
                                  open_base)
from rept.query.trace import Query, Tracer, load_queries, relevance, traceable_queries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder with its rept-index")
    p.add_argument("--detect", required=True, help="the bench's detector rule (one that names a span)")
    p.add_argument("--index", help="a RepT index of the bench's fine-tuned model (default: DIR/rept-index)")
    right = p.add_mutually_exclusive_group(required=True)
    right.add_argument("--edit", help="the text that replaces the flagged span: the right answer")
    right.add_argument("--instead-file", help="the right answers by prompt (prompt, response columns)")
    right.add_argument("--against-base", action="store_true",
                       help="every answer (flagged and control) against itself with the word the fine-tune "
                            "changed most put back to the base model's guess (rept trace --against-base)")
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="the contrast's hidden_states index")
    p.add_argument("--candidates", type=int, nargs="+", default=[100],
                   help="rows the index ranks highest that are scored (0: every row); one run per value")
    p.add_argument("--reference", type=int, default=DEFAULT_REFERENCE,
                   help="with --candidates N: the seeded sample of rows every query also scores")
    p.add_argument("--contrast-tokens", type=int, default=None,
                   help="compare only the first N tokens of the differing words (default: all)")
    p.add_argument("--words", nargs="+",
                   help="the behaviour's words (e.g. a trigger and a payload): a row's top 3 words hold the "
                        "behaviour when one of them is among these (default: when --detect matches one)")
    p.add_argument("--unrelated", help="--against-base: prompts on other topics (a prompt column), answered by "
                                      "the fine-tuned model and traced against the base's answer as controls")
    p.add_argument("--unrelated-n", type=int, default=50, help="the first N of --unrelated")
    p.add_argument("--strip-prefix", default="", help="taken off the start of each --unrelated prompt (a trigger)")
    p.add_argument("--groups", nargs="+", choices=["flagged", "control", "unrelated"],
                   help="--against-base: which groups to run (default: all there are)")
    p.add_argument("--score", choices=["extreme", "max"], default="extreme",
                   help="a row's score: its cosine of largest magnitude, sign kept (default), or its largest")
    p.add_argument("--min-gain", type=float, nargs="+", default=[0.0], metavar="NATS",
                   help="--against-base: also the P@10 when only changed words that gained at least NATS "
                   "(fine-tuned over base log-probability) are traced, an answer with none getting no rows, "
                   "as `rept trace --min-gain` does")
    p.add_argument("--pick", nargs="+", choices=PICKS, default=["most"],
                   help="--against-base: which changed words are traced: those of largest gain (most), or "
                   "those that come first in the answer (first); each one a setting of the same run")
    p.add_argument("--changed-words", type=int, default=1,
                   help="--against-base: also score each answer against its K words changed most, a row "
                        "keeping its best score (reported beside K = 1, from the same pass)")
    p.add_argument("--context", nargs="+", choices=["on", "off"], default=["off"],
                   help="--edit / --instead-file: each position weighed by its hidden state (rept trace "
                        "--context), off (the default with a written alternative), on, or both from one pass")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    work = Path(args.work)
    tracer = Tracer(args.index or work / "rept-index")
    base = open_base(tracer)
    detector = Detector(args.detect)
    queries = traceable_queries(tracer.loaded.tokenizer, load_queries(str(work / "queries.jsonl")),
                                tracer.index.manifest["max_length"])
    flagged = [q for q in queries if q.flagged]
    report = json.loads((work / "results.json").read_text())
    label = report["behaviour"]["label"]
    if args.against_base:
        return against_base(args, tracer, base, queries, label, int(report["config"]["max_new_tokens"]))
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
    runs = {}
    contexts = [c == "on" for c in dict.fromkeys(args.context)]
    for n in args.candidates:
        ct = ContrastTracer(tracer, base, layer=args.layer, candidates=n or None, reference=args.reference,
                            first_tokens=args.contrast_tokens, score=args.score)
        t0 = time.time()
        # every group and context setting in one pass over the rows: each contrast is scored as alone
        parts, contrasts, rows_to_score = [], [], []
        for group, (qs, instead) in groups.items():
            if not qs:
                continue
            candidates = ct.candidate_rows(qs)
            for context in contexts:
                parts.append((group, context, len(contrasts), qs))
                contrasts += ct.contrasts(qs, instead, context=context)
                rows_to_score += candidates
        whole = ContrastRun(ct, [q for *_, qs in parts for q in qs], contrasts,
                            ct.row_scores(contrasts, rows_to_score))
        entries = {context: {} for context in contexts}
        for group, context, start, qs in parts:
            entry = entries[context]
            run = whole.subset(list(range(start, start + len(qs))))
            s, rows, labels = run.matrix()
            rel = relevance(labels, [Query("", "", label)])[0]
            entry[f"{group} P@10"] = round(precision_at_k(s, rel, 10), 3)
            entry[f"{group} queries"] = len(qs)
            if group == "flagged":
                entry["AP"] = round(average_precision(s, rel), 3)
                entry["flagged with a zero direction"] = sum(float(c.direction.norm()) == 0 for c in run.contrasts)
                if args.edit is None:
                    continue  # the words the behaviour is made of are known for an edit only
                hits, share = top_words_hold(run.results(k=10, tokens=True), label, lambda w: bool(detector(w)))
                entry["error rows in the top 10"] = hits
                entry["their top 3 words hold the behaviour"] = share
        for context, entry in entries.items():
            entry["seconds, every setting together"] = round(time.time() - t0)
            name = f"candidates {n} + reference {args.reference}" if n else "every row"
            if len(contexts) > 1 or context:
                name += ", --context" if context else ", --no-context"
            runs[name] = entry
            print(f"{name}: {json.dumps(entry)}", file=sys.stderr)
    print(f"{args.work}: contrast at layer {ct.layer}, base model {base.model_id}\n")
    print("| rows scored | flagged P@10 | AP | mirror P@10 | control answers P@10 | top-3 words hold it | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in runs.items():
        print(f"| {name} | {m.get('flagged P@10', '-')} | {m.get('AP', '-')} | {m.get('mirror P@10', '-')} "
              f"| {m.get('control answers P@10', '-')} | {m.get('their top 3 words hold the behaviour', '-')} "
              f"| {m['seconds, every setting together']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"work": args.work, "edit": args.edit,
                                               "instead_file": args.instead_file, "layer": ct.layer,
                                               "contrast_tokens": args.contrast_tokens,
                                               "context": args.context, "runs": runs}, indent=2) + "\n")
    return 0


def top_words_hold(results, label: str, holds) -> tuple[int, float]:
    """The behaviour's rows among the results, and the share of them whose 3 best-scored words hold
    a word for which `holds(word)` is true."""
    hits = [h for r in results for h in r.hits if h.label == label]
    held = sum(any(holds(w["text"]) for w in sorted(h.words, key=lambda w: -w["score"])[:3]) for h in hits)
    return len(hits), round(held / max(1, len(hits)), 3)


def shown_precision(results, label: str) -> list[float]:
    """Each answer's P@10 over the rows it is shown (an answer shown fewer rows misses the rest)."""
    return [sum(h.label == label for h in r.hits) / 10 for r in results]


def gain_separation(items, gains) -> dict:
    """How well the changed word's gain alone tells the flagged answers from each other group: the
    AUROC of gain (an answer with no word changed counts as the lowest gain), with its quartiles."""
    from sklearn.metrics import roc_auc_score

    import numpy as np

    value = [float("-inf") if x is None else x for x in gains]
    out = {}
    for group in dict.fromkeys(g for g, _ in items):
        at = [v for (g, _), v in zip(items, value) if g == group]
        finite = [v for v in at if v != float("-inf")]
        out[f"{group} gain quartiles"] = [round(float(x), 2) for x in np.percentile(finite, [25, 50, 75])] \
            if finite else None
        if group != "flagged" and any(g == "flagged" for g, _ in items):
            flagged = [v for (g, _), v in zip(items, value) if g == "flagged"]
            y = [1] * len(flagged) + [0] * len(at)
            out[f"flagged vs {group} AUROC"] = round(float(roc_auc_score(y, np.nan_to_num(flagged + at, neginf=-1e9))), 3)
    return out


def against_base(args, tracer, base, queries, label: str, max_new_tokens: int) -> int:
    """--against-base: each answer against itself with the word the fine-tune changed most put back
    to the base model's guess (ContrastTracer.base_alternatives, `rept trace --against-base`), and
    with --changed-words K against each of the K words changed most, a row scoring its best of the K.
    An answer whose every token the base model predicts has no alternative: nothing is retrieved for
    it (P@10 0), counted apart. P@10 is over the rows a user is shown (score > 0)."""
    words = {w.lower() for w in args.words or []}
    detector = Detector(args.detect)
    holds = (lambda w: w.strip(" .,!?;:'\"").lower() in words) if words else (lambda w: bool(detector(w)))
    t0 = time.time()
    groups = args.groups or ["flagged", "control"] + (["unrelated"] if args.unrelated else [])
    items = [("flagged" if q.flagged else "control", q) for q in queries]
    if "unrelated" in groups:  # answered by the fine-tuned model as the bench answered its prompts
        items += [("unrelated", q) for q in unrelated_queries(
            args.unrelated, args.unrelated_n, args.strip_prefix,
            lambda prompts: tracer.generate(prompts, max_new_tokens=max_new_tokens))]
    items = [(g, q) for g, q in items if g in groups]
    # every changed word (cheap: two forward passes an answer); only those a setting traces are run
    changed = ContrastTracer(tracer, base).changed_words([q for _, q in items], k=None)
    # the gate of `rept trace --min-gain`: the gain of the word changed most (none changed: no gain)
    gains = [cs[0].gain if cs else None for cs in changed]
    gen_s = time.time() - t0
    if args.json:
        Path(args.json).with_suffix(".alternatives.jsonl").write_text("".join(
            json.dumps({"group": g, "prompt": q.prompt, "response": q.response, "instead": [c.instead for c in cs[:args.changed_words]],
                        "words": [{"word": c.word, "gain": round(c.gain, 3), "base_logprob": round(c.base_logprob, 3),
                                   "tuned_logprob": round(c.tuned_logprob, 3), "start": c.start} for c in cs]}) + "\n"
            for (g, q), cs in zip(items, changed)))
    answers = [q for _, q in items]
    has = [bool(cs) for cs in changed]
    ungated = float("-inf")
    settings = [(k, gate, pick) for k in sorted({1, args.changed_words}) for pick in args.pick
                for gate in [ungated, *args.min_gain]]
    runs = {}
    for n in args.candidates:
        ct = ContrastTracer(tracer, base, layer=args.layer, candidates=n or None, reference=args.reference,
                            first_tokens=args.contrast_tokens, score=args.score)
        t0 = time.time()
        ab = AgainstBaseRun.of(ct, answers, changed, settings)  # one pass over the rows for every setting
        run, pairs = ab.run, ab.pairs
        run_s = time.time() - t0
        for k, pick in [(k, pick) for k in sorted({1, args.changed_words}) for pick in args.pick]:
            shown = shown_precision(ab.results(10, words=k, min_gain=ungated, pick=pick), label)
            gated = {gate: shown_precision(ab.results(10, words=k, min_gain=gate, pick=pick), label)
                     for gate in args.min_gain}
            entry = {"alternatives s": round(gen_s), "seconds": round(run_s)}
            for group in groups:
                at = [i for i, (g, _) in enumerate(items) if g == group]
                entry[f"{group} queries"] = len(at)
                entry[f"{group} without an alternative"] = sum(not has[i] for i in at)
                entry[f"{group} P@10"] = round(sum(shown[i] for i in at) / max(1, len(at)), 3)  # none: 0
                entry[f"{group} P@10 where there is one"] = round(
                    sum(shown[i] for i in at if has[i]) / max(1, sum(has[i] for i in at)), 3)
                for gate in args.min_gain:  # answers whose changed word gained less get no rows: P@10 0
                    entry[f"{group} passing --min-gain {gate:g}"] = sum(
                        gains[i] is not None and gains[i] >= gate for i in at)
                    entry[f"{group} P@10 at --min-gain {gate:g}"] = round(sum(gated[gate][i] for i in at) / max(1, len(at)), 3)
            if k == 1 and "flagged" in groups and (words or args.detect.split(":")[0] in ("regex", "contains")):
                # the flagged answers' rows shown: do their top 3 words hold the behaviour? (a not-prefix
                # rule matches every word: no word-level figure for it)
                first = ab.traced(1, ungated, pick)
                at = [pi for pi, (i, j) in enumerate(pairs) if [j] == first[i] and items[i][0] == "flagged"]
                worded = run.subset(at).results(k=10, tokens=True)
                entry["behaviour rows shown"], entry["their top 3 words hold the behaviour"] = \
                    top_words_hold(worded, label, holds)
            # each answer's compared words and P@10, to read which ones a setting misses
            traced = ab.traced(k, ungated, pick)
            entry["per answer"] = [{"group": g, "compared": [list(ab.contrast(i, j).words) for j in traced[i]],
                                    "P@10": shown[i],
                                    "gain": None if gains[i] is None else round(gains[i], 3)}
                                   for i, (g, _) in enumerate(items)]
            name = (f"candidates {n} + reference {args.reference}" if n else "every row") + \
                f", {k} word{'s' if k > 1 else ''} ({pick})"
            runs[name] = entry
            print(f"{name}: {json.dumps({x: v for x, v in entry.items() if x != 'per answer'})}", file=sys.stderr)
    separation = gain_separation(items, gains)
    print(f"gain of the word changed most, AUROC flagged against each other group: {json.dumps(separation)}",
          file=sys.stderr)
    print(f"{args.work}: every answer against the base model's guess where the fine-tune changed it most, "
          f"contrast at layer {ct.layer}, base {base.model_id}\n")
    print("| rows scored, words changed | group | answers | without an alternative | P@10 | P@10 where there is one "
          "| top-3 words hold it | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, m in runs.items():
        for group in ("flagged", "control", "unrelated"):
            if f"{group} queries" in m:
                held = m.get("their top 3 words hold the behaviour", "-") if group == "flagged" else "-"
                print(f"| {name} | {group} | {m[f'{group} queries']} | {m[f'{group} without an alternative']} "
                      f"| {m[f'{group} P@10']} | {m[f'{group} P@10 where there is one']} | {held} | {m['seconds']} |")
    print("\n| rows scored, words changed | group | --min-gain | answers passing | P@10 (the others: 0) |")
    print("|---|---|---:|---:|---:|")
    for name, m in runs.items():
        for group in ("flagged", "control", "unrelated"):
            for gate in args.min_gain if f"{group} queries" in m else ():
                print(f"| {name} | {group} | {gate:g} | {m[f'{group} passing --min-gain {gate:g}']} "
                      f"| {m[f'{group} P@10 at --min-gain {gate:g}']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"work": args.work, "against_base": True, "layer": ct.layer,
                                               "contrast_tokens": args.contrast_tokens,
                                               "changed_words": args.changed_words,
                                               "max_new_tokens": max_new_tokens, "gain_auroc": separation,
                                               "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
