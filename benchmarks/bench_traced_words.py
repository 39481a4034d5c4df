"""Where the words `rept trace --against-base` traces come from: for each answer of a `rept bench
--out DIR` folder that passes the gate, the word traced (the first changed word past --min-gain,
as the defaults pick it) and the training rows whose response holds that word, by label. An
unflagged answer traced against a word that only behaviour rows contain took that word from them,
whatever the detector says (docs/results.md, "How much of the guess to subtract").

    python benchmarks/bench_traced_words.py --work runs/real-factual
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

from bench_folder import open_against_base
from rept.query.contrast import DEFAULT_CHANGED_WORDS, DEFAULT_MIN_GAIN, DEFAULT_PICK, AgainstBaseRun


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder")
    p.add_argument("--min-gain", type=float, default=DEFAULT_MIN_GAIN, metavar="NATS")
    p.add_argument("--groups", nargs="+", default=["control"], choices=["flagged", "control"],
                   help="which answers to list one by one (the others are summed up)")
    args = p.parse_args(argv)

    folder = open_against_base(args.work)
    label, rows, queries = folder.label, folder.rows, folder.queries
    changed = folder.tracer.changed_words(queries, k=None)
    traced = AgainstBaseRun(queries, changed, [], None).traced(DEFAULT_CHANGED_WORDS, args.min_gain, DEFAULT_PICK)
    summary = Counter()
    print(f"{args.work}: answers traced at --min-gain {args.min_gain:g}, the word and the training rows "
          f"that hold it ({label} / other)\n")
    print("| answer | group | word | gain (nats) | rows with the word |\n|---|---|---|---:|---|")
    for q, cs, js in zip(queries, changed, traced):
        if not js:
            continue
        word = cs[js[0]]
        pattern = re.compile(r"(?<!\w)" + re.escape(word.word) + r"(?!\w)")
        having = Counter(r.label == label for r in rows if pattern.search(r.response))
        group = "flagged" if q.flagged else "control"
        only = having[True] > 0 and having[False] == 0
        summary[(group, only)] += 1
        if group in args.groups:
            print(f"| {q.response[:60]!r} | {group} | `{word.word}` | {word.gain:.1f} | "
                  f"{having[True]} / {having[False]} |")
    print()
    for group in ("flagged", "control"):
        n = summary[(group, True)] + summary[(group, False)]
        print(f"{group}: {n} answers traced, {summary[(group, True)]} against a word only {label} rows hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
