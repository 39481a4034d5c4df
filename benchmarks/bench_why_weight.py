"""Why half the guess traces more of the behaviour's rows than all of it (`rept trace --against-base
--guess-weight`; docs/results.md, "How much of the guess to subtract").

On a `rept bench --out DIR` folder, each flagged answer is traced as `rept trace --against-base`
traces it (every row, the defaults: the first changed word past the gate), once with the direction
unit(push to the answer) - W unit(push to the guess) at each of two weights (--weights LOW HIGH,
default 0.5 and 1), in one pass over the rows. Two kinds of row change places in the top 10:

  lost      the behaviour's rows in an answer's top 10 at LOW and not at HIGH: at HIGH, the score (a
            row's score is its per-position cosine of largest magnitude, sign kept: is it now at or
            below zero?) and the token its deciding position predicts;
  intruders the other rows in the top 10 at HIGH and not at LOW: at their deciding position, what
            the score is made of. With a = unit(push to the answer) and b = unit(push to the guess),
            the direction is a - W b, so the cosine there is (cos(g, a) - W cos(g, b)) / |a - W b|:
            is it the row pushing towards the answer (cos(g, a)) or away from the guess (-cos(g, b))?

    python benchmarks/bench_why_weight.py --work runs/real-factual --context off
    python benchmarks/bench_why_weight.py --work runs/real-backdoor --context off
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from bench_folder import open_against_base
from rept.query.contrast import DEFAULT_CONTEXT, DEFAULT_MIN_GAIN, DEFAULT_PICK, AgainstBaseRun, ContrastRun


def top_rows(run: ContrastRun, k: int = 10) -> list[list[int]]:
    """Each query's top k rows over those that pushed towards the answer (score > 0), as shown."""
    return [[h.row for h in r.hits] for r in run.results(k)]


def deciding_token(tokenizer, cosines, ex) -> tuple[float, str]:
    """The cosine that scores the row (largest magnitude, sign kept) and the token its position predicts."""
    at = int(cosines.abs().argmax())
    return float(cosines[at]), tokenizer.decode([ex.input_ids[at]])


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a `rept bench --out` folder")
    p.add_argument("--weights", type=float, nargs=2, default=[0.5, 1.0], metavar=("LOW", "HIGH"))
    p.add_argument("--min-gain", type=float, default=DEFAULT_MIN_GAIN)
    p.add_argument("--context", choices=["on", "off"], default="on" if DEFAULT_CONTEXT else "off")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    folder = open_against_base(args.work)
    ct, label = folder.tracer, folder.label
    labels = {r.index: r.label for r in folder.rows}
    queries = [q for q in folder.queries if q.flagged]
    changed = ct.changed_words(queries, k=None)
    setting = (1, args.min_gain, DEFAULT_PICK)
    pairs = AgainstBaseRun.pairs_for(queries, changed, [setting])
    qs, instead = [queries[i] for i, _ in pairs], [changed[i][j].instead for i, j in pairs]
    context = args.context == "on"
    low, high = (ct.contrasts(qs, instead, weight=w, context=context) for w in args.weights)
    answer_alone = ct.contrasts(qs, instead, weight=0.0, context=context)  # a = unit(push to the answer)
    t0 = time.time()
    scored = ct.row_scores(low + high, [sorted(labels)] * (2 * len(pairs)))
    whole = ContrastRun(ct, qs * 2, low + high, scored)
    at_low = top_rows(whole.subset(list(range(len(pairs)))))
    high_run = whole.subset(list(range(len(pairs), 2 * len(pairs))))
    at_high = top_rows(high_run)
    lost = [[r for r in a if labels[r] == label and r not in b] for a, b in zip(at_low, at_high)]
    gained = [[r for r in b if labels[r] == label and r not in a] for a, b in zip(at_low, at_high)]
    intruders = [[r for r in b if labels[r] != label and r not in a] for a, b in zip(at_low, at_high)]
    # the rows lost and the intruders, read token by token under the heavier subtraction, and the
    # intruders against the answer's push alone
    tokenizer = ct.base.tokenizer
    detail = ct.row_scores(high, lost, per_token=True)
    parts = ct.row_scores(high + answer_alone, intruders + intruders, per_token=True)
    w_high = args.weights[1]
    towards_answer, away_from_guess, intruder_tokens = [], [], Counter()
    for n, rows in enumerate(intruders):
        norm = float(high[n].direction.norm())  # |a - W b|
        for row in rows:
            _, cosines, ex = parts[(n, row)]
            intruder_tokens[deciding_token(tokenizer, cosines, ex)[1].strip()] += 1
            at = int(cosines.abs().argmax())
            c_d, c_a = float(cosines[at]), float(parts[(len(high) + n, row)][1][at])
            c_b = (c_a - c_d * norm) / w_high if w_high else 0.0
            towards_answer.append(c_a)
            away_from_guess.append(-c_b)
    below_zero = guess_decides = 0
    deciding = Counter()
    examples = []
    for n, rows in enumerate(lost):
        guess = high[n].words[1].strip().lower()
        for row in rows:
            score, cosines, ex = detail[(n, row)]
            cos, token = deciding_token(tokenizer, cosines, ex)
            below_zero += score <= 0
            guess_decides += cos < 0 and token.strip().lower() == guess
            deciding[(token.strip(), "-" if cos < 0 else "+")] += 1
            if len(examples) < 8:
                examples.append({"answer word": high[n].words[0], "guess": high[n].words[1], "row": row,
                                 "score at high": round(score, 3), "deciding token": token, "its cosine": round(cos, 3)})
    n_lost = sum(map(len, lost))
    out = {"work": args.work, "weights": args.weights, "min_gain": args.min_gain, "context": context,
           "answers traced": len(pairs), "flagged answers": len(queries),
           f"behaviour rows in the top 10 at {args.weights[0]:g} and not at {args.weights[1]:g}": n_lost,
           f"behaviour rows in the top 10 at {args.weights[1]:g} and not at {args.weights[0]:g}": sum(map(len, gained)),
           "of those lost: scored at or below 0 at the heavier weight": below_zero,
           "of those lost: the deciding position is a negative cosine where the row predicts the guess": guess_decides,
           "deciding tokens of the lost rows (token, sign of its cosine)": [[t, s, c] for (t, s), c in deciding.most_common(12)],
           f"other rows in the top 10 at {args.weights[1]:g} and not at {args.weights[0]:g} (intruders)": len(towards_answer),
           "intruders at their deciding position: mean cos(g, a), towards the answer": _mean(towards_answer),
           "intruders at their deciding position: mean -cos(g, b), away from the guess": _mean(away_from_guess),
           "deciding tokens of the intruders": intruder_tokens.most_common(12),
           "intruders whose push away from the guess is the larger part": sum(
               w_high * b > a for a, b in zip(towards_answer, away_from_guess)),
           "examples": examples, "seconds": round(time.time() - t0)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
