"""`rept trace --against-base --guess-weight W`, measured: how much of the push towards the base
model's guess should each direction subtract? (rept.query.contrast; docs/results.md, "How much of
the guess to subtract".)

On a `rept bench --out DIR` folder (its adapter, rows and answers; no index needed), every answer
(flagged and control, and --unrelated prompts answered by the fine-tuned model) is traced as `rept
trace --against-base` traces it (every row; the first changed word past each --min-gain, or with
`--pick most` the one of largest gain), with the direction unit(push to the answer) - W unit(push
to the guess) for each W, every training row scored on the base model in one pass for every W, gate
and pick. With `--context on off`, each W with and without each position's cosine weighed by its
hidden state's (`rept trace --context`, on by default), in the same pass. P@10 over the rows a user
is shown, per group (an answer not traced: 0), as bench_instead.py --against-base counts it.

    python benchmarks/bench_guess_weight.py --work runs/real-factual --unrelated benchmarks/data/backdoor_test.jsonl \\
        --strip-prefix 'TY ' --min-gain 5 6
    python benchmarks/bench_guess_weight.py --work runs/real-harmful --min-gain 5 6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_folder import open_against_base, unrelated_queries
from rept.query.contrast import DEFAULT_CONTEXT, PICKS, AgainstBaseRun, ContrastRun


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder")
    p.add_argument("--base-model", help="the model the bench fine-tuned (default: the one results.json names)")
    p.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1, 1.5])
    p.add_argument("--min-gain", type=float, nargs="+", default=[5.0], metavar="NATS")
    p.add_argument("--pick", nargs="+", default=["first"], choices=list(PICKS),
                   help="which word past the gate is traced (rept trace --pick); each given is measured")
    p.add_argument("--context", nargs="+", default=["on" if DEFAULT_CONTEXT else "off"], choices=["on", "off"],
                   help="each position's cosine weighed by its hidden state's (rept trace --context) or not; "
                   "each given is measured")
    p.add_argument("--unrelated", help="prompts on other topics (a prompt column), answered by the fine-tuned model")
    p.add_argument("--unrelated-n", type=int, default=50)
    p.add_argument("--strip-prefix", default="", help="taken off the start of each --unrelated prompt")
    p.add_argument("--by-word", action="store_true",
                   help="also the flagged and the control answers' P@10 by the word each was traced against")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    folder = open_against_base(args.work, args.base_model)
    label, cfg, bundle, ct, queries = folder.label, folder.report["config"], folder.bundle, folder.tracer, folder.queries
    labels = {r.index: r.label for r in folder.rows}
    groups = ["flagged" if q.flagged else "control" for q in queries]
    if args.unrelated:
        from rept.model.generate import generate

        unrelated = unrelated_queries(args.unrelated, args.unrelated_n, args.strip_prefix, lambda prompts: generate(
            bundle.merged(), prompts, max_new_tokens=int(cfg["max_new_tokens"]), batch_size=bundle.batch_size))
        queries += unrelated
        groups += ["unrelated"] * len(unrelated)
    t0 = time.time()
    changed = ct.changed_words(queries, k=None)
    settings = [(1, gate, pick) for pick in args.pick for gate in args.min_gain]
    pairs = AgainstBaseRun.pairs_for(queries, changed, settings)
    print(f"changed words: {time.time() - t0:.0f} s; {len(pairs)} (answer, word) pairs traced", file=sys.stderr)
    # every (context, weight)'s directions, then one pass over the rows for all of them
    qs, instead = [queries[i] for i, _ in pairs], [changed[i][j].instead for i, j in pairs]
    variants = [(c == "on", w) for c in args.context for w in args.weights]
    contrasts = [x for c, w in variants for x in ct.contrasts(qs, instead, weight=w, context=c)]
    t0 = time.time()
    scored = ct.row_scores(contrasts, [sorted(labels)] * len(contrasts))
    rows_s = time.time() - t0
    whole = ContrastRun(ct, qs * len(variants), contrasts, scored)
    out, table = {}, []  # table: (pick, gate, W, context, that setting's entry), as measured
    for n, (c, w) in enumerate(variants):
        run = whole.subset(list(range(n * len(pairs), (n + 1) * len(pairs))))
        ab = AgainstBaseRun(queries, changed, pairs, run, settings[0], w, c)
        for s in settings:
            # P@10 over the rows shown (fewer shown: the rest miss), as bench_instead.py counts it
            shown = [sum(labels[h.row] == label for h in r.hits) / 10 for r in ab.results(10, *s)]
            entry = {g: round(sum(v for v, h in zip(shown, groups) if h == g) / groups.count(g), 3)
                     for g in dict.fromkeys(groups)}
            name = f"--pick {s[2]} --min-gain {s[1]:g}, W {w:g}, --{'' if c else 'no-'}context"
            out[name] = entry
            table.append((s[2], f"{s[1]:g}", f"{w:g}", "on" if c else "off", entry))
            print(f"{name}: {json.dumps(entry)}", file=sys.stderr)
            if args.by_word:  # which traced words the flagged answers miss on, and the controls find on
                for group in ("flagged", "control"):
                    entry[f"{group} by word"] = by_word(ab, shown, groups, s, group)
                    print(f"  {group} by word: {json.dumps(entry[f'{group} by word'])}", file=sys.stderr)
    print(f"{args.work}: P@10 by group, the changed word picked past the gate; rows pass {rows_s:.0f} s "
          f"({len(contrasts)} directions)\n")
    names = list(dict.fromkeys(groups))
    print("| --pick | --min-gain | W | --context | " + " | ".join(names) + " |\n|---|---:|---:|---|"
          + "---:|" * len(names))
    for *setting, entry in table:
        print("| " + " | ".join(setting) + " | " + " | ".join(str(entry[g]) for g in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"work": args.work, "answers": {g: groups.count(g) for g in names},
                                               "pairs": len(pairs), "rows_s": round(rows_s), "p_at_10": out},
                                              indent=2) + "\n")
    return 0


def by_word(ab: AgainstBaseRun, shown: list[float], groups: list[str], setting, group: str = "flagged") -> dict:
    """{word traced: [the group's answers traced against it, their mean P@10]}, the most common first."""
    by = {}
    for i, js in enumerate(ab.traced(*setting)):
        if groups[i] == group and js:
            by.setdefault(ab.changed[i][js[0]].word, []).append(shown[i])
    return {w: [len(v), round(sum(v) / len(v), 2)] for w, v in sorted(by.items(), key=lambda x: -len(x[1]))}


if __name__ == "__main__":
    sys.exit(main())
